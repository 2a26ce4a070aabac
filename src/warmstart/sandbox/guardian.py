"""The guardian: a small process that takes a dead worker's sandboxes down with it.

Most of what a worker starts dies with it on its own: the spawner and the parked
processes by a parent-death signal, a running sandbox's pid 1 when the worker's end of
its socket hangs up, a lazy image's FUSE daemon when it sees its parent change.  A
*frozen* task does none of that: the cgroup v1 freezer holds it in the refrigerator,
where a pending SIGKILL waits until the cgroup is thawed -- and a zygote whose forked
instances are frozen cannot finish exiting either (the kernel's pid-namespace teardown
waits for every task of the namespace).  Without help they stay until the next start
reaps the data dir's cgroups, which may be never.

So the worker starts this process once, at start, in a session of its own (Ctrl-C in
the worker's terminal and a signal to the worker's process group do not reach it; it
ignores SIGINT, SIGHUP and SIGTERM too) and keeps the write end of a pipe that no other
process holds.  The guardian blocks reading the other end:

* ``STAND_DOWN`` then EOF: the worker closed its sandboxes itself; exit, touching nothing
  (a new worker may already be using the same cgroup paths).
* EOF alone: the worker is gone -- SIGKILL, an OOM kill, a crash -- since the kernel
  closes a dead process's descriptors.  Kill every member of the worker's cgroup
  subtrees (freeze, SIGKILL, thaw: a frozen task acts on the signal once thawed, and a
  forking one cannot slip out), wait until they are empty, remove them, log what it
  killed, exit.

The guardian also holds a duplicate of the worker's data-dir lock (the same open file
description, so the same ``flock``): a worker restarted on the data dir waits for the
sweep to finish instead of building its pool in cgroups the guardian is emptying.  Start-up
reaping stays: a guardian killed along with its worker (SIGKILL to the whole unit) leaves
the sweep to the next start.

Nothing here runs on the invocation path.  It imports only the standard library and the
cgroup drivers, so it starts small and stays small while it waits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import SandboxError
from warmstart.sandbox.cgroups import CgroupDriver, detect

log = logging.getLogger("warmstart.sandbox.guardian")  # not __main__ under -m

STAND_DOWN = b"S"  # the worker cleaned up itself: the guardian has nothing to do
SWEEP_TIMEOUT_S = 10.0  # after that, what is left is logged and left to start-up reaping


@dataclass(frozen=True)
class SweepReport:
    """What one sweep found and did."""

    killed: int  # processes that were members of the subtrees
    frozen: int  # cgroups that were frozen (and were thawed)
    cgroups: int  # cgroups found
    left: tuple[str, ...]  # cgroups still holding processes when the sweep gave up

    @property
    def clean(self) -> bool:
        return not self.left


def _walk(driver: CgroupDriver, rel: str) -> list[str]:
    """``rel`` and every cgroup below it, deepest first."""
    out: list[str] = []
    for child in driver.children(rel):
        out += _walk(driver, child)
    out.append(rel)
    return out


def _is_frozen(driver: CgroupDriver, rel: str) -> bool:
    path, _frozen, thawed = driver.freeze_file(rel)
    try:
        return path.read_bytes().strip() != thawed
    except OSError:
        return False


def sweep(
    targets: Sequence[tuple[CgroupDriver, str]],
    *,
    timeout: float = SWEEP_TIMEOUT_S,
) -> SweepReport:
    """Kill every process in the ``(driver, subtree)`` targets, wait for them to go, and
    remove the subtrees.  Never raises for a cgroup it cannot handle: it logs, and says
    so in the report."""
    cgroups = [(d, rel) for d, top in targets if d.exists(top) for rel in _walk(d, top)]
    frozen = 0
    victims: set[int] = set()
    # One pass that kills everything first, so no sandbox waits for the others' exits.
    for driver, rel in cgroups:
        try:
            was_frozen = _is_frozen(driver, rel)
            frozen += was_frozen
            members = driver.pids(rel)
            victims.update(members)
            if members:
                driver.kill(rel)  # freeze, SIGKILL, thaw (v2: cgroup.kill)
            elif was_frozen:
                driver.thaw(rel)
        except SandboxError as exc:
            log.error("guardian: cannot kill the members of %s: %s", rel, exc)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        left = []
        for driver, rel in cgroups:
            with contextlib.suppress(SandboxError):
                members = driver.pids(rel)
                if members:
                    left.append((driver, rel))
                    victims.update(members)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
        for driver, rel in left:  # a task forked meanwhile, or a kill that failed
            with contextlib.suppress(SandboxError):
                driver.kill(rel)
    for driver, top in targets:
        try:
            driver.remove(top)
        except SandboxError as exc:
            log.error("guardian: %s", exc)
    return SweepReport(
        killed=len(victims),
        frozen=frozen,
        cgroups=len(cgroups),
        left=tuple(sorted(rel for _, rel in left)),
    )


def watch(fd: int) -> bool:
    """Block until the worker hangs up; whether it stood us down first."""
    stood_down = False
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        if not data:
            return stood_down
        stood_down = stood_down or STAND_DOWN in data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warmstart.sandbox.guardian")
    parser.add_argument("--watch-fd", type=int, required=True, help="read end of the pipe")
    parser.add_argument("--lock-fd", type=int, default=-1, help="the data dir's lock")
    parser.add_argument("--worker-pid", type=int, default=0)
    parser.add_argument("--cgroup-root", type=Path, default=Path("/sys/fs/cgroup"))
    parser.add_argument("--subtree", action="append", default=[], help="a cgroup subtree")
    parser.add_argument(
        "--cpuset-subtree",
        action="append",
        default=[],
        help="a cgroup subtree whose cgroups also join the cpuset controller",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        if watch(args.watch_fd):
            return 0
        driver = detect(args.cgroup_root)
        if driver is None:
            log.error("guardian: no usable cgroup hierarchy at %s", args.cgroup_root)
            return 1
        targets = [(driver, rel) for rel in args.subtree]
        targets += [(driver.with_cpuset(), rel) for rel in args.cpuset_subtree]
        report = sweep(targets)
        subtrees = ", ".join([*args.subtree, *args.cpuset_subtree])
        if report.killed or report.frozen:
            log.warning(
                "guardian: worker pid %d is gone; killed %d sandbox process(es) in %d "
                "cgroup(s) (%d frozen) under %s",
                args.worker_pid,
                report.killed,
                report.cgroups,
                report.frozen,
                subtrees,
            )
        else:
            log.info(
                "guardian: worker pid %d is gone; nothing was left in %s", args.worker_pid, subtrees
            )
        if not report.clean:
            log.error(
                "guardian: cgroups still hold processes: %s (the next start reaps them)",
                ", ".join(report.left),
            )
            return 1
        return 0
    finally:
        if args.lock_fd >= 0:  # a restarted worker may take the data dir from here on
            with contextlib.suppress(OSError):
                os.close(args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
