"""The function registry: every function's current revision, in memory and in SQLite.

Lookups on the invocation path are dict lookups; SQLite (``FunctionStore``) is written on
changes only.  A change makes a new *revision* (``FunctionStore.bump``): the caller then
retires the instances of the old one.  Code is made ready before anything is recorded --
the bundle unpacked and byte-compiled, its ``requirements.txt`` resolved and every package
installed once per node (``InstallCache``) -- so a failed deploy leaves the function as it
was and no trace of the attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from warmstart.errors import Conflict, NotFound
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore, bundle
from warmstart.functions.models import ImageSource
from warmstart.packages import InstallCache, parse_pins


class FunctionRegistry:
    def __init__(
        self, store: FunctionStore, packages: InstallCache, *, region: str, account: str
    ) -> None:
        self.store = store
        self.packages = packages
        self.region = region
        self.account = account
        self._functions: dict[str, FunctionRecord] = {}

    def load(self) -> int:
        """Read every function from SQLite (at start); returns how many."""
        for rec in self.store.load_all():
            self._functions[rec.name] = rec
        return len(self._functions)

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
        return self.store.code_dir(rec)

    def code_zip(self, rec: FunctionRecord) -> Path:
        return self.store.code_zip(rec)

    def package_dirs(self, rec: FunctionRecord) -> list[Path]:
        """The install cache's directory of every package the function pinned."""
        return [self.packages.path(p) for p in parse_pins("\n".join(rec.packages))]

    # -- changes ---------------------------------------------------------------------------
    async def create(self, name: str, config: FunctionConfig, code: bytes) -> FunctionRecord:
        self._check_new(name)
        packages = await self._prepare_code(code)
        self._check_new(name)  # a concurrent create may have won while we installed
        rec = await asyncio.to_thread(self.store.create, name, config, code, packages)
        self._functions[name] = rec
        return rec

    async def create_image(
        self, name: str, config: FunctionConfig, image: ImageSource
    ) -> FunctionRecord:
        self._check_new(name)
        config = config.updated(handler=image.command[0])
        rec = await asyncio.to_thread(self.store.create_image, name, config, image)
        self._functions[name] = rec
        return rec

    def _check_new(self, name: str) -> None:
        FunctionRecord.check_name(name)
        if name in self._functions:
            raise Conflict(f"Function already exist: {name}")

    async def update_code(self, name: str, code: bytes) -> FunctionRecord:
        """A new revision with this zip (replacing an image, if the function had one)."""
        self.get(name)
        packages = await self._prepare_code(code)
        # Bump whatever revision is current now: a change that landed while the packages
        # installed is kept, not overwritten by the record read before.
        return self._save(
            self.store.bump(
                self.get(name),
                code_sha256=bundle.digest(code),
                code_size=len(code),
                packages=packages,
                package_type="Zip",
                image=None,
            )
        )

    def update_image(self, name: str, image: ImageSource) -> FunctionRecord:
        """A new revision running ``image`` (its command names the handler)."""
        rec = self.get(name)
        return self._save(
            self.store.bump(
                rec,
                config=rec.config.updated(handler=image.command[0]),
                package_type="Image",
                image=image,
                code_sha256=image.digest.split(":", 1)[-1],
                code_size=image.size,
                packages=(),
            )
        )

    def update_config(self, name: str, **changes: Any) -> FunctionRecord:
        rec = self.get(name)
        return self._save(self.store.bump(rec, config=rec.config.updated(**changes)))

    def put_concurrency(self, name: str, reserved: int | None) -> FunctionRecord:
        rec = self.get(name)
        return self._save(self.store.bump(rec, reserved_concurrency=reserved))

    def delete(self, name: str) -> FunctionRecord:
        rec = self.get(name)
        self.store.delete(name)
        del self._functions[name]
        return rec

    def _save(self, new: FunctionRecord) -> FunctionRecord:
        self._functions[new.name] = new
        return new

    async def _prepare_code(self, code: bytes) -> tuple[str, ...]:
        """Unpack the bundle; resolve and install its requirements.txt, if any."""
        _, directory = await asyncio.to_thread(self.store.put_code, code)
        req = directory / "requirements.txt"
        if not req.is_file():
            return ()
        pins = await self.packages.resolve(req.read_text(errors="replace"))
        await self.packages.install(pins)
        return tuple(str(p) for p in pins)
