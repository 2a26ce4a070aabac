"""The zygote cache with a fake launcher at its seam: growth from demand, lookups, failures,
memory measured off the loop, eviction and close.  No processes, no root."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from warmstart.errors import SandboxError
from warmstart.sandbox import SandboxSpec
from warmstart.sandbox.memory import MemoryUse
from warmstart.zygote.cache import ZygoteCache
from warmstart.zygote.launcher import Zygote

MiB = 1 << 20


class FakeZygote(Zygote):
    pss: int = 0

    def memory(self) -> MemoryUse | None:
        return MemoryUse(self.pss, self.pss, self.pss)


class FakeLauncher:
    """Stands in for ZygoteLauncher: records what the cache asks for."""

    def __init__(self) -> None:
        self.seq = 0
        self.started: list[tuple[str, tuple[str, ...]]] = []  # (kind, packages)
        self.stopped: list[str] = []
        self.forks: list[str] = []
        self.fail_fork: set[str] = set()  # zygote ids whose fork fails
        self.dies_on_fork: set[str] = set()  # ...and are found dead
        self.image_starts: list[list[str]] = []
        self._socks: list[socket.socket] = []

    def _zygote(self, packages: tuple[tuple[str, str], ...], pss: int = 10 * MiB) -> FakeZygote:
        self.seq += 1
        a, b = socket.socketpair()
        self._socks += [a, b]
        z = FakeZygote(f"zy{self.seq}", packages, a, None, pid=1000 + self.seq)
        z.pss = pss
        return z

    async def start(
        self, packages: tuple[tuple[str, str], ...], preload: list[str], **kw: Any
    ) -> FakeZygote:
        if kw.get("image") is not None:
            self.image_starts.append(preload)
        self.started.append(("start", tuple(d for _, d in packages)))
        return self._zygote(packages)

    async def start_child(
        self, parent: Zygote, extra: tuple[tuple[str, str], ...], preload: list[str]
    ) -> FakeZygote:
        self.started.append((f"child of {parent.id}", tuple(d for _, d in extra)))
        return self._zygote((*parent.packages, *extra))

    async def fork(self, zygote: Zygote, spec: SandboxSpec) -> str:
        if zygote.id in self.fail_fork:
            if zygote.id in self.dies_on_fork:
                zygote.alive = False
            raise SandboxError(f"fork from {zygote.id} failed")
        self.forks.append(zygote.id)
        return f"sandbox from {zygote.id}"

    async def stop(self, zygote: Zygote) -> None:
        zygote.alive = False
        self.stopped.append(zygote.id)

    def close(self) -> None:
        for s in self._socks:
            s.close()


def package_dir(tmp: Path) -> Callable[[str], Path]:
    def resolve(pin: str) -> Path:
        d = tmp / pin.replace("==", "-")
        d.mkdir(exist_ok=True)
        return d

    return resolve


SPEC = SandboxSpec(code_dir=None, env={}, memory_mb=128)


def run(tmp_path: Path, body: Callable[[ZygoteCache, FakeLauncher], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        cache = ZygoteCache(object(), package_dir(tmp_path), **kw)  # type: ignore[arg-type]
        fake = FakeLauncher()
        cache.launcher = fake  # type: ignore[assignment]
        await cache.start()
        try:
            await body(cache, fake)
        finally:
            await cache.close()
            fake.close()

    asyncio.run(main())


async def settle(cache: ZygoteCache) -> None:
    """Let the cache's background work (growing zygotes) finish."""
    for _ in range(5000):
        if cache.tasks.statistics().tasks == 0:
            return
        await asyncio.sleep(0.001)  # the work includes a measurement on a thread
    raise AssertionError("background work did not finish")


def test_the_tree_grows_from_demand_and_forks_from_the_deepest_zygote(tmp_path: Path) -> None:
    pandas = frozenset({"pandas==2.2.3", "numpy==2.1.0"})

    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        root = cache.tree.root.handle
        assert isinstance(root, Zygote) and fake.started == [("start", ())]
        # First cold start of the set: served by the root; not grown yet (grow_after=2).
        sandbox, zygote = await cache.fork(pandas, SPEC)  # type: ignore[misc]
        assert zygote is root and sandbox == f"sandbox from {root.id}"
        await settle(cache)
        assert len(fake.started) == 1
        # Second: still the root, but a zygote for the set grows in the background,
        # forked from the root with the packages it adds.
        _, zygote = await cache.fork(pandas, SPEC)  # type: ignore[misc]
        assert zygote is root
        await settle(cache)
        assert fake.started[1][0] == f"child of {root.id}"
        assert sorted(fake.started[1][1]) == ["/var/packages/numpy-2.1.0", "/var/packages/pandas-2.2.3"]
        # From now on the set forks from its own zygote; a superset does too.
        _, zygote = await cache.fork(pandas, SPEC)  # type: ignore[misc]
        assert zygote is not root and zygote.id == "zy2"
        _, zygote = await cache.fork(pandas | {"six==1.16.0"}, SPEC)  # type: ignore[misc]
        assert zygote.id == "zy2"
        assert cache.forks == 4 and cache.live[zygote] == 2
        cache.released(zygote)
        assert cache.live[zygote] == 1

    run(tmp_path, body, grow_after=2)


def test_a_failed_fork_from_a_dead_zygote_drops_it_and_restarts_the_root(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        root = cache.tree.root.handle
        assert isinstance(root, Zygote)
        fake.fail_fork.add(root.id)
        fake.dies_on_fork.add(root.id)
        assert await cache.fork(frozenset(), SPEC) is None  # the caller starts it fresh
        assert cache.failures == 1
        await settle(cache)
        assert fake.stopped == [root.id]
        new_root = cache.tree.root.handle
        assert isinstance(new_root, Zygote) and new_root is not root and new_root.alive
        assert await cache.fork(frozenset(), SPEC) is not None

    run(tmp_path, body)


def test_a_failed_fork_from_a_live_zygote_keeps_it(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        root = cache.tree.root.handle
        assert isinstance(root, Zygote)
        fake.fail_fork.add(root.id)
        assert await cache.fork(frozenset(), SPEC) is None
        await settle(cache)
        assert fake.stopped == [] and cache.tree.root.handle is root

    run(tmp_path, body)


def test_memory_is_measured_then_used_for_eviction(tmp_path: Path) -> None:
    sets = [frozenset({f"p{i}==1.0"}) for i in range(3)]

    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        for pins in sets:
            await cache.fork(pins, SPEC)
            await settle(cache)
        assert len(cache.live) == 4  # the root and one per set
        # Each zygote is measured once it is up (on a thread).
        assert cache.memory() == 40 * MiB
        # Over budget (40 MiB against 25): the least recently used leaves without
        # instances go until the rest fits.
        cache.budget = 25 * MiB
        busy = next(z for z in cache.live if z.id == "zy2")
        cache.live[busy] = 1  # an instance forked from the oldest leaf is alive
        cache.enforce()
        await settle(cache)
        assert fake.stopped == ["zy3", "zy4"]
        described = {d.get("id"): d for d in cache.describe()}
        assert described["zy2"]["memory"]["pss"] == 10 * MiB
        assert "zy3" not in described
        # The sweeper's next measurement sees what changed since.
        root = cache.tree.root.handle
        assert isinstance(root, FakeZygote)
        root.pss = 5 * MiB
        await cache.measure()
        assert cache.memory() == 15 * MiB

    run(tmp_path, body, grow_after=1, budget_mb=100)


def test_image_zygotes_start_once_and_are_dropped(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        layout: Any = object()
        assert await cache.fork_image("sha256:aa", SPEC) is None  # none yet
        cache.grow_image("sha256:aa", layout, {}, ["numpy"])
        cache.grow_image("sha256:aa", layout, {}, ["numpy"])  # already starting
        await settle(cache)
        assert fake.image_starts == [["numpy"]]
        forked = await cache.fork_image("sha256:aa", SPEC)
        assert forked is not None
        await cache.drop_image("sha256:aa")
        assert await cache.fork_image("sha256:aa", SPEC) is None

    run(tmp_path, body)


def test_close_stops_every_zygote(tmp_path: Path) -> None:
    stopped: list[str] = []

    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        await cache.fork(frozenset({"a==1"}), SPEC)
        await settle(cache)
        assert len(cache.live) == 2
        stopped.append("before close")

        original = fake.stop

        async def record(z: Zygote) -> None:
            stopped.append(z.id)
            await original(z)

        fake.stop = record  # type: ignore[method-assign]

    run(tmp_path, body, grow_after=1)
    assert sorted(stopped) == ["before close", "zy1", "zy2"]


@pytest.mark.parametrize("grow_after", [1, 3])
def test_growth_waits_for_demand(tmp_path: Path, grow_after: int) -> None:
    pins = frozenset({"x==1"})

    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        for n in range(1, 4):
            await cache.fork(pins, SPEC)
            await settle(cache)
            assert (len(fake.started) == 2) is (n >= grow_after)

    run(tmp_path, body, grow_after=grow_after)


class GatedLauncher(FakeLauncher):
    """Child zygotes start only once the test opens the gate (and then fail if told)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail_start = False

    async def start_child(
        self, parent: Zygote, extra: tuple[tuple[str, str], ...], preload: list[str]
    ) -> FakeZygote:
        await self.gate.wait()
        if self.fail_start:
            raise SandboxError("the child zygote exited while importing its packages")
        return await super().start_child(parent, extra, preload)


def run_gated(
    tmp_path: Path, body: Callable[[ZygoteCache, GatedLauncher], Awaitable[None]], **kw: Any
) -> None:
    async def main() -> None:
        cache = ZygoteCache(object(), package_dir(tmp_path), **kw)  # type: ignore[arg-type]
        fake = GatedLauncher()
        cache.launcher = fake  # type: ignore[assignment]
        await cache.start()
        try:
            await body(cache, fake)
        finally:
            fake.gate.set()
            await cache.close()
            fake.close()

    asyncio.run(main())


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(5000):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


PANDAS = frozenset({"pandas==2.2.3", "numpy==2.1.0"})


def test_a_zygote_is_built_at_deploy_before_any_demand(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        root = cache.tree.root.handle
        assert isinstance(root, Zygote)
        assert cache.prepare(PANDAS) is True
        assert cache.prepare(PANDAS) is False  # under construction already
        await settle(cache)
        assert fake.started[1][0] == f"child of {root.id}"
        assert cache.prepare(PANDAS) is False  # built
        assert cache.prepare(frozenset()) is False  # the root's set
        # The very first cold start forks from it (grow_after is 5: no demand needed).
        _, zygote = await cache.fork(PANDAS, SPEC)  # type: ignore[misc]
        assert zygote is not root and zygote.id == "zy2"
        assert cache.prepared == 1 and cache.waits == 0 and len(fake.started) == 2

    run(tmp_path, body, grow_after=5)


def test_a_cold_start_waits_for_its_zygote_under_construction(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: GatedLauncher) -> None:
        root = cache.tree.root.handle
        cache.prepare(PANDAS)
        first = asyncio.ensure_future(cache.fork(PANDAS, SPEC))
        second = asyncio.ensure_future(cache.fork(PANDAS | {"six==1.16.0"}, SPEC))
        other = await cache.fork(frozenset({"requests==2.32.0"}), SPEC)  # not served by it
        assert other is not None and other[1] is root
        await until(lambda: cache.waits == 2)
        assert not first.done() and not second.done() and fake.forks == [root.id]
        fake.gate.set()
        for task in (first, second):
            forked = await task
            assert forked is not None and forked[1] is not root and forked[1].id == "zy2"
        assert fake.forks == [root.id, "zy2", "zy2"]

    run_gated(tmp_path, body, grow_after=5)


def test_a_failed_build_sends_its_waiters_to_the_root(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: GatedLauncher) -> None:
        root = cache.tree.root.handle
        cache.prepare(PANDAS)
        waiter = asyncio.ensure_future(cache.fork(PANDAS, SPEC))
        await until(lambda: cache.waits == 1)
        fake.fail_start = True
        fake.gate.set()
        forked = await waiter
        assert forked is not None and forked[1] is root  # it imports pandas itself
        await settle(cache)
        assert cache.tree.exact(PANDAS) is None and not cache._building
        assert cache.prepare(PANDAS) is True  # a later deploy may try again

    run_gated(tmp_path, body, grow_after=5)


def test_the_start_that_begins_a_build_does_not_wait_for_it(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: GatedLauncher) -> None:
        root = cache.tree.root.handle
        # grow_after=1: this start begins the build (held at the gate) and goes on.
        forked = await cache.fork(PANDAS, SPEC)
        assert forked is not None and forked[1] is root and cache.waits == 0
        assert PANDAS in cache._building
        # The next one finds it under way and waits.
        waiter = asyncio.ensure_future(cache.fork(PANDAS, SPEC))
        await until(lambda: cache.waits == 1)
        fake.gate.set()
        forked = await waiter
        assert forked is not None and forked[1].id == "zy2"

    run_gated(tmp_path, body, grow_after=1)


def test_no_wait_for_a_build_begun_longer_than_build_wait_ago(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: GatedLauncher) -> None:
        root = cache.tree.root.handle
        cache.prepare(PANDAS)
        forked = await cache.fork(PANDAS, SPEC)  # build_wait 0: every build is too old
        assert forked is not None and forked[1] is root and cache.waits == 0
        assert PANDAS in cache._building

    run_gated(tmp_path, body, grow_after=5, build_wait_s=0.0)


def test_a_zygote_built_over_a_dead_one_stops_the_dead_one(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        cache.prepare(PANDAS)
        await settle(cache)
        node = cache.tree.exact(PANDAS)
        assert node is not None and isinstance(node.handle, Zygote)
        dead = node.handle
        dead.alive = False  # killed; the sweeper has not dropped it yet
        assert cache.prepare(PANDAS) is True
        await settle(cache)
        assert node.handle is not dead and node.handle.alive
        assert dead.id in fake.stopped and dead not in cache.live

    run(tmp_path, body, grow_after=5)


class FakeCgroup:
    def __init__(self) -> None:
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False


def test_image_zygotes_are_frozen_and_evicted_like_tree_zygotes(tmp_path: Path) -> None:
    async def body(cache: ZygoteCache, fake: FakeLauncher) -> None:
        layout: Any = object()
        for key in ("sha256:old", "sha256:new"):
            cache.grow_image(key, layout, {}, [])
            await settle(cache)
            await cache.fork_image(key, SPEC)
            cache.released(cache.images[key])  # its instance is gone
        old, new = cache.images["sha256:old"], cache.images["sha256:new"]
        cgroups = {old: FakeCgroup(), new: FakeCgroup()}
        for zygote, cg in cgroups.items():
            zygote.cgroup = cg  # type: ignore[assignment]
        # Idle past freeze_after (0 here): both frozen; a fork thaws its zygote first.
        cache.enforce()
        assert cgroups[old].frozen and cgroups[new].frozen
        assert old in cache.frozen
        await cache.fork_image("sha256:new", SPEC)
        assert not cgroups[new].frozen
        cache.released(new)
        # Over the budget: the least recently used image zygote without instances goes
        # first, before the tree's (more recently used) leaves, and the root never.
        await cache.fork(frozenset({"p==1"}), SPEC)
        await settle(cache)
        cache.budget = cache.memory() - 5 * MiB
        cache.enforce()
        await settle(cache)
        assert fake.stopped == [old.id]
        assert "sha256:old" not in cache.images and "sha256:new" in cache.images
        assert await cache.fork_image("sha256:old", SPEC) is None

    run(tmp_path, body, freeze_after_s=0.0)
