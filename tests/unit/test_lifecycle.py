"""The task supervisor: loops restarted after a crash, one-shot failures logged, staged close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from warmstart.lifecycle import Supervisor, SupervisorClosed, close_all


async def wait_for_state(predicate: object, what: str, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_crashed_loop_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = []

    async def main() -> None:
        sup = Supervisor("test", min_backoff=0.0)
        await sup.start()
        proceed = asyncio.Event()

        async def body() -> None:
            runs.append(len(runs))
            if len(runs) == 1:
                raise ValueError("boom once")
            await proceed.wait()

        sup.loop("body", body)
        await wait_for_state(lambda: len(runs) == 2, "the loop's second run")
        assert sup.statistics().restarts == 1
        assert sup.statistics().loops == 1
        await sup.close()
        assert sup.statistics().loops == 0

    with caplog.at_level(logging.ERROR, logger="warmstart.lifecycle"):
        asyncio.run(main())
    crash = [r for r in caplog.records if "loop body crashed" in r.getMessage()]
    assert len(crash) == 1
    assert crash[0].exc_info is not None and "boom once" in str(crash[0].exc_info[1])


def test_backoff_doubles_and_is_capped() -> None:
    delays: list[float] = []

    async def main() -> None:
        async def fake_sleep(delay: float) -> None:
            delays.append(delay)

        sup = Supervisor("test", min_backoff=0.001, max_backoff=0.004, sleep=fake_sleep)
        await sup.start()

        async def body() -> None:
            if len(delays) < 5:
                raise RuntimeError("again")
            await asyncio.Event().wait()

        sup.loop("body", body)
        await wait_for_state(lambda: len(delays) >= 5, "five restarts")
        await sup.close()

    asyncio.run(main())
    assert delays[:5] == [0.001, 0.002, 0.004, 0.004, 0.004]


def test_a_loop_that_returns_is_not_restarted() -> None:
    runs = []

    async def main() -> None:
        sup = Supervisor("test", min_backoff=0.0)
        await sup.start()

        async def body() -> None:
            runs.append(1)

        sup.loop("once", body)
        await wait_for_state(lambda: sup.statistics().loops == 0, "the loop to end")
        await sup.close()

    asyncio.run(main())
    assert runs == [1]


def test_one_shot_failures_are_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Supervisor:
        sup = Supervisor("test")
        await sup.start()

        async def fails() -> None:
            raise KeyError("lost?")

        task = sup.spawn(fails(), "fails")
        await asyncio.wait([task])
        await sup.close()
        return sup

    with caplog.at_level(logging.ERROR, logger="warmstart.lifecycle"):
        sup = asyncio.run(main())
    assert sup.statistics().failures == 1
    assert any("task fails failed" in r.getMessage() for r in caplog.records)


def test_close_cancels_loops_then_drains_cleanups() -> None:
    order: list[str] = []

    async def main() -> None:
        sup = Supervisor("test")
        await sup.start()
        release = asyncio.Event()

        async def cleanup() -> None:
            await release.wait()
            order.append("cleanup done")

        async def loop_body() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                order.append("loop stopped")
                # Work handed over while closing still runs to its end.
                sup.spawn(cleanup(), "cleanup")

        sup.loop("body", loop_body)
        await asyncio.sleep(0)
        closing = asyncio.get_running_loop().create_task(sup.close())
        await wait_for_state(lambda: "loop stopped" in order, "the loop to stop")
        assert not closing.done()  # waiting for the cleanup
        release.set()
        await closing

    asyncio.run(main())
    assert order == ["loop stopped", "cleanup done"]


def test_close_cancels_what_hangs(caplog: pytest.LogCaptureFixture) -> None:
    cancelled = []

    async def main() -> None:
        sup = Supervisor("test", drain_timeout=0.01)
        await sup.start()

        async def hangs() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        sup.spawn(hangs(), "hangs")
        await asyncio.sleep(0)
        await sup.close()

    with caplog.at_level(logging.WARNING, logger="warmstart.lifecycle"):
        asyncio.run(main())
    assert cancelled == [True]
    assert any("test:hangs" in r.getMessage() for r in caplog.records)


def test_no_work_before_start_or_after_close() -> None:
    async def main() -> None:
        sup = Supervisor("test")

        async def nothing() -> None:
            return None

        with pytest.raises(SupervisorClosed):
            sup.spawn(nothing(), "early")
        await sup.start()
        await sup.close()
        with pytest.raises(SupervisorClosed):
            sup.spawn(nothing(), "late")
        with pytest.raises(SupervisorClosed):
            sup.loop("late", nothing)  # the factory is never called

    asyncio.run(main())


def test_close_all_runs_every_step_and_raises_what_failed() -> None:
    ran: list[str] = []

    def bad() -> None:
        ran.append("bad")
        raise OSError("first")

    async def good() -> None:
        ran.append("good")

    async def worse() -> None:
        ran.append("worse")
        raise ValueError("second")

    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(close_all(("bad", bad), ("good", good), ("worse", worse)))
    assert ran == ["bad", "good", "worse"]
    assert [type(e) for e in info.value.exceptions] == [OSError, ValueError]

    with pytest.raises(OSError, match="first"):
        asyncio.run(close_all(("bad", bad)))
    asyncio.run(close_all(("good", good)))
