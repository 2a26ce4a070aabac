"""The node's images: resolve, pull or lazily mount, and hand out mounted roots.

The worker asks two things of an image: at deploy, *what is it* (``inspect``: the manifest
digest, size and config, resolved in the registry without pulling -- after checking that
the deployer may pull it, ``images/access.py``), and at an instance's start, *where is its
root* (``rootfs``).  The first ``rootfs`` of a digest either mounts the
image lazily (every layer eStargz, pull mode ``auto`` or ``lazy``: the function starts
while the rest streams in) or pulls it in full into the content store and mounts a
read-only overlay of its layers; later calls return the same mount at once.  Mounts live
under ``<data>/images/roots`` and are taken down at close; a crash's leftovers are
unmounted at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmstart.errors import InvalidParameter, PlatformError, WarmstartError
from warmstart.functions.models import ImageSource
from warmstart.images.access import AccessChecker, AccessPolicy, RegistryCredential
from warmstart.lifecycle import close_all
from warmstart.runtime import syscalls

if TYPE_CHECKING:
    from warmstart.images.lazymount import MountSpec

log = logging.getLogger("warmstart.images")

TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
PULL_MODES = ("auto", "lazy", "full")


@dataclass
class ImageStats:
    pulls: int = 0  # full pulls finished
    lazy_mounts: int = 0
    indexed_mounts: int = 0  # of those, plain gzip images read through a gzip index
    index_failures: int = 0  # gzip indexes found but not mountable (then pulled in full)
    pull_seconds: float = 0.0
    mount_seconds: float = 0.0
    failures: int = 0
    layers_done: int = 0
    bytes_done: int = 0
    in_progress: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer → done, size


class ImageManager:
    """The node's images: one registry client, one content store, lazy mounts."""

    def __init__(
        self,
        data_dir: Path,
        *,
        pull_mode: str = "auto",
        budget_mb: int = 20480,
        insecure: tuple[str, ...] = (),
        background_fetch: bool = True,
        blob_source: Callable[[Any], Any] | None = None,
        access: AccessPolicy | None = None,
        layer_format: str = "auto",
    ) -> None:
        if pull_mode not in PULL_MODES:
            raise ValueError(f"pull mode must be one of {PULL_MODES}, not {pull_mode!r}")
        from warmstart.images.lazymount import BackgroundFetch, LazyMounts, RegistrySettings
        from warmstart.images.registry import RegistryClient
        from warmstart.images.store import ImageStore

        self.root = data_dir / "images"
        self.roots = self.root / "roots"
        self.pull_mode = pull_mode
        self.client = RegistryClient(insecure=insecure)
        self.access = AccessChecker(self.client.check_pull, access)
        self.budget_bytes = budget_mb << 20  # the store's, and the lazy chunk cache's
        # ``blob_source(client)``: where layer blobs come from (a cluster: peers first).
        blobs = blob_source(self.client) if blob_source is not None else None
        self.store = ImageStore(
            self.root / "store",
            self.client,
            self.budget_bytes,
            blobs=blobs,
            layer_format=layer_format,
        )
        self.lazy = LazyMounts(
            self.root / "lazy",
            registry=RegistrySettings(insecure=insecure),
            cache_budget_bytes=self.budget_bytes,
        )
        self.background = BackgroundFetch(enabled=background_fetch)
        self.lazy.prestart()  # a lazy mount then skips the daemon's Python start
        self.stats = ImageStats()
        self._mounts: dict[str, Path] = {}  # digest -> mounted root
        self._kinds: dict[str, str] = {}  # digest -> "lazy" | "full"
        self._locks: dict[str, asyncio.Lock] = {}
        self._images: dict[str, Any] = {}  # digest -> store Image (full pulls)
        self.on_progress: Callable[[str, int, int], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def recover(self) -> int:
        """Unmount whatever a crashed worker left mounted under our roots."""
        self.roots.mkdir(parents=True, exist_ok=True)
        n = 0
        for entry in self.roots.iterdir():
            if syscalls.is_mount_point(str(entry)):
                syscalls.unmount(str(entry))
                n += 1
        n += len(self.lazy.recover())
        self.lazy.trim_cache(self.budget_bytes)
        if n:
            log.warning("start-up unmounted %d image root(s) left by a previous worker", n)
        return n

    async def close(self) -> None:
        """Unmount every root, stop the lazy daemons, close the store and the client.
        Every step runs even if one fails; the failures are raised together at the end."""
        mounts, self._mounts = dict(self._mounts), {}
        await close_all(
            *(
                (f"unmount {path}", lambda d=digest, p=path: self._unmount(d, p))
                for digest, path in mounts.items()
            ),
            ("lazy mounts", lambda: asyncio.to_thread(self.lazy.close)),
            ("content store", lambda: asyncio.to_thread(self.store.close)),
            ("registry client", lambda: asyncio.to_thread(self.client.close)),
        )

    async def _unmount(self, digest: str, path: Path) -> None:
        if self._kinds.pop(digest, "full") == "lazy":
            await asyncio.to_thread(self.lazy.unmount, path)
        else:
            await asyncio.to_thread(self.store.unmount, path)

    # -- deploy ----------------------------------------------------------------------------
    async def inspect(
        self,
        uri: str,
        overrides: dict[str, Any],
        credential: RegistryCredential | None = None,
    ) -> ImageSource:
        """Resolve ``uri`` in its registry; what a function made from it will run.

        First the deployer's access is checked with ``credential`` (their registry
        credentials; None: none given), even when the image is cached here: an
        ``ImageAccessDenied`` if they may not pull it.  Then the node resolves it with
        its own credentials."""
        from warmstart.images.errors import ImageAccessDenied, ImageError
        from warmstart.images.reference import Reference

        try:
            ref = Reference.parse(uri)
        except (ValueError, ImageError) as exc:
            raise InvalidParameter(
                f"Code.ImageUri {uri!r} is not a valid image reference: {exc}"
            ) from exc
        try:
            await self.access.check(ref, credential)
            manifest = await asyncio.to_thread(self.client.resolve, ref)
        except ImageAccessDenied:
            raise
        except ImageError as exc:
            raise InvalidParameter(
                f"Source image {uri} is not usable: {type(exc).__name__}: {exc}"
            ) from exc
        cfg = manifest.config_json.get("config") or {}
        command = tuple(overrides.get("Command") or cfg.get("Cmd") or ())
        entrypoint = tuple(overrides.get("EntryPoint") or cfg.get("Entrypoint") or ())
        workdir = overrides.get("WorkingDirectory") or cfg.get("WorkingDir") or "/var/task"
        lazy = bool(manifest.layers) and all(
            TOC_ANNOTATION in layer.annotations for layer in manifest.layers
        )
        return ImageSource(
            uri=uri,
            digest=manifest.digest,
            size=sum(layer.size for layer in manifest.layers),
            command=command,
            entrypoint=entrypoint,
            working_directory=str(workdir),
            env=tuple(cfg.get("Env") or ()),
            overrides=dict(overrides),
            lazy=lazy,
        )

    # -- instance start --------------------------------------------------------------------
    async def rootfs(self, image: ImageSource) -> Path:
        """The mounted root of ``image``, mounting (lazily or after a full pull) if needed."""
        path = self._mounts.get(image.digest)
        if path is not None and self._healthy(image.digest, path):
            return path
        lock = self._locks.setdefault(image.digest, asyncio.Lock())
        async with lock:
            path = self._mounts.get(image.digest)
            if path is not None and self._healthy(image.digest, path):
                return path
            try:
                return await self._mount(image)
            except WarmstartError:
                self.stats.failures += 1
                raise
            except OSError as exc:
                self.stats.failures += 1
                raise PlatformError(f"cannot mount image {image.uri}: {exc}") from exc

    def _healthy(self, digest: str, path: Path) -> bool:
        if self._kinds.get(digest) == "lazy":
            return bool(self.lazy.alive(path))
        return True

    async def _mount(self, image: ImageSource) -> Path:
        from warmstart.images.reference import Reference

        ref = Reference.parse(image.resolved_uri)
        use_lazy = image.lazy and self.pull_mode != "full"
        t0 = time.perf_counter()
        indexed: MountSpec | None = None
        if not image.lazy and self.pull_mode != "full":
            indexed = await asyncio.to_thread(self._indexed_spec, ref)
            if indexed is None and self.pull_mode == "lazy":
                log.info(
                    "image %s has layers that are neither eStargz nor indexed: pulling it in full",
                    image.uri,
                )
        target: Path | None = None
        if indexed is not None:
            try:
                target = await asyncio.to_thread(self.lazy.mount, indexed)
            except WarmstartError as exc:
                # A broken or hostile index costs the lazy start, not the function.
                self.stats.index_failures += 1
                log.warning(
                    "image %s: its gzip index cannot be mounted (%s): pulling it in full",
                    image.uri,
                    exc,
                )
        if target is not None:
            self.stats.lazy_mounts += 1
            self.stats.indexed_mounts += 1
            self.stats.mount_seconds += time.perf_counter() - t0
            self._kinds[image.digest] = "lazy"
            log.info(
                "image %s mounted lazily through its gzip index in %.0f ms",
                image.uri,
                (time.perf_counter() - t0) * 1e3,
            )
        elif use_lazy:
            target = await asyncio.to_thread(self._mount_lazy, ref)
            self.stats.lazy_mounts += 1
            self.stats.mount_seconds += time.perf_counter() - t0
            self._kinds[image.digest] = "lazy"
            log.info(
                "image %s mounted lazily in %.0f ms", image.uri, (time.perf_counter() - t0) * 1e3
            )
        else:
            target = self.roots / image.digest.replace(":", "-")
            target.mkdir(parents=True, exist_ok=True)
            if syscalls.is_mount_point(str(target)):
                await asyncio.to_thread(syscalls.unmount, str(target))
            img = await asyncio.to_thread(self.store.pull, str(ref), self._progress)
            self._images[image.digest] = img
            await asyncio.to_thread(self.store.mount_rootfs, img, target)
            self.stats.pulls += 1
            self.stats.pull_seconds += time.perf_counter() - t0
            self._kinds[image.digest] = "full"
            log.info("image %s pulled and mounted in %.2f s", image.uri, time.perf_counter() - t0)
        self._mounts[image.digest] = target
        return target

    def _mount_lazy(self, ref: Any) -> Path:
        """Mount every layer lazily, straight from the registry (layers are eStargz)."""
        from warmstart.images.lazymount import LayerSource, MountSpec

        manifest = self.client.resolve(ref)
        layers = tuple(
            LayerSource.estargz(
                str(ref), layer.digest, layer.annotations.get(TOC_ANNOTATION, ""), layer.size
            )
            for layer in manifest.layers
        )
        path: Path = self.lazy.mount(MountSpec(layers=layers, background=self.background))
        return path

    def _indexed_spec(self, ref: Any) -> MountSpec | None:
        """A lazy mount of a plain gzip image through the gzip indexes pushed next to it
        (``warmstart image index``), or None if it has none (then it is pulled in full)."""
        from warmstart.images.errors import ImageError
        from warmstart.images.indexes import find_index, indexable, toc_of
        from warmstart.images.lazymount import LayerSource, MountSpec

        try:
            manifest = self.client.resolve(ref)
            found = find_index(self.client, ref, manifest)
        except ImageError as exc:
            log.warning("looking for a gzip index of %s failed (%s): pulling it in full", ref, exc)
            return None
        if found is None:
            return None
        layers = []
        for layer in manifest.layers:
            if TOC_ANNOTATION in layer.annotations:
                layers.append(
                    LayerSource.estargz(
                        str(ref), layer.digest, layer.annotations[TOC_ANNOTATION], layer.size
                    )
                )
            elif indexable(layer):
                index = found[layer.digest]
                toc_size, toc_digest = toc_of(index)
                layers.append(
                    LayerSource.gzindex(
                        str(ref),
                        layer.digest,
                        layer.size,
                        index.digest,
                        index.size,
                        toc_size=toc_size,
                        toc_digest=toc_digest,
                    )
                )
            else:
                return None  # a zstd or uncompressed layer: no index can serve it
        return MountSpec(layers=tuple(layers), background=self.background)

    def _progress(self, layer: str, done: int, size: int) -> None:
        prev = self.stats.in_progress.get(layer, (0, size))[0]
        self.stats.bytes_done += max(0, done - prev)
        if done >= size:
            self.stats.in_progress.pop(layer, None)
            self.stats.layers_done += 1
        else:
            self.stats.in_progress[layer] = (done, size)
        if self.on_progress is not None:
            self.on_progress(layer, done, size)

    async def release(self, image: ImageSource, *, still_used: bool) -> None:
        """A function using ``image`` went away; unmount the image if nothing else uses it."""
        if still_used:
            return
        path = self._mounts.pop(image.digest, None)
        if path is None:
            return
        try:
            await self._unmount(image.digest, path)
        except (OSError, WarmstartError) as exc:
            log.error("image %s: cannot unmount %s: %s", image.uri, path, exc)
            return
        with contextlib.suppress(OSError):
            os.rmdir(path)  # a lazy mount point lives elsewhere; only full roots are ours

    def held(self) -> dict[str, Any]:
        """What this node holds of images (for a cluster's placement and peers): layer
        blobs of full pulls (digest -> size) and how many verified lazy chunks are
        cached.  Reads the store's index and lists the chunk cache: call it on a thread."""
        chunks = sum(1 for _ in (self.lazy.cache_dir / "sha256").glob("*/*"))
        return {"layers": self.store.layer_digests(), "chunks": chunks}

    def snapshot(self) -> dict[str, float]:
        out = {
            "image_pulls_total": float(self.stats.pulls),
            "image_lazy_mounts_total": float(self.stats.lazy_mounts),
            "image_indexed_mounts_total": float(self.stats.indexed_mounts),
            "image_index_failures_total": float(self.stats.index_failures),
            "image_pull_seconds_total": float(self.stats.pull_seconds),
            "image_mount_seconds_total": float(self.stats.mount_seconds),
            "image_mount_failures_total": float(self.stats.failures),
            "image_pull_layers_total": float(self.stats.layers_done),
            "image_pull_bytes_total": float(self.stats.bytes_done),
            "image_pull_layers_in_progress": float(len(self.stats.in_progress)),
        }
        access = self.access.statistics()
        out["image_access_checks_total"] = float(access.checks)
        out["image_access_cache_hits_total"] = float(access.cache_hits)
        out["image_access_denied_total"] = float(access.denied)
        with contextlib.suppress(OSError, ValueError, WarmstartError):
            lazy = self.lazy.stats()
            for key in ("bytes_fetched", "requests", "read_errors", "remounts"):
                if key in lazy:
                    out[f"image_lazy_{key}_total"] = float(lazy[key])
            out["image_lazy_mounted"] = float(lazy.get("mounted", 0))
        out["image_lazy_cache_trimmed_bytes_total"] = float(self.lazy.trimmed_bytes)
        return out
