"""Applying QoS decisions to cgroupfs, for cgroup v1 and v2.

Every function takes the cgroup driver (for its version and root directory), a cgroup
path relative to that root, and the values to apply; nothing is remembered between
calls.  Files are written only when their content differs, so calling these every loop
costs one read per file.  Failures raise ``SandboxError``.

File map::

                     v1 (<root>/cpu/<rel>)              v2 (<root>/<rel>)
    CFS quota        cpu.cfs_period_us, cpu.cfs_quota_us  cpu.max = "QUOTA PERIOD"
    CPU burst        cpu.cfs_burst_us                   cpu.max.burst
    cpuset           <root>/cpuset/<rel>/cpuset.cpus    cpuset.cpus

The best-effort weight and idle class are set once, when the sandbox manager creates
the BE subtree (``sandbox.cgpool.set_best_effort``).

Kernel rules these functions respect:

* the burst may not exceed the quota (EINVAL), so lowering a quota below the current
  burst lowers the burst first;
* a v1 cpuset with an empty ``cpuset.mems`` accepts no tasks, so it is filled from the
  parent;
* a v1 cpuset must stay a subset of its parent's, so a BE cpuset shrinks its children
  before the parent and grows the parent before its children (``set_be_cpuset``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from warmstart.errors import SandboxError
from warmstart.qos.policy import CPU_PERIOD_US, DEFAULT_CONFIG, QoSConfig, be_cfs_quota_us
from warmstart.sandbox.cgroups import CgroupDriver, CgroupVersion


def cpu_dir(driver: CgroupDriver, rel: str) -> Path:
    """Directory holding the cpu controller's files for ``rel``."""
    if driver.version is CgroupVersion.V1:
        return driver.root / "cpu" / rel
    return driver.root / rel


def cpuset_dir(driver: CgroupDriver, rel: str) -> Path:
    """Directory holding the cpuset controller's files for ``rel``."""
    if driver.version is CgroupVersion.V1:
        return driver.root / "cpuset" / rel
    return driver.root / rel


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise SandboxError(f"{path} does not exist") from exc
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: Path, value: str) -> None:
    if not path.exists():
        # cgroupfs never creates files; a fake cgroupfs must not either.
        raise SandboxError(f"{path} does not exist")
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _ensure(path: Path, value: str) -> bool:
    """Write ``value`` unless the file already holds it; True when written."""
    if _read(path) == value:
        return False
    _write(path, value)
    return True


def _int(path: Path) -> int:
    text = _read(path)
    try:
        return int(text.split()[0]) if text else 0
    except ValueError as exc:
        raise SandboxError(f"unexpected content in {path}: {text[:40]!r}") from exc


# -- CFS quota and burst -------------------------------------------------------------


def _burst_file(driver: CgroupDriver, rel: str) -> Path:
    name = "cpu.cfs_burst_us" if driver.version is CgroupVersion.V1 else "cpu.max.burst"
    return cpu_dir(driver, rel) / name


def set_cpu_quota(
    driver: CgroupDriver, rel: str, quota_us: int | None, period_us: int = CPU_PERIOD_US
) -> None:
    """Set the CFS bandwidth of ``rel``: ``quota_us`` per ``period_us`` (None = no limit).

    A burst larger than the new quota is lowered to it first, as the kernel requires.
    """
    if quota_us is not None and quota_us <= 0:
        raise SandboxError(f"CFS quota must be positive or None, got {quota_us}")
    d = cpu_dir(driver, rel)
    burst = _burst_file(driver, rel)
    if quota_us is not None and burst.exists() and _int(burst) > quota_us:
        _write(burst, str(quota_us))
    if driver.version is CgroupVersion.V1:
        _ensure(d / "cpu.cfs_period_us", str(period_us))
        _ensure(d / "cpu.cfs_quota_us", str(-1 if quota_us is None else quota_us))
    else:
        quota = "max" if quota_us is None else str(quota_us)
        _ensure(d / "cpu.max", f"{quota} {period_us}")


def set_be_cpu_limit(
    driver: CgroupDriver,
    rel: str,
    limit_cores: float,
    config: QoSConfig = DEFAULT_CONFIG,
    period_us: int = CPU_PERIOD_US,
) -> int:
    """Enforce the BE CPU limit (``policy.be_cpu_limit``, after ``next_be_cpu``) as a CFS
    quota on the BE parent; returns the quota written, in microseconds per period."""
    quota = be_cfs_quota_us(limit_cores, config, period_us)
    set_cpu_quota(driver, rel, quota, period_us)
    return quota


def set_cpu_burst(driver: CgroupDriver, rel: str, burst_us: int) -> bool:
    """Set the CFS burst of an LS cgroup (``policy.ls_burst``).

    Returns False, writing nothing, when the kernel has no burst file (< 5.14).  The
    kernel rejects a burst above the cgroup's quota: that raises ``SandboxError``.
    """
    if burst_us < 0:
        raise SandboxError(f"CPU burst must not be negative, got {burst_us}")
    burst = _burst_file(driver, rel)
    if not burst.exists():
        return False
    _ensure(burst, str(burst_us))
    return True


# -- cpuset ------------------------------------------------------------------------------


def set_cpuset(driver: CgroupDriver, rel: str, cpus: str) -> None:
    """Restrict ``rel`` to ``cpus`` (a cpuset list such as ``"1"`` or ``"2-3"``, see
    ``policy.be_cpuset_list``).

    On v1 the cpuset hierarchy is separate from the ones the sandbox driver joins, and
    an empty ``cpuset.mems`` is filled from the parent so tasks can join.  On v2 the
    ``cpuset`` controller must be enabled in the parent's ``cgroup.subtree_control``.
    """
    if not cpus.strip():
        raise SandboxError("a cpuset needs at least one CPU")
    d = cpuset_dir(driver, rel)
    if driver.version is CgroupVersion.V1:
        mems = d / "cpuset.mems"
        if not _read(mems):
            parent = d.parent
            source = parent / "cpuset.effective_mems"
            if not source.exists():
                source = parent / "cpuset.mems"
            _write(mems, _read(source))
    _ensure(d / "cpuset.cpus", cpus)


def parse_cpus(text: str) -> set[int]:
    """The CPUs of a cpuset list (``"0-2,5"`` -> {0, 1, 2, 5}); empty text is no CPU."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError as exc:
            raise SandboxError(f"not a cpuset list: {text!r}") from exc
        cpus.update(range(lo, hi + 1))
    return cpus


def format_cpus(cpus: set[int]) -> str:
    """A cpuset list for ``cpus`` with ranges joined (``{0, 1, 2, 5}`` -> ``"0-2,5"``)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def set_be_cpuset(driver: CgroupDriver, parent: str, children: list[str], cpus: str) -> bool:
    """Confine the BE subtree ``parent`` (and, on v1, each of its ``children``) to
    ``cpus``; returns True when anything was written.

    On v1 every cpuset must be a subset of its parent's, so the parent first grows to
    the union of the old and new sets, then the children take the new set, then the
    parent shrinks to it: a shrink takes effect at once without an EBUSY on the way.  On
    v2 children whose ``cpuset.cpus`` is empty follow their parent, which is all that is
    written.  A child that disappears meanwhile (its instance was recycled) is skipped.
    """
    want = parse_cpus(cpus)
    if not want:
        raise SandboxError("a cpuset needs at least one CPU")
    if driver.version is not CgroupVersion.V1:
        before = _read(cpuset_dir(driver, parent) / "cpuset.cpus")
        set_cpuset(driver, parent, cpus)
        return before != cpus
    current = parse_cpus(_read(cpuset_dir(driver, parent) / "cpuset.cpus"))
    changed = False
    if not want <= current:
        set_cpuset(driver, parent, format_cpus(current | want))
        changed = True
    for child in children:
        d = cpuset_dir(driver, child)
        if not d.is_dir():
            continue
        try:
            if parse_cpus(_read(d / "cpuset.cpus")) != want:
                set_cpuset(driver, child, cpus)
                changed = True
        except SandboxError:
            if d.is_dir():
                raise
    if parse_cpus(_read(cpuset_dir(driver, parent) / "cpuset.cpus")) != want:
        set_cpuset(driver, parent, cpus)
        changed = True
    return changed


# -- memory ------------------------------------------------------------------------------
#
#                     v1 (<root>/memory/<rel>)                 v2 (<root>/<rel>)
#    BE subtree cap   memory.limit_in_bytes                    memory.high (+ memory.max)
#    reclaimed first  memory.soft_limit_in_bytes = 0           (memory.high throttles BE)
#    LS protection    none (documented best effort)            memory.low
#    reclaim now      limit lowered to usage - N, restored     memory.reclaim "N"
#    page cache       memory.stat "total_cache"                memory.stat "file"

# v2: memory.max sits this far above memory.high: BE is throttled and reclaimed in its
# own subtree at ``high``; only a burst through that is stopped by the OOM killer.
V2_MAX_HEADROOM = 1.10
_PAGE = 4096


def memory_dir(driver: CgroupDriver, rel: str) -> Path:
    """Directory holding the memory controller's files for ``rel``."""
    if driver.version is CgroupVersion.V1:
        return driver.root / "memory" / rel
    return driver.root / rel


def _pages(n: int) -> int:
    return max(_PAGE, (n + _PAGE - 1) // _PAGE * _PAGE)


def set_be_memory_limit(driver: CgroupDriver, rel: str, limit_bytes: int) -> int:
    """Cap the best-effort subtree ``rel`` at ``limit_bytes``; returns the cap in force.

    v1: ``memory.limit_in_bytes`` (the kernel reclaims inside the subtree to meet a
    lowered limit; when it cannot, the write fails with EBUSY and the cap stays at what
    BE uses now, rounded up: eviction then makes room) and a soft limit of 0, so that
    under node-wide pressure the kernel reclaims from BE before anything else.  v2:
    ``memory.high`` (BE is throttled and reclaimed above it) and ``memory.max`` a tenth
    higher.
    """
    limit = _pages(limit_bytes)
    d = memory_dir(driver, rel)
    if driver.version is CgroupVersion.V1:
        _ensure(d / "memory.soft_limit_in_bytes", "0")
        if _int(d / "memory.limit_in_bytes") == limit:
            return limit
        try:
            _write(d / "memory.limit_in_bytes", str(limit))
        except SandboxError:
            used = _int(d / "memory.usage_in_bytes")
            floor = _pages(max(used, limit))
            _write(d / "memory.limit_in_bytes", str(floor))
            return floor
        return limit
    high = d / "memory.high"
    maximum = d / "memory.max"
    new_max = str(_pages(int(limit * V2_MAX_HEADROOM)))
    # memory.max below memory.high is legal but pointless; raise max first when growing.
    if _read(maximum) != "max" and _int(maximum) < limit:
        _write(maximum, new_max)
    _ensure(high, str(limit))
    _ensure(maximum, new_max)
    return limit


def protect_ls_memory(driver: CgroupDriver, rel: str, protected_bytes: int) -> bool:
    """Shield ``protected_bytes`` of the latency-sensitive subtree from reclaim caused by
    others (v2 ``memory.low``); False on v1, which has no such protection (BE's soft
    limit of 0 is what keeps reclaim on BE there)."""
    if driver.version is CgroupVersion.V1:
        return False
    path = memory_dir(driver, rel) / "memory.low"
    if not path.exists():
        return False
    _ensure(path, str(_pages(protected_bytes) if protected_bytes > 0 else 0))
    return True


def page_cache(driver: CgroupDriver, rel: str) -> int:
    """Page cache charged to ``rel`` (v1 ``total_cache``, v2 ``file``); 0 if gone."""
    key = "total_cache" if driver.version is CgroupVersion.V1 else "file"
    try:
        text = (memory_dir(driver, rel) / "memory.stat").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def reclaim_memory(driver: CgroupDriver, rel: str, nbytes: int) -> int:
    """Ask the kernel to reclaim about ``nbytes`` from ``rel`` now; returns what its
    usage fell by.  v2 writes ``memory.reclaim``; v1 lowers ``memory.limit_in_bytes`` to
    the usage less ``nbytes`` (the kernel reclaims to meet it, or refuses with EBUSY when
    it cannot, which is fine) and puts the limit back."""
    d = memory_dir(driver, rel)
    usage_file = d / (
        "memory.usage_in_bytes" if driver.version is CgroupVersion.V1 else "memory.current"
    )
    if not usage_file.exists() or nbytes <= 0:
        return 0
    before = _int(usage_file)
    if driver.version is CgroupVersion.V1:
        limit_file = d / "memory.limit_in_bytes"
        old = _read(limit_file)
        target = _pages(max(before - nbytes, _PAGE))
        try:
            if target < _int(limit_file):
                _write(limit_file, str(target))
        except SandboxError:
            pass  # could not reclaim all of it: what went, went
        finally:
            _write(limit_file, old)
    else:
        path = d / "memory.reclaim"
        if not path.exists():
            return 0
        with contextlib.suppress(SandboxError):  # EAGAIN: less than asked could go
            _write(path, str(nbytes))
    return max(0, before - _int(usage_file))


def set_oom_score_adj(pids: list[int], value: int) -> int:
    """Make the kernel's OOM killer prefer (``value`` up to 1000) or spare these
    processes; returns how many were set (a process may be gone)."""
    done = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write(str(value))
            done += 1
        except OSError:
            continue
    return done
