"""The image cache on the in-memory etcd: entries pulled and pinned where they select,
unpinned where they no longer do, re-pulled by a node that joins later, left alone by a
restarted node that still has them, retried after a failure; the real ``Preheater``
over a content store with a fake registry; and the same API on a node alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.unit.test_image_store import FakeRegistry, make_store
from warmstart.api.app import _warmstart_error
from warmstart.api.images_api import ImagesAPI
from warmstart.cluster.etcd import MemoryEtcd
from warmstart.cluster.imagecache import PIN_PREFIX, ImageCache
from warmstart.cluster.imageops import LocalImageOps
from warmstart.cluster.membership import Member
from warmstart.errors import InvalidParameter, WarmstartError
from warmstart.images.errors import RegistryError
from warmstart.images.preheat import ByteProgress, Preheater, Pulled
from warmstart.images.store import ImageStore, Pin
from warmstart.lifecycle import Supervisor

IMAGE = "registry.test/app:1"


class FakePins:
    """A node's store, as far as pins go."""

    def __init__(self) -> None:
        self.pinned: dict[str, Pin] = {}
        self.pulls = 0
        self.errors: list[BaseException] = []

    async def pin(self, name: str, ref: str, progress: ByteProgress | None = None) -> Pulled:
        self.pulls += 1
        if self.errors:
            raise self.errors.pop(0)
        digest = "sha256:" + ref.encode().hex().ljust(64, "0")[:64]
        self.pinned[name] = Pin(name, digest, ref, time.time())
        return Pulled(digest, 10)

    async def unpin(self, name: str) -> int:
        return 1 if self.pinned.pop(name, None) else 0

    async def pins(self) -> dict[str, Pin]:
        return dict(self.pinned)


class View:
    def __init__(self, members: dict[str, Member], name: str) -> None:
        self.members, self.name, self.lease = members, name, 1

    def live(self) -> list[Member]:
        return [self.members[n] for n in sorted(self.members)]


class Node:
    def __init__(
        self,
        etcd: MemoryEtcd,
        members: dict[str, Member],
        name: str,
        store: FakePins | None = None,
        **labels: str,
    ) -> None:
        members[name] = Member(name, f"http://{name}", labels)
        self.members, self.name = members, name
        self.store = store or FakePins()
        self.tasks = Supervisor(name, drain_timeout=1.0)
        self.cache = ImageCache(
            etcd, View(members, name), self.store, self.tasks, tick_s=0.05, retry_base_s=0.05
        )

    async def start(self) -> None:
        await self.tasks.start()
        self.tasks.loop("watch", self.cache.watch)
        self.tasks.loop("run", self.cache.run)

    def publish(self) -> None:
        """What membership does every second."""
        m = self.members[self.name]
        self.members[self.name] = Member(
            m.name, m.url, m.labels, state={"pins": self.cache.published()}
        )


def run(body: Callable[[MemoryEtcd, dict[str, Member]], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(MemoryEtcd(), {}), 30))


async def until(predicate: Callable[[], Any], what: str) -> Any:
    for _ in range(4000):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_entries_are_pinned_where_they_select_and_unpinned_where_not() -> None:
    async def body(etcd: MemoryEtcd, members: dict[str, Member]) -> None:
        a, b = Node(etcd, members, "a", zone="1"), Node(etcd, members, "b", zone="2")
        for n in (a, b):
            await n.start()
        made, created = await a.cache.put("web", {"image": IMAGE, "selector": {"zone": "1"}})
        assert created and made["desired"] == 1 and not made["ready"]
        await until(lambda: PIN_PREFIX + "web" in a.store.pinned, "a to pin")
        a.publish()
        got = await b.cache.get("web")  # any node reads every node's published state
        assert got is not None and got["ready"] and got["nodes"]["a"]["state"] == "pinned"
        assert got["spec"] == {"image": IMAGE, "selector": {"zone": "1"}}
        assert b.store.pulls == 0
        # Every node now: b pins it too; changing the selector away from a unpins it there.
        _, created = await b.cache.put("web", {"image": IMAGE, "selector": {"zone": "2"}})
        assert not created
        await until(lambda: PIN_PREFIX + "web" in b.store.pinned, "b to pin")
        await until(lambda: PIN_PREFIX + "web" not in a.store.pinned, "a to unpin")
        # Another image for the entry: pulled and pinned again.
        await a.cache.put("web", {"image": "registry.test/app:2", "selector": {"zone": "2"}})
        await until(
            lambda: b.store.pinned[PIN_PREFIX + "web"].ref == "registry.test/app:2", "the new image"
        )
        assert [e["name"] for e in await a.cache.all()] == ["web"]
        assert await a.cache.delete("web")
        assert not await a.cache.delete("web")
        await until(lambda: not b.store.pinned, "b to unpin")
        assert await a.cache.get("web") is None
        for n in (a, b):
            await n.tasks.close()

    run(body)


def test_a_node_that_joins_later_pulls_and_a_restarted_one_keeps_its_pins() -> None:
    async def body(etcd: MemoryEtcd, members: dict[str, Member]) -> None:
        a = Node(etcd, members, "a")
        await a.start()
        await a.cache.put("web", {"image": IMAGE})
        await until(lambda: a.store.pinned, "a to pin")
        late = Node(etcd, members, "late")
        await late.start()
        await until(lambda: late.store.pinned, "the late node to pin")
        assert late.store.pulls == 1
        # A restart: a new controller over the same store finds the pin and pulls nothing.
        await a.tasks.close()
        again = Node(etcd, members, "a", a.store)
        await again.start()
        await until(lambda: "web" in again.cache.published(), "the pin to be published")
        assert again.cache.published()["web"]["state"] == "pinned"
        assert a.store.pulls == 1
        # An entry deleted while a node was down is unpinned when it comes back.
        await again.tasks.close()
        await late.cache.delete("web")
        back = Node(etcd, members, "a", a.store)
        await back.start()
        await until(lambda: not a.store.pinned, "the stale pin to go")
        for n in (late, back):
            await n.tasks.close()

    run(body)


def test_a_failed_pull_is_retried_and_says_why_meanwhile() -> None:
    async def body(etcd: MemoryEtcd, members: dict[str, Member]) -> None:
        a = Node(etcd, members, "a")
        a.store.errors = [RegistryError("registry down")]
        await a.start()
        await a.cache.put("web", {"image": IMAGE})
        failed = await until(
            lambda: (
                a.cache.published().get("web", {}).get("state") == "failed"
                and a.cache.published()["web"]
            ),
            "the failure",
        )
        assert "registry down" in failed["message"]
        await until(lambda: a.store.pinned, "the retry to pin it")
        assert a.store.pulls == 2
        await a.tasks.close()

    run(body)


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("Web", {"image": IMAGE}, "must be lower-case"),
        ("web\n", {"image": IMAGE}, "must be lower-case"),  # "$" let a trailing newline in
        ("web", {"image": IMAGE, "nodes": ["a\n"]}, "is not a node name"),
        ("web", {"image": IMAGE, "tag": "x"}, "unknown field"),
        ("web", {"nodes": ["a"]}, "image is required"),
        ("web", {"image": IMAGE, "nodes": "a"}, "list of node names"),
    ],
)
def test_a_bad_entry_says_what_is_wrong(name: str, body: Any, message: str) -> None:
    async def go(etcd: MemoryEtcd, members: dict[str, Member]) -> None:
        with pytest.raises(InvalidParameter, match=message):
            await Node(etcd, members, "a").cache.put(name, body)

    run(go)


# -- the real puller over a content store ---------------------------------------------------------
def test_the_preheater_pulls_with_progress_pins_and_unpins(tmp_path: Path) -> None:
    fake = FakeRegistry()
    ref = fake.image("app:1", [fake.layer({"a": b"a" * 5000}), fake.layer({"b": b"b" * 7000})])
    store = make_store(tmp_path, fake)
    preheater = Preheater(lambda: store)
    seen: list[tuple[int, int]] = []

    async def body() -> None:
        pulled = await preheater.pull(ref, lambda done, total: seen.append((done, total)))
        manifest = fake.manifests[ref]
        assert pulled == Pulled(manifest.digest, sum(d.size for d in manifest.layers))
        assert seen[0] == (0, pulled.size) and seen[-1] == (pulled.size, pulled.size)
        assert all(done <= total == pulled.size for done, total in seen)
        again = await preheater.pin("cache/x", ref)
        assert again.digest == pulled.digest
        assert (await preheater.pins())["cache/x"].image_id == pulled.digest
        assert await preheater.unpin("cache/x") == 1
        assert await preheater.pins() == {}

    asyncio.run(body())
    assert sum(fake.downloads.values()) == 2  # the pin found the image in the store
    store.close()


# -- a node alone, over HTTP -------------------------------------------------------------------------
def _client(ops: LocalImageOps) -> httpx.AsyncClient:
    app = Starlette(
        routes=ImagesAPI(ops).routes(),
        exception_handlers={WarmstartError: _warmstart_error},
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node")


async def _poll(read: Callable[[], Awaitable[Any]], what: str) -> Any:
    for _ in range(2000):
        value = await read()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_node_alone_preheats_and_pins_itself_and_keeps_its_entries(tmp_path: Path) -> None:
    fake = FakeRegistry()
    ref = fake.image("app:1", [fake.layer({"a": b"a" * 5000})])
    store = make_store(tmp_path, fake)
    spec_file = tmp_path / "cache.json"

    async def json_of(http: httpx.AsyncClient, path: str) -> Any:
        return (await http.get(path)).json()

    async def first() -> None:
        ops = LocalImageOps(Preheater(lambda: store), spec_file, name="solo")
        await ops.start()
        async with _client(ops) as http:
            job = await http.post("/images/preheat", json={"image": ref})
            assert job.status_code == 202, job.text
            assert list(job.json()["nodes"]) == ["solo"]
            path = f"/images/preheat/{job.json()['id']}"
            done = await _poll(lambda: _finished(http, path), "the job to finish")
            assert done["phase"] == "Succeeded" and done["succeeded"] == 1
            assert (await json_of(http, "/images/preheat"))["jobs"][0]["id"] == done["id"]
            bad = await http.post("/images/preheat", json={"image": ref, "nodes": ["other"]})
            assert bad.status_code == 400 and "cluster mode" in bad.json()["message"]
            assert (await http.post("/images/preheat", content=b"{")).status_code == 400
            assert (await http.get("/images/preheat/nope")).status_code == 404
            assert (await http.delete("/images/preheat/nope")).status_code == 404
            put = await http.put("/images/cache/app", json={"image": ref})
            assert put.status_code == 201, put.text
            assert (await http.put("/images/cache/app", json={"image": ref})).status_code == 200
            bad = await http.put("/images/cache/app", json={"image": ref, "selector": "a=b"})
            assert bad.status_code == 400 and "cluster mode" in bad.json()["message"]
            pinned = await _poll(lambda: _ready(http, "/images/cache/app"), "the pin")
            assert pinned["nodes"]["solo"]["state"] == "pinned"
            assert [p.name for p in store.pins()] == [PIN_PREFIX + "app"]
            assert (await json_of(http, "/images/cache"))["entries"][0]["name"] == "app"
            assert (await http.get("/images/cache/other")).status_code == 404
            assert (await http.get("/images/cache/Bad_Name")).status_code == 400
        await ops.close()

    async def second() -> None:
        # After a restart the entry is still there, and so is the pin.
        ops = LocalImageOps(Preheater(lambda: store), spec_file, name="solo")
        await ops.start()
        async with _client(ops) as http:
            again = await _poll(lambda: _ready(http, "/images/cache/app"), "the pin")
            assert again["image"] == ref
            assert (await http.delete("/images/cache/app")).status_code == 204
            await _poll(lambda: _no_pins(store), "the unpin")
        await ops.close()

    asyncio.run(asyncio.wait_for(first(), 30))
    assert json.loads(spec_file.read_text())["entries"][0]["image"] == ref
    asyncio.run(asyncio.wait_for(second(), 30))
    assert json.loads(spec_file.read_text())["entries"] == []
    assert sum(fake.downloads.values()) == 1
    store.close()


async def _finished(http: httpx.AsyncClient, path: str) -> Any:
    job = (await http.get(path)).json()
    return job if job["completionTime"] else None


async def _ready(http: httpx.AsyncClient, path: str) -> Any:
    entry = (await http.get(path)).json()
    return entry if entry["ready"] else None


async def _no_pins(store: ImageStore) -> bool:
    return store.pins() == []


def _no_store() -> ImageStore:
    raise AssertionError("no image is pulled here")


def test_etcd_unreachable_is_a_503() -> None:
    async def body() -> None:
        ops = LocalImageOps(Preheater(_no_store), Path("/nonexistent/cache.json"), name="solo")
        ops.etcd.fail()
        async with _client(ops) as http:
            for resp in (
                await http.get("/images/cache"),
                await http.post("/images/preheat", json={"image": IMAGE}),
                await http.get("/images/preheat/abc"),
            ):
                assert resp.status_code == 503
                assert resp.headers["x-amzn-errortype"] == "ServiceException"
                assert "etcd" in resp.json()["message"]

    asyncio.run(body())
