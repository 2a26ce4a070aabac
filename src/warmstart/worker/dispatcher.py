"""Best-effort work: Event invocations and batch jobs, durable in SQLite, run when there is room.

An Event invocation (or a job's item) is written to SQLite before the caller gets its
202, so a crash loses nothing.  The dispatcher's loop reads pending work only when a
best-effort slot is free -- within the capacity the QoS manager says latency-sensitive
work leaves unused (``qos.policy.be_admission``), never more than ``be_concurrency``, at
least ``min_be_concurrency`` -- and runs each in its own task under the worker's
supervisor, in the best-effort class.  A function error is retried up to
``event_retries`` times, as Lambda does; an invocation whose instance the QoS manager
evicted goes back to pending without counting as an attempt.  Every SQLite access runs on
the best-effort queue's thread (``BEQueue``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from warmstart.errors import (
    Conflict,
    InvalidParameter,
    InvalidRequestContent,
    NotFound,
    PlatformError,
    ServiceUnavailable,
    TooManyRequests,
)
from warmstart.kinds import QoSClass
from warmstart.lifecycle import Supervisor
from warmstart.qos.manager import BEInstance, QoSManager
from warmstart.qos.policy import be_admission
from warmstart.worker.bequeue import WorkQueue
from warmstart.worker.invoker import Evicted, Invoker
from warmstart.worker.registry import FunctionRegistry
from warmstart.worker.settings import Settings

log = logging.getLogger(__name__)

MAX_JOB_INPUTS = 100_000
DEFER_S = 1.0  # how long an event waits after the node refused it (429, platform error)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        registry: FunctionRegistry,
        invoker: Invoker,
        queue: WorkQueue,
        tasks: Supervisor,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.invoker = invoker
        self.queue = queue
        self.tasks = tasks
        self.qos: QoSManager | None = None  # set by the worker when the QoS loop runs
        self._wakeup = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}  # event id -> its task
        self._queue_unavailable = False

    # -- submitting ------------------------------------------------------------------------
    async def enqueue(self, name: str, payload: bytes) -> str:
        """Queue an Event invocation of ``name`` or ``name:version`` durably (written
        when this returns); returns its id."""
        self.registry.get(name.partition(":")[0])
        event_id = await self.queue.enqueue(name, payload)
        self._wakeup.set()
        return event_id

    async def submit_job(self, name: str, inputs: list[bytes]) -> str:
        """Queue ``inputs`` for ``name`` durably; they run like Event invocations.  The
        insert runs on the queue's thread: a large job takes tens of milliseconds to
        write, which the event loop owes to LS requests."""
        self.registry.get(name.partition(":")[0])
        if not inputs:
            raise InvalidParameter("a job needs at least one input")
        if len(inputs) > MAX_JOB_INPUTS:
            raise InvalidParameter(f"a job takes at most {MAX_JOB_INPUTS} inputs")
        job_id = await self.queue.create_job(name, inputs)
        self._wakeup.set()
        return job_id

    # -- reading ----------------------------------------------------------------------------
    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's progress (None if there is no such job)."""
        return await self.queue.job(job_id)

    async def jobs(self) -> list[dict[str, Any]]:
        return await self.queue.jobs()

    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None:
        """A job's results in input order (None if there is no such job)."""
        return await self.queue.job_results(job_id)

    async def event(self, event_id: str) -> dict[str, Any] | None:
        return await self.queue.event(event_id)

    async def queue_depth(self) -> int:
        return await self.queue.depth()

    # -- running ---------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """The loop: take pending work while best-effort slots are free.  Runs under the
        worker's supervisor; the tasks it starts outlive a crash of the loop itself, and
        a restarted loop sees them in ``_running``."""
        while True:
            self._wakeup.clear()
            free = self.slots() - len(self._running)
            if free > 0:
                try:
                    taken = await self.queue.take(free, frozenset(self._running))
                except ServiceUnavailable as exc:
                    # The queue lives elsewhere (a cluster's etcd) and is unreachable for
                    # now: what runs goes on; new work waits until it is back.
                    if not self._queue_unavailable:
                        log.warning("best-effort queue unavailable: %s", exc)
                    self._queue_unavailable = True
                    taken = []
                else:
                    self._queue_unavailable = False
                for event_id, fn, payload, attempts in taken:
                    if event_id in self._running:
                        continue
                    work = self._run_event(event_id, fn, payload, attempts)
                    task = self.tasks.spawn(work, f"event {event_id}")
                    self._running[event_id] = task
                    task.add_done_callback(self._done)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the event, and this loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wakeup.wait()

    def _done(self, task: asyncio.Task[None]) -> None:
        for event_id, running in list(self._running.items()):
            if running is task:
                del self._running[event_id]
        self._wakeup.set()

    def slots(self) -> int:
        """How many best-effort invocations may run now."""
        cap = self.settings.be_concurrency
        qos = self.qos
        if qos is None or not qos.enabled:
            return cap
        return be_admission(
            qos.reclaimed,
            len(self.invoker.running_be),
            self.invoker.be_memory_mb(),
            qos.config,
            most=cap,
            least=self.settings.min_be_concurrency,
        )

    async def _run_event(self, event_id: str, fn: str, payload: bytes, attempts: int) -> None:
        # ``fn`` is "name" ($LATEST as it is now) or "name:N" (the version it was routed to).
        name, _, version = fn.partition(":")
        try:
            # What is kept for it in the queue is bounded like its payload.
            result = await self.invoker.invoke(
                name,
                payload,
                qualifier=version or None,
                qos_class=QoSClass.BE,
                max_response=self.settings.max_event_bytes,
            )
        except NotFound as exc:
            if self._exists(name, version):  # the function is there; something it needs is not
                log.warning("event %s for %s failed: %s", event_id, fn, exc)
                await self.queue.finish(event_id, "failed", str(exc).encode(), attempts + 1)
            else:
                what = b"function version deleted" if version else b"function deleted"
                await self.queue.finish(event_id, "dropped", what, attempts)
            return
        except Evicted:
            await self.queue.release(event_id)  # it runs again when there is room (no attempt)
            return
        except (TooManyRequests, PlatformError) as exc:
            log.warning("event %s for %s deferred: %s", event_id, fn, exc)
            await asyncio.sleep(DEFER_S)
            await self.queue.release(event_id)
            return
        except (InvalidRequestContent, Conflict) as exc:  # Conflict: the function is Failed
            await self.queue.finish(event_id, "failed", str(exc).encode(), attempts + 1)
            return
        # Outcomes are written in batches on the queue's thread (``BEQueue``).
        attempts += 1
        if result.function_error is None:
            await self.queue.finish(event_id, "succeeded", result.payload, attempts)
        elif attempts > self.settings.event_retries:
            await self.queue.finish(event_id, "failed", result.payload, attempts)
        else:
            await self.queue.retry(event_id, attempts)

    def _exists(self, name: str, version: str) -> bool:
        try:
            self.registry.version(name, version or "$LATEST")
        except NotFound:
            return False
        return True

    # -- for the QoS manager ---------------------------------------------------------------
    def be_instances(self) -> list[BEInstance]:
        """Running BE instances for the QoS tick (which reads their memory off the loop)."""
        request = self.settings.qos_config.be_cpu_request
        return [
            BEInstance(inst.id, inst.sandbox.cgroup.rel, request)
            for inst in self.invoker.running_be
            if inst.sandbox.cgroup is not None
        ]

    def evict(self, ids: list[str]) -> None:
        self.invoker.evict_be(ids)

    def cancel_running(self) -> None:
        """Shutdown: stop the invocations in flight.  Their events have no outcome in
        SQLite, so they stay pending and run again after the restart (at least once)."""
        for task in list(self._running.values()):
            task.cancel()

    async def close(self) -> None:
        """Write the outcomes still waiting for their batch; close the queue's thread."""
        await self.queue.close()
