"""The best-effort queue's bookkeeping thread, against a real SQLite state.db."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from warmstart.functions import FunctionStore
from warmstart.worker.bequeue import BEQueue


def _queue(tmp_path: Path, flush_after_s: float = 60.0) -> tuple[FunctionStore, BEQueue]:
    store = FunctionStore(tmp_path / "data")
    return store, BEQueue(store, flush_after_s=flush_after_s)


def test_outcomes_are_written_in_one_batch_and_hidden_until_then(tmp_path: Path) -> None:
    store, queue = _queue(tmp_path)

    async def main() -> None:
        job = await queue.run(lambda db: db.create_job("f", [b"1", b"2", b"3"]))
        rows = await queue.pending(10)
        assert [r[0] for r in rows] == [f"{job}/0", f"{job}/1", f"{job}/2"]
        await queue.finish(f"{job}/0", "succeeded", b"one", 1)
        await queue.retry(f"{job}/1", 1)
        # Not written yet: SQLite still says pending, the queue does not offer them.
        assert store.job(job)["pending"] == 3  # type: ignore[index]
        assert [r[0] for r in await queue.pending(10)] == [f"{job}/2"]
        assert [r[0] for r in await queue.pending(1)] == [f"{job}/2"]
        await queue.flush()
        assert store.event(f"{job}/0") == {
            "function": "f",
            "status": "succeeded",
            "attempts": 1,
            "result": "one",
        }
        # A retried event is offered again, with its attempt counted.
        rows = await queue.pending(10)
        assert [(r[0], r[3]) for r in rows] == [(f"{job}/1", 1), (f"{job}/2", 0)]
        await queue.close()

    asyncio.run(main())
    store.close()


def test_the_batch_is_written_after_flush_after_s_off_the_loop_thread(tmp_path: Path) -> None:
    store, queue = _queue(tmp_path, flush_after_s=0.01)
    threads: set[str] = set()

    async def main() -> None:
        event_id = store.enqueue_event("f", b"{}")
        real = queue._db

        def spy() -> FunctionStore:
            threads.add(threading.current_thread().name)
            return real()

        queue._db = spy  # type: ignore[method-assign]
        await queue.finish(event_id, "failed", b"boom", 3)
        for _ in range(200):
            if store.event(event_id)["status"] == "failed":  # type: ignore[index]
                break
            await asyncio.sleep(0.01)
        assert store.event(event_id)["status"] == "failed"  # type: ignore[index]
        await queue.close()

    asyncio.run(main())
    assert threads and threading.main_thread().name not in threads
    store.close()


def test_close_writes_what_is_recorded(tmp_path: Path) -> None:
    store, queue = _queue(tmp_path)

    async def main() -> str:
        event_id = store.enqueue_event("f", b"{}")
        await queue.finish(event_id, "succeeded", b"ok", 1)
        await queue.close()
        with pytest.raises(RuntimeError, match="closed"):
            await queue.run(lambda db: db.pending_count())
        return event_id

    event_id = asyncio.run(main())
    assert store.event(event_id)["status"] == "succeeded"  # type: ignore[index]
    store.close()


def test_a_failed_write_leaves_the_events_pending_to_run_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, queue = _queue(tmp_path)

    async def main() -> None:
        event_id = store.enqueue_event("f", b"{}")
        handle = await queue.run(lambda db: db)

        def broken(*_args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        handle.record_outcomes = broken  # type: ignore[method-assign]
        await queue.finish(event_id, "succeeded", b"ok", 1)
        assert await queue.pending(10) == []
        await queue.flush()
        # At least once: the outcome is lost, the event is offered again.
        assert [r[0] for r in await queue.pending(10)] == [event_id]
        await queue.close()

    asyncio.run(main())
    assert "cannot record 1 best-effort outcome" in caplog.text
    store.close()


def test_the_queue_uses_a_connection_of_its_own(tmp_path: Path) -> None:
    store, queue = _queue(tmp_path)

    async def main() -> None:
        handle = await queue.run(lambda db: db)
        assert handle is not store and handle.db is not store.db
        # A transaction the loop's connection rolls back does not take the queue's
        # writes with it (on a shared connection they would have joined it).
        event_id = store.enqueue_event("f", b"{}")
        store.db.execute("BEGIN")
        await queue.finish(event_id, "succeeded", b"ok", 1)
        await queue.flush()
        store.db.execute("ROLLBACK")
        assert store.event(event_id)["status"] == "succeeded"  # type: ignore[index]
        await queue.close()

    asyncio.run(main())
    store.close()
