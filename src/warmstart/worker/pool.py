"""Per-version instance pools, the concurrency they share, and the node-wide handler cache.

A ``FunctionPool`` holds the instances of one function version's revision ($LATEST's
current one, or a published version).  Each instance serves
one invocation at a time.  ``acquire`` takes the most recently used idle instance (warm),
or starts one (cold) while the function is under its concurrency limit, or waits in a
bounded queue, or raises TooManyRequests.  A released instance goes straight to the
first waiter, else back to the idle stack.

The pools of one function's versions share its concurrency limit (``ConcurrencyGroup``:
reserved concurrency caps the function, whichever versions run).  A version that needs an
instance while the function is at its limit takes the slot of another version's idle
instance (destroyed for it); a released instance whose own version has no waiter goes
to another version's waiter the same way.

The ``HandlerCache`` sees every idle instance on the node in LRU order.  An instance
idle for ``freeze_after_ms`` is frozen (cgroup freezer: it uses no CPU and its memory
stays resident); when the idle instances' measured memory exceeds the cache budget, or
an instance has been idle for ``idle_ttl_s``, the least recently used is evicted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmstart.errors import PlatformError, TooManyRequests
from warmstart.worker.instance import Instance, State

log = logging.getLogger(__name__)

# Starts an instance; with a request frame, writes it to the new runtime before waiting
# for it to be ready (``Instance.first_sent`` says whether it did).
Starter = Callable[[bytes | None], Awaitable[Instance]]
Destroyer = Callable[[Instance], None]


@dataclass(frozen=True)
class FunctionPoolStatistics:
    idle: int
    busy: int
    starting: int
    waiting: int


class ConcurrencyGroup:
    """The pools of one function's versions (in one QoS class) and the limit on their
    instances together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pools: list[FunctionPool] = []

    @property
    def live(self) -> int:
        return sum(p.live for p in self.pools)

    def make_room(self, pool: FunctionPool) -> bool:
        """Whether ``pool`` may start an instance: the function is under its limit, or
        another version's least recently used idle instance gives its slot up."""
        if self.live < self.limit:
            return True
        for other in self.pools:
            if other is not pool and other.idle:
                other.drop_idle()
                return self.live < self.limit
        return False

    def waiting_elsewhere(self, pool: FunctionPool) -> bool:
        return any(p.waiters for p in self.pools if p is not pool)

    def slot_freed(self) -> None:
        """Hand a freed slot to the first pool with a waiter that may use it."""
        for pool in list(self.pools):
            if pool.wake_one():
                return


class FunctionPool:
    def __init__(
        self,
        name: str,
        revision: int,
        limit: int,
        queue_depth: int,
        start: Starter,
        destroy: Destroyer,
        cache: HandlerCache,
        *,
        version: str = "$LATEST",
        group: ConcurrencyGroup | None = None,
    ) -> None:
        self.name = name
        self.revision = revision
        self.version = version
        self.group = group
        if group is not None:
            group.pools.append(self)
        self.limit = limit
        self.queue_depth = queue_depth
        self._start = start
        self._destroy = destroy
        self.cache = cache
        self.idle: list[Instance] = []
        self.live = 0  # starting + idle + busy
        self.starting = 0
        self.waiters: collections.deque[asyncio.Future[Instance | None]] = collections.deque()
        self.retired = False

    async def acquire(self, first: bytes | None = None) -> tuple[Instance, bool]:
        """Returns (instance, cold).  ``first``: the request frame to write to a new
        instance as soon as its sandbox exists (see ``Starter``)."""
        while self.idle:
            inst = self.idle.pop()
            if self.cache.take(inst):
                return inst, False
            self.discard(inst)
        if self._has_room():
            return await self._new(first), True
        if self.limit == 0:
            raise TooManyRequests(
                "Rate Exceeded.", "ReservedFunctionConcurrentInvocationLimitExceeded"
            )
        if len(self.waiters) >= self.queue_depth:
            raise TooManyRequests(
                "Rate Exceeded.", "ReservedFunctionConcurrentInvocationLimitExceeded"
            )
        fut: asyncio.Future[Instance | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            handed = await fut
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)
            if fut.done() and not fut.cancelled():
                got = fut.result()
                if got is not None:
                    self.release(got)
                else:
                    self._pass_slot()
            raise
        if handed is None:
            return await self._new(first), True
        return handed, False

    async def _new(self, first: bytes | None = None) -> Instance:
        self.live += 1
        self.starting += 1
        try:
            inst = await self._start(first)
        except BaseException:
            self.live -= 1
            self._pass_slot()
            raise
        finally:
            self.starting -= 1
        return inst

    def _has_room(self) -> bool:
        if self.live >= self.limit:
            return False
        return self.group is None or self.group.make_room(self)

    def release(self, inst: Instance) -> None:
        """Return a healthy instance after an invocation."""
        if self.retired and not self.waiters:
            self.discard(inst)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                inst.state = State.BUSY
                fut.set_result(inst)
                return
        group = self.group
        if group is not None and group.live >= group.limit and group.waiting_elsewhere(self):
            self.discard(inst)  # its slot goes to another version's waiter
            return
        inst.state = State.IDLE
        self.idle.append(inst)
        self.cache.put(self, inst)

    def discard(self, inst: Instance) -> None:
        """Destroy an instance (dead, timed out, evicted or retired) and free its slot."""
        if inst.state is State.DEAD:
            return
        self._forget(inst)
        self._destroy(inst)
        self._pass_slot()

    def _forget(self, inst: Instance) -> None:
        self.live -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(inst)
        self.cache.drop(inst)

    def _pass_slot(self) -> None:
        """A slot freed up: let the first waiter (of this version, else of another
        version of the function) start an instance of its own."""
        if self.wake_one() or self.group is None:
            return
        self.group.slot_freed()

    def wake_one(self) -> bool:
        """Let this pool's first waiter start an instance, if there is room; whether one
        was woken."""
        while self.waiters and self._has_room():
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    def drop_idle(self) -> None:
        """Destroy the least recently used idle instance to give its slot to another
        version of the function (the caller takes the slot: it is not passed on)."""
        inst = self.idle[0]
        self._forget(inst)
        self._destroy(inst)

    def retire(self) -> None:
        """A new revision replaced this one (or the version is gone): idle instances go
        now, busy ones on release; its instances no longer count against the function's
        limit."""
        self.retired = True
        if self.group is not None:
            with contextlib.suppress(ValueError):
                self.group.pools.remove(self)
            self.group.slot_freed()
        for inst in list(self.idle):
            self.discard(inst)

    def set_limit(self, limit: int) -> None:
        """A new concurrency limit (reserved concurrency changed); a higher one lets
        waiters start instances at once, a lower one takes effect as instances go."""
        self.limit = limit
        if self.group is not None:
            self.group.limit = limit
        self._pass_slot()

    def statistics(self) -> FunctionPoolStatistics:
        return FunctionPoolStatistics(
            len(self.idle),
            self.live - len(self.idle) - self.starting,
            self.starting,
            len(self.waiters),
        )


class HandlerCache:
    """Node-wide LRU of idle instances: freezing, memory budget, eviction."""

    def __init__(self, budget_bytes: int, freeze_after_s: float, idle_ttl_s: float) -> None:
        self.budget = budget_bytes
        self.freeze_after = freeze_after_s
        self.idle_ttl = idle_ttl_s
        self._lru: collections.OrderedDict[Instance, FunctionPool] = collections.OrderedDict()
        self.evictions = 0
        self.freezes = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def memory(self) -> int:
        return sum(i.memory_bytes for i in self._lru)

    def instances(self) -> list[Instance]:
        return list(self._lru)

    def put(self, pool: FunctionPool, inst: Instance) -> None:
        inst.last_used = time.monotonic()
        self._lru[inst] = pool
        loop = asyncio.get_running_loop()
        if self.freeze_after <= 0:
            # Not inline: the response goes out first, then the freeze.
            inst.freeze_handle = loop.call_later(0, self._freeze, inst)
        else:
            inst.freeze_handle = loop.call_later(self.freeze_after, self._freeze, inst)

    def take(self, inst: Instance) -> bool:
        """Take an idle instance for an invocation, thawing it.  False if unusable."""
        self._lru.pop(inst, None)
        if inst.freeze_handle is not None:
            inst.freeze_handle.cancel()
            inst.freeze_handle = None
        if not inst.alive():
            return False  # it died while idle (killed, crashed, lost its sandbox)
        if inst.state is State.FROZEN:
            try:
                inst.sandbox.thaw()
            except PlatformError as exc:
                log.warning("cannot thaw %s: %s", inst.id, exc)
                return False
        inst.state = State.BUSY
        return True

    def drop(self, inst: Instance) -> None:
        self._lru.pop(inst, None)
        if inst.freeze_handle is not None:
            inst.freeze_handle.cancel()
            inst.freeze_handle = None

    def _freeze(self, inst: Instance) -> None:
        inst.freeze_handle = None
        if inst.state is not State.IDLE:
            return
        try:
            inst.memory_bytes = inst.sandbox.memory_usage()
            inst.sandbox.freeze()
        except PlatformError as exc:
            log.warning("cannot freeze %s: %s", inst.id, exc)
            return
        inst.state = State.FROZEN
        self.freezes += 1
        self.enforce()

    def enforce(self) -> None:
        """Evict least recently used idle instances over the budget or past their TTL."""
        now = time.monotonic()
        while self._lru:
            inst, pool = next(iter(self._lru.items()))
            if self.memory <= self.budget and now - inst.last_used < self.idle_ttl:
                break
            self.evict(inst, pool)

    def evict(self, inst: Instance, pool: FunctionPool) -> None:
        self.evictions += 1
        pool.discard(inst)

    def evict_lru(self) -> bool:
        """Evict one idle instance (frozen ones first).  False if there is none."""
        for inst, pool in self._lru.items():
            if inst.state is State.FROZEN:
                self.evict(inst, pool)
                return True
        for inst, pool in self._lru.items():
            self.evict(inst, pool)
            return True
        return False
