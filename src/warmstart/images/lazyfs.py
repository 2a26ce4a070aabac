"""The lazy image filesystem: a read-only FUSE view of one image's merged layers.

Run as ``python -m warmstart.images.lazyfs --spec FILE|- --ready-fd N`` by
:class:`warmstart.images.lazymount.LazyMounts`, one process per mounted image.

What it serves
    The layers of one image merged bottom → top, as overlayfs would merge them: eStargz
    layers from their verified TOC (no content fetched to list or stat anything), and
    unpacked layer directories for layers that were pulled in full. Whiteouts (``.wh.x``
    in eStargz, a 0/0 character device in an unpacked directory) delete lower entries,
    opaque directories (``.wh..wh..opq``, or the ``trusted.overlay.opaque`` xattr) hide
    lower contents. Hard links share one inode; device nodes are metadata only (the
    mount is ``nodev``). Since an image never changes, every attribute, directory entry,
    negative lookup and page of file data is cached by the kernel for a day.

Where bytes come from
    A file's chunks are fetched on first read with HTTP Range requests (the missed
    chunks plus a little read-ahead in blob order, adjacent ranges merged), verified
    against their ``chunkDigest`` and stored in a chunk cache on disk keyed by that
    digest, which every mount and image shares. Concurrent reads of one chunk fetch it
    once. Before the mount is announced ready the prioritized files (before the
    ``.prefetch.landmark``) are fetched in one request; afterwards, the rest is fetched
    in the background, yielding to foreground reads.

What it never does
    Return bytes that failed verification, or bytes of a fetch that failed: the read
    answers EIO and one log line says which file, which blob and why.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import functools
import json
import logging
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import trio

from warmstart.images.errors import EStargzError, FetchError, ImageError
from warmstart.images.estargz import LANDMARK_NAMES, TOC, TOCEntry, read_chunk, read_toc
from warmstart.images.lazymount import BackgroundFetch, DaemonSpec, LayerSource

log = logging.getLogger("warmstart.images.lazyfs")

# The image is immutable while mounted: let the kernel keep every answer this long.
CACHE_TIMEOUT = 24 * 3600.0
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_BLOCK = 4096
_CONSECUTIVE_BACKGROUND_FAILURES = 3


# -- where a blob's bytes come from (the seam unit tests replace) --------------------------
class BlobSource(Protocol):
    """Random access to one compressed layer blob."""

    name: str  # for log lines: where the blob lives

    def size(self) -> int: ...

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each half-open range, in order; raises on failure."""
        ...


class RegistryBlobSource:
    """A blob in a registry, read with Range requests by the shared ``RegistryClient``
    (which merges adjacent ranges, batches them into multi-range requests and retries)."""

    def __init__(self, client: Any, ref: Any, digest: str, size: int = 0) -> None:
        self.client = client
        self.ref = ref
        self.digest = digest
        self._size = size
        self.name = f"{ref.registry}/{ref.repository}@{digest}"

    def size(self) -> int:
        if not self._size:
            self._size = int(self.client.blob_size(self.ref, self.digest))
        return self._size

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return list(self.client.fetch_ranges(self.ref, self.digest, ranges))


class FileBlobSource:
    """A blob on local disk: a layer kept from an earlier pull, and tests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def size(self) -> int:
        return self.path.stat().st_size

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, end - start, start) for start, end in ranges]
        finally:
            os.close(fd)


# -- the chunk cache ----------------------------------------------------------------------
def cache_key(entry: TOCEntry) -> str:
    """The digest a data entry is cached under: its chunk digest, or for a legacy
    unchunked file without one, the file digest (which then covers the same bytes)."""
    if entry.chunk_digest:
        return entry.chunk_digest
    if entry.chunk_offset == 0 and entry.chunk_size == entry.size:
        return entry.digest
    return ""


class ChunkCache:
    """Verified chunk bytes on local disk, one file per chunk digest.

    Files are written to ``tmp/`` and renamed into place, so a reader (in this or any
    other daemon sharing the directory) sees a whole chunk or none. Only digests of the
    form ``sha256:<64 hex>`` get a path: a TOC cannot steer a write outside the cache.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path | None:
        if not _DIGEST_RE.fullmatch(digest):
            return None
        hexd = digest[7:]
        return self.root / "sha256" / hexd[:2] / hexd

    def has(self, digest: str, size: int) -> bool:
        p = self.path(digest)
        if p is None:
            return False
        try:
            return p.stat().st_size == size
        except OSError:
            return False

    def read(self, digest: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a cached chunk, or None if it is not whole."""
        p = self.path(digest)
        if p is None:
            return None
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data if len(data) == length else None

    def put(self, digest: str, data: bytes) -> bool:
        """Store verified bytes; False if the digest cannot name a cache file."""
        p = self.path(digest)
        if p is None:
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest[7:]}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return True


# -- stats --------------------------------------------------------------------------------
@dataclass
class Stats:
    """Counters the worker reads (as JSON, rewritten every ``stats_interval``).

    Mutated from fetch threads and the trio thread, hence the lock.
    """

    started: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    toc_bytes: int = 0
    toc_seconds: float = 0.0
    bytes_fetched: int = 0  # everything read from the blob sources, TOCs included
    requests: int = 0  # fetch calls (each one Range or multi-range request)
    chunks_fetched: int = 0
    chunks_cached: int = 0  # chunks this daemon wrote to the cache
    cache_hits: int = 0  # chunks a read found cached
    read_errors: int = 0
    verify_errors: int = 0
    prefetch_done: bool = False
    prefetch_bytes: int = 0
    prefetch_chunks: int = 0
    prefetch_seconds: float = 0.0
    background_enabled: bool = False
    background_done: bool = False
    background_total_bytes: int = 0
    background_cached_bytes: int = 0
    background_failed_chunks: int = 0
    seq: int = 0  # bumped on every write of the stats file
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.seq += 1
            return {
                "seq": self.seq,
                "pid": os.getpid(),
                "ready": self.ready_seconds is not None,
                "ready_seconds": self.ready_seconds,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "toc_bytes": self.toc_bytes,
                "toc_seconds": round(self.toc_seconds, 4),
                "bytes_fetched": self.bytes_fetched,
                "requests": self.requests,
                "chunks_fetched": self.chunks_fetched,
                "chunks_cached": self.chunks_cached,
                "cache_hits": self.cache_hits,
                "read_errors": self.read_errors,
                "verify_errors": self.verify_errors,
                "prefetch": {
                    "done": self.prefetch_done,
                    "bytes": self.prefetch_bytes,
                    "chunks": self.prefetch_chunks,
                    "seconds": round(self.prefetch_seconds, 4),
                },
                "background": {
                    "enabled": self.background_enabled,
                    "done": self.background_done,
                    "total_bytes": self.background_total_bytes,
                    "cached_bytes": self.background_cached_bytes,
                    "failed_chunks": self.background_failed_chunks,
                },
            }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# -- layers -------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class LEntry:
    """One entry of one layer, in the terms the filesystem answers in."""

    kind: int  # stat.S_IFREG, S_IFDIR, ...
    perm: int  # permission bits with setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    ident: Hashable = None  # names of one layer with equal ident are hard links
    target: bytes = b""  # symlink target
    chunks: Sequence[TOCEntry] = ()  # eStargz regular file data, in file order
    local: str = ""  # unpacked layer: the file on disk
    xattrs: dict[bytes, bytes] | None = None  # None: read from ``local`` when asked


class _Whiteout:
    """Marks a name deleted by a layer (hides it in every layer below)."""


WHITEOUT = _Whiteout()

_TOC_KINDS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent, base


class Layer(Protocol):
    """One layer as the merge sees it (paths are relative, "" is the root)."""

    def entry(self, path: str) -> LEntry | _Whiteout | None: ...

    def opaque(self, path: str) -> bool:
        """Whether the directory ``path`` hides the same directory in lower layers."""
        ...

    def names(self, path: str) -> Iterable[str]:
        """Candidate names in directory ``path`` (whiteout markers excluded)."""
        ...


class TOCLayer:
    """An eStargz layer: its tree from the TOC, its bytes from a :class:`BlobSource`."""

    def __init__(self, toc: TOC, source: BlobSource) -> None:
        self.toc = toc
        self.source = source
        self.entries: dict[str, LEntry] = {"": LEntry(stat.S_IFDIR, 0o755, ident="")}
        self.kids: dict[str, dict[str, None]] = {"": {}}
        self.whiteouts: set[str] = set()
        self.opaques: set[str] = set()
        # Data entries in blob order: read-ahead and background fetches walk this.
        self.data: list[TOCEntry] = sorted(
            (e for e in toc.entries if e.is_data), key=lambda e: e.offset
        )
        self.position = {e.offset: i for i, e in enumerate(self.data)}
        self.uncompressed_size = 0
        self._build()

    def _dir(self, path: str) -> None:
        """Make sure ``path`` and its parents are directories (a TOC may omit them)."""
        if path in self.kids:
            return
        parent, base = _split(path)
        self._dir(parent)
        self.kids[parent][base] = None
        self.entries[path] = LEntry(stat.S_IFDIR, 0o755, ident=path)
        self.kids[path] = {}

    def _build(self) -> None:
        links: dict[str, str] = {}
        for e in self.toc.entries:
            if e.type == "chunk":
                continue
            if e.name == "":
                if e.type == "dir":
                    self.entries[""] = self._entry(e)
                continue
            parent, base = _split(e.name)
            if parent == "" and base in LANDMARK_NAMES:
                continue  # describes the blob, not the image
            self._dir(parent)
            if base == OPAQUE_MARKER:
                self.opaques.add(parent)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                if not base.startswith(WHITEOUT_PREFIX * 2):  # other .wh..wh.* are aufs metadata
                    self.whiteouts.add(_join(parent, base[len(WHITEOUT_PREFIX) :]))
                continue
            if e.type == "hardlink":
                links[e.name] = e.link_name
                self.kids[parent][base] = None
                continue
            links.pop(e.name, None)
            entry = self._entry(e)
            if entry.kind == stat.S_IFDIR:
                self.kids.setdefault(e.name, {})
            else:
                self._drop_subtree(e.name)
            self.entries[e.name] = entry
            self.kids[parent][base] = None
        for name, target in links.items():
            resolved = target
            for _ in range(64):
                if resolved not in links:
                    break
                resolved = links[resolved]
            linked = self.entries.get(resolved)
            if linked is None or linked.kind == stat.S_IFDIR or resolved in links:
                log.warning("hard link %r → %r has no file to point at: hidden", name, target)
                parent, base = _split(name)
                self.kids[parent].pop(base, None)
                continue
            self._drop_subtree(name)
            self.entries[name] = linked
        counts: dict[int, int] = {}
        for entry in self.entries.values():
            counts[id(entry)] = counts.get(id(entry), 0) + 1
        for entry in self.entries.values():
            if entry.kind != stat.S_IFDIR:
                entry.nlink = counts[id(entry)]
                if entry.kind == stat.S_IFREG:
                    self.uncompressed_size += entry.size

    def _drop_subtree(self, path: str) -> None:
        """A later non-directory entry replaces a directory, as extracting would: what
        was under it is gone."""
        kids = self.kids.pop(path, None)
        for base in kids or ():
            child = _join(path, base)
            self.entries.pop(child, None)
            self._drop_subtree(child)

    def _entry(self, e: TOCEntry) -> LEntry:
        kind = _TOC_KINDS.get(e.type)
        if kind is None:
            raise EStargzError(f"TOC entry {e.name!r} has unexpected type {e.type!r}")
        return LEntry(
            kind=kind,
            perm=e.mode & 0o7777,
            uid=e.uid,
            gid=e.gid,
            size=e.size
            if kind == stat.S_IFREG
            else (len(os.fsencode(e.link_name)) if kind == stat.S_IFLNK else 0),
            mtime_ns=int(e.mtime * 1_000_000_000),
            rdev=os.makedev(e.dev_major, e.dev_minor)
            if kind in (stat.S_IFCHR, stat.S_IFBLK)
            else 0,
            ident=e.name,
            target=os.fsencode(e.link_name) if kind == stat.S_IFLNK else b"",
            chunks=self.toc.chunks(e.name) if kind == stat.S_IFREG else (),
            xattrs={k.encode(): v for k, v in e.xattrs.items()},
        )

    def entry(self, path: str) -> LEntry | _Whiteout | None:
        entry = self.entries.get(path)
        if entry is not None:
            return entry
        return WHITEOUT if path in self.whiteouts else None

    def opaque(self, path: str) -> bool:
        # A directory whited out and recreated in one layer also hides what is below.
        return path in self.opaques or path in self.whiteouts

    def names(self, path: str) -> Iterable[str]:
        return self.kids.get(path, {}).keys()


class DirLayer:
    """A fully pulled layer unpacked on disk, whiteouts in overlayfs form: a 0/0
    character device deletes a name, ``trusted.overlay.opaque=y`` makes a directory
    opaque. ``.wh.`` names are honoured too, for directories unpacked verbatim."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise ImageError(f"layer directory {root} does not exist")

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def entry(self, path: str) -> LEntry | _Whiteout | None:
        full = self._abs(path)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None:
            parent, base = _split(path)
            if os.path.lexists(os.path.join(self._abs(parent), WHITEOUT_PREFIX + base)):
                return WHITEOUT
            return None
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return WHITEOUT
        kind = stat.S_IFMT(st.st_mode)
        return LEntry(
            kind=kind,
            perm=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else 0,
            mtime_ns=st.st_mtime_ns,
            rdev=st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
            nlink=st.st_nlink,
            ident=(st.st_dev, st.st_ino) if kind != stat.S_IFDIR else path,
            target=os.readlink(os.fsencode(full)) if kind == stat.S_IFLNK else b"",
            local=full,
        )

    def opaque(self, path: str) -> bool:
        full = self._abs(path)
        for name in (b"trusted.overlay.opaque", b"user.overlay.opaque"):
            try:
                if os.getxattr(full, name, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                pass
        return os.path.lexists(os.path.join(full, OPAQUE_MARKER))

    def names(self, path: str) -> Iterable[str]:
        try:
            return [n for n in os.listdir(self._abs(path)) if not n.startswith(WHITEOUT_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return []


def local_xattrs(path: str) -> dict[bytes, bytes]:
    """A file's xattrs, without overlayfs's own (whiteout and opaque markers)."""
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        key = os.fsencode(name)
        if key.startswith(_OVERLAY_XATTR_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            out[key] = os.getxattr(path, name, follow_symlinks=False)
    return out


# -- the merged tree ----------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Node:
    """An inode of the merged view. Directories are merged lazily, on first use."""

    ino: int
    entry: LEntry
    layer: int  # index of the layer that provides it (its topmost)
    path: str  # merged path (for a hard-linked file: the first name seen)
    parent: int = pyfuse3.ROOT_INODE  # directories
    below: tuple[int, ...] = ()  # directories: the layers merged into it, top → bottom
    kids: dict[str, int] = field(default_factory=dict)  # name → ino, 0 = absent
    listing: list[str] | None = None
    attrs: pyfuse3.EntryAttributes | None = None
    starts: list[int] = field(default_factory=list)  # chunk offsets in the file

    @property
    def is_dir(self) -> bool:
        return self.entry.kind == stat.S_IFDIR


class Tree:
    """The merge of a layer stack (``layers[0]`` is the bottom), one node per inode.

    Resolving a name walks the parent's contributing layers top → bottom: the first
    layer holding the name decides its type; a whiteout, a non-directory, or an opaque
    directory stops the walk, so lower layers only add to directories.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = layers
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[Hashable, int] = {}
        below: list[int] = []
        top: LEntry | None = None
        top_layer = 0
        for li in range(len(layers) - 1, -1, -1):
            root = layers[li].entry("")
            if not isinstance(root, LEntry) or root.kind != stat.S_IFDIR:
                continue
            if top is None:
                top, top_layer = root, li
            below.append(li)
            if layers[li].opaque(""):
                break
        if top is None:
            raise ImageError("no layer has a root directory")
        self.root = Node(pyfuse3.ROOT_INODE, top, top_layer, "", below=tuple(below))
        self.nodes[self.root.ino] = self.root
        self._by_key[("dir", "")] = self.root.ino
        self._next_ino = pyfuse3.ROOT_INODE + 1

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def child(self, parent: Node, name: str) -> Node | None:
        cached = parent.kids.get(name)
        if cached is not None:
            return self.nodes[cached] if cached else None
        node = self._resolve(parent, name)
        parent.kids[name] = node.ino if node is not None else 0
        return node

    def _resolve(self, parent: Node, name: str) -> Node | None:
        if not name or name in (".", "..") or "/" in name or name.startswith(WHITEOUT_PREFIX):
            return None
        path = _join(parent.path, name)
        top: LEntry | None = None
        top_layer = -1
        below: list[int] = []
        for li in parent.below:
            layer = self.layers[li]
            found = layer.entry(path)
            if found is None:
                continue
            if not isinstance(found, LEntry):
                break
            if top is None:
                top, top_layer = found, li
                if found.kind != stat.S_IFDIR:
                    break
            elif found.kind != stat.S_IFDIR:
                break
            below.append(li)
            if layer.opaque(path):
                break
        if top is None:
            return None
        key: Hashable = ("dir", path) if top.kind == stat.S_IFDIR else (top_layer, top.ident)
        ino = self._by_key.get(key)
        if ino is not None:
            return self.nodes[ino]
        ino = self._next_ino
        self._next_ino += 1
        node = Node(ino, top, top_layer, path, parent=parent.ino, below=tuple(below))
        if top.chunks:
            node.starts = [c.chunk_offset for c in top.chunks]
        self.nodes[ino] = node
        self._by_key[key] = ino
        return node

    def listing(self, d: Node) -> list[str]:
        if d.listing is None:
            seen: dict[str, None] = {}
            for li in d.below:
                for name in self.layers[li].names(d.path):
                    seen.setdefault(name)
            d.listing = sorted(n for n in seen if self.child(d, n) is not None)
        return d.listing

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.attrs is None:
            e = node.entry
            a = pyfuse3.EntryAttributes()
            a.st_ino = node.ino
            a.generation = 0
            a.entry_timeout = CACHE_TIMEOUT
            a.attr_timeout = CACHE_TIMEOUT
            a.st_mode = e.kind | e.perm
            if node.is_dir:
                subdirs = sum(1 for n in self.listing(node) if self._is_dir_child(node, n))
                a.st_nlink = 2 + subdirs
            else:
                a.st_nlink = max(1, e.nlink)
            a.st_uid = e.uid
            a.st_gid = e.gid
            a.st_rdev = e.rdev
            a.st_size = e.size if not node.is_dir else _BLOCK
            a.st_blksize = _BLOCK
            a.st_blocks = (a.st_size + 511) // 512
            a.st_atime_ns = e.mtime_ns
            a.st_mtime_ns = e.mtime_ns
            a.st_ctime_ns = e.mtime_ns
            node.attrs = a
        return node.attrs

    def _is_dir_child(self, d: Node, name: str) -> bool:
        child = self.child(d, name)
        return child is not None and child.is_dir


# -- fetching -----------------------------------------------------------------------------
class _Flight:
    """One chunk being fetched; readers of the same chunk wait here instead of fetching."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


@functools.cache
def _verify_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="verify")


class Fetcher:
    """Gets chunks into the cache: on demand, ahead of time, and in the background.

    Runs on the trio thread; network and verification run in worker threads. A
    foreground fetch (a read that missed) makes background batches wait until it ends.
    """

    def __init__(
        self,
        cache: ChunkCache,
        stats: Stats,
        *,
        read_ahead: int = 64 << 10,
        background: BackgroundFetch | None = None,
    ) -> None:
        self.cache = cache
        self.stats = stats
        self.read_ahead = read_ahead
        self.background_settings = background or BackgroundFetch(enabled=False)
        self._flights: dict[str, _Flight] = {}
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_foreground = -1e9  # trio time of the last foreground fetch's end
        self.prefetched = trio.Event()  # the prioritized files are in (or failed)

    # -- the foreground --
    def touch(self) -> None:
        """A file was opened or read: the background fetch waits for a quiet spell."""
        self._last_foreground = trio.current_time()

    async def ensure(self, layer: TOCLayer, chunks: Sequence[TOCEntry]) -> None:
        """Make sure every chunk is in the cache; raise :class:`FetchError` if one of them
        cannot be fetched or does not verify."""
        want: list[TOCEntry] = []
        waits: list[_Flight] = []
        hits = 0
        for c in chunks:
            key = cache_key(c)
            flight = self._flights.get(key)
            if flight is not None:
                waits.append(flight)
            elif self.cache.has(key, c.chunk_size):
                hits += 1
            else:
                want.append(c)
        if hits:
            self.stats.add(cache_hits=hits)
        if not want and not waits:
            return
        self._foreground += 1
        self._idle = trio.Event() if self._foreground == 1 else self._idle
        try:
            if want:
                errors = await self._fetch(layer, self._plan(layer, want))
                failed = [errors[cache_key(c)] for c in want if errors.get(cache_key(c))]
                if failed:
                    raise FetchError(failed[0])
            for flight in waits:
                await flight.done.wait()
                if flight.error:
                    raise FetchError(flight.error)
        finally:
            self._foreground -= 1
            self._last_foreground = trio.current_time()
            if self._foreground == 0:
                self._idle.set()

    def _plan(self, layer: TOCLayer, want: list[TOCEntry]) -> list[TOCEntry]:
        """The missed chunks plus read-ahead: the members that follow in blob order (files
        packed next to each other are usually used together), at most ``read_ahead``
        compressed bytes, stopping at one that is cached, in flight or too big to fit."""
        chosen = {cache_key(c): c for c in want}
        last = max(want, key=lambda c: c.offset)
        i = layer.position[last.offset] + 1
        extra = 0
        while i < len(layer.data):
            e = layer.data[i]
            key = cache_key(e)
            i += 1
            if key in chosen:
                continue
            extra += e.end_offset - e.offset
            if extra > self.read_ahead or key in self._flights:
                break
            if self.cache.has(key, e.chunk_size):
                break
            chosen[key] = e
        return sorted(chosen.values(), key=lambda c: c.offset)

    def _register(self, entries: list[TOCEntry]) -> dict[str, _Flight]:
        """Flights for the chunks of ``entries`` that no other fetch carries yet."""
        flights: dict[str, _Flight] = {}
        for e in entries:
            key = cache_key(e)
            # Identical chunks (same digest) can appear at several offsets, and another
            # fetch may already carry this one: register each key once, never overwrite.
            if key not in flights and key not in self._flights:
                flights[key] = self._flights[key] = _Flight()
        return flights

    def _land(self, flights: dict[str, _Flight], key: str, error: str | None) -> None:
        """One chunk of a fetch is verified and cached (or failed): wake its readers."""
        flight = flights.get(key)
        if flight is None or flight.done.is_set():
            return
        flight.error = error
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    async def _fetch(
        self,
        layer: TOCLayer,
        entries: list[TOCEntry],
        *,
        limiter: trio.CapacityLimiter | None = None,
        abandon: bool = False,
        flights: dict[str, _Flight] | None = None,
        stream: bool = False,
    ) -> dict[str, str | None]:
        """Fetch, verify and cache ``entries`` (one call to the source, contiguous ranges
        merged); returns each chunk's error, None for success.  With ``stream``, readers
        waiting for a chunk wake as soon as that chunk is cached, not when all are."""
        if flights is None:
            flights = self._register(entries)
        notify = None
        if stream:
            token = trio.lowlevel.current_trio_token()
            registered = flights

            def notify(key: str, error: str | None) -> None:
                trio.from_thread.run_sync(
                    self._land, registered, key, error, trio_token=token
                )

        results: dict[str, str | None] = {}
        failure = "fetch cancelled"
        try:
            results = await trio.to_thread.run_sync(
                functools.partial(self._fetch_sync, layer, entries, notify),
                limiter=limiter,
                abandon_on_cancel=abandon,
            )
        except Exception as exc:
            failure = f"fetch from {layer.source.name} failed: {type(exc).__name__}: {exc}"
            log.exception("%s", failure)
            results = {key: failure for key in flights}
        finally:
            for key in list(flights):
                self._land(flights, key, results.get(key, failure))
        return results

    def _fetch_sync(
        self,
        layer: TOCLayer,
        entries: list[TOCEntry],
        notify: Callable[[str, str | None], None] | None = None,
    ) -> dict[str, str | None]:
        spans: list[list[int]] = []
        for e in entries:
            if spans and spans[-1][1] == e.offset:
                spans[-1][1] = e.end_offset
            else:
                spans.append([e.offset, e.end_offset])
        ranges = [(s, t) for s, t in spans]
        nbytes = sum(t - s for s, t in ranges)
        started = time.monotonic()
        try:
            blobs = layer.source.fetch(ranges)
            if len(blobs) != len(ranges) or any(
                len(b) != t - s for b, (s, t) in zip(blobs, ranges, strict=False)
            ):
                raise FetchError("the source answered with short or missing ranges")
        except Exception as exc:
            reason = (
                f"fetching {len(ranges)} range(s), {nbytes} bytes, of {layer.source.name} "
                f"failed: {type(exc).__name__}: {exc}"
            )
            log.error("%s", reason)
            self.stats.add(requests=1)
            return {cache_key(e): reason for e in entries}
        fetched = time.monotonic()
        self.stats.add(requests=1, bytes_fetched=nbytes)
        results: dict[str, str | None] = {}
        members: list[tuple[TOCEntry, bytes]] = []
        span_i = 0
        for e in entries:
            while ranges[span_i][1] < e.end_offset:
                span_i += 1
            start = ranges[span_i][0]
            members.append((e, blobs[span_i][e.offset - start : e.end_offset - start]))

        def store(item: tuple[TOCEntry, bytes]) -> tuple[str, str | None, bool, bool]:
            """Verify one chunk and cache it: (key, error or None, newly cached, bad)."""
            e, member = item
            key = cache_key(e)
            try:
                data = read_chunk(member, e)
            except EStargzError as exc:
                reason = f"chunk at offset {e.offset} of {layer.source.name} is bad: {exc}"
                log.error("%s", reason)
                return key, reason, False, True
            try:
                new = self.cache.put(key, data)
            except OSError as exc:
                reason = f"cannot store a chunk in the cache {self.cache.root}: {exc}"
                log.error("%s", reason)
                return key, reason, False, False
            if notify is not None:
                notify(key, None)
            return key, None, new, False

        # Decompressing, hashing and writing release the GIL: a large batch (the
        # prioritized files at mount) uses every core.
        if len(members) > 8:
            done = list(_verify_pool().map(store, members))
        else:
            done = [store(item) for item in members]
        cached = sum(1 for _, _, new, _ in done if new)
        bad = sum(1 for *_, is_bad in done if is_bad)
        for key, err, _, _ in done:
            results[key] = err
        self.stats.add(chunks_fetched=len(entries) - bad, chunks_cached=cached, verify_errors=bad)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "fetched %d bytes in %d range(s), %d chunk(s) in %.1f ms (network %.1f ms): %s",
                nbytes,
                len(ranges),
                len(entries),
                1000 * (time.monotonic() - started),
                1000 * (fetched - started),
                ", ".join(sorted({e.name for e in entries})[:8]),
            )
        return results

    # -- ahead of time --
    def plan_prefetch(
        self, layers: Sequence[TOCLayer]
    ) -> list[tuple[TOCLayer, list[TOCEntry], dict[str, _Flight]]]:
        """Claim every layer's prioritized chunks that are not cached yet: from now on a
        read of one of them waits for the prefetch instead of fetching it alone."""
        plan = []
        for layer in layers:
            end = layer.toc.prefetch_end
            if not end:
                continue
            todo: dict[str, TOCEntry] = {}
            for e in layer.data:
                if e.offset >= end:
                    break
                key = cache_key(e)
                if key not in todo and not self.cache.has(key, e.chunk_size):
                    todo[key] = e
            if todo:
                entries = list(todo.values())
                plan.append((layer, entries, self._register(entries)))
        return plan

    async def prefetch(
        self,
        layers: Sequence[TOCLayer],
        plan: list[tuple[TOCLayer, list[TOCEntry], dict[str, _Flight]]] | None = None,
    ) -> None:
        """Fetch every layer's prioritized files, one request per layer, concurrently,
        waking each reader as soon as its chunk is in (files come in first-use order)."""
        started = time.monotonic()
        if plan is None:
            plan = self.plan_prefetch(layers)

        async def one(
            layer: TOCLayer, entries: list[TOCEntry], flights: dict[str, _Flight]
        ) -> None:
            errors = await self._fetch(layer, entries, flights=flights, stream=True)
            failed = [err for err in errors.values() if err]
            if failed:
                log.warning(
                    "prefetch of %s: %d of %d chunks failed; they will be fetched on read",
                    layer.source.name,
                    len(failed),
                    len(entries),
                )
            self.stats.add(
                prefetch_chunks=len(entries) - len(failed),
                prefetch_bytes=sum(e.end_offset - e.offset for e in entries),
            )

        async with trio.open_nursery() as nursery:
            for layer, entries, flights in plan:
                nursery.start_soon(one, layer, entries, flights)
        with self.stats.lock:
            self.stats.prefetch_done = True
            self.stats.prefetch_seconds = time.monotonic() - started
        self.prefetched.set()

    async def background(self, layers: Sequence[TOCLayer]) -> None:
        """Fetch everything not cached yet, batch by batch, yielding to foreground reads
        and keeping within the configured concurrency and bandwidth."""
        bg = self.background_settings
        unique: dict[str, TOCEntry] = {}
        for layer in layers:
            for e in layer.data:
                unique.setdefault(cache_key(e), e)
        total, cached = self._cached_bytes(unique)
        with self.stats.lock:
            self.stats.background_enabled = True
            self.stats.background_total_bytes = total
            self.stats.background_cached_bytes = cached
        if bg.delay:
            await trio.sleep(bg.delay)
        limiter = trio.CapacityLimiter(bg.concurrency)
        slots = trio.Semaphore(bg.concurrency)
        started = trio.current_time()
        sent = 0
        failures = 0
        done: set[str] = set()

        async def batch_task(layer: TOCLayer, batch: list[TOCEntry]) -> None:
            nonlocal failures
            try:
                errors = await self._fetch(layer, batch, limiter=limiter, abandon=True)
            finally:
                slots.release()
            ok = sum(e.end_offset - e.offset for e in batch if not errors.get(cache_key(e)))
            bad = sum(1 for e in batch if errors.get(cache_key(e)))
            self.stats.add(background_cached_bytes=ok, background_failed_chunks=bad)
            failures = failures + 1 if bad == len(batch) else 0

        async with trio.open_nursery() as nursery:
            for layer in layers:
                i = 0
                while i < len(layer.data):
                    if failures >= _CONSECUTIVE_BACKGROUND_FAILURES:
                        log.error(
                            "background fetch stopped after %d failed batches in a row; "
                            "the rest is fetched on read",
                            failures,
                        )
                        return
                    # A starting function reads in bursts: wait for a spell without
                    # opens and reads, not just for the current fetch, so the background
                    # never competes with a start for the registry or the CPU.
                    while True:
                        while self._foreground:
                            await self._idle.wait()
                        quiet = trio.current_time() - self._last_foreground
                        if quiet >= bg.quiet:
                            break
                        await trio.sleep(bg.quiet - quiet)
                    batch: list[TOCEntry] = []
                    nbytes = 0
                    while i < len(layer.data) and nbytes < bg.batch_bytes:
                        e = layer.data[i]
                        i += 1
                        key = cache_key(e)
                        if key in done or key in self._flights:
                            continue
                        done.add(key)
                        if self.cache.has(key, e.chunk_size):
                            continue
                        batch.append(e)
                        nbytes += e.end_offset - e.offset
                    if not batch:
                        continue
                    if bg.bandwidth:
                        wait = started + sent / bg.bandwidth - trio.current_time()
                        if wait > 0:
                            await trio.sleep(wait)
                    sent += nbytes
                    await slots.acquire()
                    nursery.start_soon(batch_task, layer, batch)
        # Foreground reads fetched some chunks meanwhile: count what is really cached.
        _, cached = self._cached_bytes(unique)
        with self.stats.lock:
            self.stats.background_done = True
            self.stats.background_cached_bytes = cached
        log.info("background fetch done: %d of %d bytes cached", cached, total)

    def _cached_bytes(self, unique: dict[str, TOCEntry]) -> tuple[int, int]:
        """(compressed bytes of all these chunks, of those in the cache)."""
        total = cached = 0
        for key, e in unique.items():
            total += e.end_offset - e.offset
            if self.cache.has(key, e.chunk_size):
                cached += e.end_offset - e.offset
        return total, cached


# -- the filesystem -----------------------------------------------------------------------
def _handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn unexpected exceptions into EIO with a log line: an exception escaping a
    pyfuse3 handler would end the whole mount."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(slots=True)
class _Handle:
    node: Node
    fd: int = -1  # unpacked layers: the real file


class LazyFS(pyfuse3.Operations):
    """The pyfuse3 operations of the merged, read-only tree."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, layers: Sequence[Layer], fetcher: Fetcher) -> None:
        super().__init__()
        self.layers = layers
        self.tree = Tree(layers)
        self.fetcher = fetcher
        self.cache = fetcher.cache
        self.stats = fetcher.stats
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    @property
    def toc_layers(self) -> list[TOCLayer]:
        return [layer for layer in self.layers if isinstance(layer, TOCLayer)]

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = CACHE_TIMEOUT
        return a

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.tree.get(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self.tree.attrs(parent)
        if name == b"..":
            return self.tree.attrs(self.tree.get(parent.parent))
        node = self.tree.child(parent, os.fsdecode(name))
        return self.tree.attrs(node) if node is not None else self._negative()

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.tree.attrs(self.tree.get(inode))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.get(inode)
        if node.entry.kind != stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.get(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.tree.get(fh)
        names = self.tree.listing(d)
        for i in range(start_id, len(names) + 2):
            if i == 0:
                name, attrs = b".", self.tree.attrs(d)
            elif i == 1:
                name, attrs = b"..", self.tree.attrs(self.tree.get(d.parent))
            else:
                child = self.tree.child(d, names[i - 2])
                assert child is not None
                name, attrs = os.fsencode(names[i - 2]), self.tree.attrs(child)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.tree.get(inode)
        if node.entry.kind != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EACCES)
        self.fetcher.touch()
        handle = _Handle(node)
        if node.entry.local:
            handle.fd = os.open(node.entry.local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = handle.node
        self.fetcher.touch()
        if handle.fd >= 0:
            return os.pread(handle.fd, size, off)
        end = min(off + size, node.entry.size)
        if off >= end:
            return b""
        layer = self.layers[node.layer]
        assert isinstance(layer, TOCLayer)
        chunks = node.entry.chunks
        first = bisect.bisect_right(node.starts, off) - 1
        last = bisect.bisect_left(node.starts, end)
        needed = chunks[first:last]
        for attempt in range(2):
            try:
                await self.fetcher.ensure(layer, needed)
            except FetchError as exc:
                self.stats.add(read_errors=1)
                log.error(
                    "read of /%s (%d bytes at %d) failed, answering EIO: %s",
                    node.path,
                    size,
                    off,
                    exc,
                )
                raise pyfuse3.FUSEError(errno.EIO) from None
            parts = []
            for c in needed:
                lo = max(off, c.chunk_offset)
                hi = min(end, c.chunk_offset + c.chunk_size)
                part = self.cache.read(cache_key(c), lo - c.chunk_offset, hi - lo)
                if part is None:
                    break
                parts.append(part)
            else:
                return b"".join(parts)
            if attempt == 0:
                log.warning("chunk of /%s vanished from the cache; fetching again", node.path)
        self.stats.add(read_errors=1)
        log.error("read of /%s failed, answering EIO: the chunk cache lost it twice", node.path)
        raise pyfuse3.FUSEError(errno.EIO)

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.entry.xattrs is None:
            node.entry.xattrs = local_xattrs(node.entry.local)
        return node.entry.xattrs

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(self.tree.get(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(self.tree.get(inode)))

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = _BLOCK
        s.f_blocks = sum(t.uncompressed_size for t in self.toc_layers) // _BLOCK
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


# -- loading layers -----------------------------------------------------------------------
class _TailReader:
    """``read_range`` for :func:`read_toc` that keeps the blob's tail (TOC and footer) in
    the cache directory, so a remount after a crash needs no TOC download. The TOC is
    verified against its digest on every load, cached or not."""

    def __init__(self, source: BlobSource, cache_dir: Path, digest: str, stats: Stats) -> None:
        self.source = source
        self.stats = stats
        self.file = cache_dir / "tocs" / digest[7:] if _DIGEST_RE.fullmatch(digest) else None
        self.start = -1
        self.data = b""
        self.got: list[tuple[int, bytes]] = []
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = self.file.read_bytes()
                header, _, body = raw.partition(b"\n")
                self.start, self.data = int(header), body

    def __call__(self, start: int, end: int) -> bytes:
        if 0 <= self.start <= start and end <= self.start + len(self.data):
            return self.data[start - self.start : end - self.start]
        data = self.source.fetch([(start, end)])[0]
        self.stats.add(requests=1, bytes_fetched=len(data), toc_bytes=len(data))
        self.got.append((start, data))
        return data

    def save(self, blob_size: int) -> None:
        """Keep what was fetched if it is one contiguous run to the end of the blob."""
        if self.file is None or not self.got:
            return
        self.got.sort()
        start, data = self.got[0]
        for s, d in self.got[1:]:
            if s > start + len(data):
                return
            data = data[: s - start] + d + data[s - start + len(d) :]
        if start + len(data) != blob_size:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"%d\n" % start + data)
        os.replace(tmp, self.file)


def load_toc_layer(
    source: BlobSource, toc_digest: str, cache_dir: Path, stats: Stats, blob_digest: str = ""
) -> TOCLayer:
    """Read and verify a blob's TOC (from the cache when we have its tail) and index it."""
    reader = _TailReader(source, cache_dir, blob_digest, stats)
    size = source.size()
    try:
        toc = read_toc(reader, size, toc_digest or None)
    except EStargzError:
        if reader.start < 0:
            raise
        log.warning("cached TOC of %s is unusable: fetching it again", source.name)
        reader = _TailReader(source, cache_dir, "", stats)
        reader.file = cache_dir / "tocs" / blob_digest[7:]
        toc = read_toc(reader, size, toc_digest or None)
    if not toc_digest:
        log.warning("layer %s has no TOC digest: its TOC is not verified", source.name)
    reader.save(size)
    return TOCLayer(toc, source)


def _registry_client(spec: DaemonSpec) -> Any:
    from warmstart.images.registry import RegistryClient

    settings = spec.registry
    credentials = None
    if settings.credentials_file:
        raw = json.loads(Path(settings.credentials_file).read_text())
        credentials = {str(host): (str(pair[0]), str(pair[1])) for host, pair in raw.items()}
    return RegistryClient(
        docker_config=Path(settings.docker_config) if settings.docker_config else None,
        credentials=credentials,
        insecure=settings.insecure,
        retries=settings.retries,
        timeout=settings.timeout,
    )


def load_layers(spec: DaemonSpec, stats: Stats) -> list[Layer]:
    """Build every layer of the spec; TOCs are fetched concurrently."""
    cache_dir = Path(spec.cache_dir)
    client: Any = None
    if any(layer.kind == "estargz" for layer in spec.layers):
        client = _registry_client(spec)

    def build(layer: LayerSource) -> Layer:
        if layer.kind == "dir":
            return DirLayer(Path(layer.path))
        source: BlobSource
        if layer.kind == "file":
            source = FileBlobSource(Path(layer.path))
        else:
            from warmstart.images.reference import Reference

            source = RegistryBlobSource(
                client, Reference.parse(layer.ref), layer.digest, layer.size
            )
        return load_toc_layer(source, layer.toc_digest, cache_dir, stats, layer.digest)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(8, len(spec.layers))) as pool:
        layers = list(pool.map(build, spec.layers))
    stats.toc_seconds = time.monotonic() - started
    return layers


# -- the daemon ---------------------------------------------------------------------------
def mount_options(allow_other: bool) -> set[str]:
    opts = {
        "fsname=warmstart-lazy",
        "subtype=warmstart",
        "ro",
        "nodev",  # device nodes are metadata; opening one must not reach a host device
        "nosuid",
        "noatime",
        "default_permissions",  # the kernel checks modes, as on any filesystem
    }
    if allow_other:
        opts.add("allow_other")
    return opts


class Daemon:
    """Runs one mount: prefetch, mount, serve, background fetch, stats, stop."""

    def __init__(
        self,
        layers: Sequence[Layer],
        mountpoint: Path,
        cache: ChunkCache,
        stats: Stats,
        *,
        read_ahead: int = 64 << 10,
        background: BackgroundFetch | None = None,
        stats_path: Path | None = None,
        stats_interval: float = 0.5,
        parent_pid: int = 0,
        allow_other: bool = True,
    ) -> None:
        self.mountpoint = mountpoint
        self.stats = stats
        self.background = background or BackgroundFetch(enabled=False)
        self.fetcher = Fetcher(cache, stats, read_ahead=read_ahead, background=self.background)
        self.fs = LazyFS(layers, self.fetcher)
        self.stats_path = stats_path
        self.stats_interval = stats_interval
        self.parent_pid = parent_pid
        self.allow_other = allow_other
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = False

    def stop(self) -> None:
        """Ask the daemon to unmount and return; callable from any thread."""
        token = self._token
        if token is None:
            self._stopping = True
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop_in_loop, trio_token=token)

    def _stop_in_loop(self) -> None:
        if not self._stopping:
            self._stopping = True
            pyfuse3.terminate()

    def write_stats(self) -> None:
        if self.stats_path is not None:
            snap = self.stats.snapshot()
            snap["mountpoint"] = str(self.mountpoint)
            # What the registry client itself counted: HTTP bodies including multipart
            # framing, and every request including retries.
            clients = {
                id(t.source.client): t.source.client
                for t in self.fs.toc_layers
                if isinstance(t.source, RegistryBlobSource)
            }
            if clients:
                snap["http_bytes"] = sum(int(c.bytes_downloaded) for c in clients.values())
                snap["http_requests"] = sum(int(c.requests) for c in clients.values())
            try:
                write_json_atomic(self.stats_path, snap)
            except OSError as exc:
                log.warning("cannot write stats to %s: %s", self.stats_path, exc)

    async def _stats_loop(self) -> None:
        while True:
            self.write_stats()
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.warning("worker (pid %d) is gone: unmounting", self.parent_pid)
                self._stop_in_loop()
            await trio.sleep(self.stats_interval)

    async def _signals(self) -> None:
        stop = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*stop, signal.SIGUSR1) as sigs:
            async for signum in sigs:
                if signum == signal.SIGUSR1:  # the worker wants fresh stats
                    self.write_stats()
                    continue
                log.info("signal %d: unmounting", signum)
                self._stop_in_loop()

    async def _background(self, layers: Sequence[TOCLayer]) -> None:
        """The background fetch, contained: whatever goes wrong in it is logged and ends
        it, never the filesystem (reads then fetch on demand)."""
        try:
            await self.fetcher.prefetched.wait()
            await self.fetcher.background(layers)
        except Exception:
            log.exception("background fetch failed; the rest is fetched on read")

    async def run(
        self, on_ready: Callable[[dict[str, Any]], None], *, handle_signals: bool = False
    ) -> None:
        """Prefetch, mount, call ``on_ready`` once the mount answers, serve until stopped
        or unmounted."""
        self._token = trio.lowlevel.current_trio_token()
        # The prioritized files are claimed now and stream in after the mount is up: a
        # start begins with its first files while the rest of them still arrive.
        plan = self.fetcher.plan_prefetch(self.fs.toc_layers)
        if self._stopping:
            return
        pyfuse3.init(self.fs, str(self.mountpoint), mount_options(self.allow_other))
        try:
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    try:
                        await pyfuse3.main()
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(serve)
                if handle_signals:
                    nursery.start_soon(self._signals)
                nursery.start_soon(self.fetcher.prefetch, self.fs.toc_layers, plan)
                # A stat through the mount proves the kernel reaches our handlers.
                await trio.to_thread.run_sync(os.stat, self.mountpoint, abandon_on_cancel=True)
                self.stats.ready_seconds = time.monotonic() - self.stats.started
                self.write_stats()
                log.info(
                    "mounted %s: ready in %.3f s (TOCs %.3f s, prefetching %d chunks)",
                    self.mountpoint,
                    self.stats.ready_seconds,
                    self.stats.toc_seconds,
                    sum(len(entries) for _, entries, _ in plan),
                )
                on_ready(self.stats.snapshot())
                nursery.start_soon(self._stats_loop)
                if self.background.enabled and self.fs.toc_layers:
                    nursery.start_soon(self._background, self.fs.toc_layers)
        finally:
            self.write_stats()
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            self._token = None
            log.info("unmounted %s", self.mountpoint)


def build_daemon(spec: DaemonSpec) -> Daemon:
    """Everything before mounting: layers (TOCs verified), cache, stats."""
    stats = Stats()
    cache = ChunkCache(Path(spec.cache_dir))
    layers = load_layers(spec, stats)
    return Daemon(
        layers,
        Path(spec.mountpoint),
        cache,
        stats,
        read_ahead=spec.read_ahead,
        background=spec.background,
        stats_path=Path(spec.stats_path) if spec.stats_path else None,
        stats_interval=spec.stats_interval,
        parent_pid=spec.parent_pid,
        allow_other=spec.allow_other,
    )


def _report(fd: int | None, message: dict[str, Any]) -> None:
    """Write the one ready/error line for the parent and close the pipe."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(message).encode() + b"\n")
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m warmstart.images.lazyfs",
        description="Serve one image's layers as a lazily fetched, read-only FUSE mount.",
    )
    parser.add_argument("--spec", required=True, help="JSON mount spec file, or - for stdin")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when ready")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "pyfuse3"):  # a line per request or FUSE worker
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    ready_fd: int | None = args.ready_fd
    # Asked for fresh stats before the signal loop runs: ignore rather than die.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        raw = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        spec = DaemonSpec.from_json(json.loads(raw))
        daemon = build_daemon(spec)
    except Exception as exc:
        log.error("cannot mount: %s: %s", type(exc).__name__, exc)
        _report(ready_fd, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1

    def on_ready(snapshot: dict[str, Any]) -> None:
        nonlocal ready_fd
        _report(ready_fd, {"ready": True, **snapshot})
        ready_fd = None

    try:
        trio.run(functools.partial(daemon.run, on_ready, handle_signals=True))
    except Exception as exc:
        log.exception("lazy filesystem failed")
        _report(ready_fd, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    if ready_fd is not None:
        _report(ready_fd, {"ready": False, "error": "stopped before it was ready"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
