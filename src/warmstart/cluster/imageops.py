"""The images API's controllers on one node -- preheat jobs and the image cache -- in a
cluster or alone.

In a cluster (``ClusterNode``) ``ImageOps`` runs the controllers of ``preheat.py`` and
``imagecache.py`` over the cluster's etcd and membership, under the node's supervisor:
any node takes the API calls, every selected node does the pulling.

A node running alone (``warmstart serve`` without ``--cluster``) serves the same API with
``LocalImageOps``: the same controllers over an in-process ``MemoryEtcd``, with this node
as the only member -- a preheat job pulls here, a cache entry pins here.  ``nodes`` and
``selector`` need a cluster and are refused (400).  Jobs live in memory (a restart
forgets them; what they pulled stays in the store); cache entries are saved to
``<data>/images/cache.json`` after every change and read back at start, so the pins
keep following them.  Leases run out and the in-memory history is dropped every
``HOUSEKEEPING_S``, as etcd would do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmstart.cluster.etcd import Etcd, MemoryEtcd
from warmstart.cluster.imagecache import CACHE, CacheSpec, ImageCache
from warmstart.cluster.membership import Member
from warmstart.cluster.preheat import PreheatJobs, PreheatSpec
from warmstart.errors import InvalidParameter
from warmstart.images.preheat import Preheater
from warmstart.lifecycle import Supervisor, close_all

if TYPE_CHECKING:
    from warmstart.cluster.selection import NodeView
    from warmstart.worker import Worker

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 60.0
SOLO_LEASE_TTL = 3600


class ImageOps:
    def __init__(
        self,
        etcd: Etcd,
        view: NodeView,
        images: Preheater,
        tasks: Supervisor,
        *,
        alive: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.tasks = tasks
        self.preheat = PreheatJobs(etcd, view, images, tasks, alive=alive)
        self.cache = ImageCache(etcd, view, images, tasks)

    def start_loops(self) -> None:
        """Start the loops (under ``tasks``, which runs)."""
        self.tasks.loop("preheat-watch", self.preheat.watch)
        self.tasks.loop("preheat", self.preheat.run)
        self.tasks.loop("image-cache-watch", self.cache.watch)
        self.tasks.loop("image-cache", self.cache.run)

    async def close(self) -> None:
        await self.preheat.close()
        await self.cache.close()

    # -- what the API asks -----------------------------------------------------------------------
    def check(self, body: Any) -> None:
        """Refuse what this node cannot do (a node alone has no other nodes to name)."""

    async def create_preheat(self, body: Any) -> dict[str, Any]:
        spec = PreheatSpec.from_json(body)
        self.check(body)
        return await self.preheat.create(spec)

    async def put_cache(self, name: str, body: Any) -> tuple[dict[str, Any], bool]:
        self.check(body)
        return await self.cache.put(name, body)

    async def delete_cache(self, name: str) -> bool:
        return await self.cache.delete(name)


class _Solo:
    """This node as the only member (``NodeView``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lease = 0

    def live(self) -> list[Member]:
        return [Member(self.name, "")]


def _host_name() -> str:
    label = socket.gethostname().split(".", 1)[0].lower()
    return "".join(c if c.isalnum() or c == "-" else "-" for c in label).strip("-") or "local"


class LocalImageOps(ImageOps):
    """The images API on a node that runs alone (see the module docstring)."""

    def __init__(self, images: Preheater, spec_file: Path, *, name: str | None = None) -> None:
        self.etcd = MemoryEtcd()
        self.view = _Solo(name or _host_name())
        self.spec_file = spec_file
        super().__init__(
            self.etcd,
            self.view,
            images,
            Supervisor("images"),
            alive=self._alive,
        )

    @classmethod
    def for_worker(cls, worker: Worker) -> LocalImageOps:
        images = Preheater(worker.image_store, opened=worker.image_store_opened)
        return cls(images, worker.settings.data_dir / "images" / "cache.json")

    async def _alive(self, name: str) -> bool:
        return name == self.view.name

    async def start(self) -> None:
        await self.tasks.start()
        self.view.lease = await self.etcd.grant(SOLO_LEASE_TTL)
        for spec in self._load():
            await self.etcd.put(CACHE + spec.name, spec.to_json())
        self.start_loops()
        self.tasks.loop("housekeeping", self._housekeeping)

    async def close(self) -> None:
        await close_all(("image jobs", super().close), ("image tasks", self.tasks.close))

    def check(self, body: Any) -> None:
        if isinstance(body, dict) and (body.get("nodes") is not None or body.get("selector")):
            raise InvalidParameter(
                "nodes and selector need cluster mode (warmstart serve --cluster): this node "
                "runs alone, and the image goes to it"
            )

    async def put_cache(self, name: str, body: Any) -> tuple[dict[str, Any], bool]:
        out = await super().put_cache(name, body)
        await self._save()
        return out

    async def delete_cache(self, name: str) -> bool:
        gone = await super().delete_cache(name)
        if gone:
            await self._save()
        return gone

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            await self.etcd.keepalive(self.view.lease)
            self.etcd.expire_lapsed()  # finished jobs past their ttlSecondsAfterFinished
            self.etcd.compact()

    def _load(self) -> list[CacheSpec]:
        try:
            data = json.loads(self.spec_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error(
                "image cache: cannot read %s (starting without entries): %s", self.spec_file, exc
            )
            return []
        specs = []
        for item in data.get("entries", []):
            try:
                specs.append(CacheSpec.from_json(json.dumps(item).encode()))
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "image cache: skipping an unreadable entry in %s: %s", self.spec_file, exc
                )
        return specs

    async def _save(self) -> None:
        kvs, _ = await self.etcd.range(CACHE)
        entries = [json.loads(kv.value) for kv in kvs]

        def write() -> None:
            self.spec_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.spec_file.with_name(f".{self.spec_file.name}.tmp")
            tmp.write_text(json.dumps({"entries": entries}, indent=2) + "\n")
            os.replace(tmp, self.spec_file)

        await asyncio.to_thread(write)
