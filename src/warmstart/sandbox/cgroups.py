"""cgroups: one narrow seam over cgroupfs, for v1 (per-controller hierarchies) and v2.

Every path this module touches lives under a *root* directory (``/sys/fs/cgroup`` on a
real host, any directory in unit tests), so a fake cgroupfs is just a temporary folder.

Some facts about cgroupfs that shape this code:

* On v1 each controller is its own hierarchy, so "a cgroup" is one directory per
  controller (memory, pids, freezer, cpu); joining it means writing the pid into each
  ``cgroup.procs``.  On v2 there is one directory, but a controller is only usable in a
  child when every ancestor lists it in ``cgroup.subtree_control``, and a cgroup that has
  processes cannot delegate controllers (the "no internal processes" rule) -- so our
  parent directory never holds processes itself.
* Writing ``FROZEN`` (v1) or ``1`` (v2) returns before every task is stopped; for an idle
  instance that is fine, nobody needs to wait.  Killing, though, must not race with
  fork: we freeze first, SIGKILL every member, then thaw so the signals are delivered.
  v2 kernels >= 5.14 have ``cgroup.kill`` which does all of that atomically.
* A cgroup directory can only be removed once it has no members; zombie members still
  count until their parent reaps them.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import SandboxError

V1_CONTROLLERS = ("memory", "pids", "freezer", "cpu")
# Joined too where the host has it (CPU accounting for the QoS manager); where cpu and
# cpuacct are co-mounted the two names are one directory.
V1_OPTIONAL = ("cpuacct",)
V2_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


class CgroupVersion(enum.Enum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids_max: int
    cpu_quota_us: int | None = None  # per CPU_PERIOD_US; None = unlimited


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from exc


def _read_int(path: Path, default: int = 0) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return default
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from exc
    if text == "max":
        return -1
    return int(text)


def _keyed(path: Path, key: str) -> int:
    """Read ``key value`` lines (memory.events, memory.oom_control) and return value."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except FileNotFoundError:
        return 0
    return 0


class CgroupDriver:
    """Operations on cgroups named by a path relative to the hierarchy root."""

    version: CgroupVersion

    def __init__(self, root: Path, *, cpuset: bool = False) -> None:
        self.root = root
        self.cpuset = cpuset  # cgroups also join the cpuset controller (best-effort ones)

    def with_cpuset(self) -> CgroupDriver:
        """A driver whose cgroups also join the cpuset controller, so the QoS manager can
        confine them to some cores; this driver itself when the host has no cpuset
        controller."""
        if self.cpuset or not self._has_cpuset():
            return self
        return type(self)(self.root, cpuset=True)

    def _has_cpuset(self) -> bool:
        raise NotImplementedError

    # -- layout --------------------------------------------------------------------
    def dirs(self, rel: str) -> list[Path]:
        raise NotImplementedError

    def procs_files(self, rel: str) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs(rel)]

    def create(self, rel: str) -> None:
        for d in self.dirs(rel):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SandboxError(f"cannot create cgroup {d}: {exc.strerror}") from exc

    def remove(self, rel: str) -> None:
        """rmdir the cgroup (children first); missing is fine, busy raises."""
        for d in self.dirs(rel):
            if not d.exists():
                continue
            for child in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                self._rmdir(child)
            self._rmdir(d)

    @staticmethod
    def _rmdir(d: Path) -> None:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SandboxError(f"cannot remove cgroup {d}: {exc.strerror}") from exc

    def children(self, rel: str) -> list[str]:
        d = self.dirs(rel)[0]
        if not d.is_dir():
            return []
        return sorted(f"{rel}/{p.name}" for p in d.iterdir() if p.is_dir())

    def exists(self, rel: str) -> bool:
        return self.dirs(rel)[0].is_dir()

    # -- membership ------------------------------------------------------------------
    def pids(self, rel: str) -> list[int]:
        """Members of this cgroup (not of its children: pooled cgroups are leaves).

        One file: every sandbox process joins all our controllers, so any one of them
        lists it.  This runs for every recycled cgroup, so it must stay cheap.
        """
        try:
            with open(self._members_file(rel)) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SandboxError(f"cannot list cgroup {rel}: {exc.strerror}") from exc
        return sorted({int(x) for x in text.split()})

    def _members_file(self, rel: str) -> str:
        return str(self.dirs(rel)[0] / "cgroup.procs")

    def add(self, rel: str, pid: int) -> None:
        for f in self.procs_files(rel):
            _write(Path(f), str(pid))

    def kill(self, rel: str) -> None:
        """SIGKILL every member without racing against fork (freeze, kill, thaw)."""
        self.freeze(rel)
        try:
            for pid in self.pids(rel):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self.thaw(rel)

    # -- control ---------------------------------------------------------------------
    def set_limits(self, rel: str, limits: Limits, previous: Limits | None = None) -> None:
        """Apply ``limits``; with ``previous`` (what the cgroup has now), write only what
        changes -- a recycled cgroup usually keeps most of them."""
        raise NotImplementedError

    def freeze_file(self, rel: str) -> tuple[Path, bytes, bytes]:
        """(file, frozen value, thawed value): the worker keeps the file open."""
        raise NotImplementedError

    def freeze(self, rel: str) -> None:
        path, frozen, _ = self.freeze_file(rel)
        _write(path, frozen.decode())

    def thaw(self, rel: str) -> None:
        path, _, thawed = self.freeze_file(rel)
        _write(path, thawed.decode())

    def memory_usage(self, rel: str) -> int:
        raise NotImplementedError

    def memory_peak(self, rel: str) -> int:
        raise NotImplementedError

    def oom_kills(self, rel: str) -> int:
        raise NotImplementedError

    def prepare_parent(self, rel: str) -> None:
        """Create the parent of our subtree and make controllers usable below it."""
        self.create(rel)


class V1Driver(CgroupDriver):
    version = CgroupVersion.V1

    def __init__(self, root: Path, *, cpuset: bool = False) -> None:
        super().__init__(root, cpuset=cpuset)
        self._hierarchy_cache: list[Path] | None = None

    def _has_cpuset(self) -> bool:
        cpuset = self.root / "cpuset"
        return (cpuset / "cpuset.cpus").exists() and os.access(cpuset, os.W_OK)

    def _hierarchies(self) -> list[Path]:
        """The controller hierarchies every cgroup joins.  Which optional ones are mounted
        apart is read once: resolving them walks the mount points with a dozen lstat
        calls, and ``dirs`` runs for every pooled cgroup's recycling poll."""
        if self._hierarchy_cache is not None:
            return self._hierarchy_cache
        roots = [self.root / c for c in V1_CONTROLLERS]
        if self.cpuset:
            roots.append(self.root / "cpuset")
        mounted = {(self.root / k).resolve() for k in V1_CONTROLLERS}
        for c in V1_OPTIONAL:
            d = self.root / c
            if d.is_dir() and not d.is_symlink() and d.resolve() not in mounted:
                roots.append(d)
        self._hierarchy_cache = roots
        return roots

    def dirs(self, rel: str) -> list[Path]:
        return [d / rel for d in self._hierarchies()]

    def _members_file(self, rel: str) -> str:
        # Plain strings: pathlib's joins cost more than the read itself.
        return f"{self._hierarchies()[0]}/{rel}/cgroup.procs"

    def _d(self, controller: str, rel: str) -> Path:
        return self.root / controller / rel

    def create(self, rel: str) -> None:
        super().create(rel)
        if self.cpuset:
            self._fill_cpuset(rel)

    def _fill_cpuset(self, rel: str) -> None:
        """A new v1 cpuset has no CPUs and no memory nodes and accepts no task: each level
        that lacks them gets its parent's, top-down (a child must stay a subset)."""
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            d = self.root.joinpath("cpuset", *parts[:depth])
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (d / name).exists() and not _read(d / name).strip():
                    _write(d / name, _read(d.parent / name).strip())

    def prepare_parent(self, rel: str) -> None:
        self.create(rel)
        mem = self._d("memory", rel)
        # Hierarchical accounting is always on since 5.x; older kernels want it asked for.
        use_h = mem / "memory.use_hierarchy"
        if use_h.exists() and use_h.read_text().strip() != "1":
            with contextlib.suppress(SandboxError):
                _write(use_h, "1")

    def set_limits(self, rel: str, limits: Limits, previous: Limits | None = None) -> None:
        if previous is None or previous.memory_bytes != limits.memory_bytes:
            self._set_memory(rel, limits.memory_bytes, first=previous is None)
        if previous is None or previous.pids_max != limits.pids_max:
            _write(self._d("pids", rel) / "pids.max", str(limits.pids_max))
        cpu = self._d("cpu", rel)
        if previous is None:
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        if previous is None or previous.cpu_quota_us != limits.cpu_quota_us:
            _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us or -1))

    def _set_memory(self, rel: str, memory_bytes: int, *, first: bool) -> None:
        limits = Limits(memory_bytes, 0)
        mem = self._d("memory", rel)
        memsw = mem / "memory.memsw.limit_in_bytes"
        # memsw (memory+swap) must stay >= limit_in_bytes at every step: raise it first
        # when the limit goes up, lower it last when the limit comes down.
        raising = memsw.exists() and limits.memory_bytes > _read_int(memsw, -1) >= 0
        if raising:
            _write(memsw, str(limits.memory_bytes))
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        if memsw.exists() and not raising:
            with contextlib.suppress(SandboxError):
                _write(memsw, str(limits.memory_bytes))
        swappiness = mem / "memory.swappiness"
        if first and swappiness.exists():
            with contextlib.suppress(SandboxError):
                _write(swappiness, "0")

    def freeze_file(self, rel: str) -> tuple[Path, bytes, bytes]:
        return self._d("freezer", rel) / "freezer.state", b"FROZEN", b"THAWED"

    def memory_usage(self, rel: str) -> int:
        return _read_int(self._d("memory", rel) / "memory.usage_in_bytes")

    def memory_peak(self, rel: str) -> int:
        return _read_int(self._d("memory", rel) / "memory.max_usage_in_bytes")

    def oom_kills(self, rel: str) -> int:
        return _keyed(self._d("memory", rel) / "memory.oom_control", "oom_kill")


class V2Driver(CgroupDriver):
    version = CgroupVersion.V2

    def _has_cpuset(self) -> bool:
        controllers = self.root / "cgroup.controllers"
        return controllers.exists() and "cpuset" in _read(controllers).split()

    def dirs(self, rel: str) -> list[Path]:
        return [self.root / rel]

    def prepare_parent(self, rel: str) -> None:
        self.create(rel)
        want = set(V2_CONTROLLERS) | ({"cpuset"} if self.cpuset else set())
        available = set(_read(self.root / "cgroup.controllers").split())
        missing = want - available
        if missing:
            raise SandboxError(f"cgroup v2 at {self.root} lacks controllers {sorted(missing)}")
        # Every ancestor from the root down to our parent must delegate the controllers.
        parts = Path(rel).parts
        for depth in range(len(parts) + 1):
            d = self.root.joinpath(*parts[:depth])
            enabled = set(_read(d / "cgroup.subtree_control").split())
            todo = want - enabled
            if todo:
                _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(todo)))

    def set_limits(self, rel: str, limits: Limits, previous: Limits | None = None) -> None:
        d = self.root / rel
        if previous is None or previous.memory_bytes != limits.memory_bytes:
            _write(d / "memory.max", str(limits.memory_bytes))
        if previous is None and (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        if previous is None or previous.pids_max != limits.pids_max:
            _write(d / "pids.max", str(limits.pids_max))
        if previous is None or previous.cpu_quota_us != limits.cpu_quota_us:
            quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")

    def freeze_file(self, rel: str) -> tuple[Path, bytes, bytes]:
        return self.root / rel / "cgroup.freeze", b"1", b"0"

    def kill(self, rel: str) -> None:
        kill_file = self.root / rel / "cgroup.kill"
        if kill_file.exists():
            _write(kill_file, "1")
            return
        super().kill(rel)

    def memory_usage(self, rel: str) -> int:
        return _read_int(self.root / rel / "memory.current")

    def memory_peak(self, rel: str) -> int:
        peak = self.root / rel / "memory.peak"
        return _read_int(peak) if peak.exists() else self.memory_usage(rel)

    def oom_kills(self, rel: str) -> int:
        return _keyed(self.root / rel / "memory.events", "oom_kill")


def detect(root: Path = Path("/sys/fs/cgroup")) -> CgroupDriver | None:
    """Pick the driver for this host, or None when cgroups cannot be used."""
    if (root / "cgroup.controllers").exists() and not (root / "memory").is_dir():
        driver: CgroupDriver = V2Driver(root)
    elif all((root / c).is_dir() for c in V1_CONTROLLERS):
        driver = V1Driver(root)
    else:
        return None
    probe = driver.dirs("")[0]
    if not os.access(probe, os.W_OK):
        return None
    return driver

