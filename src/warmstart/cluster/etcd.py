"""The one seam between warmstart and etcd: a small key-value interface over etcd v3.

Everything the cluster keeps in etcd goes through ``Etcd``: keys are relative to the
cluster's prefix (``/warmstart/`` by default), values are bytes, and the few operations
the cluster needs are named for what they do -- ``create`` (only if absent),
``replace`` (only if the value is still the one read: optimistic concurrency),
``claim`` (create under a lease, only while another key exists), leases for liveness and
a prefix watch.  ``AetcdEtcd`` speaks to a real etcd through the maintained ``aetcd``
client (gRPC), trying the configured endpoints in turn; ``MemoryEtcd`` is the same
interface in memory, for unit tests at this seam (and a single node's image jobs).

Any failure to reach etcd is ``ClusterUnavailable`` (a ``PlatformError``: the API answers
503), never a client library's exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from warmstart.errors import InvalidParameter, ServiceUnavailable

log = logging.getLogger(__name__)

TXN_MAX_OPS = 128  # etcd's default --max-txn-ops
TIMEOUT_S = 3.0  # one request; a slower etcd is treated as unreachable


class ClusterUnavailable(ServiceUnavailable):
    """etcd cannot be reached (or answered an error): cluster writes cannot be made."""


class ValueTooLarge(InvalidParameter):
    """etcd refused a request for its size (its default limit is 1.5 MiB a request)."""


def _too_large(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "too large" in text or "larger than max" in text or "resource_exhausted" in text


@dataclass(frozen=True)
class KV:
    key: str  # relative to the cluster prefix
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


class Etcd(Protocol):
    async def get(self, key: str) -> KV | None: ...

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KV], int]:
        """Keys under ``prefix`` in key order (at most ``limit``; 0: all), and the store's
        revision at the time (to watch from)."""

    async def count(self, prefix: str) -> int: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None: ...

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist; False if it did."""

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        """Put ``key`` only if its value is still ``expected``; False otherwise."""

    async def claim(self, key: str, value: bytes, *, lease: int, while_exists: str) -> bool:
        """Create ``key`` under ``lease`` only if it is absent and ``while_exists`` is
        present (a queue item that has not been finished meanwhile)."""

    async def delete(self, key: str) -> bool:
        """Delete ``key``; False if it did not exist."""

    async def commit(self, ops: Sequence[Op], *, if_value: tuple[str, bytes] | None = None) -> bool:
        """Apply ``ops`` atomically (at most TXN_MAX_OPS); with ``if_value=(key, value)``
        only if that key holds that value.  False when the condition failed."""

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease; its remaining TTL, <= 0 when it has expired (keys gone)."""

    async def revoke(self, lease: int) -> None: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` on, until cancelled; an
        error (etcd gone, revision compacted) ends it with ``ClusterUnavailable``."""

    async def close(self) -> None: ...


# -- the real thing --------------------------------------------------------------------------
def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        raise ValueError(f"etcd URL {url!r} has no host:port")
    return parts.hostname, parts.port


class AetcdEtcd:
    """``Etcd`` over aetcd; on a connection failure the next endpoint is tried."""

    def __init__(self, endpoints: Sequence[str], prefix: str, *, timeout: float = TIMEOUT_S):
        import aetcd
        import aetcd.rpc

        self._aetcd = aetcd
        self._rpc = aetcd.rpc
        self._errors = (aetcd.ClientError, aetcd.rpc.AioRpcError, OSError, TimeoutError)
        self._tx = aetcd.Transactions()
        self._endpoints = [_host_port(u) for u in endpoints]
        self._current = 0
        self._prefix = prefix
        self._timeout = timeout
        self._client: Any = None
        self._lock = asyncio.Lock()

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def _rel(self, raw: bytes) -> str:
        return raw.decode()[len(self._prefix) :]

    async def _connected(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                host, port = self._endpoints[self._current]
                client = self._aetcd.Client(host=host, port=port, timeout=self._timeout)
                await client.connect()
                self._client = client
        return self._client

    async def _failed(self, exc: BaseException) -> ClusterUnavailable | ValueTooLarge:
        """What a failed call raises.  A request refused for its size is the caller's
        (the connection is fine); anything else drops the client, and the next call
        connects to the next endpoint."""
        if _too_large(exc):
            return ValueTooLarge(f"etcd refused a request this large: {exc}")
        client, self._client = self._client, None
        self._current = (self._current + 1) % len(self._endpoints)
        if client is not None:
            with contextlib.suppress(Exception):  # a broken channel may fail to close
                await client.close()
        host, port = self._endpoints[self._current - 1]
        return ClusterUnavailable(f"etcd at {host}:{port}: {type(exc).__name__}: {exc}")

    async def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        try:
            client = await self._connected()
            async with asyncio.timeout(self._timeout):
                return await getattr(client, fn)(*args, **kwargs)
        except self._errors as exc:
            raise await self._failed(exc) from exc

    async def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        try:
            client = await self._connected()
            async with asyncio.timeout(self._timeout):
                ok, _ = await client.transaction(compare=compare, success=success, failure=[])
            return bool(ok)
        except self._errors as exc:
            raise await self._failed(exc) from exc

    async def get(self, key: str) -> KV | None:
        r = await self._call("get", self._key(key))
        if r is None:
            return None
        return KV(key, bytes(r.value), int(r.mod_revision), int(r.lease))

    async def _range(self, prefix: str, *, limit: int = 0, count_only: bool = False) -> Any:
        # aetcd's get_prefix has no limit or count_only: the request is built here.
        from aetcd import utils

        key = self._key(prefix)
        request = self._rpc.RangeRequest(
            key=key, range_end=utils.prefix_range_end(key), limit=limit, count_only=count_only
        )
        try:
            client = await self._connected()
            async with asyncio.timeout(self._timeout):
                return await client.kvstub.Range(
                    request, timeout=self._timeout, metadata=client.metadata
                )
        except self._errors as exc:
            raise await self._failed(exc) from exc

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KV], int]:
        r = await self._range(prefix, limit=limit)
        kvs = [
            KV(self._rel(kv.key), bytes(kv.value), int(kv.mod_revision), int(kv.lease))
            for kv in r.kvs
        ]
        return kvs, int(r.header.revision)

    async def count(self, prefix: str) -> int:
        return int((await self._range(prefix, count_only=True)).count)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        await self._call("put", self._key(key), value, lease=lease or None)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        t = self._tx
        k = self._key(key)
        return await self._txn([t.create(k) == 0], [t.put(k, value, lease=lease or None)])

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        t = self._tx
        k = self._key(key)
        return await self._txn([t.value(k) == expected], [t.put(k, value)])

    async def claim(self, key: str, value: bytes, *, lease: int, while_exists: str) -> bool:
        t = self._tx
        k, other = self._key(key), self._key(while_exists)
        return await self._txn(
            [t.create(k) == 0, t.create(other) > 0], [t.put(k, value, lease=lease)]
        )

    async def delete(self, key: str) -> bool:
        r = await self._call("delete", self._key(key))
        return r is not None

    async def commit(self, ops: Sequence[Op], *, if_value: tuple[str, bytes] | None = None) -> bool:
        if len(ops) > TXN_MAX_OPS:
            raise ValueError(f"a transaction takes at most {TXN_MAX_OPS} operations")
        t = self._tx
        success = [
            t.put(self._key(op.key), op.value, lease=op.lease or None)
            if isinstance(op, Put)
            else t.delete(self._key(op.key))
            for op in ops
        ]
        compare = [] if if_value is None else [t.value(self._key(if_value[0])) == if_value[1]]
        return await self._txn(compare, success)

    async def grant(self, ttl: int) -> int:
        lease = await self._call("lease", ttl)
        return int(lease.id)

    async def keepalive(self, lease: int) -> int:
        reply = await self._call("refresh_lease", lease)
        return int(reply.TTL) if reply is not None else 0

    async def revoke(self, lease: int) -> None:
        try:
            client = await self._connected()
            async with asyncio.timeout(self._timeout):
                await client.revoke_lease(lease)
        except self._errors as exc:
            if "lease not found" in str(exc):
                return  # it lapsed already: its keys are gone, which is what was asked
            raise await self._failed(exc) from exc

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        aetcd = self._aetcd
        try:
            client = await self._connected()
            stream = await client.watch_prefix(self._key(prefix), start_revision=start_revision)
        except self._errors as exc:
            raise await self._failed(exc) from exc
        try:
            async for event in stream:
                kind: Literal["put", "delete"] = (
                    "delete" if event.kind == aetcd.EventKind.DELETE else "put"
                )
                kv = event.kv
                yield WatchEvent(kind, self._rel(kv.key), bytes(kv.value), int(kv.mod_revision))
        except self._errors as exc:
            raise await self._failed(exc) from exc
        finally:
            with contextlib.suppress(Exception):  # the channel may be gone already
                await stream.cancel()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


# -- in memory, for unit tests ----------------------------------------------------------------
class MemoryEtcd:
    """``Etcd`` in memory: revisions, leases (expired by ``expire``, ``expire_lapsed`` or
    their TTL on the next keepalive) and watches behave as etcd's do.  ``down`` makes
    every call fail.  Unit tests use it; so does a node running alone, for the state of
    its image jobs (``cluster/imageops.py``)."""

    def __init__(self) -> None:
        self.data: dict[str, KV] = {}
        self.revision = 1
        self.leases: dict[int, float] = {}  # lease -> deadline (monotonic)
        self._ttl: dict[int, int] = {}
        self._next_lease = 100
        self._watchers: list[tuple[str, asyncio.Queue[WatchEvent | None]]] = []
        self.history: list[WatchEvent] = []
        self.down = False
        self.writes = 0

    def _check(self) -> None:
        if self.down:
            raise ClusterUnavailable("etcd at memory: down")

    def _emit(self, event: WatchEvent) -> None:
        self.history.append(event)
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    def _put(self, key: str, value: bytes, lease: int) -> None:
        self.revision += 1
        self.writes += 1
        self.data[key] = KV(key, value, self.revision, lease)
        self._emit(WatchEvent("put", key, value, self.revision))

    def _del(self, key: str) -> bool:
        if key not in self.data:
            return False
        self.revision += 1
        self.writes += 1
        del self.data[key]
        self._emit(WatchEvent("delete", key, b"", self.revision))
        return True

    async def get(self, key: str) -> KV | None:
        self._check()
        return self.data.get(key)

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KV], int]:
        self._check()
        kvs = [self.data[k] for k in sorted(self.data) if k.startswith(prefix)]
        return (kvs[:limit] if limit else kvs), self.revision

    async def count(self, prefix: str) -> int:
        self._check()
        return sum(1 for k in self.data if k.startswith(prefix))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        self._check()
        self._put(key, value, lease)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        self._check()
        if key in self.data:
            return False
        self._put(key, value, lease)
        return True

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        self._check()
        current = self.data.get(key)
        if current is None or current.value != expected:
            return False
        self._put(key, value, current.lease)
        return True

    async def claim(self, key: str, value: bytes, *, lease: int, while_exists: str) -> bool:
        self._check()
        if key in self.data or while_exists not in self.data or lease not in self.leases:
            return False
        self._put(key, value, lease)
        return True

    async def delete(self, key: str) -> bool:
        self._check()
        return self._del(key)

    async def commit(self, ops: Sequence[Op], *, if_value: tuple[str, bytes] | None = None) -> bool:
        self._check()
        if len(ops) > TXN_MAX_OPS:
            raise ValueError(f"a transaction takes at most {TXN_MAX_OPS} operations")
        if if_value is not None:
            current = self.data.get(if_value[0])
            if current is None or current.value != if_value[1]:
                return False
        for op in ops:
            if isinstance(op, Put):
                self._put(op.key, op.value, op.lease)
            else:
                self._del(op.key)
        return True

    async def grant(self, ttl: int) -> int:
        self._check()
        self._next_lease += 1
        self.leases[self._next_lease] = time.monotonic() + ttl
        self._ttl[self._next_lease] = ttl
        return self._next_lease

    async def keepalive(self, lease: int) -> int:
        self._check()
        deadline = self.leases.get(lease)
        if deadline is None or deadline < time.monotonic():
            self.expire(lease)
            return 0
        self.leases[lease] = time.monotonic() + self._ttl[lease]
        return self._ttl[lease]

    async def revoke(self, lease: int) -> None:
        self._check()
        self.expire(lease)

    def expire(self, lease: int) -> None:
        """The lease lapses: its keys are deleted, as etcd does."""
        self.leases.pop(lease, None)
        for key in [k for k, kv in self.data.items() if kv.lease == lease]:
            self._del(key)

    def expire_lapsed(self) -> list[int]:
        """Expire every lease whose TTL has run out without a keepalive (etcd does this
        by itself; here whoever uses the store calls it now and then)."""
        now = time.monotonic()
        lapsed = [lease for lease, deadline in self.leases.items() if deadline < now]
        for lease in lapsed:
            self.expire(lease)
        return lapsed

    def compact(self) -> None:
        """Forget the history (as etcd's compaction does): a watch can no longer start
        from a revision before now.  Watches already running miss nothing."""
        self.history.clear()

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self._check()
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        for event in self.history:
            if event.mod_revision >= start_revision and event.key.startswith(prefix):
                queue.put_nowait(event)
        entry = (prefix, queue)
        self._watchers.append(entry)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    raise ClusterUnavailable("etcd at memory: down")
                yield item
        finally:
            self._watchers.remove(entry)

    def fail(self) -> None:
        """etcd goes away: calls fail and every watch ends with an error."""
        self.down = True
        for _, queue in self._watchers:
            queue.put_nowait(None)

    async def close(self) -> None:
        return None
