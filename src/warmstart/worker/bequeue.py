"""The best-effort queue's SQLite traffic, kept off the event loop.

One asyncio loop serves every latency-sensitive request, so anything else it does is
latency added to whichever request is waiting behind it.  Best-effort bookkeeping is
plentiful (a job of ten thousand items is ten thousand outcomes, and inserting it took
~60 ms in one go here) and never urgent, so it runs on a thread of its own, over an
SQLite connection of its own (WAL: its writes do not block the loop's reads), and the
outcomes of finished invocations are written in batches, one transaction per
``flush_after_s``.

An outcome waiting for its batch is not yet in SQLite, where the event still reads as
pending: ``pending()`` leaves such events out, so nothing runs twice while the worker
lives.  A worker killed before a batch is written runs those events again after its
restart, which the queue's at-least-once contract allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from warmstart.functions import FunctionStore

log = logging.getLogger(__name__)

T = TypeVar("T")
PendingRow = tuple[str, str, bytes, int]  # id, function, payload, attempts


class WorkQueue(Protocol):
    """Where Event invocations and job items wait, durably, and where their outcomes go.

    ``take`` hands the dispatcher up to ``limit`` items to run now; every item taken ends
    in ``finish`` (final), ``retry`` (a failed attempt: pending again) or ``release``
    (not run after all -- evicted, or the node was busy: pending again, no attempt
    counted).  ``expire`` deletes some of the events and jobs that finished before a
    time (``worker.retention`` calls it until it returns 0), and ``vacuum`` returns the space
they took to the file system where it can.  A single node keeps the queue in SQLite (``BEQueue``); a cluster in etcd,
    where ``take`` claims items under the node's lease (``cluster.queue.EtcdQueue``).
    """

    async def enqueue(self, function: str, payload: bytes) -> str: ...
    async def create_job(self, function: str, inputs: list[bytes]) -> str: ...
    async def take(self, limit: int, running: frozenset[str]) -> list[PendingRow]: ...
    async def finish(self, event_id: str, status: str, result: bytes, attempts: int) -> None: ...
    async def retry(self, event_id: str, attempts: int) -> None: ...
    async def release(self, event_id: str) -> None: ...
    async def job(self, job_id: str) -> dict[str, Any] | None: ...
    async def jobs(self) -> list[dict[str, Any]]: ...
    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None: ...
    async def event(self, event_id: str) -> dict[str, Any] | None: ...
    async def depth(self) -> int: ...
    async def expire(self, before: float, limit: int) -> int: ...
    async def vacuum(self, pages: int) -> int: ...
    async def close(self) -> None: ...


class BEQueue:
    """The single node's ``WorkQueue``: SQLite, on a thread of its own."""

    def __init__(self, store: FunctionStore, *, flush_after_s: float = 0.05) -> None:
        self._store = store
        self._handle: FunctionStore | None = None  # opened, used and closed on the thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warmstart-be-db")
        self.flush_after = flush_after_s
        self._finished: list[tuple[str, str, bytes, int]] = []
        self._retried: list[tuple[str, int]] = []
        self._unwritten: set[str] = set()  # events whose outcome waits for its batch
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    # -- on the thread ---------------------------------------------------------------------
    def _db(self) -> FunctionStore:
        if self._handle is None:
            self._handle = self._store.another_handle()
        return self._handle

    async def run(self, fn: Callable[[FunctionStore], T]) -> T:
        """Run ``fn(store)`` on the queue's thread, with its own connection."""
        if self._closed:
            raise RuntimeError("the best-effort queue is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._db()))

    # -- the WorkQueue ----------------------------------------------------------------------
    async def enqueue(self, function: str, payload: bytes) -> str:
        return await self.run(lambda db: db.enqueue_event(function, payload))

    async def create_job(self, function: str, inputs: list[bytes]) -> str:
        return await self.run(lambda db: db.create_job(function, inputs))

    async def take(self, limit: int, running: frozenset[str]) -> list[PendingRow]:
        """Pending events to run now, without those ``running`` already."""
        rows = await self.pending(limit + len(running))
        return [row for row in rows if row[0] not in running][:limit]

    async def release(self, event_id: str) -> None:
        """Nothing to do: an event stays pending in SQLite until its outcome is written."""

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return await self.run(lambda db: db.job(job_id))

    async def jobs(self) -> list[dict[str, Any]]:
        return await self.run(lambda db: db.jobs())

    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None:
        def read(db: FunctionStore) -> list[dict[str, Any]] | None:
            return None if db.job(job_id) is None else db.job_results(job_id)

        return await self.run(read)

    async def event(self, event_id: str) -> dict[str, Any] | None:
        return await self.run(lambda db: db.event(event_id))

    async def depth(self) -> int:
        return await self.run(lambda db: db.pending_count())

    async def expire(self, before: float, limit: int) -> int:
        """Delete up to ``limit`` rows of events and jobs finished before ``before``, in
        one or two short transactions on the queue's thread (the loop's own writes and
        the API's reads go on between calls); how many rows went, 0 when none is left."""

        def expire(db: FunctionStore) -> int:
            deleted = db.expire_events(before, limit)
            if deleted < limit:
                for job_id in db.expired_jobs(before, 1):
                    deleted += db.expire_job(job_id, limit - deleted)
            return deleted

        return await self.run(expire)

    async def vacuum(self, pages: int) -> int:
        """Give free pages back to the file system (``FunctionStore.vacuum_some``)."""
        return await self.run(lambda db: db.vacuum_some(pages))

    async def pending(self, limit: int) -> list[PendingRow]:
        """Up to ``limit`` pending events, oldest first, without those whose outcome is
        recorded but not written yet."""
        if limit <= 0:
            return []
        before = set(self._unwritten)
        rows = await self.run(lambda db: db.pending_events(limit + len(before)))
        # An outcome recorded while the query ran is excluded too (``_unwritten`` now);
        # one written meanwhile was read either way, so the snapshot excludes it.
        skip = before | self._unwritten
        return [row for row in rows if row[0] not in skip][:limit]

    async def finish(self, event_id: str, status: str, result: bytes, attempts: int) -> None:
        """Record a final outcome, written with the next batch
        (``FunctionStore.record_outcomes``)."""
        self._finished.append((event_id, status, result, attempts))
        self._recorded(event_id)

    async def retry(self, event_id: str, attempts: int) -> None:
        """Record a failed attempt that will be retried; the event is offered again once
        the batch is written."""
        self._retried.append((event_id, attempts))
        self._recorded(event_id)

    def _recorded(self, event_id: str) -> None:
        self._unwritten.add(event_id)
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_after)
        await self.flush()

    async def flush(self) -> None:
        """Write every recorded outcome now, in one transaction."""
        self._flusher = None
        finished, retried = self._finished, self._retried
        if not finished and not retried:
            return
        self._finished, self._retried = [], []
        try:
            await self.run(lambda db: db.record_outcomes(finished, retried))
        except (sqlite3.Error, RuntimeError) as exc:
            # Still pending in SQLite: the events run again (at least once).
            log.error(
                "cannot record %d best-effort outcome(s): %s", len(finished) + len(retried), exc
            )
        finally:
            self._unwritten.difference_update(i for i, *_ in finished)
            self._unwritten.difference_update(i for i, _ in retried)

    async def close(self) -> None:
        """Write what is recorded, then close the connection and stop the thread."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        self._closed = True
        handle, self._handle = self._handle, None
        loop = asyncio.get_running_loop()
        if handle is not None:
            await loop.run_in_executor(self._executor, handle.close)
        await loop.run_in_executor(None, self._executor.shutdown)
