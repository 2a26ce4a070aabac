"""Measuring the node for the QoS manager: /proc for the node, cgroupfs for LS and BE.

A ``Sampler`` takes a ``Reading`` (cumulative counters) each loop and turns two of them
into a ``NodeSample`` (rates and current sizes over the interval).  Every path is
injectable -- ``/proc`` files by argument, cgroup files through the driver's root -- so
tests run against temporary files.

Sources:

* node CPU: the first ``cpu`` line of ``/proc/stat``; busy = every field but idle and
  iowait (guest time is already inside user/nice and is not added again);
* node memory: ``MemTotal - MemAvailable`` from ``/proc/meminfo``;
* subtree CPU: v1 ``cpuacct.usage`` (ns) under ``<root>/cpuacct/<rel>``, v2
  ``usage_usec`` in ``<root>/<rel>/cpu.stat``;
* subtree memory: the working set, as the kubelet counts it -- v1
  ``memory.usage_in_bytes - total_inactive_file``, v2 ``memory.current -
  inactive_file`` -- so reclaimable page cache does not count as use;
* throttling: ``nr_throttled`` (and throttled time) in ``cpu.stat``.

A cgroup that does not exist (yet) reads as zero; any other read error raises
``SandboxError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import SandboxError
from warmstart.qos.policy import NodeSample
from warmstart.sandbox.cgroups import CgroupDriver, CgroupVersion

PROC_STAT = Path("/proc/stat")
PROC_MEMINFO = Path("/proc/meminfo")


def _read_text(path: Path) -> str | None:
    """The file's text, None if it does not exist; other errors raise SandboxError."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from exc


def _read_int(path: Path) -> int:
    text = _read_text(path)
    if text is None or not text.strip():
        return 0
    try:
        return int(text.split()[0])
    except ValueError as exc:
        raise SandboxError(f"unexpected content in {path}: {text[:40]!r}") from exc


def _keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat) as a dict; missing file → empty."""
    text = _read_text(path)
    out: dict[str, int] = {}
    if text is None:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


# -- node -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU ticks from /proc/stat and the number of CPUs listed there."""

    busy: int
    total: int
    cpus: int


@dataclass(frozen=True)
class MemInfo:
    total_bytes: int
    available_bytes: int

    @property
    def used_bytes(self) -> int:
        return max(0, self.total_bytes - self.available_bytes)


def read_proc_stat(path: Path = PROC_STAT) -> CpuTimes:
    text = _read_text(path)
    if text is None:
        raise SandboxError(f"{path} does not exist")
    busy = total = cpus = 0
    found = False
    for line in text.splitlines():
        if line.startswith("cpu "):
            # user nice system idle iowait irq softirq steal [guest guest_nice]
            fields = [int(x) for x in line.split()[1:]]
            base = fields[:8]
            total = sum(base)
            idle = base[3] + (base[4] if len(base) > 4 else 0)
            busy = total - idle
            found = True
        elif line.startswith("cpu") and line[3:4].isdigit():
            cpus += 1
    if not found:
        raise SandboxError(f"no aggregate cpu line in {path}")
    return CpuTimes(busy=busy, total=total, cpus=max(cpus, 1))


def read_meminfo(path: Path = PROC_MEMINFO) -> MemInfo:
    text = _read_text(path)
    if text is None:
        raise SandboxError(f"{path} does not exist")
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            values[name] = int(parts[0]) * scale
    if "MemTotal" not in values:
        raise SandboxError(f"no MemTotal in {path}")
    total = values["MemTotal"]
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return MemInfo(total_bytes=total, available_bytes=available)


# -- cgroup subtrees ------------------------------------------------------------------


def cgroup_cpu_usage_ns(driver: CgroupDriver, rel: str) -> int:
    """Cumulative CPU time of the subtree ``rel`` in nanoseconds (0 if missing)."""
    if driver.version is CgroupVersion.V1:
        for controller in ("cpuacct", "cpu"):  # "cpu,cpuacct" co-mounts have both names
            path = driver.root / controller / rel / "cpuacct.usage"
            if path.exists():
                return _read_int(path)
        return 0
    return _keyed(driver.root / rel / "cpu.stat").get("usage_usec", 0) * 1000


def cgroup_memory_working_set(driver: CgroupDriver, rel: str) -> int:
    """Memory of the subtree ``rel`` minus inactive file cache, in bytes (0 if missing)."""
    if driver.version is CgroupVersion.V1:
        d = driver.root / "memory" / rel
        usage = _read_int(d / "memory.usage_in_bytes")
        inactive = _keyed(d / "memory.stat").get("total_inactive_file", 0)
    else:
        d = driver.root / rel
        usage = _read_int(d / "memory.current")
        inactive = _keyed(d / "memory.stat").get("inactive_file", 0)
    return max(0, usage - inactive)


@dataclass(frozen=True)
class Throttling:
    """Cumulative CFS bandwidth counters of one cgroup."""

    periods: int = 0
    throttled: int = 0
    throttled_ns: int = 0


def cgroup_throttling(driver: CgroupDriver, rel: str) -> Throttling:
    """``cpu.stat`` bandwidth counters (zeros when missing)."""
    if driver.version is CgroupVersion.V1:
        stat = _keyed(driver.root / "cpu" / rel / "cpu.stat")
        throttled_ns = stat.get("throttled_time", 0)
    else:
        stat = _keyed(driver.root / rel / "cpu.stat")
        throttled_ns = stat.get("throttled_usec", 0) * 1000
    return Throttling(stat.get("nr_periods", 0), stat.get("nr_throttled", 0), throttled_ns)


def was_throttled(previous: Throttling, current: Throttling) -> bool:
    """True when the cgroup was throttled between the two readings."""
    return current.throttled > previous.throttled


# -- readings and samples ----------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at one instant; two readings make a ``NodeSample``."""

    timestamp: float
    cpu: CpuTimes
    memory: MemInfo
    ls_cpu_ns: Mapping[str, int]
    ls_memory_bytes: int
    be_cpu_ns: Mapping[str, int]
    be_memory_bytes: int


def _cpu_delta_ns(previous: Mapping[str, int], current: Mapping[str, int]) -> int:
    """CPU time spent between readings, summed over the subtrees present in both.

    A counter that went backwards belongs to a cgroup that was removed and recreated;
    it contributes nothing for this interval.
    """
    total = 0
    for rel, now_ns in current.items():
        before = previous.get(rel)
        if before is not None and now_ns >= before:
            total += now_ns - before
    return total


def delta(previous: Reading, current: Reading) -> NodeSample:
    """The ``NodeSample`` for the interval between two readings.

    Node CPU is the busy share of /proc/stat ticks times the CPU count; subtree CPU is
    cgroup CPU time over wall time.  Memory values are the current ones.
    """
    wall = current.timestamp - previous.timestamp
    if wall <= 0:
        raise ValueError("readings must be taken in order, at different times")
    cpus = float(current.cpu.cpus)
    ticks = current.cpu.total - previous.cpu.total
    busy = current.cpu.busy - previous.cpu.busy
    node_cpu = cpus * busy / ticks if ticks > 0 else 0.0

    def cores(ns: int) -> float:
        return min(cpus, ns / 1e9 / wall)

    return NodeSample(
        timestamp=current.timestamp,
        capacity_cpus=cpus,
        capacity_memory_bytes=current.memory.total_bytes,
        node_cpu_used=min(cpus, max(0.0, node_cpu)),
        node_memory_used=current.memory.used_bytes,
        ls_cpu_used=cores(_cpu_delta_ns(previous.ls_cpu_ns, current.ls_cpu_ns)),
        ls_memory_used=current.ls_memory_bytes,
        be_cpu_used=cores(_cpu_delta_ns(previous.be_cpu_ns, current.be_cpu_ns)),
        be_memory_used=current.be_memory_bytes,
    )


class Sampler:
    """Reads the node and the LS/BE subtrees; ``sample()`` returns the last interval.

    ``ls_rels`` and ``be_rels`` are cgroup paths relative to the driver's root; pass
    stable parents (``warmstart/<hash>/ls``), not per-instance cgroups that come and go,
    so CPU deltas cover the whole interval.  ``driver`` None measures only the node.
    """

    def __init__(
        self,
        driver: CgroupDriver | None,
        ls_rels: Sequence[str] = (),
        be_rels: Sequence[str] = (),
        *,
        proc_stat: Path = PROC_STAT,
        meminfo: Path = PROC_MEMINFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self.ls_rels = tuple(ls_rels)
        self.be_rels = tuple(be_rels)
        self.proc_stat = proc_stat
        self.meminfo = meminfo
        self.clock = clock
        self._last: Reading | None = None

    def _subtrees(self, rels: Sequence[str]) -> tuple[dict[str, int], int]:
        if self.driver is None:
            return {}, 0
        cpu = {rel: cgroup_cpu_usage_ns(self.driver, rel) for rel in rels}
        memory = sum(cgroup_memory_working_set(self.driver, rel) for rel in rels)
        return cpu, memory

    def read(self) -> Reading:
        """Take one reading of every counter (does not change the sampler's state)."""
        timestamp = self.clock()
        cpu = read_proc_stat(self.proc_stat)
        memory = read_meminfo(self.meminfo)
        ls_cpu, ls_mem = self._subtrees(self.ls_rels)
        be_cpu, be_mem = self._subtrees(self.be_rels)
        return Reading(timestamp, cpu, memory, ls_cpu, ls_mem, be_cpu, be_mem)

    def sample(self) -> NodeSample | None:
        """Read now and return the sample since the previous call (None the first time,
        or when the clock did not advance)."""
        current = self.read()
        previous = self._last
        if previous is not None and current.timestamp <= previous.timestamp:
            return None  # keep the older reading as the base of the next interval
        self._last = current
        if previous is None:
            return None
        return delta(previous, current)
