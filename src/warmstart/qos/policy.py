"""Differentiated-SLO colocation policy: Koordinator's formulas as pure functions.

Latency-sensitive (LS) work reserves far more than it uses; best-effort (BE) work runs on
what LS leaves idle and gives it back the moment LS wants it.  This module decides *how
much* BE may have; ``usage.py`` measures, ``enforce.py`` writes the answers to cgroupfs.
Nothing here touches the system, so every decision is a unit test away.

Units everywhere: CPU in cores (float), memory in bytes (int), time in seconds from a
monotonic clock (float), CFS quota/burst in microseconds (int).

The formulas (koordinator-sh/koordinator, see ``shared/REFERENCES.md``, "Colocation"):

* **Reclaimed capacity** (what BE admission may hand out)::

      reclaimed = capacity * reclaim_threshold - smoothed LS usage
                  - max(system usage, reserved)             clamped at 0

  and withdrawn (zero) when the metrics behind it are stale.
* **BE CPU suppress** (what BE may use right now)::

      be_limit = capacity * suppress_threshold - LS usage - max(system usage, reserved)

  BE always runs at the lowest weight (and, with ``be_sched_idle``, in the kernel's idle
  class) at the root of the hierarchy, so LS takes a CPU back from BE at its next
  wake-up; this limit is a *ceiling* on top of that, enforced as configured
  (``be_cpu_policy``): not at all (``none``, the default: BE's grant is then what LS and
  the system leave idle, ``be_cpu_idle``), as a CFS quota (``quota``), or as a cpuset of
  whole cores (``cpuset``).
  Quota and cpuset shrink at once when LS needs the CPU and grow back by at most
  ``cpuset_grow_step`` of the node per step.
* **Small nodes.** Both CPU thresholds are scaled by ``effective_threshold``: Koordinator's
  headroom (1 - threshold) applies to every core beyond the first
  ``headroom_exempt_cores``::

      effective = 1 - (1 - threshold) * (capacity - exempt) / capacity

  2 cores: 60% -> 80%, 65% -> 82.5%; 8 cores: 65% / 69%; 64 cores: 60.6% / 65.5%.
* **BE admission**: each BE instance counts ``be_cpu_request`` cores and at least
  ``be_memory_request_mb``; as many run as the reclaimed capacity holds.
* **LS CPU burst**: an LS cgroup that was throttled while the shared pool is below
  ``ls_burst_pool_threshold`` busy may bank unused quota (``cpu.cfs_burst_us``).
* **Eviction**: node memory at or above ``memory_evict_upper`` evicts BE instances
  (lowest priority first, then largest usage) until the node is below
  ``memory_evict_lower``; BE CPU satisfaction (granted / requested) below
  ``be_cpu_satisfaction_lower`` over a window, while BE uses at least
  ``be_cpu_usage_threshold`` of its grant, evicts BE until satisfaction would reach
  ``be_cpu_satisfaction_upper``.

"System usage" is whatever the node uses outside the LS and BE subtrees (the worker
itself, the kernel, other daemons): node usage - LS usage - BE usage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CPU_PERIOD_US = 100_000
BE_CPU_POLICIES = ("none", "quota", "cpuset")


@dataclass(frozen=True)
class QoSConfig:
    """Every threshold of the QoS manager.  Defaults are Koordinator's, scaled to small
    (2-core) nodes and a loop of about one second.

    Fractions are of node capacity unless stated otherwise.
    """

    # -- reclaimed capacity (BE admission) ------------------------------------------
    cpu_reclaim_threshold: float = 0.60
    """Share of node CPU that LS + system + BE together may be planned against (60%)."""
    memory_reclaim_threshold: float = 0.65
    """Share of node memory LS + system + BE may be planned against (65%)."""
    reserved_cpu_cores: float = 0.0
    """CPU set aside for the system; the formula uses max(system usage, this)."""
    reserved_memory_bytes: int = 0
    """Memory set aside for the system; the formula uses max(system usage, this)."""
    stale_after_s: float = 5.0
    """A sample older than this withdraws all reclaimed capacity (Koordinator degrades
    after minutes of missing metrics; five one-second loops here)."""
    smoothing_alpha: float = 0.2
    """Weight of a new sample in the moving average when usage falls (slow decay)."""
    smoothing_alpha_rise: float = 0.6
    """Weight of a new sample when usage rises: LS growth is believed quickly, so BE
    gives capacity back quickly and takes it again only slowly."""

    headroom_exempt_cores: float = 1.0
    """Cores exempt from the headroom the CPU thresholds keep (``effective_threshold``).

    Koordinator's thresholds keep 35-40% of a node out of BE's reach so that LS can grow
    between two loop ticks without waiting for BE to be squeezed.  Here BE runs at the
    lowest weight at the root of the hierarchy, so a waking LS task takes a CPU from BE
    without waiting for the loop, and the headroom no longer guards LS latency itself; on
    a 2-core node the unscaled 60% leaves BE about a third of the CPU LS leaves idle
    (capacity x 0.6 - LS - system) by construction.
    Exempting the first core gives 80% on 2 cores and converges to Koordinator's values
    on large nodes (64 cores: 60.6%).  0 restores the plain percentages."""

    # -- BE admission ------------------------------------------------------------------
    be_cpu_request: float = 0.25
    """Cores each running BE instance counts against the reclaimed CPU.  A BE instance
    runs one invocation at a time and uses between nothing (waiting on I/O) and one core;
    a quarter lets about four run in the ~1 core a 2-core node typically reclaims, and
    they share whatever CPU LS leaves idle at the lowest priority."""
    be_memory_request_mb: int = 128
    """Memory each BE instance counts at least (its MemorySize counts when larger)."""

    # -- BE CPU suppress -------------------------------------------------------------
    be_sched_idle: bool = False
    """Also put the BE subtree in the kernel's idle class (``cpu.idle=1``, mainline >=
    5.15), on top of the lowest weight.  Off by default, by measurement: the scheduler
    counts a CPU running only idle-class tasks as idle when it places a waking task, so
    with BE everywhere the worker's wake-ups went to the other CPU instead of staying on
    the one that woke it, and on this VM that cost it ~0.9 ms of run-queue wait per LS
    request (0.15 ms with the weight alone) and LS 1.29x its p99 alone (0.97x with the
    weight alone; docs/benchmarks.md).  The lowest weight at the hierarchy's root already
    lets EEVDF hand the CPU to a waking LS task.  On bare metal, where a cross-CPU wake-up
    is a cheap IPI, the idle class's strict priority may be worth turning on."""
    be_cpu_policy: str = "none"
    """How the BE CPU limit is enforced on top of BE's scheduling class: ``none`` (not
    enforced: the lowest weight keeps BE behind LS, and the limit only serves as BE's
    grant for CPU-satisfaction eviction), ``quota`` (a CFS quota on the BE subtree with
    period ``be_cfs_period_us``) or ``cpuset`` (whole cores, the highest-numbered ones).
    Both ceilings cost LS tail latency and BE throughput in the measurements behind the
    default (docs/benchmarks.md)."""
    be_cfs_period_us: int = CPU_PERIOD_US
    """CFS period of the BE quota (``quota`` policy).  The kernel's 100 ms: a 20 ms period
    releases throttled BE five times as often, and measured here it cost LS more at the
    tail than 100 ms did (docs/benchmarks.md, Colocation)."""
    be_cpu_suppress_threshold: float = 0.65
    """BE CPU limit = capacity * this (scaled, ``effective_threshold``) - LS usage -
    system usage (65%)."""
    be_min_cpu_cores: int = 1
    """The BE cpuset never shrinks below this many whole cores (Koordinator keeps 2 on
    big nodes; 1 on a 2-core node)."""
    be_min_quota_cores: float = 0.1
    """Floor of the BE CFS quota, so suppressed BE still makes (slow) progress and CPU
    satisfaction eviction, not starvation, decides its fate."""
    cpuset_grow_step: float = 0.10
    """BE CPU grows by at most this share of the node per step (at least one core for a
    cpuset); it shrinks at once."""

    # -- LS CPU burst ----------------------------------------------------------------
    ls_burst_pool_threshold: float = 0.50
    """Grant burst only while the shared CPU pool is less busy than this (50%)."""
    ls_burst_ratio: float = 1.0
    """Burst = quota * this.  The kernel refuses a burst larger than the quota, so the
    result is capped at the quota (Koordinator's 1000% would be cut to 100% anyway)."""

    # -- eviction --------------------------------------------------------------------
    memory_evict_upper: float = 0.70
    """Node memory at or above this evicts BE work (70%)."""
    memory_evict_lower: float = 0.68
    """... until node memory is below this (68%)."""
    be_cpu_satisfaction_lower: float = 0.60
    """Evict when BE's granted / requested CPU averages below this over the window."""
    be_cpu_satisfaction_upper: float = 0.80
    """... releasing BE requests until satisfaction would reach this."""
    be_cpu_usage_threshold: float = 0.90
    """... and only while BE actually uses at least this share of its grant (90%)."""
    be_cpu_evict_window_s: float = 30.0
    """The window over which satisfaction and usage are averaged."""

    # -- memory QoS --------------------------------------------------------------------
    be_memory_limit: bool = True
    """Cap the whole BE subtree at the reclaimed memory (``be_memory_cap``), so a BE
    burst is throttled and reclaimed inside BE instead of pushing the node into global
    reclaim that LS would pay for."""
    be_memory_floor_mb: int = 256
    """The cap never goes below this: BE keeps room to start while LS is busy."""
    idle_reclaim_after_s: float = 10.0
    """An instance idle (or frozen) this long has its page cache reclaimed (0: never)."""
    idle_reclaim_min_cache_mb: int = 4
    """... when it holds at least this much of it."""

    def __post_init__(self) -> None:
        fractions = {
            "cpu_reclaim_threshold": self.cpu_reclaim_threshold,
            "memory_reclaim_threshold": self.memory_reclaim_threshold,
            "be_cpu_suppress_threshold": self.be_cpu_suppress_threshold,
            "cpuset_grow_step": self.cpuset_grow_step,
            "ls_burst_pool_threshold": self.ls_burst_pool_threshold,
            "memory_evict_upper": self.memory_evict_upper,
            "memory_evict_lower": self.memory_evict_lower,
            "be_cpu_satisfaction_lower": self.be_cpu_satisfaction_lower,
            "be_cpu_satisfaction_upper": self.be_cpu_satisfaction_upper,
            "be_cpu_usage_threshold": self.be_cpu_usage_threshold,
        }
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        for name, value in (
            ("smoothing_alpha", self.smoothing_alpha),
            ("smoothing_alpha_rise", self.smoothing_alpha_rise),
        ):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be within (0, 1], got {value}")
        if self.memory_evict_lower > self.memory_evict_upper:
            raise ValueError("memory_evict_lower must not exceed memory_evict_upper")
        if self.be_cpu_satisfaction_lower > self.be_cpu_satisfaction_upper:
            raise ValueError("be_cpu_satisfaction_lower must not exceed the upper bound")
        if self.be_min_cpu_cores < 0 or self.be_min_quota_cores < 0:
            raise ValueError("BE minimums must not be negative")
        if self.reserved_cpu_cores < 0 or self.reserved_memory_bytes < 0:
            raise ValueError("reservations must not be negative")
        if self.stale_after_s <= 0 or self.be_cpu_evict_window_s <= 0:
            raise ValueError("stale_after_s and be_cpu_evict_window_s must be positive")
        if self.ls_burst_ratio < 0:
            raise ValueError("ls_burst_ratio must not be negative")
        if self.be_cpu_policy not in BE_CPU_POLICIES:
            raise ValueError(f"be_cpu_policy must be one of {BE_CPU_POLICIES}")
        if not 1000 <= self.be_cfs_period_us <= 1_000_000:
            raise ValueError("be_cfs_period_us must be within [1000, 1000000] (the kernel's)")
        if self.headroom_exempt_cores < 0:
            raise ValueError("headroom_exempt_cores must not be negative")
        if self.be_cpu_request < 0 or self.be_memory_request_mb < 0:
            raise ValueError("BE requests must not be negative")
        if (
            self.be_memory_floor_mb < 0
            or self.idle_reclaim_after_s < 0
            or self.idle_reclaim_min_cache_mb < 0
        ):
            raise ValueError("memory QoS settings must not be negative")


DEFAULT_CONFIG = QoSConfig()


@dataclass(frozen=True)
class NodeSample:
    """Node usage over one sampling interval (``usage.Sampler`` produces these).

    ``timestamp`` is the monotonic time of the end of the interval.  System usage is not
    measured directly: it is what the node uses outside the LS and BE subtrees.
    """

    timestamp: float
    capacity_cpus: float
    capacity_memory_bytes: int
    node_cpu_used: float
    node_memory_used: int
    ls_cpu_used: float
    ls_memory_used: int
    be_cpu_used: float = 0.0
    be_memory_used: int = 0

    @property
    def system_cpu_used(self) -> float:
        return max(0.0, self.node_cpu_used - self.ls_cpu_used - self.be_cpu_used)

    @property
    def system_memory_used(self) -> int:
        return max(0, self.node_memory_used - self.ls_memory_used - self.be_memory_used)

    @property
    def cpu_busy_fraction(self) -> float:
        """Node CPU busy share (0..1): the "shared pool" of ``ls_burst``."""
        if self.capacity_cpus <= 0:
            return 1.0
        return min(1.0, max(0.0, self.node_cpu_used / self.capacity_cpus))


@dataclass(frozen=True)
class Reclaimed:
    """Capacity BE admission may hand out; ``stale`` when withdrawn for old metrics."""

    cpu_cores: float
    memory_bytes: int
    stale: bool = False


@dataclass(frozen=True)
class BEUsage:
    """One BE instance (or job) as the eviction policies see it.

    ``priority``: higher is more important; the lowest goes first.  ``cpu_request`` is
    what the instance asked for (its share of "requested" in CPU satisfaction).
    """

    id: str
    priority: int = 0
    memory_bytes: int = 0
    cpu_used: float = 0.0
    cpu_request: float = 0.0


@dataclass(frozen=True)
class BECPUSample:
    """One loop's view of BE CPU for satisfaction eviction.

    ``granted_cores``: the limit BE ran under (CFS quota in cores, or cpuset size);
    ``requested_cores``: the sum of BE instances' requests; ``used_cores``: measured.
    """

    timestamp: float
    granted_cores: float
    requested_cores: float
    used_cores: float


# -- smoothing -------------------------------------------------------------------------


def ewma(previous: float | None, value: float, config: QoSConfig = DEFAULT_CONFIG) -> float:
    """Exponential moving average that believes rises faster than falls.

    ``previous`` None starts the average at ``value``.
    """
    if previous is None:
        return value
    alpha = config.smoothing_alpha_rise if value > previous else config.smoothing_alpha
    return previous + alpha * (value - previous)


def smooth(
    previous: NodeSample | None, sample: NodeSample, config: QoSConfig = DEFAULT_CONFIG
) -> NodeSample:
    """Smooth the usage fields of ``sample`` against the previous *smoothed* sample.

    Capacity and timestamp come from ``sample`` (so staleness follows the newest raw
    reading).  Keep the result and pass it back as ``previous`` next time.
    """
    if previous is None:
        return sample

    def f(old: float, new: float) -> float:
        return ewma(old, new, config)

    def m(old: int, new: int) -> int:
        return round(ewma(float(old), float(new), config))

    return NodeSample(
        timestamp=sample.timestamp,
        capacity_cpus=sample.capacity_cpus,
        capacity_memory_bytes=sample.capacity_memory_bytes,
        node_cpu_used=f(previous.node_cpu_used, sample.node_cpu_used),
        node_memory_used=m(previous.node_memory_used, sample.node_memory_used),
        ls_cpu_used=f(previous.ls_cpu_used, sample.ls_cpu_used),
        ls_memory_used=m(previous.ls_memory_used, sample.ls_memory_used),
        be_cpu_used=f(previous.be_cpu_used, sample.be_cpu_used),
        be_memory_used=m(previous.be_memory_used, sample.be_memory_used),
    )


def is_stale(sample: NodeSample, config: QoSConfig, now: float) -> bool:
    """True when ``sample`` is older than ``config.stale_after_s`` at ``now``."""
    return now - sample.timestamp > config.stale_after_s


# -- reclaimed capacity ----------------------------------------------------------------


def effective_threshold(
    threshold: float, capacity: float, config: QoSConfig = DEFAULT_CONFIG
) -> float:
    """A CPU threshold scaled to the node's size: the headroom ``1 - threshold`` applies
    only to the cores beyond ``headroom_exempt_cores`` (see that field for why).

    A node no larger than the exempt cores keeps no headroom at all (1.0).
    """
    if capacity <= 0:
        return threshold
    exempt = min(capacity, config.headroom_exempt_cores)
    return 1.0 - (1.0 - threshold) * (capacity - exempt) / capacity


def reclaimed(sample: NodeSample, config: QoSConfig = DEFAULT_CONFIG, *, now: float) -> Reclaimed:
    """Capacity BE may be admitted against (Koordinator's usage policy).

    ``sample`` should be smoothed (``smooth``); ``now`` is the current monotonic time.
    Stale metrics withdraw everything: when we cannot see LS, we must not lend its CPU.
    """
    if is_stale(sample, config, now):
        return Reclaimed(0.0, 0, stale=True)
    threshold = effective_threshold(config.cpu_reclaim_threshold, sample.capacity_cpus, config)
    cpu = (
        sample.capacity_cpus * threshold
        - sample.ls_cpu_used
        - max(sample.system_cpu_used, config.reserved_cpu_cores)
    )
    memory = (
        sample.capacity_memory_bytes * config.memory_reclaim_threshold
        - sample.ls_memory_used
        - max(sample.system_memory_used, config.reserved_memory_bytes)
    )
    return Reclaimed(max(0.0, cpu), max(0, int(memory)))


def be_memory_cap(reclaimed: Reclaimed, config: QoSConfig = DEFAULT_CONFIG) -> int | None:
    """What the whole BE subtree may hold: the reclaimed memory (capacity x threshold -
    LS - system), at least ``be_memory_floor_mb``; None while the metrics are stale (the
    cap in force stays: blind, it must neither grow nor squeeze BE)."""
    if reclaimed.stale:
        return None
    return max(reclaimed.memory_bytes, config.be_memory_floor_mb << 20)


# -- BE admission ---------------------------------------------------------------------


def be_admission(
    reclaimed: Reclaimed,
    running: int,
    running_memory_mb: int,
    config: QoSConfig = DEFAULT_CONFIG,
    *,
    most: int,
    least: int = 0,
) -> int:
    """How many BE instances may run at once.

    Each counts ``be_cpu_request`` cores against the reclaimed CPU, and its MemorySize
    (``running_memory_mb`` in total for the ``running`` ones; at least
    ``be_memory_request_mb`` each for new ones) against the reclaimed memory.  The
    result is within [``least``, ``most``]: ``least`` keeps BE work from starving for
    ever on a node LS keeps busy (it still runs at the lowest priority).
    """
    request = config.be_cpu_request
    by_cpu = most if request <= 0 else int(reclaimed.cpu_cores / request + 1e-9)
    free_mb = max(0, (reclaimed.memory_bytes >> 20) - running_memory_mb)
    per = config.be_memory_request_mb
    by_memory = most if per <= 0 else running + free_mb // per
    return max(least, min(most, by_cpu, by_memory))


# -- BE CPU suppress ------------------------------------------------------------------


def be_cpu_limit(sample: NodeSample, config: QoSConfig = DEFAULT_CONFIG, *, now: float) -> float:
    """Cores BE may use now: capacity * suppress threshold (scaled to the node,
    ``effective_threshold``) - LS - max(system, reserved).

    Clamped at 0 (and 0 for stale metrics); the enforcement floors
    (``be_min_quota_cores``, ``be_min_cpu_cores``) are applied by ``be_cfs_quota_us`` and
    ``be_cpuset_cores``.
    """
    threshold = effective_threshold(config.be_cpu_suppress_threshold, sample.capacity_cpus, config)
    return _left_to_be(sample, threshold, config, now)


def be_cpu_idle(sample: NodeSample, config: QoSConfig = DEFAULT_CONFIG, *, now: float) -> float:
    """Cores LS and the system leave idle now: capacity - LS - max(system, reserved).

    BE's grant under the ``none`` policy, where no limit is enforced: CPU-satisfaction
    eviction then fires only when BE is starved of CPU nobody else wants, never merely
    for using more than a threshold would allow.  0 for stale metrics.
    """
    return _left_to_be(sample, 1.0, config, now)


def _left_to_be(sample: NodeSample, threshold: float, config: QoSConfig, now: float) -> float:
    if is_stale(sample, config, now):
        return 0.0
    limit = (
        sample.capacity_cpus * threshold
        - sample.ls_cpu_used
        - max(sample.system_cpu_used, config.reserved_cpu_cores)
    )
    return max(0.0, limit)


def _grow_step(total: float, config: QoSConfig) -> float:
    return total * config.cpuset_grow_step


def next_be_cpu(
    current: float, target: float, total: float, config: QoSConfig = DEFAULT_CONFIG
) -> float:
    """Next BE CPU limit in cores (CFS-quota policy): shrink at once, grow slowly.

    Bounded to [``be_min_quota_cores``, ``total``]; growth is at most
    ``cpuset_grow_step * total`` per call.
    """
    lo = min(config.be_min_quota_cores, total)
    target = min(max(target, lo), total)
    current = min(max(current, lo), total)
    if target <= current:
        return target
    return min(target, current + _grow_step(total, config))


def be_cpuset_cores(limit_cores: float, total: int, config: QoSConfig = DEFAULT_CONFIG) -> int:
    """Whole cores for a BE cpuset holding ``limit_cores``: rounded up, within
    [``be_min_cpu_cores``, ``total``]."""
    lo = min(config.be_min_cpu_cores, total)
    # The epsilon keeps 1.0000000001 (float noise) from becoming two cores.
    return min(max(math.ceil(limit_cores - 1e-9), lo), total)


def next_cpuset(
    current_cores: int, target_cores: int, total: int, config: QoSConfig = DEFAULT_CONFIG
) -> int:
    """Next BE cpuset size: shrink to the target at once, grow by at most
    ``cpuset_grow_step`` of the node per call (but at least one core), always within
    [``be_min_cpu_cores``, ``total``]."""
    lo = min(config.be_min_cpu_cores, total)
    target = min(max(target_cores, lo), total)
    current = min(max(current_cores, lo), total)
    if target <= current:
        return target
    step = max(1, math.floor(_grow_step(total, config) + 1e-9))
    return min(target, current + step)


def be_cpuset_list(cores: int, total: int) -> str:
    """The cpuset string for a BE cpuset of ``cores`` cores out of ``total``.

    BE takes the highest-numbered cores, so LS keeps cpu0 (where most interrupts land
    on small machines) and BE's cores are taken back from the top.
    """
    cores = min(max(cores, 0), total)
    if cores == 0:
        return ""
    first = total - cores
    return str(first) if cores == 1 else f"{first}-{total - 1}"


def be_cfs_quota_us(
    limit_cores: float, config: QoSConfig = DEFAULT_CONFIG, period_us: int = CPU_PERIOD_US
) -> int:
    """CFS quota (per ``period_us``) for a BE limit, never below ``be_min_quota_cores``
    (and never below the kernel's 1 ms minimum)."""
    cores = max(limit_cores, config.be_min_quota_cores)
    return max(1000, round(cores * period_us))


# -- LS burst -------------------------------------------------------------------------


def ls_burst(
    throttled: bool,
    pool_busy_fraction: float,
    quota_us: int | None,
    config: QoSConfig = DEFAULT_CONFIG,
    current_us: int = 0,
) -> int:
    """``cpu.cfs_burst_us`` for one LS cgroup.

    * no quota (unlimited) → 0: nothing to burst past;
    * shared pool at or above ``ls_burst_pool_threshold`` busy → 0: banked quota would
      be spent against other LS work;
    * throttled in the last interval while the pool is quiet → quota * ``ls_burst_ratio``
      (capped at the quota: the kernel rejects a larger burst);
    * otherwise keep ``current_us`` (capped likewise), so burst does not flap.
    """
    if quota_us is None or quota_us <= 0:
        return 0
    if pool_busy_fraction >= config.ls_burst_pool_threshold:
        return 0
    if throttled:
        return min(quota_us, round(quota_us * config.ls_burst_ratio))
    return min(max(current_us, 0), quota_us)


# -- eviction -------------------------------------------------------------------------


def _eviction_order_memory(be: BEUsage) -> tuple[int, int, str]:
    return (be.priority, -be.memory_bytes, be.id)


def memory_evictions(
    node_used: int,
    capacity: int,
    be_instances: Sequence[BEUsage],
    config: QoSConfig = DEFAULT_CONFIG,
) -> list[str]:
    """BE instances to evict for node memory pressure, in eviction order.

    Nothing happens below ``memory_evict_upper * capacity``.  Above it, instances go
    lowest priority first and, within a priority, largest memory first, until the
    node's usage minus what was evicted is below ``memory_evict_lower * capacity``.
    Instances using no memory are never chosen: evicting them frees nothing.  If every
    BE instance is not enough, all of them are returned.
    """
    if capacity <= 0 or node_used < capacity * config.memory_evict_upper:
        return []
    target = capacity * config.memory_evict_lower
    used = node_used
    chosen: list[str] = []
    for be in sorted(be_instances, key=_eviction_order_memory):
        if used < target:
            break
        if be.memory_bytes <= 0:
            continue
        chosen.append(be.id)
        used -= be.memory_bytes
    return chosen


def _eviction_order_cpu(be: BEUsage) -> tuple[int, float, str]:
    return (be.priority, -be.cpu_used, be.id)


def cpu_satisfaction_evictions(
    history: Sequence[BECPUSample],
    be_instances: Sequence[BEUsage],
    config: QoSConfig = DEFAULT_CONFIG,
) -> list[str]:
    """BE instances to evict because BE is starved of CPU it is actually using.

    Considered only once ``history`` covers the whole window (``be_cpu_evict_window_s``
    back from its newest sample).  Over the window, average satisfaction (granted /
    requested) must be below ``be_cpu_satisfaction_lower`` *and* average usage / grant
    at least ``be_cpu_usage_threshold`` (a suppressed BE that is idle anyway is fine).
    Then BE requests are released -- lowest priority first, then highest CPU usage --
    until the remaining requests fit the newest grant at ``be_cpu_satisfaction_upper``.

    The caller should clear ``history`` after evicting, so the next decision is made on
    a fresh window rather than on the starvation that was just dealt with.
    """
    if not history:
        return []
    newest = max(history, key=lambda s: s.timestamp)
    start = newest.timestamp - config.be_cpu_evict_window_s
    if min(s.timestamp for s in history) > start:
        return []  # not enough history yet
    window = [s for s in history if s.timestamp >= start]
    ratios = [s.granted_cores / s.requested_cores for s in window if s.requested_cores > 0]
    if not ratios:
        return []
    satisfaction = sum(ratios) / len(ratios)
    # A zero grant is fully used by definition: BE has nothing and wants more.
    usage = sum(s.used_cores / s.granted_cores if s.granted_cores > 0 else 1.0 for s in window)
    usage /= len(window)
    if satisfaction >= config.be_cpu_satisfaction_lower or usage < config.be_cpu_usage_threshold:
        return []
    requested = sum(be.cpu_request for be in be_instances if be.cpu_request > 0)
    # satisfaction < lower <= upper, so upper > 0 here.
    keep = newest.granted_cores / config.be_cpu_satisfaction_upper
    to_release = requested - keep
    chosen: list[str] = []
    released = 0.0
    for be in sorted(be_instances, key=_eviction_order_cpu):
        if released >= to_release - 1e-9:
            break
        if be.cpu_request <= 0:
            continue
        chosen.append(be.id)
        released += be.cpu_request
    return chosen
