"""The node QoS manager: a loop of about a second that keeps best-effort work on the
capacity latency-sensitive work leaves unused (differentiated SLO, after Koordinator).

Every tick it
1. samples node, LS (``warmstart/<hash>/ls``) and BE (``warmstart-be/<hash>``) CPU and
   memory;
2. smooths the sample and computes the *reclaimed* capacity (capacity x threshold -
   smoothed LS usage - system usage; zero when the metrics go stale) -- BE admission in
   the worker never exceeds it;
3. computes the BE CPU limit (BE always runs at the lowest weight) and, as
   ``be_cpu_policy`` says, enforces it as a CFS quota or a cpuset of whole cores that
   shrink at once when LS needs the CPU and grow back a step at a time -- or not at all;
4. gives throttled LS instances a CFS burst while the node's CPU pool is not busy;
5. evicts BE instances -- lowest priority, largest first -- when node memory crosses the
   upper threshold, and when BE CPU satisfaction stays low while BE uses its grant; the
   evicted work is requeued, never lost;
6. keeps memory QoS: the whole BE subtree is capped at the reclaimed memory (v1
   ``memory.limit_in_bytes`` with a soft limit of 0 so node-wide reclaim takes from BE
   first; v2 ``memory.high`` and ``memory.max``), LS is protected on v2
   (``memory.low`` at its usage), and the page cache of instances idle or frozen for
   ``idle_reclaim_after_s`` is reclaimed in the background (v2 ``memory.reclaim``; v1
   a limit lowered for a moment) before anything has to reclaim it in a hurry.

The policy itself is pure (``warmstart.qos.policy``); this module only wires it to the
sandboxes and, through two callbacks, to the worker's best-effort dispatcher (which
instances run; evict these).  ``run`` is a loop for the worker's supervisor: a tick that
raises is logged and the loop restarted; ``close`` stops the tick's thread.

The tick's reads and writes (a dozen or more cgroupfs and /proc files) run on a thread of
the manager's own, never on the event loop: each costs ~0.2 ms on a busy node and
occasionally several, and the loop serves every latency-sensitive request, so a stall of
a few milliseconds once a second lands right in LS's p99.  The loop only hands the tick a
snapshot of its state (``TickInputs``) and applies the evictions the tick decides.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from warmstart.errors import SandboxError
from warmstart.qos import enforce, policy, usage
from warmstart.qos.policy import BECPUSample, BEUsage, NodeSample, QoSConfig, Reclaimed
from warmstart.sandbox import SandboxManager
from warmstart.sandbox.cgroups import CgroupDriver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BEInstance:
    """What the manager needs to know of a running best-effort instance (its memory is
    read from ``cgroup_rel`` by the tick, off the event loop)."""

    id: str
    cgroup_rel: str
    cpu_request: float
    priority: int = 0


@dataclass(frozen=True)
class TickInputs:
    """The event loop's state a tick needs, copied on the loop so the tick's thread never
    walks structures the loop is changing."""

    ls_cgroups: list[str] = field(default_factory=list)  # live LS cgroups (for burst)
    be_cgroups: list[str] = field(default_factory=list)  # every pooled BE cgroup (cpuset)
    be_running: list[BEInstance] = field(default_factory=list)
    # Idle (maybe frozen) instances' cgroups and how long each has been idle.
    idle: list[tuple[str, float]] = field(default_factory=list)


class QoSManager:
    def __init__(
        self,
        sandboxes: SandboxManager,
        be_instances: Callable[[], list[BEInstance]],
        evict: Callable[[list[str]], None],
        *,
        config: QoSConfig = policy.DEFAULT_CONFIG,
        enabled: bool = True,
        interval_s: float = 1.0,
        idle_instances: Callable[[], list[tuple[str, float]]] | None = None,
    ) -> None:
        self.sandboxes = sandboxes
        self.be_instances = be_instances
        self.idle_instances = idle_instances or (lambda: [])
        self.evict = evict
        self.config = config
        self.enabled = enabled
        self.interval = interval_s
        driver = sandboxes.driver
        self.sampler = usage.Sampler(driver, [sandboxes.ls_parent], [sandboxes.be_parent])
        self.sample: NodeSample | None = None
        self.smoothed: NodeSample | None = None
        self.reclaimed = Reclaimed(0.0, 0, stale=True)
        self.be_cpu_cores: float | None = None  # BE's CPU grant (the limit, enforced or not)
        self.be_cpuset: str | None = None  # the BE cpuset in force (``cpuset`` policy)
        self.history: deque[BECPUSample] = deque()
        self.throttling: dict[str, usage.Throttling] = {}
        self.bursts: dict[str, int] = {}
        self.evictions = 0
        self.ticks = 0
        self.be_memory_cap: int | None = None  # the BE subtree's memory cap in force
        self.ls_memory_protected = False  # v2 memory.low written
        self.page_cache_reclaimed = 0  # bytes idle instances gave back
        self._reclaimed_at: dict[str, float] = {}  # cgroup -> when its cache was reclaimed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warmstart-qos")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # The first reading only sets the baseline.
        await loop.run_in_executor(self._executor, self.sampler.sample)
        while True:
            await asyncio.sleep(self.interval)
            inputs = self.inputs()
            try:
                victims = await loop.run_in_executor(self._executor, self.tick, inputs)
            except SandboxError as exc:
                log.warning("qos: %s", exc)
                continue
            if victims:
                self.evictions += len(victims)
                log.warning("qos: evicting best-effort instance(s) %s", ", ".join(victims))
                self.evict(victims)

    def close(self) -> None:
        """Stop the tick's thread (after the loop stopped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def inputs(self) -> TickInputs:
        """Copy what the tick needs of the loop's state (on the loop; no I/O)."""
        pool, be_pool = self.sandboxes.pool, self.sandboxes.be_pool
        return TickInputs(
            [cg.rel for cg in pool.in_use()] if pool is not None else [],
            [cg.rel for cg in [*be_pool.free(), *be_pool.in_use()]] if be_pool else [],
            self.be_instances(),
            self.idle_instances(),
        )

    # -- one tick (on the manager's thread) ------------------------------------------------
    def tick(self, inputs: TickInputs | None = None) -> list[str]:
        """Sample, decide and enforce; returns the BE instances to evict (the caller
        evicts them on the event loop)."""
        inputs = inputs if inputs is not None else TickInputs()
        now = time.monotonic()
        sample = self.sampler.sample()
        self.ticks += 1
        if sample is not None:
            self.sample = sample
            self.smoothed = policy.smooth(self.smoothed, sample, self.config)
        if self.smoothed is not None:
            self.reclaimed = policy.reclaimed(self.smoothed, self.config, now=now)
        if not self.enabled or sample is None:
            return []
        self._suppress_be(sample, now, inputs.be_cgroups)
        self._burst_ls(sample, inputs.ls_cgroups)
        self._memory_qos(now, inputs.idle)
        return self._evict(sample, now, inputs.be_running)

    def _memory_qos(self, now: float, idle: list[tuple[str, float]]) -> None:
        """Cap BE's memory, protect LS's, reclaim idle instances' page cache."""
        driver = self.sandboxes.driver
        if driver is None:
            return
        config = self.config
        cap = policy.be_memory_cap(self.reclaimed, config)
        if config.be_memory_limit and cap is not None:
            be_driver = self.sandboxes.be_driver or driver
            current = self.be_memory_cap
            # Small moves are not worth a write (and a reclaim pass in the kernel).
            if current is None or abs(cap - current) > max(16 << 20, current // 50):
                self.be_memory_cap = enforce.set_be_memory_limit(
                    be_driver, self.sandboxes.be_parent, cap
                )
        if self.smoothed is not None:
            self.ls_memory_protected = enforce.protect_ls_memory(
                driver, self.sandboxes.ls_parent, self.smoothed.ls_memory_used
            )
        after = config.idle_reclaim_after_s
        if after <= 0:
            return
        live = {rel for rel, _ in idle}
        self._reclaimed_at = {r: t for r, t in self._reclaimed_at.items() if r in live}
        for rel, idle_s in idle:
            if idle_s < after or now - self._reclaimed_at.get(rel, -math.inf) < after:
                continue
            self._reclaimed_at[rel] = now
            cache = enforce.page_cache(driver, rel)
            if cache >= config.idle_reclaim_min_cache_mb << 20:
                self.page_cache_reclaimed += enforce.reclaim_memory(driver, rel, cache)

    def _suppress_be(
        self, sample: NodeSample, now: float, be_cgroups: list[str] | None = None
    ) -> None:
        driver = self.sandboxes.driver
        if driver is None:
            return
        config = self.config
        target = policy.be_cpu_limit(sample, config, now=now)
        total = sample.capacity_cpus
        current = total if self.be_cpu_cores is None else self.be_cpu_cores
        be = self.sandboxes.be_parent
        if config.be_cpu_policy == "quota":
            self.be_cpu_cores = policy.next_be_cpu(current, target, total, config)
            enforce.set_be_cpu_limit(driver, be, self.be_cpu_cores, config, config.be_cfs_period_us)
        elif config.be_cpu_policy == "cpuset":
            cores = policy.next_cpuset(
                math.ceil(current - 1e-9),
                policy.be_cpuset_cores(target, int(total), config),
                int(total),
                config,
            )
            cpus = policy.be_cpuset_list(cores, int(total))
            children = be_cgroups or []
            enforce.set_be_cpuset(self.sandboxes.be_driver or driver, be, children, cpus)
            self.be_cpu_cores, self.be_cpuset = float(cores), cpus
        else:
            # Nothing enforced: BE's scheduling class keeps it behind LS, and its grant (for
            # CPU-satisfaction eviction, and what /node shows) is what LS and the system
            # leave idle.
            self.be_cpu_cores = policy.be_cpu_idle(sample, config, now=now)

    def _burst_ls(self, sample: NodeSample, ls_cgroups: list[str]) -> None:
        driver = self.sandboxes.driver
        if driver is None:
            return
        quota = self.sandboxes.limits_for(128).cpu_quota_us
        if not quota:
            return
        live = set(ls_cgroups)
        for rel in list(self.throttling):
            if rel not in live:
                self.throttling.pop(rel, None)
                self.bursts.pop(rel, None)
        for rel in live:
            now_t = usage.cgroup_throttling(driver, rel)
            before = self.throttling.get(rel, now_t)
            self.throttling[rel] = now_t
            burst = policy.ls_burst(
                usage.was_throttled(before, now_t),
                sample.cpu_busy_fraction,
                quota,
                self.config,
                self.bursts.get(rel, 0),
            )
            if burst != self.bursts.get(rel, 0):
                try:
                    enforce.set_cpu_burst(driver, rel, burst)
                    self.bursts[rel] = burst
                except SandboxError as exc:
                    log.debug("qos: burst on %s: %s", rel, exc)

    def _evict(self, sample: NodeSample, now: float, running: list[BEInstance]) -> list[str]:
        if not running:
            self.history.clear()
            return []
        driver = self.sandboxes.be_driver or self.sandboxes.driver
        be = [
            BEUsage(i.id, i.priority, self._memory(driver, i.cgroup_rel), 0.0, i.cpu_request)
            for i in running
        ]
        victims = policy.memory_evictions(
            sample.node_memory_used, sample.capacity_memory_bytes, be, self.config
        )
        granted = sample.capacity_cpus if self.be_cpu_cores is None else self.be_cpu_cores
        self.history.append(
            BECPUSample(now, granted, sum(i.cpu_request for i in running), sample.be_cpu_used)
        )
        while self.history and now - self.history[0].timestamp > self.config.be_cpu_evict_window_s:
            self.history.popleft()
        if not victims:
            victims = policy.cpu_satisfaction_evictions(list(self.history), be, self.config)
            if victims:
                self.history.clear()
        return victims

    @staticmethod
    def _memory(driver: CgroupDriver | None, rel: str) -> int:
        """A BE instance's memory; 0 when its cgroup went away meanwhile."""
        if driver is None:
            return 0
        try:
            return driver.memory_usage(rel)
        except SandboxError:
            return 0

    # -- reporting -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        s = self.sample
        return {
            "qos": self.enabled,
            "capacity": {
                "cpus": s.capacity_cpus if s else None,
                "memory_bytes": s.capacity_memory_bytes if s else None,
            },
            "usage": {}
            if s is None
            else {
                "node_cpu": s.node_cpu_used,
                "ls_cpu": s.ls_cpu_used,
                "be_cpu": s.be_cpu_used,
                "system_cpu": s.system_cpu_used,
                "node_memory": s.node_memory_used,
                "ls_memory": s.ls_memory_used,
                "be_memory": s.be_memory_used,
                "system_memory": s.system_memory_used,
            },
            "reclaimed": {
                "cpu_cores": self.reclaimed.cpu_cores,
                "memory_bytes": self.reclaimed.memory_bytes,
                "stale": self.reclaimed.stale,
            },
            "be_cpu_limit_cores": self.be_cpu_cores,
            "be_memory_cap_bytes": self.be_memory_cap,
            "ls_memory_protected": self.ls_memory_protected,
            "page_cache_reclaimed_bytes": self.page_cache_reclaimed,
            "be_cpu_policy": self.config.be_cpu_policy,
            "be_cpuset": self.be_cpuset,
            "evictions": self.evictions,
        }
