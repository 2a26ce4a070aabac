"""The cluster's work queue on the in-memory etcd (whose contract is checked against real
etcd): claims under leases, outcomes, retries, releases, a dead node's work requeued,
jobs and their results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from warmstart.cluster.etcd import MemoryEtcd
from warmstart.cluster.queue import EtcdQueue
from warmstart.errors import InvalidParameter


@dataclass
class FakeMembership:
    name: str
    lease: int


async def node(etcd: MemoryEtcd, name: str) -> tuple[EtcdQueue, FakeMembership]:
    m = FakeMembership(name, await etcd.grant(6))
    return EtcdQueue(etcd, m), m  # type: ignore[arg-type]


def run(body: Callable[[MemoryEtcd], Awaitable[None]]) -> None:
    asyncio.run(body(MemoryEtcd()))


def test_two_nodes_never_take_the_same_item() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, _ = await node(etcd, "a")
        b, _ = await node(etcd, "b")
        ids = [await a.enqueue("fn", f'{{"n": {i}}}'.encode()) for i in range(5)]
        assert await a.depth() == 5
        got_a = await a.take(3, frozenset())
        got_b = await b.take(10, frozenset())
        assert [r[0] for r in got_a] == ids[:3]  # oldest first
        assert [r[0] for r in got_b] == ids[3:]
        assert got_a[0][1:] == ("fn", b'{"n": 0}', 0)
        assert await a.take(1, frozenset()) == []  # all claimed

    run(body)


def test_outcomes_retries_and_releases() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, _ = await node(etcd, "a")
        first = await a.enqueue("fn", b"1")
        second = await a.enqueue("fn", b"2")
        third = await a.enqueue("fn", b"3")
        assert len(await a.take(3, frozenset())) == 3
        await a.finish(first, "succeeded", b'{"ok": true}', 1)
        await a.retry(second, 1)  # a failed attempt: queued again, attempts kept
        await a.release(third)  # not run after all: queued again, no attempt
        assert await a.depth() == 2
        event = await a.event(first)
        assert event == {
            "function": "fn",
            "status": "succeeded",
            "attempts": 1,
            "result": {"ok": True},
            "node": "a",
        }
        again = await a.take(5, frozenset())
        assert [(r[0], r[3]) for r in again] == [(second, 1), (third, 0)]

    run(body)


def test_a_dead_nodes_claims_return_to_the_queue() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, ma = await node(etcd, "a")
        b, _ = await node(etcd, "b")
        event = await a.enqueue("fn", b"{}")
        assert [r[0] for r in await a.take(1, frozenset())] == [event]
        assert await b.take(1, frozenset()) == []
        etcd.expire(ma.lease)  # node a is killed: its lease lapses
        assert [r[0] for r in await b.take(1, frozenset())] == [event]
        await b.finish(event, "succeeded", b"1", 1)
        assert (await b.event(event))["node"] == "b"  # type: ignore[index]
        # a's late outcome (it was partitioned, not dead) is ignored: it no longer holds it.
        await a.finish(event, "failed", b"late", 1)
        assert (await b.event(event))["status"] == "succeeded"  # type: ignore[index]

    run(body)


def test_a_finished_item_is_never_taken_again() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, _ = await node(etcd, "a")
        event = await a.enqueue("fn", b"{}")
        await a.take(1, frozenset())
        await a.finish(event, "succeeded", b"1", 1)
        assert await a.take(5, frozenset()) == []
        assert await a.depth() == 0

    run(body)


def test_jobs_in_order_with_progress_results_and_short_ids() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, _ = await node(etcd, "a")
        inputs = [json.dumps({"i": i}).encode() for i in range(150)]  # several transactions
        job_id = await a.create_job("fn", inputs)
        job = await a.job(job_id[:8])
        assert job is not None and job["JobId"] == job_id
        assert (job["total"], job["pending"], job["status"]) == (150, 150, "running")
        taken = await a.take(200, frozenset())
        assert [r[2] for r in taken] == inputs
        for i, (event_id, _, payload, _) in enumerate(taken):
            if i % 2:
                await a.finish(event_id, "failed", b'{"errorType": "E"}', 3)
            else:
                await a.finish(event_id, "succeeded", payload, 1)
        job = await a.job(job_id)
        assert job is not None
        assert (job["succeeded"], job["failed"], job["status"]) == (75, 75, "completed")
        results = await a.job_results(job_id)
        assert results is not None and [r["index"] for r in results] == list(range(150))
        assert results[2]["result"] == {"i": 2} and results[1]["result"] == {"errorType": "E"}
        assert [j["JobId"] for j in await a.jobs()] == [job_id]
        with pytest.raises(InvalidParameter, match="at least 6"):
            await a.job(job_id[:3])
        assert await a.job("ffffffffff") is None

    run(body)


def test_nothing_is_taken_without_a_lease() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a, m = await node(etcd, "a")
        await a.enqueue("fn", b"{}")
        m.lease = 0  # not joined (or lost it): it must not take work
        assert await a.take(5, frozenset()) == []

    run(body)


def test_finished_items_and_jobs_expire_with_the_configured_retention() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        m = FakeMembership("a", await etcd.grant(6))
        q = EtcdQueue(etcd, m, retention_s=2 * 3600)  # type: ignore[arg-type]
        done = await q.enqueue("fn", b"1")
        waiting = await q.enqueue("fn", b"2")
        job = await q.create_job("fn", [b"3"])
        taken = await q.take(1, frozenset())
        assert [r[0] for r in taken] == [done]
        await q.finish(done, "succeeded", b"1", 1)
        retention = etcd.data[f"events/{done}"].lease
        assert retention != 0 and etcd._ttl[retention] == 2 * 3600 + 300  # 1/24 more
        assert etcd.data[f"jobs/{job}"].lease == retention
        assert etcd.data[f"events/{waiting}"].lease == 0  # pending work has no lease
        assert await q.expire(0.0, 100) == 0  # etcd's leases do the deleting
        etcd.expire(retention)
        assert await q.event(done) is None and await q.job(job) is None
        assert (await q.event(waiting))["status"] == "pending"  # type: ignore[index]

    run(body)
