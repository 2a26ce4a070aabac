"""The best-effort dispatcher with fakes at its seams (registry, invoker, queue): admission,
outcomes, retries, requeue on eviction, a crashed loop restarted, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from warmstart.errors import NotFound, TooManyRequests
from warmstart.kinds import QoSClass, StartKind
from warmstart.lifecycle import Supervisor
from warmstart.qos.policy import QoSConfig, Reclaimed
from warmstart.worker import dispatcher as dispatcher_module
from warmstart.worker.dispatcher import Dispatcher
from warmstart.worker.invoker import Evicted, InvokeResult
from warmstart.worker.settings import Settings


@dataclass
class FakeQueue:
    """Pending rows in memory; outcomes recorded as the real queue records them."""

    pending_rows: list[tuple[str, str, bytes, int]] = field(default_factory=list)
    finished: dict[str, tuple[str, bytes, int]] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    fail_reads: int = 0

    async def take(self, limit: int, running: frozenset[str]) -> list[tuple[str, str, bytes, int]]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise RuntimeError("database is locked")
        done = set(self.finished) | running
        return [r for r in self.pending_rows if r[0] not in done][:limit]

    async def finish(self, event_id: str, status: str, result: bytes, attempts: int) -> None:
        self.finished[event_id] = (status, result, attempts)

    async def retry(self, event_id: str, attempts: int) -> None:
        self.retried[event_id] = attempts
        self.pending_rows = [
            (i, f, p, attempts if i == event_id else a) for i, f, p, a in self.pending_rows
        ]

    async def release(self, event_id: str) -> None:
        self.released.append(event_id)

    async def enqueue(self, function: str, payload: bytes) -> str:
        event_id = f"e{len(self.pending_rows)}"
        self.pending_rows.append((event_id, function, payload, 0))
        return event_id

    async def create_job(self, function: str, inputs: list[bytes]) -> str:
        return "job"

    async def close(self) -> None:
        return None


class FakeRegistry:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def get(self, name: str) -> object:
        if name not in self.names:
            raise NotFound(name)
        return object()

    def version(self, name: str, version: str) -> object:
        if version != "$LATEST":
            raise NotFound(f"{name}:{version}")
        return self.get(name)


class FakeInvoker:
    def __init__(self, behaviour: Callable[[str, bytes], Awaitable[InvokeResult]]) -> None:
        self.behaviour = behaviour
        self.running_be: dict[Any, Any] = {}
        self.calls: list[tuple[str, bytes, QoSClass]] = []
        self.evicted: list[list[str]] = []

    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        qos_class: QoSClass,
        max_response: int,
        qualifier: str | None = None,
    ) -> InvokeResult:
        self.calls.append((name, payload, qos_class))
        self.max_response = max_response
        return await self.behaviour(name, payload)

    def be_memory_mb(self) -> int:
        return 128 * len(self.running_be)

    def evict_be(self, ids: list[str]) -> None:
        self.evicted.append(ids)


def result(payload: bytes, error: str | None = None) -> InvokeResult:
    return InvokeResult("rid", payload, error, StartKind.WARM, 1.0, b"")


async def ok(name: str, payload: bytes) -> InvokeResult:
    return result(b'"done ' + payload + b'"')


def make(
    behaviour: Callable[[str, bytes], Awaitable[InvokeResult]] = ok,
    rows: int = 0,
    **settings: Any,
) -> tuple[Dispatcher, FakeQueue, FakeInvoker, Supervisor]:
    queue = FakeQueue([(f"e{i}", "fn", str(i).encode(), 0) for i in range(rows)])
    invoker = FakeInvoker(behaviour)
    tasks = Supervisor("test worker", min_backoff=0.0)
    d = Dispatcher(
        Settings(**settings),
        FakeRegistry({"fn"}),  # type: ignore[arg-type]
        invoker,  # type: ignore[arg-type]
        queue,  # type: ignore[arg-type]
        tasks,
    )
    return d, queue, invoker, tasks


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(5000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_pending_events_run_best_effort_and_their_outcomes_are_recorded() -> None:
    async def body() -> None:
        d, queue, invoker, tasks = make(rows=5, be_concurrency=2)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: len(queue.finished) == 5, "five outcomes")
        assert {s for s, _, _ in queue.finished.values()} == {"succeeded"}
        assert queue.finished["e3"] == ("succeeded", b'"done 3"', 1)
        assert {c[2] for c in invoker.calls} == {QoSClass.BE}
        await tasks.close()

    run(body)


def test_admission_never_exceeds_the_slots() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        peak = [0]
        now = [0]

        async def slow(name: str, payload: bytes) -> InvokeResult:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
            await gate.wait()
            now[0] -= 1
            return result(b"1")

        d, queue, _, tasks = make(slow, rows=6, be_concurrency=2)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: d.running == 2, "two running")
        for _ in range(20):
            await asyncio.sleep(0)
        assert peak[0] == 2 and d.running == 2
        gate.set()
        await until(lambda: len(queue.finished) == 6, "all outcomes")
        assert peak[0] == 2
        await tasks.close()

    run(body)


def test_reclaimed_capacity_sets_the_slots() -> None:
    d, _, _, _ = make(be_concurrency=8, min_be_concurrency=1)

    @dataclass
    class FakeQoS:
        reclaimed: Reclaimed
        config: QoSConfig = field(default_factory=QoSConfig)
        enabled: bool = True

    assert d.slots() == 8  # no QoS manager: the cap
    qos = FakeQoS(Reclaimed(0.5, 4 << 30))
    d.qos = qos  # type: ignore[assignment]
    assert d.slots() == 2  # 0.5 cores / 0.25 per BE instance
    qos.reclaimed = Reclaimed(0.0, 0)
    assert d.slots() == 1  # nothing reclaimed: the floor
    qos.enabled = False
    assert d.slots() == 8


def test_function_errors_are_retried_then_failed() -> None:
    async def body() -> None:
        async def fails(name: str, payload: bytes) -> InvokeResult:
            return result(b'{"errorType": "ValueError"}', "Unhandled")

        d, queue, invoker, tasks = make(fails, rows=1, event_retries=2)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: "e0" in queue.finished, "the final outcome")
        assert queue.finished["e0"][0] == "failed" and queue.finished["e0"][2] == 3
        assert len(invoker.calls) == 3
        await tasks.close()

    run(body)


def test_deleted_function_drops_the_event_and_eviction_requeues_it() -> None:
    async def body() -> None:
        evictions = [1]

        async def behaviour(name: str, payload: bytes) -> InvokeResult:
            if payload == b"0":
                raise NotFound("gone")
            if evictions[0]:
                evictions[0] -= 1
                raise Evicted("evicted")
            return result(b"1")

        d, queue, invoker, tasks = make(behaviour, rows=2)
        d.registry.names.discard("fn")  # type: ignore[attr-defined]
        queue.pending_rows[1] = ("e1", "other", b"1", 0)
        d.registry.names.add("other")  # type: ignore[attr-defined]
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: len(queue.finished) == 2, "both outcomes")
        assert queue.finished["e0"][0] == "dropped"
        # Evicted once, not an attempt: released, run again, succeeded at its first attempt.
        assert queue.finished["e1"] == ("succeeded", b"1", 1)
        assert queue.released == ["e1"]
        assert [c[1] for c in invoker.calls].count(b"1") == 2
        await tasks.close()

    run(body)


def test_a_missing_artifact_fails_the_event_but_keeps_the_function() -> None:
    async def body() -> None:
        async def no_image(name: str, payload: bytes) -> InvokeResult:
            raise NotFound("image gone from its registry")

        d, queue, _, tasks = make(no_image, rows=1)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: "e0" in queue.finished, "the outcome")
        assert queue.finished["e0"] == ("failed", b"image gone from its registry", 1)
        await tasks.close()

    run(body)


def test_a_refused_event_is_deferred_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatcher_module, "DEFER_S", 0.0)

    async def body() -> None:
        refusals = [2]

        async def busy(name: str, payload: bytes) -> InvokeResult:
            if refusals[0]:
                refusals[0] -= 1
                raise TooManyRequests("node busy")
            return result(b"ok")

        d, queue, _, tasks = make(busy, rows=1)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: "e0" in queue.finished, "the outcome")
        assert queue.finished["e0"] == ("succeeded", b"ok", 1)
        await tasks.close()

    run(body)


def test_a_crashed_dispatcher_loop_is_logged_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        d, queue, _, tasks = make(rows=3)
        queue.fail_reads = 1
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await until(lambda: len(queue.finished) == 3, "outcomes after the restart")
        assert tasks.statistics().restarts == 1
        await tasks.close()

    with caplog.at_level(logging.ERROR, logger="warmstart.lifecycle"):
        run(body)
    assert any("loop dispatcher crashed" in r.getMessage() for r in caplog.records)


def test_shutdown_cancels_invocations_in_flight_and_leaves_them_pending() -> None:
    async def body() -> None:
        started = asyncio.Event()

        async def forever(name: str, payload: bytes) -> InvokeResult:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        d, queue, _, tasks = make(forever, rows=1)
        await tasks.start()
        tasks.loop("dispatcher", d.run)
        await started.wait()
        await tasks.stop_loops()
        d.cancel_running()
        await tasks.close()
        assert queue.finished == {} and d.running == 0

    run(body)


def test_enqueue_and_jobs_check_the_function() -> None:
    async def body() -> None:
        d, _, _, _ = make()
        with pytest.raises(NotFound):
            await d.enqueue("nope", b"{}")
        with pytest.raises(NotFound):
            await d.submit_job("nope", [b"{}"])
        from warmstart.errors import InvalidParameter

        with pytest.raises(InvalidParameter):
            await d.submit_job("fn", [])

    run(body)
