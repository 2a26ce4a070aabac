"""Code bundles in a cluster: content-addressed, on at least two nodes, fetched by digest.

A bundle is stored where it was deployed (unpacked and byte-compiled, as on a single
node) and copied to one more live node before CreateFunction or UpdateFunctionCode
returns, so losing one node loses no function.  Every node that holds a bundle says so
under its lease (``code/<sha256>/<node>``); a node that must run a function whose
bundle it lacks fetches it from a holder (``GET /cluster/code/<sha256>`` on that node)
and checks it against its digest before it is used.  Peers authenticate each other with
the cluster's token (``X-Warmstart-Cluster-Token``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.errors import PlatformError
from warmstart.functions import FunctionRecord, FunctionStore

if TYPE_CHECKING:
    from warmstart.cluster.membership import Membership

log = logging.getLogger(__name__)

CODE = "code/"
TOKEN_HEADER = "X-Warmstart-Cluster-Token"


class ClusterCode:
    """``CodeStore`` for a cluster node."""

    def __init__(
        self,
        store: FunctionStore,
        etcd: Etcd,
        membership: Membership,
        http: httpx.AsyncClient,
        token: str,
        *,
        copies: int = 2,
    ) -> None:
        self.store = store
        self.etcd = etcd
        self.membership = membership
        self.http = http
        self.token = token
        self.copies = copies
        self._locks: dict[str, asyncio.Lock] = {}
        self.held: set[str] = set()  # digests of the bundles this node holds

    def code_dir(self, rec: FunctionRecord) -> Path:
        return self.store.code_dir(rec)

    def code_zip(self, rec: FunctionRecord) -> Path:
        return self.store.code_zip(rec)

    def has(self, sha: str) -> bool:
        return (self.store.code_root / f"{sha}.zip").is_file()

    def zip_path(self, sha: str) -> Path:
        return self.store.code_root / f"{sha}.zip"

    async def _hold(self, sha: str) -> None:
        self.held.add(sha)
        await self.etcd.put(f"{CODE}{sha}/{self.membership.name}", b"", lease=self.membership.lease)

    async def announce_all(self) -> None:
        """After (re)joining: say which bundles this node holds (under the new lease)."""
        for zip_path in sorted(self.store.code_root.glob("*.zip")):
            await self._hold(zip_path.stem)

    # -- deploying here --------------------------------------------------------------------
    async def put(self, data: bytes) -> tuple[str, Path]:
        """Store a bundle here and on ``copies - 1`` other live nodes (as many as exist)."""
        sha, directory = await asyncio.to_thread(self.store.put_code, data)
        await self._hold(sha)
        peers = self.membership.peers()
        random.shuffle(peers)
        stored = 1
        failures = []
        for peer in peers:
            if stored >= self.copies:
                break
            try:
                await self._push(peer.url, sha, data)
                stored += 1
            except (httpx.HTTPError, PlatformError) as exc:
                failures.append(f"{peer.name}: {exc}")
        if stored < min(self.copies, len(peers) + 1):
            raise PlatformError(
                f"the code bundle could not be stored on {self.copies} nodes: "
                + "; ".join(failures)
            )
        return sha, directory

    async def _push(self, url: str, sha: str, data: bytes) -> None:
        resp = await self.http.put(
            f"{url}/cluster/code/{sha}",
            content=data,
            headers={TOKEN_HEADER: self.token},
            timeout=60,
        )
        if resp.status_code >= 300:
            raise PlatformError(f"HTTP {resp.status_code}: {resp.text[:200]}")

    async def receive(self, sha: str, data: bytes) -> None:
        """A peer pushed a bundle here (``PUT /cluster/code/<sha>``)."""
        if hashlib.sha256(data).hexdigest() != sha:
            raise PlatformError(f"bundle {sha[:12]}: the bytes do not match the digest")
        await asyncio.to_thread(self.store.put_code, data)
        await self._hold(sha)

    # -- running here ----------------------------------------------------------------------
    async def ensure(self, rec: FunctionRecord) -> None:
        """Fetch ``rec``'s bundle from a holder if this node lacks it (once per bundle,
        however many starts wait for it)."""
        sha = rec.code_sha256
        if self.has(sha) and self.store.code_dir(rec).is_dir():
            return
        async with self._locks.setdefault(sha, asyncio.Lock()):
            if not (self.has(sha) and self.store.code_dir(rec).is_dir()):
                await self._fetch(sha)

    async def _fetch(self, sha: str) -> None:
        try:
            kvs, _ = await self.etcd.range(f"{CODE}{sha}/")
        except ClusterUnavailable as exc:
            raise PlatformError(f"bundle {sha[:12]} is not on this node and {exc}") from exc
        urls = {m.name: m.url for m in self.membership.peers()}
        holders = [kv.key.rsplit("/", 1)[1] for kv in kvs]
        errors = []
        for name in holders:
            url = urls.get(name)
            if url is None:
                continue
            try:
                resp = await self.http.get(
                    f"{url}/cluster/code/{sha}", headers={TOKEN_HEADER: self.token}, timeout=60
                )
                resp.raise_for_status()
                data = resp.content
            except httpx.HTTPError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if hashlib.sha256(data).hexdigest() != sha:
                errors.append(f"{name}: served bytes that do not match the digest")
                log.error("cluster: node %s served a wrong bundle for %s", name, sha[:12])
                continue
            await self.receive(sha, data)
            log.info("cluster: fetched bundle %s from %s", sha[:12], name)
            return
        raise PlatformError(
            f"bundle {sha[:12]} is on no reachable node ({'; '.join(errors) or 'no holder'})"
        )
