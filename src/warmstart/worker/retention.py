"""Retention: finished best-effort work is deleted once it is old enough.

An Event invocation keeps its payload and result, a job its items' results, so that
``GET /events/<id>`` and ``GET /jobs/<id>/results`` can answer; without an end they
would fill the disk (at two events a second, ~2.3 MB an hour).  This loop, under the
worker's supervisor, deletes what *finished* (succeeded, failed, dropped) more than
``event_retention_hours`` ago, and nothing queued or running.  A job goes when its last
item finished that long ago, with all its items.

Each pass deletes in batches of ``batch`` rows, each a short transaction on the
best-effort queue's thread (``WorkQueue.expire``), so the event loop never waits on it
and the queue's own writes slip in between.  In a cluster, etcd drops finished items
itself, under the retention lease they were written with (``cluster.queue``), and
``expire`` has nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmstart.worker.bequeue import WorkQueue

log = logging.getLogger(__name__)

INTERVAL_S = 60.0  # between passes (or a tenth of the retention, if that is shorter)
BATCH = 500  # rows a transaction
VACUUM_PAGES = 256  # free pages given back to the file system per step (1 MB at 4 KB)


@dataclass(frozen=True)
class RetentionStatistics:
    passes: int
    deleted: int  # rows (events, job items, jobs) deleted since start


class Retention:
    def __init__(
        self,
        queue: WorkQueue,
        retention_s: float,
        *,
        interval_s: float | None = None,
        batch: int = BATCH,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.queue = queue
        self.retention_s = retention_s
        self.interval_s = min(INTERVAL_S, retention_s / 10) if interval_s is None else interval_s
        self.batch = batch
        self._clock = clock  # wall clock: events are stamped with time.time()
        self._sleep = sleep
        self.passes = 0
        self.deleted = 0

    async def run(self) -> None:
        """The loop: a pass now (a restarted worker catches up at once), then one every
        ``interval_s``."""
        while True:
            await self.sweep()
            await self._sleep(self.interval_s)

    async def sweep(self, now: float | None = None) -> int:
        """One pass: delete what finished before ``now - retention``; how many rows."""
        before = (self._clock() if now is None else now) - self.retention_s
        total = 0
        while True:
            deleted = await self.queue.expire(before, self.batch)
            total += deleted
            if deleted == 0:
                break
            await asyncio.sleep(0)  # let the loop's other work use the queue's thread
        self.passes += 1
        self.deleted += total
        if total:
            log.info("retention: deleted %d finished event(s), job item(s) and job(s)", total)
            while await self.queue.vacuum(VACUUM_PAGES) > 0:
                await asyncio.sleep(0)
        return total

    def statistics(self) -> RetentionStatistics:
        return RetentionStatistics(self.passes, self.deleted)
