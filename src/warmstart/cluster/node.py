"""A cluster node: one worker, joined to the others through etcd.

``ClusterNode`` builds the worker with the cluster's seams -- the function catalog in etcd
(``EtcdCatalog``), code bundles replicated between nodes (``ClusterCode``), the work
queue in etcd with claims (``EtcdQueue``) -- and runs, under its own supervisor, what
keeps the node in the cluster: the membership loop (lease, published state), the watch
of the other nodes, and the catalog's watch; and the image operations: preheat jobs and
the image cache (``ImageOps``), demand-based prewarm (``Prewarm``).  The API asks it
where an invocation runs (``place``) and forwards there when it is another node.

Start order: etcd reachable (a node does not start without it) and the cluster's token
read (or made, by the first node); the worker started (functions loaded from etcd);
the node joined under its lease; the loops.  Close order is the reverse, with the worker
closed before the lease is revoked, so the Event work it ran has its outcome written
before its claims are dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from warmstart.cluster.catalog import EtcdCatalog
from warmstart.cluster.code import ClusterCode
from warmstart.cluster.distribution import P2PBlobFetcher, Swarm
from warmstart.cluster.etcd import AetcdEtcd, ClusterUnavailable, Etcd
from warmstart.cluster.imageops import ImageOps
from warmstart.cluster.membership import NODES, Membership
from warmstart.cluster.peer import PeerClient
from warmstart.cluster.prewarm import Prewarm
from warmstart.cluster.queue import EtcdQueue
from warmstart.cluster.router import Placement, Router, share
from warmstart.cluster.settings import ClusterSettings
from warmstart.functions import FunctionRecord, FunctionStore
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.peers import PEERS_FILE
from warmstart.images.preheat import Preheater
from warmstart.lifecycle import Supervisor, close_all
from warmstart.worker import Settings, Worker

log = logging.getLogger(__name__)

TOKEN_KEY = "cluster/token"
ARTIFACTS_INTERVAL_S = 5.0


class ClusterNode:
    def __init__(self, settings: Settings, *, etcd: Etcd | None = None) -> None:
        if settings.cluster is None:
            raise ValueError("a cluster node needs cluster settings")
        self.settings = settings
        self.cluster: ClusterSettings = settings.cluster
        self.name = self.cluster.node_name
        self.etcd: Etcd = etcd or AetcdEtcd(self.cluster.endpoints, self.cluster.prefix)
        self.tasks = Supervisor("cluster")
        # Peers: keep-alive connections for bundles and other node-to-node calls.
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            timeout=httpx.Timeout(10.0, read=None),
        )
        self.peers = PeerClient()  # forwarded invocations (the hot hop)
        self.token = ""
        store = FunctionStore(settings.data_dir)
        self.membership = Membership(self.etcd, self.cluster, self._state)
        self.catalog = EtcdCatalog(self.etcd)
        self.code = ClusterCode(store, self.etcd, self.membership, self.http, "")
        self.queue = EtcdQueue(
            self.etcd, self.membership, retention_s=settings.event_retention_hours * 3600
        )
        self.worker = Worker(
            settings, store=store, catalog=self.catalog, code=self.code, queue=self.queue
        )
        self.worker.registry.distributed = True
        self.swarm = Swarm(
            self.etcd,
            self.membership,
            settings.data_dir / "images" / "p2p",
            sources=self.cluster.p2p_sources,
        )
        self._fetcher: P2PBlobFetcher | None = None
        if self.cluster.p2p:
            self.worker.set_blob_source(self._blob_source)
        self.router = Router(self.membership, self.worker.has_idle, self.worker.inflight)
        self.images = ImageOps(
            self.etcd,
            self.membership,
            Preheater(self.worker.image_store, opened=self.worker.image_store_opened),
            self.tasks,
            alive=self._alive,
        )
        self.prewarm = Prewarm(
            self.etcd, self.membership, self.worker, self.tasks, limit=self._limit
        )
        self.membership.on_join(self.code.announce_all)
        self.membership.on_join(self.swarm.announce_all)
        self.membership.on_join(self._joined)
        self.membership.on_change(self._members_changed)
        self._started = False
        self._artifacts: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self.token = await self._token()
        except ClusterUnavailable as exc:
            await self.etcd.close()
            await self.http.aclose()
            raise ClusterUnavailable(
                f"cannot join the cluster: {exc} (is etcd running at "
                f"{', '.join(self.cluster.endpoints)}?)"
            ) from exc
        self.code.token = self.token
        await self.tasks.start()
        await self.worker.start()
        self.worker.set_reserved_limit(self._share)
        await self.membership.join()
        self.tasks.loop("membership", self.membership.run)
        self.tasks.loop("members", self.membership.watch)
        self.tasks.loop("catalog", lambda: self.catalog.follow(self.worker.registry))
        self.tasks.loop("artifacts", self._artifacts_loop)
        self.images.start_loops()
        self.tasks.loop("prewarm", self.prewarm.run)
        self.tasks.loop("prewarm-watch", self.prewarm.watch)
        self._started = True
        log.info(
            "cluster: node %s serving at %s; %d node(s) live",
            self.name,
            self.cluster.advertise,
            len(self.membership.live()),
        )

    @staticmethod
    async def check_etcd(cluster: ClusterSettings) -> None:
        """Whether etcd answers at the configured endpoints (``ClusterUnavailable``)."""
        etcd = AetcdEtcd(cluster.endpoints, cluster.prefix)
        try:
            for _ in cluster.endpoints:  # each failure moves on to the next endpoint
                try:
                    await etcd.get(TOKEN_KEY)
                    return
                except ClusterUnavailable as exc:
                    error = exc
            raise error
        finally:
            await etcd.close()

    async def _token(self) -> str:
        """The cluster's shared secret for node-to-node calls (made by the first node)."""
        await self.etcd.create(TOKEN_KEY, secrets.token_hex(24).encode())
        kv = await self.etcd.get(TOKEN_KEY)
        if kv is None:
            raise ClusterUnavailable("the cluster token vanished right after it was made")
        return kv.value.decode()

    async def close(self) -> None:
        await self.tasks.stop_loops()
        await close_all(
            ("image operations", self.images.close),
            ("worker", self.worker.close),
            ("cluster membership", self.membership.leave),
            ("cluster tasks", self.tasks.close),
            ("peer connections", self.http.aclose),
            ("forwarding connections", self.peers.close),
            ("p2p fetcher", lambda: self._fetcher.close() if self._fetcher else None),
            ("etcd client", self.etcd.close),
        )

    # -- what the API asks -----------------------------------------------------------------
    def place(self, rec: FunctionRecord) -> Placement:
        return self.router.place(rec)

    async def _joined(self) -> None:
        self._write_peers()

    def _blob_source(self, registry: Any) -> P2PBlobFetcher:
        """What the content store's full pulls fetch layer blobs through (made when the
        node's image manager is, on the node's event loop)."""
        self._fetcher = P2PBlobFetcher(
            self.swarm, asyncio.get_running_loop(), registry, self.token
        )
        return self._fetcher

    def _share(self, reserved: int) -> int:
        names = [m.name for m in self.membership.live()]
        return share(reserved, names, self.name)

    def _limit(self, rec: FunctionRecord) -> int:
        """This node's concurrency limit for ``rec`` (its share of a reserved one)."""
        if rec.reserved_concurrency is not None:
            return self._share(rec.reserved_concurrency)
        return self.settings.max_concurrency

    async def _alive(self, name: str) -> bool:
        """Whether node ``name`` holds its key (asks etcd: the table may be a second old)."""
        return await self.etcd.get(NODES + name) is not None

    def _members_changed(self) -> None:
        if self._started:
            self.worker.set_reserved_limit(self._share)
            self.images.preheat.wake()  # a node that left may hold up a job
        self._write_peers()

    def _write_peers(self) -> None:
        """The other nodes, for this node's lazy-mount daemons (chunks from peers)."""
        path = self.settings.data_dir / "images" / "lazy" / PEERS_FILE
        peers = [m.url for m in self.membership.peers()] if self.cluster.p2p else []
        data = {"peers": peers, "token": self.token}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the token
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cluster: cannot write %s: %s", path, exc)

    def chunk_path(self, digest: str) -> Path | None:
        """A verified lazy chunk this node has cached, for a peer."""
        path = ChunkCache(self.settings.data_dir / "images" / "lazy" / "cache").path(digest)
        return path if path is not None and path.is_file() else None

    def _state(self) -> dict[str, Any]:
        state = self.worker.published_state()
        state["code"] = sorted(self.code.held)
        state["pins"] = self.images.cache.published()
        state.update(self._artifacts)
        state["uploads"] = self.swarm.stats.uploads
        state["p2p"] = dict(self.swarm.stats.__dict__)
        return state

    async def _artifacts_loop(self) -> None:
        """Every few seconds, what this node holds of images (read on a thread)."""
        while True:
            held = await asyncio.to_thread(self.worker.held_artifacts)
            self._artifacts = held
            # Blobs kept for peers go when their layer leaves the content store.
            keep = {d.split(":", 1)[-1] for d in held.get("layers", {})}
            await asyncio.to_thread(self.swarm.prune, keep | self.swarm.in_progress())
            await asyncio.sleep(ARTIFACTS_INTERVAL_S)

    def health(self) -> dict[str, Any]:
        m = self.membership
        return {
            "node": self.name,
            "etcd": "ok" if m.connected else "unreachable",
            "degraded": not m.connected,
            "nodes": len(m.live()),
            **({"error": m.last_error} if m.last_error else {}),
        }

    def nodes(self) -> dict[str, Any]:
        """GET /cluster/nodes: every live node and what it published."""
        return {
            "self": self.name,
            "etcd": "ok" if self.membership.connected else "unreachable",
            "nodes": [
                {
                    "name": m.name,
                    "url": m.url,
                    "labels": m.labels,
                    "started": m.started,
                    "published": m.published,
                    "state": m.state,
                }
                for m in self.membership.live()
            ],
        }
