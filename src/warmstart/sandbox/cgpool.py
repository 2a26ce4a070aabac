"""A pool of pre-created cgroups, recycled between sandboxes (the SOCK cgroup pool).

Creating a cgroup costs a mkdir per controller plus limit writes; killing an instance
and reusing its cgroup costs only the kill.  The pool owns every cgroup below its
parent directory: ``start()`` reaps whatever a crashed worker left there (killing the
members first), ``close()`` removes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field

from warmstart.errors import SandboxError
from warmstart.sandbox.cgroups import CgroupDriver, Limits, V2Driver

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Cgroup:
    """One pooled cgroup.  ``freeze``/``thaw`` keep the control file open: one write."""

    driver: CgroupDriver
    rel: str
    _freeze_fd: int = field(default=-1, repr=False)
    _values: tuple[bytes, bytes] = (b"", b"")
    oom_baseline: int = 0
    applied: Limits | None = None  # the limits the cgroup has now
    frozen: bool = False

    def open(self) -> None:
        path, frozen, thawed = self.driver.freeze_file(self.rel)
        self._freeze_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._values = (frozen, thawed)

    def close(self) -> None:
        if self._freeze_fd >= 0:
            os.close(self._freeze_fd)
            self._freeze_fd = -1

    @property
    def procs_files(self) -> list[str]:
        return self.driver.procs_files(self.rel)

    def freeze(self) -> None:
        self.frozen = True
        try:
            os.write(self._freeze_fd, self._values[0])
        except OSError as exc:
            raise SandboxError(f"cannot freeze cgroup {self.rel}: {exc.strerror}") from exc

    def thaw(self) -> None:
        self.frozen = False
        try:
            os.write(self._freeze_fd, self._values[1])
        except OSError as exc:
            raise SandboxError(f"cannot thaw cgroup {self.rel}: {exc.strerror}") from exc

    def set_limits(self, limits: Limits, *, new_tenant: bool = True) -> None:
        """Apply ``limits`` (writing only what changed).  ``new_tenant`` False: the same
        processes stay (a spare given its function), so the OOM baseline taken when
        they came stays too -- one read of memory.oom_control less on a cold start."""
        self.driver.set_limits(self.rel, limits, self.applied)
        self.applied = limits
        if new_tenant:
            self.oom_baseline = self.driver.oom_kills(self.rel)

    def kill(self) -> None:
        """SIGKILL every member without racing against fork (freeze, kill, thaw)."""
        if isinstance(self.driver, V2Driver):
            self.driver.kill(self.rel)  # cgroup.kill where the kernel has it
            return
        # Every member of a sandbox's cgroup lives in one pid namespace whose init is a
        # member too, and SIGKILL to an init takes the whole namespace down, children
        # forked meanwhile included: no freeze needed to win the race.  A frozen cgroup
        # is thawed so that the signals land.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.frozen:
            self.thaw()

    def pids(self) -> list[int]:
        return self.driver.pids(self.rel)

    def memory_usage(self) -> int:
        return self.driver.memory_usage(self.rel)

    def memory_peak(self) -> int:
        return self.driver.memory_peak(self.rel)

    def oom_killed(self) -> bool:
        return self.driver.oom_kills(self.rel) > self.oom_baseline


@dataclass(frozen=True)
class CgroupPoolStatistics:
    free: int
    in_use: int
    created: int


class CgroupPool:
    def __init__(self, driver: CgroupDriver, parent: str, *, initial: int = 8, max_free: int = 64):
        self.driver = driver
        self.parent = parent
        self.initial = initial
        self.max_free = max_free
        self._free: list[Cgroup] = []
        self._in_use: set[Cgroup] = set()
        self._next = 0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        """Reap what a previous worker left behind, then pre-create the pool.

        Returns how many leftover processes were killed.
        """
        killed = reap(self.driver, self.parent)
        self.driver.prepare_parent(self.parent)
        for _ in range(self.initial):
            self._free.append(self._create())
        return killed

    def close(self) -> None:
        for cg in [*self._free, *self._in_use]:
            cg.close()
        self._free.clear()
        self._in_use.clear()
        reap(self.driver, self.parent, quiet=True)
        with contextlib.suppress(SandboxError):
            self.driver.remove(self.parent)

    def _create(self) -> Cgroup:
        rel = f"{self.parent}/cg{self._next}"
        self._next += 1
        self.driver.create(rel)
        if isinstance(self.driver, V2Driver):
            oom_group = self.driver.root / rel / "memory.oom.group"
            if oom_group.exists():  # an OOM kill takes the whole sandbox, not half of it
                with contextlib.suppress(OSError):
                    oom_group.write_text("1")
        cg = Cgroup(self.driver, rel)
        cg.open()
        return cg

    # -- use -----------------------------------------------------------------------------
    def acquire(
        self, limits: Limits, prefer: set[Cgroup] | None = None, *, inside: bool = True
    ) -> Cgroup:
        """A free cgroup with ``limits`` applied.

        With ``prefer``, the first free cgroup that is (``inside=True``) or is not in
        that set is taken, if there is one.  FIFO otherwise: the longest-free cgroup has
        had the most time to get its parked parent.
        """
        cg = None
        if prefer is not None:
            for candidate in self._free:
                if (candidate in prefer) == inside:
                    cg = candidate
                    self._free.remove(candidate)
                    break
        if cg is None:
            cg = self._free.pop(0) if self._free else self._create()
        if cg.frozen:
            cg.thaw()
        cg.set_limits(limits)
        self._in_use.add(cg)
        return cg

    def in_use(self) -> list[Cgroup]:
        return list(self._in_use)

    def owns(self, cg: Cgroup) -> bool:
        return cg.rel.startswith(self.parent + "/") and "/" not in cg.rel[len(self.parent) + 1 :]

    def grow(self) -> Cgroup:
        """Create one more free cgroup (the caller parks a process in it)."""
        cg = self._create()
        self._free.append(cg)
        return cg

    def free(self) -> list[Cgroup]:
        return list(self._free)

    async def release(self, cg: Cgroup, timeout: float = 5.0) -> bool:
        """Kill every member, wait until the cgroup is empty, and pool it again.

        Returns whether the cgroup went back to the free list.
        """
        self._in_use.discard(cg)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.0005
        while True:
            try:
                if not cg.pids():
                    break
                cg.kill()
                if not cg.pids():
                    break
            except SandboxError as exc:
                log.warning("recycling cgroup %s: %s", cg.rel, exc)
            if loop.time() > deadline:
                # Leave it out of the pool; start-up reaping will retry.
                log.error("cgroup %s still has members after %.1fs; not reused", cg.rel, timeout)
                cg.close()
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        if len(self._free) < self.max_free:
            self._free.append(cg)
            return True
        cg.close()
        with contextlib.suppress(SandboxError):
            self.driver.remove(cg.rel)
        return False

    def statistics(self) -> CgroupPoolStatistics:
        return CgroupPoolStatistics(free=len(self._free), in_use=len(self._in_use), created=self._next)


def reap(driver: CgroupDriver, parent: str, rounds: int = 200, *, quiet: bool = False) -> int:
    """Kill every process below ``parent`` and remove its cgroups.  Returns kills."""
    import time

    if not driver.exists(parent):
        return 0
    killed = 0
    for child in driver.children(parent):
        killed += reap(driver, child, rounds, quiet=quiet)  # nested pools (the BE class) first
        pids = driver.pids(child)
        if pids:
            killed += len(pids)
            if not quiet:
                log.warning("reaping %d leftover process(es) in cgroup %s", len(pids), child)
        for _ in range(rounds):
            with contextlib.suppress(SandboxError):
                driver.kill(child)
            if not driver.pids(child):
                break
            time.sleep(0.005)
        try:
            driver.remove(child)
        except SandboxError as exc:
            log.error("cannot remove leftover cgroup %s: %s", child, exc)
    return killed


# The lowest CPU weight that still means "share": Kubernetes' BestEffort shares on v1,
# the minimum weight on v2.
BE_CPU_SHARES = 2
BE_CPU_WEIGHT = 1


def set_best_effort(driver: CgroupDriver, rel: str, *, idle: bool = False) -> bool:
    """Make ``rel`` best-effort: the lowest CPU weight, and with ``idle`` the kernel's
    idle class (``cpu.idle``, mainline >= 5.15) where the kernel has it.  Returns whether
    the idle class is in effect.  The one place warmstart makes a cgroup best-effort.

    A weight (like ``cpu.idle``) ranks a group only against its siblings, which is why the
    best-effort subtree hangs off the hierarchy's root (``warmstart-be/``) rather than
    beside the latency-sensitive one: there it ranks below every ordinary task on the
    host, the worker serving requests included.  An idle group refuses weight writes, so
    one that is idle already is left as it is (or, without ``idle``, made ordinary
    first).
    """
    v2 = isinstance(driver, V2Driver)
    d = driver.root / rel if v2 else driver.root / "cpu" / rel
    if not d.is_dir():
        raise SandboxError(f"cgroup {rel} does not exist (at {d})")
    weight = (d / "cpu.weight", str(BE_CPU_WEIGHT)) if v2 else (d / "cpu.shares", str(BE_CPU_SHARES))
    idle_file = d / "cpu.idle"
    has_idle = idle_file.exists()
    current = ""
    with contextlib.suppress(OSError):
        current = idle_file.read_text().strip()
    if idle and current == "1":
        return True
    steps = [(idle_file, "0"), weight] if current == "1" else [weight]
    if idle and has_idle:
        steps.append((idle_file, "1"))
    for path, value in steps:
        if path.exists():
            try:
                path.write_text(value)
            except OSError as exc:
                raise SandboxError(f"cannot write {value} to {path}: {exc}") from exc
    return idle and has_idle
