"""Membership, the function catalog and placement on the in-memory etcd: joining under a
lease, names held by one live node, rejoining after a lapse, degraded mode, watches,
optimistic updates, and where an invocation goes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from warmstart.cluster.catalog import EtcdCatalog
from warmstart.cluster.etcd import MemoryEtcd
from warmstart.cluster.membership import Member, Membership, NameTaken
from warmstart.cluster.router import Router, locality, share, zygote_cover
from warmstart.cluster.settings import ClusterSettings
from warmstart.errors import Conflict, NotFound
from warmstart.functions import FunctionConfig, FunctionRecord
from warmstart.functions.models import AliasRecord
from warmstart.worker.registry import FunctionRegistry


def settings(name: str, port: int = 8080) -> ClusterSettings:
    return ClusterSettings(
        ("http://127.0.0.1:2379",), name, f"http://127.0.0.1:{port}", publish_interval_s=0.05
    )


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def run(body: Callable[[MemoryEtcd], Awaitable[None]]) -> None:
    asyncio.run(body(MemoryEtcd()))


def test_nodes_join_see_each_other_and_leave() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        a = Membership(etcd, settings("a", 1), lambda: {"inflight": 1})
        b = Membership(etcd, settings("b", 2), lambda: {"inflight": 2})
        await a.join()
        await b.join()
        tasks = [asyncio.create_task(m.watch()) for m in (a, b)]
        tasks += [asyncio.create_task(m.run()) for m in (a, b)]
        await until(lambda: {m.name for m in a.live()} == {"a", "b"}, "a to see b")
        await until(
            lambda: a.members.get("b", Member("b", "")).state.get("inflight") == 2, "b's state"
        )
        assert [m.name for m in b.peers()] == ["a"]
        await b.leave()
        tasks[3].cancel()
        await until(lambda: [m.name for m in a.live()] == ["a"], "b to leave")
        for t in tasks:
            t.cancel()

    run(body)


def test_a_name_is_one_live_nodes() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        first = Membership(etcd, settings("same", 1), dict)
        await first.join()
        second = Membership(etcd, settings("same", 2), dict)
        with pytest.raises(NameTaken, match="in use by a live node"):
            await second.join(wait_for_name_s=0.05)
        # The first dies: its lease lapses, and the name is free again.
        etcd.expire(first.lease)
        await second.join(wait_for_name_s=0.05)
        assert second.lease != 0

    run(body)


def test_a_lapsed_lease_is_rejoined_and_lost_etcd_is_degraded_not_fatal() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        joins = []
        m = Membership(etcd, settings("a"), dict)

        async def joined() -> None:
            joins.append(m.lease)

        m.on_join(joined)
        await m.join()
        task = asyncio.create_task(m.run())
        etcd.expire(m.lease)
        await until(lambda: len(joins) == 2, "the rejoin")
        assert joins[0] != joins[1] and await etcd.get("nodes/a") is not None
        etcd.down = True
        await until(lambda: not m.connected, "degraded mode")
        assert "etcd" in m.last_error and not task.done()
        etcd.down = False
        await until(lambda: m.connected, "reconnection")
        task.cancel()

    run(body)


def record(name: str, **kw: Any) -> FunctionRecord:
    return FunctionRecord.new(name, FunctionConfig(handler="h.handler"), "ab" * 32, 10, **kw)


class NoPackages:
    def path(self, pin: Any) -> Any:
        raise AssertionError


def registry(catalog: EtcdCatalog) -> FunctionRegistry:
    return FunctionRegistry(catalog, None, NoPackages(), region="r", account="1")  # type: ignore[arg-type]


def test_catalog_updates_are_optimistic_and_followed_by_every_node() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        cat_a, cat_b = EtcdCatalog(etcd), EtcdCatalog(etcd)
        reg_a, reg_b = registry(cat_a), registry(cat_b)
        changes: list[tuple[str | None, str | None]] = []
        reg_b.listen(
            lambda old, new: changes.append((old and old.revision_id, new and new.revision_id))
        )
        await reg_a.load()
        await reg_b.load()
        follow = asyncio.create_task(cat_b.follow(reg_b))
        rec = record("fn")
        await cat_a.insert(rec)
        with pytest.raises(Conflict):
            await cat_a.insert(rec)
        await until(lambda: "fn" in reg_b, "b to see the new function")
        newer = rec.next_revision(reserved_concurrency=3)
        await cat_a.update(rec, newer)
        with pytest.raises(Conflict, match="another node"):
            await cat_b.update(rec, rec.next_revision(reserved_concurrency=5))  # stale
        await until(lambda: reg_b.get("fn").revision == 2, "b to see revision 2")
        await cat_a.remove("fn")
        with pytest.raises(NotFound):
            await cat_a.remove("fn")
        await until(lambda: "fn" not in reg_b, "b to forget it")
        assert changes == [
            (None, rec.revision_id),
            (rec.revision_id, newer.revision_id),
            (newer.revision_id, None),
        ]
        follow.cancel()

    run(body)


def test_reserved_concurrency_is_split_over_the_live_nodes() -> None:
    names = ["a", "b", "c"]
    assert [share(7, names, n) for n in names] == [3, 2, 2]
    assert [share(1, names, n) for n in names] == [1, 0, 0]
    assert sum(share(10, names, n) for n in names) == 10
    assert share(4, ["b"], "a") == 2  # this node counts even before the watch saw it


def member(name: str, **state: Any) -> Member:
    return Member(name, f"http://{name}:8080", state={"capacity": {"cpus": 2}, **state})


class FakeMembership:
    def __init__(self, me: str, members: list[Member]) -> None:
        self.name = me
        self.settings = settings(me)
        self._members = members

    def live(self) -> list[Member]:
        return self._members


def test_placement_prefers_warm_then_zygote_then_cached_then_least_loaded() -> None:
    rec = record("fn", packages=("pandas==2.2", "numpy==2.1"))
    fn_state = {"fn": {"revision": rec.revision, "idle": 1, "inflight": 0}}
    nodes = [
        member("me", inflight=0),
        member("warm", functions=fn_state, inflight=9),
        member("zyg", zygotes=[["numpy==2.1"]], inflight=0),
        member("cached", packages=["pandas==2.2", "numpy==2.1"], inflight=0),
        member("idle", inflight=0),
    ]

    def place(members: list[Member], local_idle: bool = False) -> tuple[str, str]:
        r = Router(
            FakeMembership("me", members), lambda _r: local_idle, lambda _r: 0, placement_ttl_s=0
        )  # type: ignore[arg-type]
        p = r.place(rec)
        return p.node, p.reason

    assert place(nodes, local_idle=True) == ("me", "warm")  # the warm path reads nothing else
    assert place(nodes) == ("warm", "warm")
    assert place([n for n in nodes if n.name != "warm"]) == ("zyg", "zygote")
    assert place([nodes[0], nodes[3], nodes[4]]) == ("cached", "cached")
    busy_me = member("me", inflight=4)
    assert place([busy_me, nodes[4]]) == ("idle", "load")
    assert place([nodes[0], nodes[4]])[0] == "me"  # a tie stays here: no hop
    # A node whose instances were all busy when it published beats a cold start elsewhere
    # (under steady load an instance is busy about half the time), but not an idle one.
    busy = member("busy", functions={"fn": {"revision": rec.revision, "idle": 0, "busy": 1}})
    assert place([nodes[0], nodes[2], busy]) == ("busy", "warm")
    assert place([nodes[0], busy, nodes[1]]) == ("warm", "warm")
    assert zygote_cover(nodes[2], rec) == 0.5
    # A stale revision's idle instances do not count as warm.
    old = {"fn": {"revision": rec.revision - 1, "idle": 3}}
    assert place([nodes[0], member("old", functions=old, inflight=5)])[0] == "me"


def test_locality_discounts_what_every_node_holds() -> None:
    rec = record("fn", packages=("a==1", "b==1"))
    everywhere = [member(n, packages=["a==1"]) for n in "xyz"]
    rare = member("r", packages=["b==1"])
    members = [*everywhere, rare]
    # "a" is on 3 of 4 nodes, "b" on 1: holding "a" scores 3/4 of a package, "b" 1/4.
    assert locality(everywhere[0], rec, members) > locality(rare, rec, members)
    assert locality(member("none"), rec, members) == 0


def test_a_node_at_its_share_sends_calls_where_there_is_room() -> None:
    rec = record("fn")
    rec = rec.next_revision(reserved_concurrency=2)
    fn_busy = {"fn": {"revision": rec.revision, "idle": 0, "inflight": 1}}
    members = [member("a"), member("b", functions=fn_busy)]
    router = Router(FakeMembership("a", members), lambda _r: True, lambda _r: 1, placement_ttl_s=0)  # type: ignore[arg-type]
    # a's share is 1 and it runs 1: it has an idle instance but no room; b is full too.
    placement = router.place(rec)
    assert placement.local and placement.reason == "share"
    members[1] = member("b", functions={"fn": {"revision": rec.revision, "idle": 0, "inflight": 0}})
    assert router.place(rec).node == "b"


def test_versions_are_numbered_once_across_nodes_and_followed_with_aliases() -> None:
    async def body(etcd: MemoryEtcd) -> None:
        cat_a, cat_b = EtcdCatalog(etcd), EtcdCatalog(etcd)
        reg_a, reg_b = registry(cat_a), registry(cat_b)
        rec = record("fn")
        await cat_a.insert(rec)
        await reg_a.load()
        await reg_b.load()
        follow = asyncio.create_task(cat_b.follow(reg_b))
        # Two nodes publishing at once get two numbers (the counter's compare-and-swap).
        made = await asyncio.gather(
            cat_a.publish("fn", lambda n: rec.publish(n, "a")),
            cat_b.publish("fn", lambda n: rec.publish(n, "b")),
        )
        assert sorted(v.version for v in made) == ["1", "2"]
        await until(lambda: len(reg_b.versions("fn")) == 2, "b to see both versions")
        alias = AliasRecord("fn", "live", "1", weights=(("2", 0.25),))
        await cat_a.put_alias(alias, None)
        with pytest.raises(Conflict):
            await cat_b.put_alias(alias, None)
        await until(lambda: "live" in {a.name for a in reg_b.aliases("fn")}, "b to see the alias")
        assert reg_b.alias("fn", "live") == alias
        moved = AliasRecord("fn", "live", "2", revision_id="r2")
        await cat_b.put_alias(moved, alias)
        with pytest.raises(Conflict, match="another node"):
            await cat_a.put_alias(AliasRecord("fn", "live", "1", revision_id="r3"), alias)
        await until(lambda: reg_b.alias("fn", "live").function_version == "2", "b to follow")
        await cat_a.unpublish("fn", "1")
        await until(lambda: [v.version for v in reg_b.versions("fn")] == ["2"], "b to drop 1")
        third = await cat_a.publish("fn", lambda n: rec.publish(n, None))
        assert third.version == "3"  # numbers are never given twice
        # Deleting the function deletes every key under it: a new one starts again at 1.
        await cat_a.remove("fn")
        await until(lambda: "fn" not in reg_b, "b to forget it")
        assert await etcd.count("functions/") == 0
        await cat_a.insert(rec)
        assert (await cat_a.publish("fn", lambda n: rec.publish(n, None))).version == "1"
        # A fresh node loads the function, its versions and aliases in one read.
        await cat_a.put_alias(AliasRecord("fn", "edge", "$LATEST"), None)
        fresh = registry(EtcdCatalog(etcd))
        await fresh.load()
        assert [v.version for v in fresh.versions("fn")] == ["1"]
        assert [a.name for a in fresh.aliases("fn")] == ["edge"]
        follow.cancel()

    run(body)
