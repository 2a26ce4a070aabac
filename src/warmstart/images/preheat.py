"""Pulling an image before it is needed, and keeping it: what one node does for a preheat
job or an image cache entry, over its content store (``store.py``).

``pull`` resolves the reference once (the manifest names every layer and its size, so
progress is reported as bytes done of a known total), then pulls exactly that digest in
full through ``ImageStore.pull`` -- the path a fully pulled image function takes, so
whatever fetches blobs underneath serves preheats too, and an image already in the store
costs no download.  ``pin`` pulls, then pins the image under a name so that the store's
LRU never evicts it (the pin is persistent, in the store's index); ``unpin`` drops a
name's pins and lets the store shrink back to its budget.  Blocking work runs on threads.

Which failures are worth retrying: a reference that does not exist, a registry that
refuses our credentials, a malformed reference (``permanent``) will not change by
waiting; a registry that is down or a layer that failed to verify may.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warmstart.images.errors import AuthError, ImageNotFound, InvalidReference
from warmstart.images.reference import Reference

if TYPE_CHECKING:  # the store (and the registry client) load only when an image is used
    from warmstart.images.store import ImageStore, Pin

ByteProgress = Callable[[int, int], None]
"""Called (from a pulling thread) with (bytes done, bytes in all) of an image's layers."""


@dataclass(frozen=True)
class Pulled:
    """An image now in the store."""

    digest: str  # the manifest digest the reference resolved to
    size: int  # compressed bytes of its layers (what a pull from scratch downloads)


def permanent(exc: BaseException) -> bool:
    """Whether retrying cannot help: no such image, credentials refused, a bad reference."""
    return isinstance(exc, (ImageNotFound, AuthError, InvalidReference))


class Preheater:
    """Pulls and pins images in one node's content store.  ``store`` is called when one
    is needed (a worker makes its image manager, and so its store, on first use);
    ``opened`` says whether it exists yet -- reading the pins does not make one."""

    def __init__(
        self, store: Callable[[], ImageStore], *, opened: Callable[[], bool] = lambda: True
    ) -> None:
        self._store = store
        self._opened = opened

    @property
    def store(self) -> ImageStore:
        return self._store()

    async def pull(self, ref: str, progress: ByteProgress | None = None) -> Pulled:
        """Pull ``ref`` in full into the store (nothing is downloaded that is there)."""
        return await asyncio.to_thread(self._pull, ref, progress)

    def _pull(self, text: str, progress: ByteProgress | None) -> Pulled:
        store = self.store
        ref = Reference.parse(text)
        manifest = store.client.resolve(ref, store.platform)
        total = sum(layer.size for layer in manifest.layers)
        done: dict[str, int] = {}
        lock = threading.Lock()

        def on_layer(layer: str, layer_done: int, size: int) -> None:
            if progress is None:
                return
            with lock:
                done[layer] = min(layer_done, size)
                now = sum(done.values())
            progress(now, total)

        if progress is not None:
            progress(0, total)
        store.pull(str(ref.with_digest(manifest.digest)), on_layer)
        if progress is not None:
            progress(total, total)
        return Pulled(manifest.digest, total)

    async def pin(self, name: str, ref: str, progress: ByteProgress | None = None) -> Pulled:
        """Pull ``ref`` and pin it under ``name``; an image ``name`` pinned before (its
        reference changed, or its tag moved) is unpinned once the new one is in."""
        pulled = await self.pull(ref, progress)

        def pin() -> None:
            store = self.store
            store.pin(name, pulled.digest, ref)
            if store.unpin(name, keep=pulled.digest):
                store.gc()

        await asyncio.to_thread(pin)
        return pulled

    async def unpin(self, name: str) -> int:
        """Drop ``name``'s pins; the images are LRU candidates again (the store is
        collected back to its budget now).  How many pins went."""

        def unpin() -> int:
            store = self.store
            n = store.unpin(name)
            if n:
                store.gc()
            return n

        return await asyncio.to_thread(unpin)

    async def pins(self) -> dict[str, Pin]:
        """The newest pin of every name (reads the store's index, on a thread)."""
        if not self._opened():
            return {}
        pins = await asyncio.to_thread(lambda: self.store.pins())
        return {pin.name: pin for pin in pins}  # ordered by creation: the newest wins
