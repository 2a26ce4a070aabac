"""The cluster's function catalog: every function's current revision in etcd.

``functions/<name>`` holds the record as JSON.  A change is a transaction that replaces
the value only if it is still the revision the change was made from, so two nodes
changing one function at once cannot both win: the loser gets ``Conflict`` (409) and
retries with what it then reads.  Every node keeps the whole catalog in memory (its
registry) and follows ``functions/`` with a watch, so a function created through one
node can be invoked through any other at once, with no etcd read on the invocation path.
"""

from __future__ import annotations

import asyncio
import logging

from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.errors import Conflict, NotFound
from warmstart.functions import FunctionRecord
from warmstart.functions.store import record_from_json, record_json
from warmstart.worker.registry import FunctionRegistry

log = logging.getLogger(__name__)

FUNCTIONS = "functions/"


class EtcdCatalog:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.revision = 0  # the store revision ``load`` read at (the watch starts after it)

    async def load(self) -> list[FunctionRecord]:
        kvs, self.revision = await self.etcd.range(FUNCTIONS)
        records = []
        for kv in kvs:
            try:
                records.append(record_from_json(kv.value))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("cluster: unreadable function record %s: %s", kv.key, exc)
        return records

    async def insert(self, rec: FunctionRecord) -> None:
        if not await self.etcd.create(FUNCTIONS + rec.name, record_json(rec).encode()):
            raise Conflict(f"Function already exist: {rec.name}")

    async def update(self, old: FunctionRecord, new: FunctionRecord) -> None:
        key = FUNCTIONS + new.name
        if await self.etcd.replace(key, record_json(old).encode(), record_json(new).encode()):
            return
        if await self.etcd.get(key) is None:
            raise NotFound(f"Function not found: {new.name}")
        raise Conflict(
            f"Function {new.name} was changed through another node at the same time; "
            "read it again and retry"
        )

    async def remove(self, name: str) -> None:
        if not await self.etcd.delete(FUNCTIONS + name):
            raise NotFound(f"Function not found: {name}")

    async def follow(self, registry: FunctionRegistry) -> None:
        """Apply the changes other nodes make to ``registry``, as they happen.  After a
        lost connection the catalog is read again in full (what changed meanwhile,
        deletions included, is applied) and followed from there."""
        start = self.revision + 1
        while True:
            try:
                if start == 0:
                    records = {r.name: r for r in await self.load()}
                    for name in registry.names():
                        if name not in records:
                            registry.forget(name)
                    for rec in records.values():
                        registry.apply(rec)
                    start = self.revision + 1
                async for event in self.etcd.watch(FUNCTIONS, start):
                    start = event.mod_revision + 1
                    name = event.key[len(FUNCTIONS) :]
                    if event.kind == "delete":
                        registry.forget(name)
                        continue
                    try:
                        registry.apply(record_from_json(event.value))
                    except (ValueError, TypeError, KeyError) as exc:
                        log.error("cluster: unreadable function record %s: %s", name, exc)
            except ClusterUnavailable as exc:
                log.warning("cluster: lost the function catalog's watch: %s", exc)
                start = 0  # read everything again once etcd answers
                await asyncio.sleep(1.0)
