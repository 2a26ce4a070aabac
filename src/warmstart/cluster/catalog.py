"""The cluster's function catalog: every function's current revision, versions and aliases in etcd.

Keys, under the cluster's prefix::

    functions/<name>                      $LATEST's record (JSON)
    functions/<name>/versions/<N>         published version N (an immutable record)
    functions/<name>/aliases/<alias>      an alias (JSON)
    functions/<name>/last-version         the function's version counter

A change is a transaction that replaces the value only if it is still the revision the
change was made from, so two nodes changing one function (or alias) at once cannot both
win: the loser gets ``Conflict`` (409) and retries with what it then reads.  A version's
number comes from the counter, moved in the same transaction that stores the version
(compare-and-swap on the counter's value), so two nodes publishing at once get two
numbers, and a number is never given twice.  Deleting a function deletes every key under
``functions/<name>/`` too.

Every node keeps the whole catalog in memory (its registry) and follows ``functions/``
-- versions and aliases included -- with one watch, so a function created or a version
published through one node can be invoked through any other at once, with no etcd read
on the invocation path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from warmstart.cluster.etcd import TXN_MAX_OPS, ClusterUnavailable, Delete, Etcd, Put
from warmstart.errors import Conflict, NotFound
from warmstart.functions import FunctionRecord
from warmstart.functions.models import AliasRecord
from warmstart.functions.store import record_from_json, record_json
from warmstart.worker.registry import CatalogContents, FunctionRegistry

log = logging.getLogger(__name__)

FUNCTIONS = "functions/"
VERSIONS = "/versions/"
ALIASES = "/aliases/"
COUNTER = "/last-version"
PUBLISH_ATTEMPTS = 20


def _version_key(name: str, version: str) -> str:
    return f"{FUNCTIONS}{name}{VERSIONS}{version}"


def _alias_key(function: str, alias: str) -> str:
    return f"{FUNCTIONS}{function}{ALIASES}{alias}"


class EtcdCatalog:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.revision = 0  # the store revision ``load`` read at (the watch starts after it)

    async def load(self) -> CatalogContents:
        kvs, self.revision = await self.etcd.range(FUNCTIONS)
        contents = CatalogContents([])
        for kv in kvs:
            rest = kv.key[len(FUNCTIONS) :]
            try:
                if "/" not in rest:
                    contents.functions.append(record_from_json(kv.value))
                elif VERSIONS in rest:
                    contents.versions.append(record_from_json(kv.value))
                elif ALIASES in rest:
                    contents.aliases.append(AliasRecord.from_json(kv.value))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("cluster: unreadable catalog record %s: %s", kv.key, exc)
        return contents

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
        # Its versions, aliases and counter: the function is gone already (every node
        # forgets them with it), so these go in batches after it.
        kvs, _ = await self.etcd.range(FUNCTIONS + name + "/")
        keys = [kv.key for kv in kvs]
        for i in range(0, len(keys), TXN_MAX_OPS):
            await self.etcd.commit([Delete(k) for k in keys[i : i + TXN_MAX_OPS]])

    async def publish(self, name: str, make: Callable[[int], FunctionRecord]) -> FunctionRecord:
        counter = FUNCTIONS + name + COUNTER
        for _ in range(PUBLISH_ATTEMPTS):
            if await self.etcd.get(FUNCTIONS + name) is None:
                raise NotFound(f"Function not found: {name}")
            kv = await self.etcd.get(counter)
            if kv is None:
                await self.etcd.create(counter, b"0")
                continue
            number = int(kv.value) + 1
            rec = make(number)
            ops = [
                Put(counter, str(number).encode()),
                Put(_version_key(name, rec.version), record_json(rec).encode()),
            ]
            if await self.etcd.commit(ops, if_value=(counter, kv.value)):
                return rec
        raise Conflict(
            f"Versions of {name} are being published through other nodes at the same time; retry"
        )

    async def unpublish(self, name: str, version: str) -> None:
        if not await self.etcd.delete(_version_key(name, version)):
            raise NotFound(f"Function not found: {name}:{version}")

    async def put_alias(self, alias: AliasRecord, old: AliasRecord | None) -> None:
        key = _alias_key(alias.function, alias.name)
        if old is None:
            if not await self.etcd.create(key, alias.to_json().encode()):
                raise Conflict(f"Alias already exists: {alias.function}:{alias.name}")
            return
        if await self.etcd.replace(key, old.to_json().encode(), alias.to_json().encode()):
            return
        if await self.etcd.get(key) is None:
            raise NotFound(f"Alias not found: {alias.function}:{alias.name}")
        raise Conflict(
            f"Alias {alias.function}:{alias.name} was changed through another node at the "
            "same time; read it again and retry"
        )

    async def remove_alias(self, function: str, name: str) -> None:
        if not await self.etcd.delete(_alias_key(function, name)):
            raise NotFound(f"Alias not found: {function}:{name}")

    async def follow(self, registry: FunctionRegistry) -> None:
        """Apply the changes other nodes make to ``registry``, as they happen.  After a
        lost connection the catalog is read again in full (what changed meanwhile,
        deletions included, is applied) and followed from there."""
        start = self.revision + 1
        while True:
            try:
                if start == 0:
                    self._resync(registry, await self.load())
                    start = self.revision + 1
                async for event in self.etcd.watch(FUNCTIONS, start):
                    start = event.mod_revision + 1
                    self._apply(registry, event.kind, event.key[len(FUNCTIONS) :], event.value)
            except ClusterUnavailable as exc:
                log.warning("cluster: lost the function catalog's watch: %s", exc)
                start = 0  # read everything again once etcd answers
                await asyncio.sleep(1.0)

    @staticmethod
    def _resync(registry: FunctionRegistry, contents: CatalogContents) -> None:
        records = {r.name: r for r in contents.functions}
        for name in registry.names():
            if name not in records:
                registry.forget(name)
        for rec in records.values():
            registry.apply(rec)
        versions = {(r.name, r.version) for r in contents.versions}
        aliases = {(a.function, a.name) for a in contents.aliases}
        for name in registry.names():
            for rec in registry.versions(name):
                if (name, rec.version) not in versions:
                    registry.forget_version(name, rec.version)
            for alias in registry.aliases(name):
                if (name, alias.name) not in aliases:
                    registry.forget_alias(name, alias.name)
        for rec in contents.versions:
            registry.apply_version(rec)
        for alias in contents.aliases:
            registry.apply_alias(alias)

    @staticmethod
    def _apply(registry: FunctionRegistry, kind: str, rest: str, value: bytes) -> None:
        """One watch event for ``functions/<rest>``."""
        name, _, sub = rest.partition("/")
        try:
            if not sub:
                if kind == "delete":
                    registry.forget(name)
                else:
                    registry.apply(record_from_json(value))
            elif sub.startswith(VERSIONS[1:]):
                version = sub[len(VERSIONS) - 1 :]
                if kind == "delete":
                    registry.forget_version(name, version)
                else:
                    registry.apply_version(record_from_json(value))
            elif sub.startswith(ALIASES[1:]):
                alias = sub[len(ALIASES) - 1 :]
                if kind == "delete":
                    registry.forget_alias(name, alias)
                else:
                    registry.apply_alias(AliasRecord.from_json(value))
        except (ValueError, TypeError, KeyError) as exc:
            log.error("cluster: unreadable catalog record %s: %s", rest, exc)
