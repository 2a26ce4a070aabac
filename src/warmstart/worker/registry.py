"""The function registry: every function's current revision, in memory and in a catalog.

Lookups on the invocation path are dict lookups; the catalog is written on changes only.
A single node's catalog is SQLite (``SqliteCatalog``); a cluster's is etcd
(``cluster.catalog.EtcdCatalog``), which also reports the changes other nodes make
(``apply`` / ``forget``).  A change makes a new *revision*; the registry's listeners
(the worker's invoker) retire the instances of the old one.  Code is made ready before
anything is recorded -- the bundle unpacked and byte-compiled, its ``requirements.txt``
resolved and every package installed once per node (``InstallCache``) -- so a failed
deploy leaves the function as it was and no trace of the attempt.

Each function may also have published *versions* -- immutable snapshots of its $LATEST
record, numbered from 1 by a counter the catalog keeps (a number is never given twice,
even after its version is deleted) -- and *aliases* naming a version, optionally with a
second one that gets a share of the invocations (``AliasRecord``).  ``resolve`` turns an
invocation's qualifier into the record it runs, from memory: an alias draws its version
for each invocation.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from warmstart.errors import Conflict, InvalidParameter, NotFound, PreconditionFailed
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore
from warmstart.functions.models import (
    LATEST,
    VERSION_RE,
    AliasRecord,
    ImageSource,
    check_alias_name,
)
from warmstart.packages import InstallCache, parse_pins

# The runtimes this node serves: zip functions run on the interpreter the worker runs on
# (its packages are installed for it, its zygotes import with it).  Image functions bring
# their own Python and are not bound by this.
NODE_RUNTIMES = (f"python{sys.version_info.major}.{sys.version_info.minor}",)


def check_runtime(config: FunctionConfig) -> None:
    """Refuse a zip function's runtime this node cannot serve (``InvalidParameter``)."""
    if config.runtime not in NODE_RUNTIMES:
        raise InvalidParameter(
            f"Runtime {config.runtime} is not available on this node; "
            f"available: {', '.join(NODE_RUNTIMES)}"
        )


# Lambda's Qualifier: a version number, $LATEST or an alias name.
QUALIFIER_RE = re.compile(r"[a-zA-Z0-9$_-]{1,128}")


def parse_qualifier(qualifier: str | None) -> str | None:
    """A request's qualifier, checked (``InvalidParameter``); None when there is none."""
    if qualifier is None or qualifier == "":
        return None
    if not QUALIFIER_RE.fullmatch(qualifier):
        raise InvalidParameter(
            f"1 validation error detected: Value '{qualifier[:140]}' at 'qualifier' failed to "
            "satisfy constraint: Member must satisfy regular expression pattern: "
            "(|[a-zA-Z0-9$_-]+) (1-128 chars)"
        )
    return qualifier


@dataclass(frozen=True)
class CatalogContents:
    """Everything a catalog holds, as read at start (or after a lost watch)."""

    functions: list[FunctionRecord]
    versions: list[FunctionRecord] = field(default_factory=list)
    aliases: list[AliasRecord] = field(default_factory=list)


class FunctionCatalog(Protocol):
    """Where function records live."""

    async def load(self) -> CatalogContents: ...

    async def insert(self, rec: FunctionRecord) -> None:
        """Store a new function; ``Conflict`` if the name is taken."""

    async def update(self, old: FunctionRecord, new: FunctionRecord) -> None:
        """Replace revision ``old`` by ``new``; ``Conflict`` if ``old`` is no longer the
        stored revision (another change won), ``NotFound`` if the function is gone."""

    async def remove(self, name: str) -> None:
        """Delete a function with its versions, aliases and version counter; ``NotFound``
        if there is none."""

    async def publish(self, name: str, make: Callable[[int], FunctionRecord]) -> FunctionRecord:
        """Store ``make(n)`` as version ``n`` of ``name``, ``n`` the function's next
        version number (never one given before); ``NotFound`` if the function is gone."""

    async def unpublish(self, name: str, version: str) -> None:
        """Delete a published version; ``NotFound`` if there is none."""

    async def put_alias(self, alias: AliasRecord, old: AliasRecord | None) -> None:
        """Store a new alias (``old`` None; ``Conflict`` if the name is taken) or replace
        ``old`` (``Conflict`` if it changed meanwhile, ``NotFound`` if it is gone)."""

    async def remove_alias(self, function: str, name: str) -> None:
        """Delete an alias; ``NotFound`` if there is none."""


class CodeStore(Protocol):
    """Where code bundles live, by digest (a node's disk; a cluster also replicates)."""

    async def put(self, data: bytes) -> tuple[str, Path]:
        """Store (unpacked, compiled) a zip; returns its digest and directory."""

    async def ensure(self, rec: FunctionRecord) -> None:
        """Make ``rec``'s bundle present on this node (a cluster fetches it from a peer)."""

    def code_dir(self, rec: FunctionRecord) -> Path: ...
    def code_zip(self, rec: FunctionRecord) -> Path: ...


class SqliteCatalog:
    """The single node's catalog: the ``functions`` table of ``state.db``."""

    def __init__(self, store: FunctionStore) -> None:
        self.store = store

    async def load(self) -> CatalogContents:
        return CatalogContents(
            list(self.store.load_all()),
            list(self.store.load_versions()),
            list(self.store.load_aliases()),
        )

    async def insert(self, rec: FunctionRecord) -> None:
        await asyncio.to_thread(self.store.insert, rec)

    async def update(self, old: FunctionRecord, new: FunctionRecord) -> None:
        # One process writes this table, through one registry that checks ``old`` is
        # current before it calls: nothing else can have changed it.
        self.store.save(new)

    async def remove(self, name: str) -> None:
        self.store.delete(name)

    async def publish(self, name: str, make: Callable[[int], FunctionRecord]) -> FunctionRecord:
        return self.store.publish(name, make)

    async def unpublish(self, name: str, version: str) -> None:
        self.store.delete_version(name, version)

    async def put_alias(self, alias: AliasRecord, old: AliasRecord | None) -> None:
        self.store.put_alias(alias, create=old is None)

    async def remove_alias(self, function: str, name: str) -> None:
        self.store.delete_alias(function, name)


class LocalCode:
    """The single node's code store: ``code/<sha256>/`` and ``code/<sha256>.zip``."""

    def __init__(self, store: FunctionStore) -> None:
        self.store = store

    async def put(self, data: bytes) -> tuple[str, Path]:
        return await asyncio.to_thread(self.store.put_code, data)

    async def ensure(self, rec: FunctionRecord) -> None:
        return None  # every bundle this node runs was deployed through it

    def code_dir(self, rec: FunctionRecord) -> Path:
        return self.store.code_dir(rec)

    def code_zip(self, rec: FunctionRecord) -> Path:
        return self.store.code_zip(rec)


# (the revision replaced or None, the new revision or None): created, changed, deleted.
Listener = Callable[[FunctionRecord | None, FunctionRecord | None], None]


class FunctionRegistry:
    def __init__(
        self,
        catalog: FunctionCatalog,
        code: CodeStore,
        packages: InstallCache,
        *,
        region: str,
        account: str,
    ) -> None:
        self.catalog = catalog
        self.code = code
        self.packages = packages
        self.region = region
        self.account = account
        self._functions: dict[str, FunctionRecord] = {}
        self._versions: dict[str, dict[str, FunctionRecord]] = {}  # name -> number -> record
        self._aliases: dict[str, dict[str, AliasRecord]] = {}  # name -> alias -> record
        self._listeners: list[Listener] = []
        # In a cluster a function may be deployed through another node: its bundle and
        # packages are checked for (and fetched) before an instance starts here.
        self.distributed = False

    async def load(self) -> int:
        """Read every function from the catalog (at start); returns how many."""
        contents = await self.catalog.load()
        for rec in contents.functions:
            self._functions[rec.name] = rec
        for rec in contents.versions:
            if rec.name in self._functions:
                self._versions.setdefault(rec.name, {})[rec.version] = rec
        for alias in contents.aliases:
            if alias.function in self._functions:
                self._aliases.setdefault(alias.function, {})[alias.name] = alias
        return len(self._functions)

    def listen(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every change, made here or elsewhere
        (``old`` None: created; ``new`` None: deleted) -- of a function's $LATEST or of
        a published version (created or deleted, never changed)."""
        self._listeners.append(listener)

    # -- lookups ---------------------------------------------------------------------------
    def get(self, name: str) -> FunctionRecord:
        try:
            return self._functions[name]
        except KeyError:
            raise NotFound(f"Function not found: {self.arn(name)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __len__(self) -> int:
        return len(self._functions)

    def __iter__(self) -> Iterator[FunctionRecord]:
        return iter(list(self._functions.values()))

    def names(self) -> list[str]:
        return sorted(self._functions)

    def arn(self, name: str, qualifier: str | None = None) -> str:
        base = f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"
        return base if qualifier is None else f"{base}:{qualifier}"

    def all_records(self) -> Iterator[FunctionRecord]:
        """Every function's $LATEST and every published version."""
        for rec in list(self._functions.values()):
            yield rec
            yield from list(self._versions.get(rec.name, {}).values())

    def image_in_use(self, digest: str) -> bool:
        """Whether any function's current revision or published version runs the image
        ``digest``."""
        return any(r.image is not None and r.image.digest == digest for r in self.all_records())

    # -- versions and aliases ----------------------------------------------------------------
    def version(self, name: str, version: str) -> FunctionRecord:
        """``$LATEST`` or a published version (``NotFound`` if there is none)."""
        rec = self.get(name)
        if version == LATEST:
            return rec
        try:
            return self._versions[name][version]
        except KeyError:
            raise NotFound(f"Function not found: {self.arn(name, version)}") from None

    def versions(self, name: str) -> list[FunctionRecord]:
        """A function's published versions, oldest first."""
        self.get(name)
        return sorted(self._versions.get(name, {}).values(), key=lambda r: int(r.version))

    def alias(self, name: str, alias: str) -> AliasRecord:
        self.get(name)
        try:
            return self._aliases[name][alias]
        except KeyError:
            raise NotFound(f"Alias not found: {self.arn(name, alias)}") from None

    def aliases(self, name: str) -> list[AliasRecord]:
        self.get(name)
        return sorted(self._aliases.get(name, {}).values(), key=lambda a: a.name)

    def resolve(self, name: str, qualifier: str | None) -> FunctionRecord:
        """The record an invocation of ``name:qualifier`` runs: $LATEST (no qualifier),
        a version, or the version an alias routes this invocation to (drawn by its
        weights).  Memory only: this is on the invocation path."""
        if qualifier is None or qualifier == LATEST:
            return self.get(name)
        if VERSION_RE.fullmatch(qualifier):
            return self.version(name, qualifier)
        aliases = self._aliases.get(name)
        alias = aliases.get(qualifier) if aliases is not None else None
        if alias is None:
            self.get(name)
            raise NotFound(f"Function not found: {self.arn(name, qualifier)}")
        return self.version(name, alias.pick(random.random()))

    def target(self, name: str, qualifier: str | None) -> FunctionRecord:
        """What a control-plane request about ``name:qualifier`` reads: an alias stands
        for its (primary) version."""
        if qualifier is not None and qualifier != LATEST and not VERSION_RE.fullmatch(qualifier):
            return self.version(name, self.alias(name, qualifier).function_version)
        return self.resolve(name, qualifier)

    async def publish(
        self, rec: FunctionRecord, description: str | None = None
    ) -> tuple[FunctionRecord, bool]:
        """Publish ``rec`` ($LATEST, as the caller checked it) as a new version; (the
        version, True).  When the newest version already runs the same code and
        configuration, that version and False (as Lambda does)."""
        versions = self.versions(rec.name)
        if versions and versions[-1].same_deployment(rec):
            return versions[-1], False
        published = await self.catalog.publish(rec.name, lambda n: rec.publish(n, description))
        self._add_version(published)
        return published, True

    async def delete_version(self, name: str, version: str) -> None:
        """Delete a published version (``Conflict`` while an alias routes to it)."""
        self.version(name, version)
        users = [a.name for a in self.aliases(name) if version in a.versions()]
        if users:
            raise Conflict(
                f"Unable to delete version because the following aliases reference it: {users}"
            )
        await self.catalog.unpublish(name, version)
        self.forget_version(name, version)

    def _check_alias_versions(self, alias: AliasRecord) -> None:
        for version in alias.versions():
            self.version(alias.function, version)

    async def create_alias(self, alias: AliasRecord) -> AliasRecord:
        if alias.name in self._aliases.get(alias.function, {}):
            raise Conflict(f"Alias already exists: {self.arn(alias.function, alias.name)}")
        self._check_alias_versions(alias)
        await self.catalog.put_alias(alias, None)
        self.apply_alias(alias)
        return alias

    async def update_alias(
        self, function: str, name: str, revision_id: str | None = None, **changes: Any
    ) -> AliasRecord:
        """Change an alias (``changes``: function_version, description, weights), if its
        revision is still ``revision_id`` when one is given (``PreconditionFailed``)."""
        old = self.alias(function, name)
        if revision_id is not None and revision_id != old.revision_id:
            raise PreconditionFailed(
                "The Revision Id provided does not match the latest Revision Id. "
                "Call the GetFunction/GetAlias API to retrieve the latest Revision Id"
            )
        new = replace(old, revision_id=str(uuid.uuid4()), **changes)
        self._check_alias_versions(new)
        await self.catalog.put_alias(new, old)
        self.apply_alias(new)
        return new

    async def delete_alias(self, function: str, name: str) -> None:
        check_alias_name(name)
        self.alias(function, name)
        await self.catalog.remove_alias(function, name)
        self.forget_alias(function, name)

    def code_dir(self, rec: FunctionRecord) -> Path:
        return self.code.code_dir(rec)

    def code_zip(self, rec: FunctionRecord) -> Path:
        return self.code.code_zip(rec)

    def package_dirs(self, rec: FunctionRecord) -> list[Path]:
        """The install cache's directory of every package the function pinned."""
        return [self.packages.path(p) for p in parse_pins("\n".join(rec.packages))]

    async def ensure_code(self, rec: FunctionRecord) -> None:
        """Before an instance of ``rec`` starts here: its bundle and packages are on this
        node (in a cluster a function may have been deployed through another node)."""
        if rec.image is not None:
            return
        await self.code.ensure(rec)
        if rec.packages:
            await self.packages.install(parse_pins("\n".join(rec.packages)))

    # -- changes made here -------------------------------------------------------------------
    async def create(self, name: str, config: FunctionConfig, code: bytes) -> FunctionRecord:
        self._check_new(name)
        check_runtime(config)
        sha, packages = await self._prepare_code(code)
        rec = FunctionRecord.new(name, config, sha, len(code), packages=packages)
        self._check_new(name)  # a concurrent create may have won while we installed
        await self.catalog.insert(rec)
        return self._set(rec)

    async def create_image(
        self, name: str, config: FunctionConfig, image: ImageSource
    ) -> FunctionRecord:
        self._check_new(name)
        config = config.updated(handler=image.command[0])
        sha = image.digest.split(":", 1)[-1]
        rec = FunctionRecord.new(name, config, sha, image.size, image=image)
        await self.catalog.insert(rec)
        return self._set(rec)

    def _check_new(self, name: str) -> None:
        FunctionRecord.check_name(name)
        if name in self._functions:
            raise Conflict(f"Function already exist: {name}")

    async def update_code(self, name: str, code: bytes) -> FunctionRecord:
        """A new revision with this zip (replacing an image, if the function had one)."""
        check_runtime(self.get(name).config)
        sha, packages = await self._prepare_code(code)
        # The revision current now: a change that landed while the packages installed
        # is kept, not overwritten by the record read before.
        return await self._change(
            name,
            code_sha256=sha,
            code_size=len(code),
            packages=packages,
            package_type="Zip",
            image=None,
        )

    async def update_image(self, name: str, image: ImageSource) -> FunctionRecord:
        """A new revision running ``image`` (its command names the handler)."""
        rec = self.get(name)
        return await self._change(
            name,
            config=rec.config.updated(handler=image.command[0]),
            package_type="Image",
            image=image,
            code_sha256=image.digest.split(":", 1)[-1],
            code_size=image.size,
            packages=(),
        )

    async def update_config(self, name: str, **changes: Any) -> FunctionRecord:
        rec = self.get(name)
        config = rec.config.updated(**changes)
        if rec.image is None and "runtime" in changes:
            check_runtime(config)
        return await self._change(name, config=config)

    async def put_concurrency(self, name: str, reserved: int | None) -> FunctionRecord:
        return await self._change(name, reserved_concurrency=reserved)

    async def delete(self, name: str) -> FunctionRecord:
        """Delete a function with its versions and aliases."""
        rec = self.get(name)
        await self.catalog.remove(name)
        self.forget(name)
        return rec

    async def _change(self, name: str, **changes: Any) -> FunctionRecord:
        old = self.get(name)
        new = old.next_revision(**changes)
        await self.catalog.update(old, new)
        current = self._functions.get(name)
        # A cluster's watch may have delivered this very change, or a newer one, while
        # the catalog wrote ours: keep what is newest.
        if (
            current is not old
            and current is not None
            and (current.revision_id == new.revision_id or current.revision > new.revision)
        ):
            return current
        return self._set(new)

    def _set(self, rec: FunctionRecord) -> FunctionRecord:
        old = self._functions.get(rec.name)
        self._functions[rec.name] = rec
        for listener in self._listeners:
            listener(old, rec)
        return rec

    async def _prepare_code(self, code: bytes) -> tuple[str, tuple[str, ...]]:
        """Store the bundle; resolve and install its requirements.txt, if any."""
        sha, directory = await self.code.put(code)
        req = directory / "requirements.txt"
        if not req.is_file():
            return sha, ()
        pins = await self.packages.resolve(req.read_text(errors="replace"))
        await self.packages.install(pins)
        return sha, tuple(str(p) for p in pins)

    # -- changes made elsewhere (a cluster's other nodes) --------------------------------------
    def apply(self, rec: FunctionRecord) -> None:
        """Another node created or changed a function: keep the newer revision."""
        current = self._functions.get(rec.name)
        if current is not None and (
            current.revision_id == rec.revision_id or current.revision > rec.revision
        ):
            return
        self._set(rec)

    def forget(self, name: str) -> None:
        """A function is gone (deleted here or by another node), with its versions and
        aliases."""
        self._aliases.pop(name, None)
        for version in list(self._versions.get(name, {})):
            self.forget_version(name, version)
        self._versions.pop(name, None)
        old = self._functions.pop(name, None)
        if old is not None:
            for listener in self._listeners:
                listener(old, None)

    def _add_version(self, rec: FunctionRecord) -> None:
        versions = self._versions.setdefault(rec.name, {})
        if rec.version in versions:
            return  # published versions never change: this one is known already
        versions[rec.version] = rec
        for listener in self._listeners:
            listener(None, rec)

    def apply_version(self, rec: FunctionRecord) -> None:
        """A version was published (here or through another node)."""
        if rec.name in self._functions and rec.published:
            self._add_version(rec)

    def forget_version(self, name: str, version: str) -> None:
        old = self._versions.get(name, {}).pop(version, None)
        if old is not None:
            for listener in self._listeners:
                listener(old, None)

    def apply_alias(self, alias: AliasRecord) -> None:
        """An alias was created or changed (here or through another node)."""
        if alias.function in self._functions:
            self._aliases.setdefault(alias.function, {})[alias.name] = alias

    def forget_alias(self, function: str, name: str) -> None:
        self._aliases.get(function, {}).pop(name, None)
