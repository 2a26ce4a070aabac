"""Demand-based prewarm: a function's artifacts on the next node before calls are sent there.

Where a function spreads.  The router (``router.py``) keeps a function's calls on the
nodes where it is warm, and sends them elsewhere once such a node has no room for more:
once its in-flight calls reach its share of the function's reserved concurrency.  The
next node is the best, in the router's own order, of those without an instance: a
zygote with the function's packages, then its artifacts cached, then the least loaded.
Cold for the function, that node pays on its first call for the bundle fetch and the
package install (or the image pull) on top of the cold start, while the calls pile up.

Prewarm moves that work ahead of the traffic.  Every second each node looks at its own
functions; one is **hot** here when its in-flight calls reach half of this node's limit
for it (its share of the reserved concurrency, else ``--max-concurrency``), and at least
one.  Half, because load that took a node from nothing to half its room usually takes
about as long again to fill the other half: that is the window in which a bundle fetch
and a package install (seconds) or an image pull (seconds to a minute) can finish, while
a lower mark would prepare nodes for every blip.  For a hot function the node ranks the
other nodes as the router would for the overflow -- skipping those where the function is
warm or busy (they take its calls already) and those without room -- and when the first
of them does not hold the function's artifacts (published: bundles, installed packages,
mounted images) asks it to get them, by creating ``prewarm/<function>/<node>`` under its
own lease (create-if-absent: many hot nodes, one request; the key goes if the asker
dies).  A node asks the same node again for the same function after ``cooldown_s`` at
the earliest.

The asked node watches ``prewarm/`` and makes the function ready without starting an
instance (``Worker.prepare``): the bundle fetched from a holder and the packages
installed (``registry.ensure_code``), or the image mounted -- lazily, or pulled in full --
just as the first start would; then it deletes the key.  Its next published state shows
the artifacts, and the router's locality score puts it first for the overflow, so the
calls that spill there find a node that only needs to start the instance.

Functions without reserved concurrency are not spread by today's router (their calls
wait on their warm nodes up to ``--max-concurrency``), so for them a request is made
only once a node is half full, and helps only when the router does spread them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.cluster.membership import Member
from warmstart.cluster.router import load, locality, share, zygote_cover
from warmstart.cluster.selection import NodeView
from warmstart.errors import NotFound, WarmstartError
from warmstart.functions import FunctionRecord
from warmstart.lifecycle import Supervisor

log = logging.getLogger(__name__)

PREWARM = "prewarm/"
HOT_FRACTION = 0.5
INTERVAL_S = 1.0
COOLDOWN_S = 10.0


class Functions(Protocol):
    """What prewarm needs of the worker."""

    def functions(self) -> list[FunctionRecord]: ...

    def get(self, name: str) -> FunctionRecord: ...

    def inflight(self, rec: FunctionRecord) -> int: ...

    async def prepare(self, rec: FunctionRecord) -> None: ...


def holds(member: Member, rec: FunctionRecord) -> bool:
    """Whether ``member`` published having everything ``rec`` needs to start."""
    state = member.state
    if rec.image is not None:
        return rec.image.digest in (state.get("images") or {})
    installed = set(state.get("packages") or ())
    return rec.code_sha256 in (state.get("code") or ()) and all(
        p in installed for p in rec.packages
    )


def serving(member: Member, rec: FunctionRecord) -> bool:
    """Whether ``member`` has instances of ``rec``'s revision (warm or busy)."""
    fn = (member.state.get("functions") or {}).get(rec.name)
    if not isinstance(fn, dict) or fn.get("revision") != rec.revision:
        return False
    return bool(fn.get("idle", 0) or fn.get("busy", 0))


def next_node(rec: FunctionRecord, members: list[Member], me: str) -> Member | None:
    """Where the router sends ``rec``'s calls that its serving nodes have no room for:
    the best node, in the router's order, that does not serve it and has room."""
    names = [m.name for m in members]

    def has_room(m: Member) -> bool:
        if rec.reserved_concurrency is None:
            return True
        fn = (m.state.get("functions") or {}).get(rec.name) or {}
        return int(fn.get("inflight", 0)) < share(rec.reserved_concurrency, names, m.name)

    candidates = [m for m in members if m.name != me and not serving(m, rec) and has_room(m)]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda m: (zygote_cover(m, rec), locality(m, rec, members), -load(m), m.name),
    )


class Prewarm:
    def __init__(
        self,
        etcd: Etcd,
        view: NodeView,
        worker: Functions,
        tasks: Supervisor,
        *,
        limit: Callable[[FunctionRecord], int],
        hot_fraction: float = HOT_FRACTION,
        interval_s: float = INTERVAL_S,
        cooldown_s: float = COOLDOWN_S,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.worker = worker
        self.tasks = tasks
        self.limit = limit  # this node's concurrency limit for a function
        self.hot_fraction = hot_fraction
        self.interval_s = interval_s
        self.cooldown_s = cooldown_s
        self._asked: dict[tuple[str, str], float] = {}  # (function, node) -> when
        self._preparing: dict[str, asyncio.Task[None]] = {}  # key -> task
        self.requests = 0  # nodes asked by this one
        self.prepared = 0  # functions made ready here on request

    def hot(self, rec: FunctionRecord) -> bool:
        inflight = self.worker.inflight(rec)
        return inflight > 0 and inflight >= max(1, math.ceil(self.hot_fraction * self.limit(rec)))

    # -- asking ------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except ClusterUnavailable as exc:
                log.debug("prewarm: etcd unreachable: %s", exc)

    async def check(self) -> list[tuple[str, str]]:
        """Ask the next node of every hot function here to prepare it; what was asked."""
        members = self.view.live()
        if len(members) < 2 or self.view.lease == 0:
            return []
        now = time.monotonic()
        asked = []
        for rec in self.worker.functions():
            if not self.hot(rec):
                continue
            target = next_node(rec, members, self.view.name)
            if target is None or holds(target, rec):
                continue
            key = (rec.name, target.name)
            if now - self._asked.get(key, -math.inf) < self.cooldown_s:
                continue
            self._asked[key] = now
            value = json.dumps(
                {"function": rec.name, "revision": rec.revision, "by": self.view.name}
            ).encode()
            if await self.etcd.create(
                f"{PREWARM}{rec.name}/{target.name}", value, lease=self.view.lease
            ):
                self.requests += 1
                asked.append(key)
                log.info(
                    "prewarm: %s is hot here (%d in flight); asking %s to prepare it",
                    rec.name,
                    self.worker.inflight(rec),
                    target.name,
                )
        if len(self._asked) > 4096:
            self._asked = {k: t for k, t in self._asked.items() if now - t < self.cooldown_s}
        return asked

    # -- being asked -------------------------------------------------------------------------
    async def watch(self) -> None:
        """Prepare what this node is asked to: the requests there are, then new ones."""
        while True:
            try:
                kvs, revision = await self.etcd.range(PREWARM)
                self._requests(kv.key for kv in kvs)
                async for event in self.etcd.watch(PREWARM, revision + 1):
                    if event.kind == "put":
                        self._requests([event.key])
            except ClusterUnavailable:
                await asyncio.sleep(1.0)

    def _requests(self, keys: Iterable[str]) -> None:
        for key in keys:
            function, _, node = key[len(PREWARM) :].rpartition("/")
            if node == self.view.name and function and key not in self._preparing:
                self._preparing[key] = self.tasks.spawn(
                    self._prepare(key, function), f"prewarm {function}"
                )

    async def _prepare(self, key: str, function: str) -> None:
        try:
            try:
                rec = self.worker.get(function)
            except NotFound:
                return  # deleted meanwhile
            started = time.perf_counter()
            try:
                await self.worker.prepare(rec)
            except (WarmstartError, OSError) as exc:
                log.warning("prewarm: cannot prepare %s here: %s", function, exc)
                return
            self.prepared += 1
            log.info("prewarm: %s prepared here in %.2f s", function, time.perf_counter() - started)
        finally:
            with contextlib.suppress(ClusterUnavailable):
                await self.etcd.delete(key)
            self._preparing.pop(key, None)
