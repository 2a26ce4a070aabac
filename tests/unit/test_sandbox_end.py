"""How a destroyed sandbox's end is awaited (``Sandbox.end_fd``, ``_wait_eof``): the
pidfd of a forked sandbox's init, or the end of file of a fresh sandbox's exit pipe."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from warmstart.sandbox.cgpool import Cgroup
from warmstart.sandbox.cgroups import V1Driver
from warmstart.sandbox.manager import Sandbox, _wait_eof


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _sandbox(pid: int, *, forked: bool, exit_status: int = -1) -> Sandbox:
    a, b = socket.socketpair()
    b.close()
    cgroup = Cgroup(V1Driver(Path("/nonexistent")), "ws/cg0")
    return Sandbox("sb1", pid, a, cgroup, forked=forked, exit_status=exit_status)


def test_a_forked_sandbox_ends_when_its_init_exits() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sandbox = _sandbox(child.pid, forked=True)
    fd = sandbox.end_fd()
    assert fd >= 0

    async def main() -> None:
        waiting = asyncio.create_task(_wait_eof(fd, 60.0))
        await asyncio.sleep(0)
        assert not waiting.done()
        child.send_signal(signal.SIGKILL)
        await waiting

    try:
        asyncio.run(main())
    finally:
        child.kill()
        child.wait()
        sandbox.sock.close()
    assert _closed(fd)


def test_a_fresh_sandbox_ends_at_the_end_of_its_exit_pipe() -> None:
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    sandbox = _sandbox(os.getpid(), forked=False, exit_status=r)
    fd = sandbox.end_fd()
    assert fd >= 0
    sandbox.close_exit_fds()  # as destroy does: the duplicate keeps the pipe open

    async def main() -> None:
        waiting = asyncio.create_task(_wait_eof(fd, 60.0))
        await asyncio.sleep(0)
        os.write(w, b"signal: killed")  # the report comes before pid 1 is gone
        await asyncio.sleep(0.01)
        assert not waiting.done()
        os.close(w)
        await waiting

    asyncio.run(main())
    sandbox.sock.close()
    assert _closed(fd)


def test_waiting_gives_up_after_the_timeout_and_closes_the_fd() -> None:
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    asyncio.run(_wait_eof(r, 0.01))
    assert _closed(r)
    os.close(w)


def test_no_end_to_wait_for_without_a_cgroup_or_once_gone() -> None:
    a, b = socket.socketpair()
    assert Sandbox("sb1", os.getpid(), a, None).end_fd() == -1
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: no such process any more
    gone = _sandbox(child.pid, forked=True)
    assert gone.end_fd() == -1
    for s in (a, b, gone.sock):
        s.close()
