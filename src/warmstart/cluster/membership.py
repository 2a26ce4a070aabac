"""Membership: a node's lease, its published state, and the table of live nodes.

A node joins by creating ``nodes/<name>`` under a lease of ``lease_ttl_s`` (6 s) and then,
every ``publish_interval_s`` (1 s), refreshes the lease and rewrites the key with its
state (capacity, usage, reclaimed capacity, instances, zygotes, cached artifacts).  A
node that stops refreshing -- killed, partitioned from etcd -- loses its lease: etcd
deletes its key and every claim it held, and the others see it leave through their
watch of ``nodes/``.

A name is one node's: a node that starts while its name's key is alive waits one TTL
for a crashed predecessor's lease to lapse, and refuses to start if the key is still
being refreshed (another live node has the name).

When etcd cannot be reached the node keeps serving (``connected`` is False, ``/healthz``
says degraded); once etcd answers again the loop finds the lease gone and rejoins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.cluster.settings import ClusterSettings
from warmstart.errors import PlatformError

log = logging.getLogger(__name__)

NODES = "nodes/"


class NameTaken(PlatformError):
    """Another live node uses this node's name."""


@dataclass(frozen=True)
class Member:
    name: str
    url: str
    labels: dict[str, str] = field(default_factory=dict)
    started: str = ""
    instance: str = ""  # one per process: tells a restarted node from its predecessor
    state: dict[str, Any] = field(default_factory=dict)
    published: float = 0.0  # wall-clock time of the last write

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "url": self.url,
                "labels": self.labels,
                "started": self.started,
                "instance": self.instance,
                "state": self.state,
                "published": self.published,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Member:
        d = json.loads(raw)
        return cls(
            str(d["name"]),
            str(d["url"]),
            dict(d.get("labels") or {}),
            str(d.get("started", "")),
            str(d.get("instance", "")),
            dict(d.get("state") or {}),
            float(d.get("published", 0.0)),
        )


class Membership:
    def __init__(
        self,
        etcd: Etcd,
        settings: ClusterSettings,
        state: Callable[[], dict[str, Any]],
    ) -> None:
        self.etcd = etcd
        self.settings = settings
        self.state = state
        self.name = settings.node_name
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.lease = 0
        self.members: dict[str, Member] = {}
        self.connected = False
        self.disconnected_since: float | None = None
        self.last_error = ""
        self._on_join: list[Callable[[], Any]] = []
        self._on_change: list[Callable[[], None]] = []

    def on_join(self, callback: Callable[[], Any]) -> None:
        """``callback()`` (a coroutine function) after every (re)join under a new lease."""
        self._on_join.append(callback)

    def on_change(self, callback: Callable[[], None]) -> None:
        """``callback()`` whenever a node joins or leaves."""
        self._on_change.append(callback)

    def me(self) -> Member:
        return Member(
            self.name,
            self.settings.advertise,
            dict(self.settings.labels),
            self.started,
            self.instance,
            self.state(),
            time.time(),
        )

    # -- joining and staying -----------------------------------------------------------------
    async def join(self, *, wait_for_name_s: float | None = None) -> None:
        """Register under a new lease (waiting up to a TTL for a crashed predecessor's
        key to lapse); ``NameTaken`` if a live node holds the name."""
        wait = self.settings.lease_ttl_s + 1 if wait_for_name_s is None else wait_for_name_s
        lease = await self.etcd.grant(self.settings.lease_ttl_s)
        deadline = time.monotonic() + wait
        while not await self.etcd.create(NODES + self.name, self.me().to_json(), lease=lease):
            current = await self.etcd.get(NODES + self.name)
            if current is not None and Member.from_json(current.value).instance == self.instance:
                break  # ours, from before a lost connection
            if time.monotonic() > deadline:
                await self.etcd.revoke(lease)
                holder = Member.from_json(current.value).url if current else "?"
                raise NameTaken(
                    f"node name {self.name!r} is in use by a live node ({holder}); "
                    "give this node another --node-name"
                )
            await asyncio.sleep(0.25)
        self.lease = lease
        self._connected()
        for callback in self._on_join:
            await callback()
        log.info("cluster: joined as %s (lease %x)", self.name, lease)

    async def run(self) -> None:
        """Refresh the lease and publish this node's state every interval; rejoin when
        the lease is gone.  Losing etcd is survived here, not raised."""
        while True:
            await asyncio.sleep(self.settings.publish_interval_s)
            try:
                if self.lease == 0 or await self.etcd.keepalive(self.lease) <= 0:
                    if self.lease:
                        log.warning("cluster: this node's lease lapsed; joining again")
                    self.lease = 0
                    await self.join(wait_for_name_s=0.0)
                await self.etcd.put(NODES + self.name, self.me().to_json(), lease=self.lease)
                self._connected()
            except ClusterUnavailable as exc:
                self._disconnected(exc)
            except NameTaken as exc:
                self._disconnected(exc)

    def _connected(self) -> None:
        if not self.connected and self.disconnected_since is not None:
            log.warning(
                "cluster: etcd reachable again after %.1f s",
                time.monotonic() - self.disconnected_since,
            )
        self.connected = True
        self.disconnected_since = None
        self.last_error = ""

    def _disconnected(self, exc: Exception) -> None:
        if self.connected or self.disconnected_since is None:
            log.error(
                "cluster: %s -- serving the functions this node knows; changes fail until "
                "etcd is back (degraded)",
                exc,
            )
            self.disconnected_since = time.monotonic()
        self.connected = False
        self.last_error = str(exc)

    async def leave(self) -> None:
        """Revoke the lease: this node's key and its claims go at once."""
        if self.lease:
            lease, self.lease = self.lease, 0
            try:
                await self.etcd.revoke(lease)
            except ClusterUnavailable as exc:
                log.warning("cluster: could not revoke the lease (it lapses by itself): %s", exc)

    # -- the other nodes ---------------------------------------------------------------------
    async def watch(self) -> None:
        """Keep ``members`` current: read ``nodes/``, then follow its changes."""
        while True:
            try:
                kvs, revision = await self.etcd.range(NODES)
                members = {}
                for kv in kvs:
                    try:
                        members[kv.key[len(NODES) :]] = Member.from_json(kv.value)
                    except (ValueError, KeyError) as exc:
                        log.warning("cluster: unreadable node entry %s: %s", kv.key, exc)
                self._set_members(members)
                async for event in self.etcd.watch(NODES, revision + 1):
                    name = event.key[len(NODES) :]
                    if event.kind == "delete":
                        if self.members.pop(name, None) is not None:
                            log.info("cluster: node %s left", name)
                            self._changed()
                        continue
                    try:
                        member = Member.from_json(event.value)
                    except (ValueError, KeyError):
                        continue
                    joined = name not in self.members
                    self.members[name] = member
                    if joined:
                        log.info("cluster: node %s joined (%s)", name, member.url)
                        self._changed()
            except ClusterUnavailable as exc:
                self._disconnected(exc)
                await asyncio.sleep(1.0)

    def _set_members(self, members: dict[str, Member]) -> None:
        before = set(self.members)
        self.members = members
        if set(members) != before:
            self._changed()

    def _changed(self) -> None:
        for callback in self._on_change:
            callback()

    def live(self) -> list[Member]:
        """Every live node (this one included), by name."""
        members = dict(self.members)
        if self.name not in members:  # not seen through the watch yet
            members[self.name] = Member(
                self.name,
                self.settings.advertise,
                dict(self.settings.labels),
                self.started,
                self.instance,
            )
        return [members[n] for n in sorted(members)]

    def peers(self) -> list[Member]:
        return [m for m in self.live() if m.name != self.name]
