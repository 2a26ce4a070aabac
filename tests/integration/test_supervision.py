"""Every loop of a real worker (linux sandboxes, cgroups, the QoS tick) survives a crash:
each is made to raise once, and the test sees the crash logged and the loop running again.
Then the worker closes cleanly and leaves no task behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_root
from warmstart.worker import Settings, Worker

pytestmark = [pytest.mark.integration, needs_root]


def _raise_once(calls: list[str], name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if calls.count(name) == 1:
            raise RuntimeError(f"{name} fails once")
        return original(*args, **kwargs)

    return wrapper


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_each_worker_loop_is_logged_and_restarted_after_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def main() -> None:
        worker = Worker(
            Settings(data_dir=tmp_path / "data", isolation="linux", zygotes=False, cgroup_pool=2)
        )
        await worker.start()
        try:
            qos = worker._qos
            assert qos is not None, "the QoS loop runs with linux isolation"
            # One fault per loop: the sweeper's cache pass, the dispatcher's queue read,
            # and the QoS tick (which runs on the QoS manager's thread).
            cache = worker._cache
            cache.enforce = _raise_once(calls, "sweeper", cache.enforce)  # type: ignore[method-assign]
            queue = worker._dispatcher.queue
            pending = queue.pending

            async def pending_once(limit: int) -> Any:
                calls.append("dispatcher")
                if calls.count("dispatcher") == 1:
                    raise RuntimeError("dispatcher fails once")
                return await pending(limit)

            queue.pending = pending_once  # type: ignore[method-assign]
            qos.tick = _raise_once(calls, "qos", qos.tick)  # type: ignore[method-assign]
            worker._dispatcher._wakeup.set()  # read the queue now, not after a second
            # Each ran again after its crash: the fault was called a second time.
            await _until(
                lambda: all(calls.count(n) >= 2 for n in ("sweeper", "dispatcher", "qos")),
                "every loop to run again",
            )
            assert worker.tasks.statistics().restarts == 3
            assert worker.tasks.statistics().loops == 4  # and the retention pass
        finally:
            await worker.close()
        assert worker.tasks.statistics().loops == 0
        assert worker.tasks.statistics().tasks == 0

    with caplog.at_level(logging.ERROR, logger="warmstart.lifecycle"):
        asyncio.run(main())
    crashed = sorted(
        r.getMessage().split(" loop ")[1].split(" ")[0]
        for r in caplog.records
        if "crashed; restarting" in r.getMessage()
    )
    assert crashed == ["dispatcher", "qos", "sweeper"]
    assert all(
        r.exc_info is not None for r in caplog.records if "crashed; restarting" in r.getMessage()
    )
