"""FunctionPool and HandlerCache through their public behaviour, with fake instances at the
seam (no sandboxes, no root).

The pool's two outside things are its ``start`` and ``destroy`` callables; an instance's
are its sandbox (freeze, thaw, memory) and whether its runtime is alive.  ``Node`` fakes
the first two and ``FakeSandbox``/``FakeInstance`` the rest.  Every test runs on a
looptime event loop: loop time only moves when everything is waiting on a timer, so
"frozen after 30 s" takes no real time and no test sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import looptime
import pytest

from warmstart.errors import SandboxError, TooManyRequests
from warmstart.worker.instance import Instance, State
from warmstart.worker.pool import FunctionPool, HandlerCache

T = TypeVar("T")
MB = 1 << 20


class FakeSandbox:
    def __init__(self, n: int, memory: int = 10 * MB) -> None:
        self.id = f"sb-{n}"
        self.memory = memory
        self.frozen = False
        self.freeze_fails = False
        self.thaw_fails = False
        self.thaws = 0

    def memory_usage(self) -> int:
        return self.memory

    def freeze(self) -> None:
        if self.freeze_fails:
            raise SandboxError("freezer.state: No such file or directory")
        self.frozen = True

    def thaw(self) -> None:
        if self.thaw_fails:
            raise SandboxError("freezer.state: No such file or directory")
        self.frozen = False
        self.thaws += 1


class FakeInstance(Instance):
    """An instance whose runtime is alive until the test says otherwise."""

    def __init__(self, sandbox: FakeSandbox) -> None:
        super().__init__(cast(Any, sandbox), "f", 1, 128)
        self.fake = sandbox
        self.dead = False

    def alive(self) -> bool:
        return not self.dead


class Node:
    """The pool's start and destroy: starts can be held at a gate or made to fail."""

    def __init__(self) -> None:
        self.started: list[FakeInstance] = []
        self.destroyed: list[Instance] = []
        self.gate: asyncio.Event | None = None
        self.failures = 0

    async def start(self, first: bytes | None = None) -> Instance:
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise SandboxError("cannot create the sandbox")
        inst = FakeInstance(FakeSandbox(len(self.started)))
        inst.state = State.BUSY  # as the worker hands over a started instance
        self.started.append(inst)
        return inst

    def destroy(self, inst: Instance) -> None:
        self.destroyed.append(inst)
        inst.close()

    def pool(
        self, cache: HandlerCache, *, limit: int = 2, queue_depth: int = 2, name: str = "f"
    ) -> FunctionPool:
        return FunctionPool(name, 1, limit, queue_depth, self.start, self.destroy, cache)


def quiet_cache(**kw: Any) -> HandlerCache:
    """A cache that neither freezes nor evicts unless a test asks it to."""
    kw.setdefault("budget_bytes", 1 << 40)
    kw.setdefault("freeze_after_s", 3600.0)
    kw.setdefault("idle_ttl_s", 3600.0)
    return HandlerCache(**kw)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` on a looptime loop.  A test stuck on something that never happens
    fails at once: with nothing else to do, the loop jumps to the timeout."""

    async def bounded() -> T:
        async with asyncio.timeout(3600):
            return await main()

    with asyncio.Runner(loop_factory=lambda: looptime.new_event_loop(start=0)) as runner:
        return runner.run(bounded())


async def until(predicate: Callable[[], object], what: str) -> None:
    """Let the loop run until ``predicate`` holds (a few turns, never a timer)."""
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def counts(pool: FunctionPool) -> tuple[int, int, int, int]:
    """(idle, busy, starting, waiting)"""
    st = pool.statistics()
    return st.idle, st.busy, st.starting, st.waiting


# -- FunctionPool ------------------------------------------------------------------------------
def test_cold_start_under_the_limit_then_warm_reuse_most_recent_first() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=2)
        a, cold_a = await pool.acquire()
        b, cold_b = await pool.acquire()
        assert (cold_a, cold_b) == (True, True) and node.started == [a, b]
        assert counts(pool) == (0, 2, 0, 0)
        pool.release(a)
        pool.release(b)
        assert counts(pool) == (2, 0, 0, 0)
        assert a.state is State.IDLE and b.state is State.IDLE
        # LIFO: the most recently used is warmest.
        assert await pool.acquire() == (b, False)
        assert await pool.acquire() == (a, False)
        assert b.state is State.BUSY and len(node.started) == 2

    run(main)


def test_reserved_concurrency_zero_refuses_without_starting() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=0, queue_depth=5)
        with pytest.raises(TooManyRequests) as info:
            await pool.acquire()
        assert info.value.reason == "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert node.started == [] and counts(pool) == (0, 0, 0, 0)

    run(main)


def test_at_the_limit_calls_wait_in_a_bounded_queue_then_get_429() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1, queue_depth=2)
        a, _ = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 2, "two waiters")
        with pytest.raises(TooManyRequests):
            await pool.acquire()
        assert len(node.started) == 1  # nothing started past the limit
        # A release goes straight to the first waiter, warm, never through the idle stack.
        pool.release(a)
        assert await first == (a, False)
        assert a.state is State.BUSY and counts(pool) == (0, 1, 0, 1)
        assert not second.done()
        pool.release(a)
        assert await second == (a, False)
        assert counts(pool) == (0, 1, 0, 0) and len(node.started) == 1

    run(main)


def test_a_discarded_instance_frees_its_slot_for_a_waiter() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1)
        a, _ = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 1, "a waiter")
        pool.discard(a)  # e.g. it timed out
        assert node.destroyed == [a] and a.state is State.DEAD
        b, cold = await waiter
        assert cold and b is not a and node.started == [a, b]
        assert counts(pool) == (0, 1, 0, 0)
        pool.discard(a)  # already dead: nothing happens twice
        assert node.destroyed == [a] and counts(pool) == (0, 1, 0, 0)

    run(main)


def test_a_failing_start_frees_its_slot() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1)
        node.gate = asyncio.Event()
        node.failures = 1
        starting = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[2] == 1, "a start in progress")
        waiter = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 1, "a waiter behind the start")
        node.gate.set()
        with pytest.raises(SandboxError):
            await starting
        # The slot went to the waiter, which started an instance of its own.
        inst, cold = await waiter
        assert cold and node.started == [inst]
        assert counts(pool) == (0, 1, 0, 0)

    run(main)


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1, queue_depth=1)
        a, _ = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 1, "a waiter")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert counts(pool)[3] == 0
        other = asyncio.create_task(pool.acquire())  # the queue has room again
        await until(lambda: counts(pool)[3] == 1, "the next waiter")
        pool.release(a)
        assert await other == (a, False)

    run(main)


def test_an_instance_handed_to_a_waiter_cancelled_meanwhile_is_not_lost() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1)
        a, _ = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 1, "a waiter")
        pool.release(a)  # handed over ...
        waiter.cancel()  # ... but the waiter is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert counts(pool) == (1, 0, 0, 0) and a.state is State.IDLE
        assert await pool.acquire() == (a, False)

    run(main)


def test_a_slot_handed_to_a_waiter_cancelled_meanwhile_goes_to_the_next() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1)
        a, _ = await pool.acquire()
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 2, "two waiters")
        pool.discard(a)  # the free slot goes to the first waiter ...
        first.cancel()  # ... which is cancelled before it can start an instance
        with pytest.raises(asyncio.CancelledError):
            await first
        b, cold = await second
        assert cold and node.started == [a, b]

    run(main)


def test_retire_destroys_idle_instances_now_and_busy_ones_on_release() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=3)
        idle, _ = await pool.acquire()
        busy, _ = await pool.acquire()
        pool.release(idle)
        pool.retire()
        assert node.destroyed == [idle] and counts(pool) == (0, 1, 0, 0)
        pool.release(busy)
        assert node.destroyed == [idle, busy] and counts(pool) == (0, 0, 0, 0)
        assert len(pool.cache) == 0

    run(main)


def test_a_retired_pool_still_serves_its_waiters() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=1)
        a, _ = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await until(lambda: counts(pool)[3] == 1, "a waiter")
        pool.retire()
        pool.release(a)
        assert await waiter == (a, False)
        assert node.destroyed == []
        pool.release(a)
        assert node.destroyed == [a]

    run(main)


def test_dead_idle_instances_are_skipped_and_destroyed() -> None:
    async def main() -> None:
        node = Node()
        pool = node.pool(quiet_cache(), limit=3)
        a, _ = await pool.acquire()
        b, _ = await pool.acquire()
        pool.release(a)
        pool.release(b)
        b.dead = True  # its runtime died while idle
        assert await pool.acquire() == (a, False)
        assert node.destroyed == [b]
        pool.release(a)
        a.dead = True
        c, cold = await pool.acquire()  # nothing usable left: a cold start
        assert cold and c not in (a, b) and node.destroyed == [b, a]
        assert counts(pool) == (0, 1, 0, 0)

    run(main)


# -- HandlerCache ------------------------------------------------------------------------------
def test_an_idle_instance_is_frozen_after_the_delay_and_thawed_when_taken() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=30.0)
        pool = node.pool(cache)
        a, _ = await pool.acquire()
        pool.release(a)
        await asyncio.sleep(29)
        assert a.state is State.IDLE and not a.fake.frozen and cache.freezes == 0
        await asyncio.sleep(2)
        assert a.state is State.FROZEN and a.fake.frozen and cache.freezes == 1
        assert cache.memory == 10 * MB  # measured when frozen
        assert await pool.acquire() == (a, False)
        assert a.state is State.BUSY and not a.fake.frozen and a.fake.thaws == 1
        assert len(cache) == 0

    run(main)


def test_taking_an_instance_back_in_time_cancels_its_freeze() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=30.0)
        pool = node.pool(cache)
        a, _ = await pool.acquire()
        pool.release(a)
        await asyncio.sleep(10)
        assert await pool.acquire() == (a, False)
        await asyncio.sleep(60)
        assert a.state is State.BUSY and not a.fake.frozen and a.fake.thaws == 0
        assert cache.freezes == 0

    run(main)


def test_with_no_delay_the_freeze_follows_the_release_not_inside_it() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=0.0)
        pool = node.pool(cache)
        a, _ = await pool.acquire()
        pool.release(a)
        assert a.state is State.IDLE  # the response goes out first
        await until(lambda: a.state is State.FROZEN, "the freeze")
        assert a.fake.frozen and cache.freezes == 1

    run(main)


def test_an_instance_that_cannot_be_frozen_stays_idle_and_usable() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=0.0)
        pool = node.pool(cache)
        a, _ = await pool.acquire()
        a.fake.freeze_fails = True
        pool.release(a)
        await asyncio.sleep(1)
        assert a.state is State.IDLE and cache.freezes == 0
        assert await pool.acquire() == (a, False)

    run(main)


def test_an_instance_that_cannot_be_thawed_is_replaced() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=0.0)
        pool = node.pool(cache)
        a, _ = await pool.acquire()
        pool.release(a)
        await until(lambda: a.state is State.FROZEN, "the freeze")
        a.fake.thaw_fails = True
        b, cold = await pool.acquire()
        assert cold and b is not a and node.destroyed == [a]

    run(main)


def test_over_the_budget_the_least_recently_used_are_evicted() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(budget_bytes=25 * MB, freeze_after_s=0.0)  # room for two
        pools = [node.pool(cache, name=name) for name in ("a", "b", "c")]
        insts = [(await p.acquire())[0] for p in pools]
        for pool, inst in zip(pools, insts, strict=True):
            pool.release(inst)
            await until(lambda i=inst: i.state is not State.IDLE, "the freeze")
        a, b, c = insts
        assert node.destroyed == [a] and cache.evictions == 1
        assert cache.instances() == [b, c] and cache.memory == 20 * MB
        assert counts(pools[0]) == (0, 0, 0, 0)
        # Using one makes it the most recent: it outlives the one released before it.
        assert await pools[1].acquire() == (b, False)
        pools[1].release(b)
        await until(lambda: b.state is State.FROZEN, "the freeze")
        assert cache.instances() == [c, b]
        d, _ = await pools[0].acquire()
        pools[0].release(d)
        await until(lambda: d.state is not State.IDLE, "the freeze")
        assert node.destroyed == [a, c] and cache.instances() == [b, d]

    run(main)


def test_instances_idle_past_their_ttl_are_evicted_oldest_first() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(idle_ttl_s=60.0)
        pool = node.pool(cache, limit=3)
        a, _ = await pool.acquire()
        b, _ = await pool.acquire()
        pool.release(a)
        pool.release(b)
        cache.enforce()
        assert node.destroyed == []
        a.last_used = time.monotonic() - 61  # idle for longer than the TTL
        cache.enforce()
        assert node.destroyed == [a] and cache.instances() == [b] and cache.evictions == 1
        assert await pool.acquire() == (b, False)

    run(main)


def test_evict_lru_takes_frozen_instances_first() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache(freeze_after_s=0.0)
        pool = node.pool(cache, limit=3)
        a, _ = await pool.acquire()
        b, _ = await pool.acquire()
        a.fake.freeze_fails = True  # a stays idle, unfrozen, and is the oldest
        pool.release(a)
        pool.release(b)
        await until(lambda: b.state is State.FROZEN, "the freeze")
        assert cache.evict_lru() is True
        assert node.destroyed == [b]
        assert cache.evict_lru() is True
        assert node.destroyed == [b, a]
        assert cache.evict_lru() is False
        assert cache.evictions == 2 and counts(pool) == (0, 0, 0, 0)

    run(main)
