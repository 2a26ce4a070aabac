"""The node's content store: unpacked layers by diff-id, images by manifest digest.

Layout under ``root``::

    index.db             SQLite: images, their layers (the reference counts), tags, LRU
                         times, persistent pins
    layers/<hex>/        one layer (an overlayfs lower directory), by diff-id: the mount
                         point of ``<hex>.sqfs`` when layers are images, else unpacked
    layers/<hex>.sqfs    the layer as a read-only squashfs image (``layerimage``)
    blobs/sha256/<hex>   compressed layer blobs, only when ``keep_blobs`` is set
    empty/               an empty lower directory (overlayfs wants two lowers without upper)
    tmp/<pid>.<start>-<rand>/  work in progress; what a dead process left here is removed
    lock                 taken by every process that publishes, recovers or collects

A full pull streams each layer: bytes from the registry are hashed (the compressed digest),
piped into a decompressor (ISA-L's igzip in a child process for gzip, zstandard for zstd)
and read as they arrive, so download, decompression and writing overlap; layers go
concurrently.  Where the node can (root, loop devices, squashfs, ``tar2sqfs``), a layer
becomes one read-only squashfs image (``layerimage``: no file is created per entry, which
on an aged disk costs more than the download), loop-mounted at ``layers/<hex>/`` when
published and again when an image using it is mounted after a restart; elsewhere it is
unpacked into that directory (``unpack``).  Both apply the same rules to hostile
archives, and a store may hold layers of both kinds.  A layer is
published (renamed into ``layers/``) only after both its compressed digest and its diff-id
matched, otherwise its directory is deleted. Layers are shared by every image that lists
them: concurrent pulls needing the same layer download it once (single-flight by diff-id).

An image's layers are referenced by its row in the index; a layer no image references is
garbage. Images are kept LRU within ``budget_bytes`` of unpacked data; an image is never
evicted while it is held (``acquire``, in memory, for as long as this process uses it),
mounted, or pinned. A *pin* is persistent (the ``pins`` table): a name (an image cache
entry's, say) keeps an image in the store across restarts until ``unpin`` drops it;
an image pinned by no name is an ordinary LRU candidate again. Every method is
thread-safe: the worker calls in from ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from warmstart.images import layerimage
from warmstart.images.errors import DigestMismatch, ImageError
from warmstart.images.reference import Reference, check_digest, digest_hex
from warmstart.images.registry import (
    Descriptor,
    ImageManifest,
    RawManifest,
    RegistryClient,
    manifest_from_raw,
)
from warmstart.images.unpack import UnpackResult, decompress_stream, unpack
from warmstart.runtime import syscalls

log = logging.getLogger("warmstart.images.store")

# How layers are stored: squashfs images (``layerimage``) or unpacked directories.
SQUASHFS, DIRECTORIES = "squashfs", "dirs"
LAYER_FORMATS = ("auto", SQUASHFS, DIRECTORIES)
IMAGE_SUFFIX = ".sqfs"


def squashfs_unavailable() -> str | None:
    """Why this node cannot keep layers as squashfs images, or None when it can."""
    if os.geteuid() != 0:
        return "mounting layer images needs root"
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control)"
    try:
        with open("/proc/filesystems") as f:
            if "squashfs" not in f.read().split():
                return "the kernel has no squashfs"
    except OSError:
        return "cannot read /proc/filesystems"
    if not layerimage.available():
        return "tar2sqfs (Debian package squashfs-tools-ng) is not installed"
    return None


def resolve_layer_format(wanted: str) -> str:
    """``auto``: squashfs images where the node can, else directories."""
    if wanted not in LAYER_FORMATS:
        raise ImageError(f"layer format must be one of {', '.join(LAYER_FORMATS)}, not {wanted!r}")
    if wanted == DIRECTORIES:
        return DIRECTORIES
    why = squashfs_unavailable()
    if why is None:
        return SQUASHFS
    if wanted == SQUASHFS:
        raise ImageError(f"layers cannot be squashfs images here: {why}")
    log.info("image layers are unpacked into directories: %s", why)
    return DIRECTORIES


class BlobSource(Protocol):
    """Streams a blob's bytes, verified against its digest by the end of the stream."""

    def stream_blob(
        self, ref: Reference, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]: ...


Progress = Callable[[str, int, int], None]
"""Called with (layer digest, bytes done, layer size); done == size when a layer is ready."""

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    diff_id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    compressed_size INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    ref TEXT NOT NULL,
    media_type TEXT NOT NULL,
    manifest BLOB NOT NULL,
    config BLOB NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS image_layers (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    diff_id TEXT NOT NULL,
    PRIMARY KEY (image_id, position)
);
CREATE INDEX IF NOT EXISTS image_layers_diff ON image_layers(diff_id);
CREATE TABLE IF NOT EXISTS tags (
    ref TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS pins (
    name TEXT NOT NULL,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    ref TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (name, image_id)
);
"""


@dataclass(frozen=True)
class ImageConfig:
    """What a container made from the image runs (the ``config`` object of the image config)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, config_json: dict[str, Any]) -> ImageConfig:
        cfg = config_json.get("config") or {}
        if not isinstance(cfg, dict):
            cfg = {}

        def strings(value: Any) -> list[str]:
            return [str(v) for v in value] if isinstance(value, list) else []

        labels = cfg.get("Labels") or {}
        return cls(
            entrypoint=strings(cfg.get("Entrypoint")),
            cmd=strings(cfg.get("Cmd")),
            env=strings(cfg.get("Env")),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        )

    def env_dict(self) -> dict[str, str]:
        return {k: v for k, _, v in (e.partition("=") for e in self.env)}


@dataclass(frozen=True)
class Image:
    """A fully pulled image: its manifest, config and unpacked layer directories."""

    id: str  # the manifest digest
    ref: str  # the reference it was pulled by, with the digest
    manifest: ImageManifest
    config: ImageConfig
    layer_dirs: list[Path]  # bottom → top
    diff_ids: list[str]

    @property
    def size(self) -> int:
        """Compressed size of the layers (what a pull downloads)."""
        return sum(layer.size for layer in self.manifest.layers)


@dataclass(frozen=True)
class Pin:
    """A persistent pin: ``name`` keeps image ``image_id`` (pulled as ``ref``) in the store."""

    name: str
    image_id: str
    ref: str
    created: float


@dataclass(frozen=True)
class StoreStats:
    bytes_downloaded: int  # compressed layer bytes downloaded by this store instance
    layers_pulled: int  # layers downloaded and unpacked
    layers_reused: int  # layers a pull found already present (or being pulled)
    pulls: int  # pull() calls that succeeded
    images: int
    layers: int
    disk_bytes: int  # unpacked bytes of all layers (tar stream size)
    budget_bytes: int
    gc_layers_removed: int


@dataclass
class _Flight:
    """A layer being pulled: the future its waiters block on, and their progress callbacks."""

    future: Future[None] = field(default_factory=Future)
    listeners: list[tuple[Progress, str]] = field(default_factory=list)
    waiters: int = 0


def _process_tag(pid: int) -> str | None:
    """``pid.starttime``: names a process uniquely even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return f"{pid}.{fields[19]}"


def _escape_overlay(path: Path) -> str:
    """A path as an overlayfs ``lowerdir`` element (``\\``, ``:`` and ``,`` escaped)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


class ImageStore:
    """Pulls images into a local content store and mounts them as read-only overlays."""

    def __init__(
        self,
        root: Path,
        client: RegistryClient,
        budget_bytes: int,
        *,
        platform: str = "linux/amd64",
        concurrency: int = 4,
        keep_blobs: bool = False,
        blobs: BlobSource | None = None,
        layer_format: str = "auto",
    ) -> None:
        self.root = Path(root)
        self.layer_format = resolve_layer_format(layer_format)
        self.client = client
        # Where layer blobs' bytes come from: the registry, or (in a cluster) peers too.
        self.blobs: BlobSource = blobs if blobs is not None else client
        self.budget_bytes = budget_bytes
        self.platform = platform
        self.keep_blobs = keep_blobs
        self.layers_dir = self.root / "layers"
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.empty_dir = self.root / "empty"
        for d in (self.layers_dir, self.blobs_dir, self.tmp_dir, self.empty_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Another process may open the same store (the CLI beside the worker): publishing
        # layers, recovery and garbage collection also take this file lock.
        self._lockfile = open(self.root / "lock", "a+")  # noqa: SIM115
        self._lock_depth = 0
        self._tag = _process_tag(os.getpid()) or str(os.getpid())
        self._db = sqlite3.connect(
            self.root / "index.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._pool = ThreadPoolExecutor(max(1, concurrency), "layer-pull")
        self._inflight: dict[str, _Flight] = {}
        self._leases: Counter[str] = Counter()  # diff-id → pulls about to reference it
        self._pins: Counter[str] = Counter()  # image id → holders (acquire, mounts)
        self._mounts: dict[str, str] = {}  # mount target → image id
        self._bytes_downloaded = 0
        self._layers_pulled = 0
        self._layers_reused = 0
        self._pulls = 0
        self._gc_layers_removed = 0
        self._recover()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This thread alone in this process, and this process alone on the store."""
        with self._lock:
            if self._lock_depth == 0:
                fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_UN)

    def _mounted_stacks(self) -> list[frozenset[str]]:
        """The layers (hex names) of every overlay mount of our layer directories, whoever
        made it: this store's pins do not cover mounts made by another process."""
        prefix = f"{self.layers_dir}/"
        stacks: list[frozenset[str]] = []
        try:
            table = syscalls.mounts()
        except OSError:
            return stacks
        for entry in table:
            if entry.fstype != "overlay":
                continue
            for option in entry.super_options.split(","):
                if option.startswith("lowerdir="):
                    lowers = option[len("lowerdir=") :].split(":")
                    stack = frozenset(
                        p[len(prefix) :].split("/", 1)[0] for p in lowers if p.startswith(prefix)
                    )
                    if stack:
                        stacks.append(stack)
        return stacks

    def _image_layers(self, image_id: str) -> frozenset[str]:
        return frozenset(digest_hex(d) for d in self._diff_ids(image_id))

    # -- start-up ----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Remove what a crashed process left: its temp dirs, layer directories that never
        made it into the index, and index rows whose directory is gone."""
        for entry in self.tmp_dir.iterdir():
            tag = entry.name.split("-", 1)[0]
            pid_text = tag.split(".", 1)[0]
            if pid_text.isdigit() and _process_tag(int(pid_text)) == tag:
                continue  # the work of a live process (maybe this one)
            self._rmtree(entry)
        with self._exclusive():
            known = {row[0] for row in self._db.execute("SELECT diff_id FROM layers")}
            on_disk = {p.name.removesuffix(IMAGE_SUFFIX) for p in self.layers_dir.iterdir()}
            for name in on_disk:
                if f"sha256:{name}" not in known:
                    log.warning("removing layer %s not in the index", name)
                    self._discard_layer(name, self.layers_dir / name)
            missing = [d for d in known if digest_hex(d) not in on_disk]
            for diff_id in missing:
                log.warning("layer %s is missing on disk; dropping the images using it", diff_id)
                self._db.execute(
                    "DELETE FROM images WHERE id IN "
                    "(SELECT image_id FROM image_layers WHERE diff_id = ?)",
                    (diff_id,),
                )
                self._db.execute("DELETE FROM layers WHERE diff_id = ?", (diff_id,))
            for part in self.blobs_dir.glob("*.part*"):
                part.unlink(missing_ok=True)

    def _rmtree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.warning("could not remove %s completely", path)

    def _new_tmp(self) -> Path:
        path = self.tmp_dir / f"{self._tag}-{uuid.uuid4().hex[:12]}"
        path.mkdir(mode=0o700)
        return path

    def close(self) -> None:
        """Stop pulling; unmount the layer images no overlay uses (the next user of the
        store mounts them again)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError), self._exclusive():
            used = set().union(*self._mounted_stacks())
            for image in self.layers_dir.glob(f"*{IMAGE_SUFFIX}"):
                name = image.name.removesuffix(IMAGE_SUFFIX)
                if name not in used:
                    syscalls.unmount(str(self.layers_dir / name))
        with self._lock:
            self._db.close()
            self._lockfile.close()

    def _image_file(self, diff_id: str) -> Path:
        return self.layers_dir / f"{digest_hex(diff_id)}{IMAGE_SUFFIX}"

    def _discard_layer(self, name: str, directory: Path) -> None:
        """Remove a layer (its image unmounted first) that is in no index row."""
        image = self.layers_dir / f"{name}{IMAGE_SUFFIX}"
        if directory.exists() and syscalls.is_mount_point(str(directory)):
            syscalls.umount(str(directory), syscalls.MNT_DETACH)
        self._rmtree(directory)
        image.unlink(missing_ok=True)

    def _ensure_layer_mounted(self, diff_id: str) -> None:
        """A layer stored as an image is mounted at its directory (after a restart, or
        when another process unmounted it); call under ``_exclusive``."""
        image = self._image_file(diff_id)
        target = self.layer_dir(diff_id)
        if image.exists() and not syscalls.is_mount_point(str(target)):
            layerimage.mount_image(image, target)

    # -- queries -----------------------------------------------------------------------------
    def layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / digest_hex(diff_id)

    def _layer_ready(self, diff_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM layers WHERE diff_id = ?", (diff_id,)).fetchone()
        return row is not None

    def refcount(self, diff_id: str) -> int:
        """How many images in the store reference this layer."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT image_id) FROM image_layers WHERE diff_id = ?", (diff_id,)
            ).fetchone()
        return int(row[0])

    def _load(self, image_id: str) -> Image | None:
        row = self._db.execute(
            "SELECT ref, media_type, manifest, config FROM images WHERE id = ?", (image_id,)
        ).fetchone()
        if row is None:
            return None
        ref_text, media_type, raw, config_raw = row
        manifest = manifest_from_raw(
            Reference.parse(ref_text), RawManifest(bytes(raw), media_type, image_id), config_raw
        )
        diff_ids = self._diff_ids(image_id)
        return Image(
            id=image_id,
            ref=str(manifest.ref),
            manifest=manifest,
            config=ImageConfig.from_json(manifest.config_json),
            layer_dirs=[self.layer_dir(d) for d in diff_ids],
            diff_ids=diff_ids,
        )

    def _diff_ids(self, image_id: str) -> list[str]:
        return [
            r[0]
            for r in self._db.execute(
                "SELECT diff_id FROM image_layers WHERE image_id = ? ORDER BY position",
                (image_id,),
            )
        ]

    def get(self, ref_or_id: str) -> Image | None:
        """A pulled image by manifest digest or by the reference it was pulled by (no
        network)."""
        with self._lock:
            image_id = self._lookup(ref_or_id)
            return self._load(image_id) if image_id else None

    def _lookup(self, ref_or_id: str) -> str | None:
        if ref_or_id.startswith(("sha256:", "sha512:")):
            check_digest(ref_or_id)
            row = self._db.execute("SELECT id FROM images WHERE id = ?", (ref_or_id,)).fetchone()
            if row:
                return str(row[0])
        ref = Reference.parse(ref_or_id)
        row = self._db.execute("SELECT image_id FROM tags WHERE ref = ?", (str(ref),)).fetchone()
        if row:
            return str(row[0])
        if ref.digest:
            row = self._db.execute("SELECT id FROM images WHERE id = ?", (ref.digest,)).fetchone()
            if row:
                return str(row[0])
        return None

    def list_images(self) -> list[Image]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM images ORDER BY last_used")]
            return [img for i in ids if (img := self._load(i)) is not None]

    def layer_digests(self) -> dict[str, int]:
        """Every layer blob held here: compressed digest -> compressed size."""
        with self._lock:
            rows = self._db.execute("SELECT digest, compressed_size FROM layers").fetchall()
        return {str(d): int(n) for d, n in rows}

    def disk_bytes(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(disk_bytes), 0) FROM layers").fetchone()
        return int(row[0])

    def stats(self) -> StoreStats:
        with self._lock:
            images = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
            layers = self._db.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
            return StoreStats(
                bytes_downloaded=self._bytes_downloaded,
                layers_pulled=self._layers_pulled,
                layers_reused=self._layers_reused,
                pulls=self._pulls,
                images=int(images),
                layers=int(layers),
                disk_bytes=self.disk_bytes(),
                budget_bytes=self.budget_bytes,
                gc_layers_removed=self._gc_layers_removed,
            )

    # -- pulling -----------------------------------------------------------------------------
    def pull(self, ref_text: str, progress: Progress | None = None) -> Image:
        """Pull ``ref_text`` (every layer downloaded, verified and unpacked) and return it.

        A reference with a digest that is already in the store needs no network at all; a
        tag is always resolved again (tags move).
        """
        ref = Reference.parse(ref_text)
        if ref.digest:
            with self._lock:
                image_id = self._lookup(str(ref))
                image = self._load(image_id) if image_id else None
                if image is not None:
                    self._touch_image(image.id)
                    self._pulls += 1
            if image is not None:
                for desc in image.manifest.layers:
                    self._emit(progress, desc.digest, desc.size, desc.size)
                return image
        manifest = self.client.resolve(ref, self.platform)
        diff_ids = manifest.diff_ids
        with self._lock:
            self._leases.update(diff_ids)
        try:
            jobs = [
                self._pool.submit(self._ensure_layer, manifest.ref, desc, diff_id, progress)
                for desc, diff_id in zip(manifest.layers, diff_ids, strict=True)
            ]
            errors: list[BaseException] = []
            for job in jobs:
                try:
                    job.result()
                except BaseException as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
            with self._exclusive():
                image = self._record(ref, manifest, diff_ids)
                self._pulls += 1
        finally:
            with self._lock:
                self._leases.subtract(diff_ids)
                self._leases = +self._leases  # unary plus drops the zero counts
        if self.disk_bytes() > self.budget_bytes:
            self.gc(keep={image.id})
        return image

    def _emit(self, progress: Progress | None, digest: str, done: int, size: int) -> None:
        if progress is None:
            return
        try:
            progress(digest, done, size)
        except Exception:  # a broken progress display must not fail a pull
            log.exception("progress callback failed")

    def _record(self, ref: Reference, manifest: ImageManifest, diff_ids: list[str]) -> Image:
        now = time.time()
        config_raw = manifest.config_raw or json.dumps(manifest.config_json).encode()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO images (id, ref, media_type, manifest, config, created, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "last_used = excluded.last_used, ref = excluded.ref",
                (
                    manifest.digest,
                    str(manifest.ref),
                    manifest.media_type,
                    manifest.raw,
                    config_raw,
                    now,
                    now,
                ),
            )
            db.execute("DELETE FROM image_layers WHERE image_id = ?", (manifest.digest,))
            db.executemany(
                "INSERT INTO image_layers (image_id, position, diff_id) VALUES (?, ?, ?)",
                [(manifest.digest, i, d) for i, d in enumerate(diff_ids)],
            )
            for tag_ref in {str(ref), str(manifest.ref)}:
                db.execute(
                    "INSERT INTO tags (ref, image_id) VALUES (?, ?) "
                    "ON CONFLICT(ref) DO UPDATE SET image_id = excluded.image_id",
                    (tag_ref, manifest.digest),
                )
            db.execute(
                f"UPDATE layers SET last_used = ? WHERE diff_id IN "
                f"({','.join('?' * len(diff_ids))})",
                (now, *diff_ids),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        image = self._load(manifest.digest)
        assert image is not None
        return image

    def _touch_image(self, image_id: str) -> None:
        now = time.time()
        self._db.execute("UPDATE images SET last_used = ? WHERE id = ?", (now, image_id))
        self._db.execute(
            "UPDATE layers SET last_used = ? WHERE diff_id IN "
            "(SELECT diff_id FROM image_layers WHERE image_id = ?)",
            (now, image_id),
        )

    def _ensure_layer(
        self, ref: Reference, desc: Descriptor, diff_id: str, progress: Progress | None
    ) -> None:
        """Make ``diff_id`` present: reuse it, wait for the pull already fetching it, or
        fetch it ourselves. If the pull we waited for failed, we try once on our own."""
        waited_failed = False
        while True:
            with self._lock:
                found = self._layer_ready(diff_id)
                if found:
                    self._layers_reused += 1
                else:
                    existing = self._inflight.get(diff_id)
                    mine = existing is None
                    if existing is None:
                        flight = self._inflight[diff_id] = _Flight()
                    else:
                        flight = existing
                        flight.waiters += 1
                        if progress is not None:
                            flight.listeners.append((progress, desc.digest))
            if found:
                self._emit(progress, desc.digest, desc.size, desc.size)
                return
            if not mine:
                try:
                    flight.future.result()
                except Exception as exc:
                    if waited_failed:
                        raise
                    log.warning("pull of layer %s for another image failed (%s)", diff_id, exc)
                    waited_failed = True
                continue  # ready now (or ours to try)
            try:
                self._fetch_layer(ref, desc, diff_id, progress, flight)
            except BaseException as exc:
                with self._lock:
                    del self._inflight[diff_id]
                flight.future.set_exception(exc)
                raise
            with self._lock:
                del self._inflight[diff_id]
            flight.future.set_result(None)
            return

    def _fetch_layer(
        self,
        ref: Reference,
        desc: Descriptor,
        diff_id: str,
        progress: Progress | None,
        flight: _Flight,
    ) -> None:
        """Download, verify and unpack one layer, streaming, then publish it."""
        tmp = self._new_tmp()
        try:
            dest = tmp / ("layer" + (IMAGE_SUFFIX if self.layer_format == SQUASHFS else ""))
            t0 = time.perf_counter()
            result = self._stream_unpack(ref, desc, dest, tmp, progress, flight)
            if result.diff_id != diff_id:
                raise DigestMismatch(
                    f"layer {desc.digest} unpacks to diff-id {result.diff_id}, "
                    f"the image config says {diff_id}"
                )
            final = self.layer_dir(diff_id)
            with self._exclusive():
                if self._layer_ready(diff_id):
                    log.info("layer %s was published meanwhile by another process", diff_id)
                    return
                if final.exists() or self._image_file(diff_id).exists():
                    # a leftover that never made it into the index
                    self._discard_layer(digest_hex(diff_id), final)
                # The budget counts a layer's uncompressed size, whatever its format (an
                # image takes less: lz4 blocks, file tails packed).
                disk_bytes = result.tar_bytes
                if self.layer_format == SQUASHFS:
                    image = self._image_file(diff_id)
                    os.rename(dest, image)
                    try:
                        layerimage.mount_image(image, final)
                    except BaseException:
                        self._discard_layer(digest_hex(diff_id), final)
                        raise
                else:
                    os.rename(dest, final)
                if self.keep_blobs and (tmp / "blob").exists():
                    os.replace(tmp / "blob", self.blobs_dir / digest_hex(desc.digest))
                now = time.time()
                self._db.execute(
                    "INSERT OR REPLACE INTO layers (diff_id, digest, media_type, "
                    "compressed_size, disk_bytes, created, last_used) VALUES (?,?,?,?,?,?,?)",
                    (diff_id, desc.digest, desc.media_type, desc.size, disk_bytes, now, now),
                )
                self._layers_pulled += 1
            log.info(
                "layer %s: %d entries, %.1f MB %s in %.2f s",
                desc.digest[:19],
                result.entries,
                result.tar_bytes / 1e6,
                "made a squashfs image" if self.layer_format == SQUASHFS else "unpacked",
                time.perf_counter() - t0,
            )
        finally:
            self._rmtree(tmp)

    def _stream_unpack(
        self,
        ref: Reference,
        desc: Descriptor,
        dest: Path,
        tmp: Path,
        progress: Progress | None,
        flight: _Flight,
    ) -> UnpackResult:
        """Pipe the blob, as it arrives, into a decompress-and-unpack thread.

        The registry's bytes are verified against the compressed digest by
        ``stream_blob``; if they do not match (or the download fails), that error wins over
        whatever the unpacker made of the bad bytes, and the caller deletes ``dest``.
        """
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        outcome: dict[str, Any] = {}

        def consume() -> None:
            raw = os.fdopen(read_fd, "rb", buffering=0)
            stream = None
            try:
                stream = decompress_stream(raw, desc.media_type, process=True)
                if self.layer_format == SQUASHFS:
                    outcome["result"] = layerimage.build_squashfs(stream, dest, workdir=tmp)
                else:
                    outcome["result"] = unpack(stream, dest)
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
                with contextlib.suppress(Exception):
                    raw.close()

        worker = threading.Thread(target=consume, name=f"unpack-{desc.digest[7:19]}")
        worker.start()
        blob = open(tmp / "blob", "wb") if self.keep_blobs else None  # noqa: SIM115
        download_error: BaseException | None = None
        done = 0
        chunks: Iterator[bytes] = self.blobs.stream_blob(ref, desc.digest, size=desc.size)
        try:
            self._emit(progress, desc.digest, 0, desc.size)
            for chunk in chunks:
                if blob is not None:
                    blob.write(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_fd, view) :]
                done += len(chunk)
                with self._lock:
                    self._bytes_downloaded += len(chunk)
                    listeners = list(flight.listeners)
                self._emit(progress, desc.digest, min(done, desc.size - 1), desc.size)
                for fn, digest in listeners:
                    self._emit(fn, digest, min(done, desc.size - 1), desc.size)
        except BrokenPipeError:
            pass  # the unpacker stopped early: its error is reported below
        except BaseException as exc:
            download_error = exc
        finally:
            with contextlib.suppress(Exception):
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            os.close(write_fd)
            worker.join()
            if blob is not None:
                blob.close()
        if download_error is not None:
            raise download_error
        if "error" in outcome:
            raise outcome["error"]
        result: UnpackResult = outcome["result"]
        self._emit(progress, desc.digest, desc.size, desc.size)
        with self._lock:
            listeners = list(flight.listeners)
        for fn, digest in listeners:
            self._emit(fn, digest, desc.size, desc.size)
        return result

    # -- holds, pins, mounts -----------------------------------------------------------------
    def acquire(self, image_id: str) -> None:
        """Hold an image (in memory): it is not garbage-collected until a matching
        ``release``."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone():
                self._pins[image_id] += 1
                self._touch_image(image_id)
                return
        raise ImageError(f"image {image_id} is not in the store")

    def release(self, image_id: str) -> None:
        with self._lock:
            if self._pins[image_id] > 0:
                self._pins[image_id] -= 1
            if self._pins[image_id] <= 0:
                del self._pins[image_id]

    def pin(self, name: str, image_id: str, ref: str) -> None:
        """Pin ``image_id`` under ``name`` (persistently: it survives restarts) so that
        garbage collection never evicts it; ``ref`` is what the pin asked for."""
        with self._exclusive():
            if not self._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone():
                raise ImageError(f"image {image_id} is not in the store")
            self._db.execute(
                "INSERT INTO pins (name, image_id, ref, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name, image_id) DO UPDATE SET ref = excluded.ref",
                (name, image_id, ref, time.time()),
            )
            self._touch_image(image_id)

    def unpin(self, name: str, *, keep: str | None = None) -> int:
        """Drop ``name``'s pins (but the one of image ``keep``); the images become
        ordinary LRU candidates. Returns how many pins went."""
        with self._exclusive():
            cur = self._db.execute(
                "DELETE FROM pins WHERE name = ? AND image_id != ?", (name, keep or "")
            )
            return int(cur.rowcount)

    def pins(self) -> list[Pin]:
        """Every persistent pin, by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, image_id, ref, created FROM pins ORDER BY name, created"
            ).fetchall()
        return [Pin(str(n), str(i), str(r), float(c)) for n, i, r, c in rows]

    def _pin_names(self, image_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT name FROM pins WHERE image_id = ? ORDER BY name", (image_id,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def mount_rootfs(self, image: Image, target: Path) -> None:
        """Mount the image's layers at ``target`` as one read-only overlay (top layer wins,
        whiteouts and opaque directories applied by overlayfs). The image stays held
        until ``unmount``."""
        target = Path(target)
        dirs = list(image.layer_dirs)
        with self._exclusive():
            for diff_id in image.diff_ids:
                self._ensure_layer_mounted(diff_id)
        for d in dirs:
            if not d.is_dir():
                raise ImageError(f"image {image.id}: layer directory {d} is missing; pull again")
        if len(dirs) < 2:
            dirs = [self.empty_dir, *dirs]  # overlayfs needs two lower layers without an upper
        options = "lowerdir=" + ":".join(_escape_overlay(d) for d in reversed(dirs))
        if len(options) >= os.sysconf("SC_PAGE_SIZE"):
            raise ImageError(
                f"image {image.id}: {len(dirs)} layers are too many for one overlay mount "
                f"under {self.root}"
            )
        self.acquire(image.id)
        try:
            target.mkdir(parents=True, exist_ok=True)
            syscalls.mount(
                "overlay",
                str(target),
                "overlay",
                syscalls.MS_RDONLY | syscalls.MS_NODEV | syscalls.MS_NOSUID,
                options,
            )
        except BaseException:
            self.release(image.id)
            raise
        with self._lock:
            self._mounts[str(target.resolve())] = image.id

    def unmount(self, target: Path) -> None:
        """Unmount a rootfs mounted by ``mount_rootfs`` (lazily if it is still busy)."""
        key = str(Path(target).resolve())
        syscalls.unmount(key)
        with self._lock:
            image_id = self._mounts.pop(key, None)
        if image_id is not None:
            self.release(image_id)

    # -- removal and garbage collection -----------------------------------------------------
    def remove(self, ref_or_id: str) -> bool:
        """Forget an image (its layers go when no other image uses them). Refused while
        the image is held, mounted or pinned."""
        with self._exclusive():
            image_id = self._lookup(ref_or_id)
            if image_id is None:
                return False
            if self._pins[image_id] > 0:
                raise ImageError(f"image {image_id} is in use")
            names = self._pin_names(image_id)
            if names:
                raise ImageError(f"image {image_id} is pinned by {', '.join(names)}")
            if self._image_layers(image_id) in self._mounted_stacks():
                raise ImageError(f"image {image_id} is in use (mounted)")
            self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        self.gc()
        return True

    def gc(self, budget_bytes: int | None = None, *, keep: set[str] | None = None) -> int:
        """Delete unreferenced layers, then least recently used images (not held, mounted
        or pinned, not in ``keep``) and their layers until the store fits ``budget_bytes``
        (default: the store's budget). Returns the bytes freed."""
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        keep = keep or set()
        doomed: list[tuple[int, Path]] = []
        with self._exclusive():
            stacks = self._mounted_stacks()
            mounted = set().union(*stacks)
            self._collect_unreferenced(doomed, mounted)
            pinned = {str(r[0]) for r in self._db.execute("SELECT DISTINCT image_id FROM pins")}
            if self.disk_bytes() > budget:
                candidates = [
                    r[0]
                    for r in self._db.execute("SELECT id FROM images ORDER BY last_used, created")
                ]
                for image_id in candidates:
                    if self.disk_bytes() <= budget:
                        break
                    if image_id in keep or self._pins[image_id] > 0 or image_id in pinned:
                        continue
                    if self._image_layers(image_id) in stacks:
                        continue  # mounted, maybe by another process
                    log.info("evicting image %s (least recently used)", image_id)
                    self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))
                    self._collect_unreferenced(doomed, mounted)
                if self.disk_bytes() > budget:
                    log.warning(
                        "image store uses %d bytes, over its budget of %d: the rest is in use",
                        self.disk_bytes(),
                        budget,
                    )
        freed = 0
        for size, path in doomed:
            freed += size
            self._rmtree(path)
        return freed

    def _collect_unreferenced(self, doomed: list[tuple[int, Path]], mounted: set[str]) -> None:
        """Move unreferenced, unleased, unmounted layers out of ``layers/`` (under the
        lock); the slow rmtree happens later, outside it."""
        rows = self._db.execute(
            "SELECT diff_id, digest, disk_bytes FROM layers WHERE diff_id NOT IN "
            "(SELECT diff_id FROM image_layers)"
        ).fetchall()
        for diff_id, blob_digest, disk_bytes in rows:
            if self._leases[diff_id] > 0 or diff_id in self._inflight:
                continue
            if digest_hex(diff_id) in mounted:
                continue
            self._db.execute("DELETE FROM layers WHERE diff_id = ?", (diff_id,))
            src = self.layer_dir(diff_id)
            trash = self._new_tmp()
            image = self._image_file(diff_id)
            if image.exists():
                if syscalls.is_mount_point(str(src)):
                    syscalls.umount(str(src), syscalls.MNT_DETACH)  # no overlay uses it
                os.rename(image, trash / image.name)
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, trash / "layer")
            (self.blobs_dir / digest_hex(blob_digest)).unlink(missing_ok=True)
            self._gc_layers_removed += 1
            doomed.append((int(disk_bytes), trash))

    def in_progress(self) -> dict[str, int]:
        """Layers being pulled now: diff-id → how many other pulls are waiting for it."""
        with self._lock:
            return {diff_id: f.waiters for diff_id, f in self._inflight.items()}

    def mounted(self) -> list[tuple[str, str]]:
        """(target, image id) of the rootfs mounts this store made."""
        with self._lock:
            return list(self._mounts.items())
