"""Retention of finished best-effort work: the queries (with an explicit 'now'), the
loop's batches over a real state.db, and a database from before the column existed."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from warmstart.functions import FunctionStore
from warmstart.worker.bequeue import BEQueue
from warmstart.worker.retention import Retention

HOUR = 3600.0


T0 = time.time()  # rows are created at the time; they finish later, at T0 + the argument


def _finish(store: FunctionStore, ids: list[str], at: float, status: str = "succeeded") -> None:
    store.record_outcomes([(i, status, b'"ok"', 1) for i in ids], now=T0 + at)


def _event_ids(store: FunctionStore) -> set[str]:
    return {r[0] for r in store.db.execute("SELECT id FROM events")}


def test_only_events_finished_before_the_cutoff_go(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path)
    old, recent, failed, dropped, queued, retried = (
        store.enqueue_event("f", b"{}") for _ in range(6)
    )
    _finish(store, [old], at=1000.0)
    _finish(store, [failed], at=1000.0, status="failed")
    _finish(store, [dropped], at=1000.0, status="dropped")
    _finish(store, [recent], at=5000.0)
    store.record_outcomes([], [(retried, 1)], now=1000.0)  # a failed attempt: still pending

    assert store.expire_events(before=T0 + 4000.0, limit=100) == 3
    assert _event_ids(store) == {recent, queued, retried}
    assert store.event(old) is None
    assert store.event(queued)["status"] == "pending"  # type: ignore[index]
    # Queued work is never old enough, whatever the cutoff.
    assert store.expire_events(before=10.0**12, limit=100) == 1
    assert _event_ids(store) == {queued, retried}


def test_expiry_goes_in_batches_of_the_limit(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path)
    ids = [store.enqueue_event("f", b"{}") for _ in range(7)]
    _finish(store, ids, at=1000.0)
    assert [store.expire_events(T0 + 2000.0, 3) for _ in range(4)] == [3, 3, 1, 0]


def test_a_job_goes_only_when_its_last_item_finished_before_the_cutoff(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path)
    done = store.create_job("f", [b"1", b"2", b"3"])
    running = store.create_job("f", [b"1", b"2"])
    late = store.create_job("f", [b"1", b"2"])
    _finish(store, [f"{done}/0", f"{done}/1"], at=1000.0)
    _finish(store, [f"{done}/2"], at=1500.0, status="failed")
    _finish(store, [f"{running}/0"], at=1000.0)  # its item 1 is still pending
    _finish(store, [f"{late}/0"], at=1000.0)
    _finish(store, [f"{late}/1"], at=3000.0)

    assert store.expired_jobs(before=T0 + 2000.0, limit=10) == [done]
    assert store.expired_jobs(before=T0 + 1200.0, limit=10) == []
    # Standalone expiry leaves job items to their job.
    assert store.expire_events(before=10.0**12, limit=100) == 0

    assert store.expire_job(done, 2) == 2  # two items; the job stays while one is left
    assert store.job(done) is not None
    assert store.expire_job(done, 2) == 2  # the last item, then the job itself
    assert store.job(done) is None and store.job_results(done) == []
    assert store.expire_job(done, 2) == 0
    assert store.expired_jobs(before=10.0**12, limit=10) == [late]
    assert store.job(running)["pending"] == 1  # type: ignore[index]


def test_the_loop_deletes_in_batches_with_a_fake_clock(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path / "data")
    queue = BEQueue(store, flush_after_s=60.0)
    clock = [T0 + 1000.0]
    retention = Retention(queue, 24 * HOUR, batch=4, clock=lambda: clock[0])

    async def main() -> None:
        events = [await queue.enqueue("f", b"{}") for _ in range(5)]
        job = await queue.create_job("f", [b"1", b"2", b"3"])
        queued = await queue.enqueue("f", b"{}")
        job_items = [f"{job}/{i}" for i in range(3)]
        await queue.run(lambda db: _finish(db, events + job_items, at=1000.0))

        clock[0] += 23 * HOUR
        assert await retention.sweep() == 0
        assert await queue.event(events[0]) is not None
        clock[0] += 2 * HOUR
        assert await retention.sweep() == 5 + 3 + 1  # events, job items, the job
        assert all([await queue.event(e) is None for e in events])
        assert await queue.job(job) is None
        assert await queue.job_results(job) is None
        assert (await queue.event(queued))["status"] == "pending"  # type: ignore[index]
        assert await queue.depth() == 1
        assert retention.statistics().deleted == 9
        await queue.close()

    asyncio.run(main())
    store.close()


def test_freed_pages_are_reused_and_given_back(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path)
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    ids = [store.enqueue_event("f", b"x" * 4000) for _ in range(300)]
    _finish(store, ids, at=1000.0)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    assert store.expire_events(T0 + 2000.0, 1000) == 300
    assert store.db.execute("PRAGMA freelist_count").fetchone()[0] > 0
    while store.vacuum_some(64) > 0:
        pass
    assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert store.db.execute("PRAGMA page_count").fetchone()[0] < pages / 2


def test_a_database_from_before_retention_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(
        """
        CREATE TABLE functions (name TEXT PRIMARY KEY, record TEXT NOT NULL);
        CREATE TABLE events (id TEXT PRIMARY KEY, function TEXT NOT NULL,
            payload BLOB NOT NULL, created REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending',
            result BLOB, job_id TEXT, idx INTEGER);
        CREATE TABLE jobs (id TEXT PRIMARY KEY, function TEXT NOT NULL, created REAL NOT NULL,
            total INTEGER NOT NULL);
        INSERT INTO events(id, function, payload, created, status) VALUES
            ('done', 'f', x'', 1000.0, 'succeeded'), ('waiting', 'f', x'', 1000.0, 'pending');
        """
    )
    db.commit()
    db.close()
    store = FunctionStore(tmp_path)
    # Finished before the column existed: aged from its creation.
    assert store.expire_events(before=2000.0, limit=10) == 1
    assert _event_ids(store) == {"waiting"}
    assert store.vacuum_some(64) == 0  # not incremental: free pages are reused instead
