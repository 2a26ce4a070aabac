"""Demand-based prewarm on the in-memory etcd: when a function is hot, which node is asked
to prepare it (the router's next choice for the overflow), that the asked node prepares
it and answers, and that nobody is asked twice meanwhile or asked for what it has."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from warmstart.cluster.etcd import MemoryEtcd
from warmstart.cluster.membership import Member
from warmstart.cluster.prewarm import PREWARM, Prewarm, holds, next_node
from warmstart.errors import NotFound
from warmstart.functions import FunctionConfig, FunctionRecord
from warmstart.lifecycle import Supervisor

SHA = "ab" * 32


def record(name: str = "fn", **kw: Any) -> FunctionRecord:
    return FunctionRecord.new(name, FunctionConfig(handler="h.handler"), SHA, 10, **kw)


def member(name: str, **state: Any) -> Member:
    return Member(name, f"http://{name}:8080", state={"capacity": {"cpus": 2}, **state})


def busy(rec: FunctionRecord, inflight: int = 1) -> dict[str, Any]:
    return {rec.name: {"revision": rec.revision, "idle": 0, "busy": inflight, "inflight": inflight}}


class View:
    def __init__(self, name: str, members: list[Member]) -> None:
        self.name, self.lease, self.members = name, 1, members

    def live(self) -> list[Member]:
        return self.members


class FakeWorker:
    def __init__(self, *recs: FunctionRecord) -> None:
        self.recs = {r.name: r for r in recs}
        self.inflight_of: dict[str, int] = {}
        self.prepared: list[str] = []

    def functions(self) -> list[FunctionRecord]:
        return list(self.recs.values())

    def get(self, name: str) -> FunctionRecord:
        if name not in self.recs:
            raise NotFound(name)
        return self.recs[name]

    def inflight(self, rec: FunctionRecord) -> int:
        return self.inflight_of.get(rec.name, 0)

    async def prepare(self, rec: FunctionRecord) -> None:
        self.prepared.append(rec.name)


def run(body: Callable[[MemoryEtcd], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(MemoryEtcd()), 30))


def test_holding_a_function_means_its_bundle_and_packages_or_its_image() -> None:
    rec = record(packages=("a==1", "b==2"))
    assert holds(member("x", code=[SHA], packages=["a==1", "b==2", "c==3"]), rec)
    assert not holds(member("x", code=[SHA], packages=["a==1"]), rec)
    assert not holds(member("x", packages=["a==1", "b==2"]), rec)


def test_the_next_node_is_the_routers_choice_for_the_overflow() -> None:
    rec = record(packages=("a==1",)).next_revision(reserved_concurrency=8)  # 2 a node
    members = [
        member("me", functions=busy(rec)),  # serving: not a candidate
        member("warm", functions=busy(rec)),
        member("cached", packages=["a==1"], code=[SHA]),
        member("idle"),
    ]
    assert next_node(rec, members, "me").name == "cached"  # type: ignore[union-attr]
    # Without the cached node, the least loaded one.
    members = [*members[:2], member("loaded", inflight=4), member("idle")]
    assert next_node(rec, members, "me").name == "idle"  # type: ignore[union-attr]
    # A node at its share (two starting) has no room; with none left, nowhere to spread.
    starting = {"fn": {"revision": rec.revision, "idle": 0, "busy": 0, "inflight": 2}}
    members[3] = member("idle", functions=starting)
    assert next_node(rec, members, "me").name == "loaded"  # type: ignore[union-attr]
    assert next_node(rec, members[:2], "me") is None


def test_a_hot_function_gets_its_next_node_prepared_before_calls_go_there() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        rec = record().next_revision(reserved_concurrency=4)  # a share of 2 on each node
        members = [member("a"), member("b", code=[SHA]), member("c")]
        worker_a, worker_c = FakeWorker(rec), FakeWorker(rec)
        tasks = Supervisor("test", drain_timeout=1.0)
        await tasks.start()
        a = Prewarm(etcd, View("a", members), worker_a, tasks, limit=lambda r: 2, cooldown_s=60)
        c = Prewarm(etcd, View("c", members), worker_c, tasks, limit=lambda r: 2)
        # One call in flight on a: half its share, hot.  Its next node is b, which holds
        # the bundle already: nobody is asked.
        worker_a.inflight_of["fn"] = 1
        assert a.hot(rec)
        assert await a.check() == []
        # b takes calls now (it serves): the next node is c, which lacks the bundle.
        members[1] = member("b", code=[SHA], functions=busy(rec))
        tasks.loop("c-watch", c.watch)
        assert await a.check() == [("fn", "c")]
        assert await a.check() == []  # asked once per cooldown, however hot
        await _until(lambda: worker_c.prepared == ["fn"], "c to prepare fn")
        await _until(lambda: not etcd.data, "c to answer by deleting the request")
        assert (a.requests, c.prepared) == (1, 1)
        # A function that is not hot asks nothing.
        worker_a.inflight_of["fn"] = 0
        a.cooldown_s = 0
        assert not a.hot(rec) and await a.check() == []
        await tasks.close()

    run(body)


def test_a_request_goes_when_the_asking_node_dies_and_a_deleted_function_is_skipped() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        lease = await etcd.grant(6)
        await etcd.put(f"{PREWARM}gone/c", b"{}", lease=lease)
        worker_c = FakeWorker()
        tasks = Supervisor("test", drain_timeout=1.0)
        await tasks.start()
        c = Prewarm(etcd, View("c", [member("c")]), worker_c, tasks, limit=lambda r: 1)
        tasks.loop("c-watch", c.watch)
        await _until(lambda: not etcd.data, "the request for a deleted function to go")
        assert worker_c.prepared == [] and c.prepared == 0
        await etcd.put(f"{PREWARM}other/b", b"{}", lease=lease)  # for another node
        etcd.expire(lease)
        assert not etcd.data
        await tasks.close()

    run(body)


async def _until(predicate: Callable[[], Any], what: str) -> None:
    for _ in range(4000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")
