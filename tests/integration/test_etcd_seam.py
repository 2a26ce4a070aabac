"""The etcd seam's contract, checked on the real etcd (Debian's) and on the in-memory fake
the unit tests use, so the fake cannot drift from what etcd does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.etcdtools import EtcdServer, etcd_available, start_etcd
from warmstart.cluster.etcd import AetcdEtcd, ClusterUnavailable, Delete, Etcd, MemoryEtcd, Put

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    require(etcd_available(), "needs etcd (Debian package etcd-server; scripts/test installs it)")
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", "etcd"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(kind: str, server: Any, body: Any) -> None:
    async def main() -> None:
        store: Etcd
        if kind == "memory":
            store = MemoryEtcd()
        else:
            store = AetcdEtcd([server.url], f"/test-{id(body)}-{asyncio.get_running_loop().time()}/")
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_keys_values_and_ranges(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("etcd_server") if kind == "etcd" else None

    async def body(store: Etcd) -> None:
        assert await store.get("a/1") is None
        await store.put("a/1", b"one")
        await store.put("a/2", b"two")
        await store.put("b/1", b"other")
        kv = await store.get("a/1")
        assert kv is not None and kv.value == b"one" and kv.key == "a/1"
        kvs, revision = await store.range("a/")
        assert [(k.key, k.value) for k in kvs] == [("a/1", b"one"), ("a/2", b"two")]
        assert revision >= kvs[-1].mod_revision
        assert [k.key for k in (await store.range("a/", limit=1))[0]] == ["a/1"]
        assert await store.count("a/") == 2
        assert await store.delete("a/1") is True
        assert await store.delete("a/1") is False
        assert await store.count("a/") == 1

    run(kind, server, body)


def test_create_replace_claim_and_commit(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("etcd_server") if kind == "etcd" else None

    async def body(store: Etcd) -> None:
        assert await store.create("f/x", b"v1") is True
        assert await store.create("f/x", b"again") is False
        assert await store.replace("f/x", b"stale", b"v2") is False
        assert await store.replace("f/x", b"v1", b"v2") is True
        assert (await store.get("f/x")).value == b"v2"  # type: ignore[union-attr]
        lease = await store.grant(5)
        assert await store.claim("c/1", b"node", lease=lease, while_exists="q/1") is False
        await store.put("q/1", b"")
        assert await store.claim("c/1", b"node", lease=lease, while_exists="q/1") is True
        assert await store.claim("c/1", b"other", lease=lease, while_exists="q/1") is False
        assert await store.commit([Put("q/2", b""), Put("e/2", b"{}"), Delete("q/1")])
        assert await store.get("q/1") is None and await store.get("e/2") is not None
        # Conditional: applied only while a key holds a value (an outcome only while the
        # writer still holds its claim).
        assert await store.commit([Put("e/3", b"x")], if_value=("f/x", b"stale")) is False
        assert await store.get("e/3") is None
        assert await store.commit([Put("e/3", b"x")], if_value=("f/x", b"v2")) is True
        assert await store.commit([Put("e/4", b"x")], if_value=("absent", b"")) is False
        await store.revoke(lease)  # a revoked lease takes its keys with it
        assert await store.get("c/1") is None

    run(kind, server, body)


def test_leases_keep_keys_alive_until_they_lapse(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("etcd_server") if kind == "etcd" else None

    async def body(store: Etcd) -> None:
        lease = await store.grant(5)
        await store.put("n/a", b"state", lease=lease)
        assert (await store.get("n/a")).lease == lease  # type: ignore[union-attr]
        assert await store.keepalive(lease) > 0
        await store.revoke(lease)
        assert await store.get("n/a") is None
        assert await store.keepalive(lease) <= 0  # gone: the owner must take a new one

    run(kind, server, body)


def test_watch_sees_puts_and_deletes_from_a_revision(
    kind: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue("etcd_server") if kind == "etcd" else None

    async def body(store: Etcd) -> None:
        await store.put("w/old", b"0")
        _, revision = await store.range("w/")
        seen: list[tuple[str, str, bytes]] = []

        async def consume(events: AsyncIterator[Any]) -> None:
            async for event in events:
                seen.append((event.kind, event.key, event.value))
                if len(seen) == 3:
                    return

        task = asyncio.create_task(consume(store.watch("w/", revision + 1)))
        await asyncio.sleep(0.2)
        await store.put("w/a", b"1")
        await store.put("other/x", b"not watched")
        await store.put("w/a", b"2")
        await store.delete("w/a")
        await asyncio.wait_for(task, 10)
        assert seen == [("put", "w/a", b"1"), ("put", "w/a", b"2"), ("delete", "w/a", b"")]

    run(kind, server, body)


def test_an_unreachable_etcd_is_cluster_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        store = AetcdEtcd(["http://127.0.0.1:9"], "/x/", timeout=1.0)
        try:
            with pytest.raises(ClusterUnavailable, match=r"etcd at 127\.0\.0\.1:9"):
                await store.put("k", b"v")
        finally:
            await store.close()

    asyncio.run(main())
