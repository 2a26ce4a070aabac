"""The function registry: every function's current revision, in memory and in a catalog.

Lookups on the invocation path are dict lookups; the catalog is written on changes only.
A single node's catalog is SQLite (``SqliteCatalog``); a cluster's is etcd
(``cluster.catalog.EtcdCatalog``), which also reports the changes other nodes make
(``apply`` / ``forget``).  A change makes a new *revision*; the registry's listeners
(the worker's invoker) retire the instances of the old one.  Code is made ready before
anything is recorded -- the bundle unpacked and byte-compiled, its ``requirements.txt``
resolved and every package installed once per node (``InstallCache``) -- so a failed
deploy leaves the function as it was and no trace of the attempt.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from warmstart.errors import Conflict, InvalidParameter, NotFound
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore
from warmstart.functions.models import ImageSource
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


class FunctionCatalog(Protocol):
    """Where function records live."""

    async def load(self) -> list[FunctionRecord]: ...

    async def insert(self, rec: FunctionRecord) -> None:
        """Store a new function; ``Conflict`` if the name is taken."""

    async def update(self, old: FunctionRecord, new: FunctionRecord) -> None:
        """Replace revision ``old`` by ``new``; ``Conflict`` if ``old`` is no longer the
        stored revision (another change won), ``NotFound`` if the function is gone."""

    async def remove(self, name: str) -> None:
        """Delete a function; ``NotFound`` if there is none."""


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

    async def load(self) -> list[FunctionRecord]:
        return list(self.store.load_all())

    async def insert(self, rec: FunctionRecord) -> None:
        await asyncio.to_thread(self.store.insert, rec)

    async def update(self, old: FunctionRecord, new: FunctionRecord) -> None:
        # One process writes this table, through one registry that checks ``old`` is
        # current before it calls: nothing else can have changed it.
        self.store.save(new)

    async def remove(self, name: str) -> None:
        self.store.delete(name)


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
        self._listeners: list[Listener] = []
        # In a cluster a function may be deployed through another node: its bundle and
        # packages are checked for (and fetched) before an instance starts here.
        self.distributed = False

    async def load(self) -> int:
        """Read every function from the catalog (at start); returns how many."""
        for rec in await self.catalog.load():
            self._functions[rec.name] = rec
        return len(self._functions)

    def listen(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every change, made here or elsewhere
        (``old`` None: created; ``new`` None: deleted)."""
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

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{name}"

    def image_in_use(self, digest: str) -> bool:
        """Whether any function's current revision runs the image ``digest``."""
        return any(r.image is not None and r.image.digest == digest for r in self)

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
        """A function is gone (deleted here or by another node)."""
        old = self._functions.pop(name, None)
        if old is not None:
            for listener in self._listeners:
                listener(old, None)
