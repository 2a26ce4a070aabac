"""One layer of an image, as the merge sees it: entries by path, whiteouts, opaque dirs.

Two kinds: :class:`TOCLayer`, an eStargz blob whose tree comes from its verified TOC (no
content fetched to list or stat anything), and :class:`DirLayer`, a layer pulled in full
and unpacked on disk with overlayfs whiteouts. Paths are relative; ``""`` is the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from warmstart.images.errors import EStargzError, ImageError
from warmstart.images.estargz import LANDMARK_NAMES, TOC, TOCEntry, read_chunk
from warmstart.images.gzindex import GzipIndex, SpanEntry, read_span, read_window
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.sources import BlobSource

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")


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


class Whiteout:
    """Marks a name deleted by a layer (hides it in every layer below)."""


WHITEOUT = Whiteout()

_TOC_KINDS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


_MAX_NS = (1 << 63) - 1


def _mtime_ns(mtime: float) -> int:
    """A TOC's time as the kernel takes it, the way an unpacked layer has it: before 1970
    (Go writes year 1 for a zero time) is 1970, past 2262 is the last time there is."""
    if not mtime > 0:
        return 0
    return min(int(mtime * 1_000_000_000), _MAX_NS)


def join_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split_path(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent, base


def members_of(
    entries: Sequence[TOCEntry], ranges: Sequence[tuple[int, int]], blobs: Sequence[bytes]
) -> list[tuple[TOCEntry, bytes]]:
    """Each entry with its compressed member, cut from the bytes fetched for
    ``blob_ranges(entries)``."""
    members: list[tuple[TOCEntry, bytes]] = []
    span_i = 0
    for e in entries:
        while ranges[span_i][1] < e.end_offset:
            span_i += 1
        start = ranges[span_i][0]
        members.append((e, blobs[span_i][e.offset - start : e.end_offset - start]))
    return members


class Layer(Protocol):
    """One layer as the merge sees it (paths are relative, "" is the root)."""

    def entry(self, path: str) -> LEntry | Whiteout | None: ...

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
            (e for e in toc.entries if e.is_data), key=lambda e: e.order
        )
        self.position = {id(e): i for i, e in enumerate(self.data)}
        self.uncompressed_size = 0
        self._build()

    def _dir(self, path: str) -> None:
        """Make sure ``path`` and its parents are directories (a TOC may omit them)."""
        if path in self.kids:
            return
        parent, base = split_path(path)
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
            parent, base = split_path(e.name)
            if parent == "" and base in LANDMARK_NAMES:
                continue  # describes the blob, not the image
            self._dir(parent)
            if base == OPAQUE_MARKER:
                self.opaques.add(parent)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                hidden = base[len(WHITEOUT_PREFIX) :]
                # other .wh..wh.* are aufs metadata; ".wh." alone names nothing (and would
                # otherwise whiteout its own directory: at the top, every lower layer)
                if not base.startswith(WHITEOUT_PREFIX * 2) and hidden not in ("", ".", ".."):
                    self.whiteouts.add(join_path(parent, hidden))
                continue
            if e.type == "hardlink":
                links[e.name] = e.link_name
                self.kids[parent][base] = None
                continue
            links.pop(e.name, None)
            entry = self._entry(e)
            if entry.kind == stat.S_IFDIR:
                self.kids.setdefault(e.name, {})
            elif e.name in self.kids:  # a directory replaced: hard links in it go too
                self._drop_subtree(e.name)
                prefix = e.name + "/"
                for gone in [n for n in links if n.startswith(prefix)]:
                    del links[gone]
            self.entries[e.name] = entry
            self.kids[parent][base] = None
        for name, target in links.items():
            if split_path(name)[0] not in self.kids:
                continue  # its directory was replaced by a later entry (or another link)
            resolved = target
            for _ in range(64):
                if resolved not in links:
                    break
                resolved = links[resolved]
            linked = self.entries.get(resolved)
            if linked is None or linked.kind == stat.S_IFDIR or resolved in links:
                log.warning("hard link %r → %r has no file to point at: hidden", name, target)
                parent, base = split_path(name)
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
            child = join_path(path, base)
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
            mtime_ns=_mtime_ns(e.mtime),
            rdev=os.makedev(e.dev_major, e.dev_minor)
            if kind in (stat.S_IFCHR, stat.S_IFBLK)
            else 0,
            ident=e.name,
            target=os.fsencode(e.link_name) if kind == stat.S_IFLNK else b"",
            chunks=self.toc.chunks(e.name) if kind == stat.S_IFREG else (),
            xattrs={k.encode(): v for k, v in e.xattrs.items()},
        )

    def entry(self, path: str) -> LEntry | Whiteout | None:
        entry = self.entries.get(path)
        if entry is not None:
            return entry
        return WHITEOUT if path in self.whiteouts else None

    def prioritized(self) -> list[TOCEntry]:
        """The chunks fetched in one request when the mount goes up, in blob order: those
        before the ``.prefetch.landmark``."""
        end = self.toc.prefetch_end
        if not end:
            return []
        return [e for e in self.data if e.offset < end]

    def prepare(self, entries: Sequence[TOCEntry]) -> None:
        """Whatever decoding these chunks needs besides their bytes (nothing here)."""

    def units(
        self, entries: Sequence[TOCEntry], ranges: Sequence[tuple[int, int]], blobs: Sequence[bytes]
    ) -> list[tuple[list[TOCEntry], bytes]]:
        """The fetched bytes cut into what is decoded at once: one gzip member per chunk."""
        return [([e], member) for e, member in members_of(entries, ranges, blobs)]

    def decode(
        self, unit: tuple[list[TOCEntry], bytes]
    ) -> list[tuple[TOCEntry, bytes | Exception]]:
        """Each chunk's verified bytes from its unit, or the error saying why not."""
        [entry], member = unit
        try:
            return [(entry, read_chunk(member, entry))]
        except EStargzError as exc:
            return [(entry, exc)]

    def opaque(self, path: str) -> bool:
        # A directory whited out and recreated in one layer also hides what is below.
        return path in self.opaques or path in self.whiteouts

    def names(self, path: str) -> Iterable[str]:
        return self.kids.get(path, {}).keys()


class IndexLayer(TOCLayer):
    """An ordinary gzip layer with a gzip index: its tree from the index's entries, each
    file chunk inflated from the checkpoint before it (:mod:`warmstart.images.gzindex`).

    Checkpoint windows come from the index blob (``windows``) the first time a read
    resumes there, verified, and stay in memory and in the chunk cache (by digest)."""

    def __init__(
        self,
        index: GzipIndex,
        source: BlobSource,
        windows: BlobSource,
        cache: ChunkCache | None = None,
    ) -> None:
        self.index = index
        self.windows = windows
        self.cache = cache
        self._windows: dict[int, bytes] = {}
        self._lock = threading.Lock()
        super().__init__(index.toc, source)

    def prioritized(self) -> list[TOCEntry]:
        names = set(self.index.prioritized)
        return [e for e in self.data if e.name in names]

    def prepare(self, entries: Sequence[TOCEntry]) -> None:
        """Fetch the windows these chunks' spans resume from, all in one request."""
        self._fetch_windows({e.point for e in entries if isinstance(e, SpanEntry)})

    def _fetch_windows(self, wanted: set[int]) -> None:
        points = self.index.checkpoints
        want: list[int] = []
        for i in sorted(wanted):
            if i in self._windows or not points[i].window_size:
                continue
            cached = self._cached_window(i)
            if cached is not None:
                self._windows[i] = cached
                continue
            want.append(i)
        if not want:
            return
        ranges = [(points[i].window_at, points[i].window_at + points[i].window_len) for i in want]
        for i, member in zip(want, self.windows.fetch(ranges), strict=True):
            window = read_window(points[i], member)
            with self._lock:
                self._windows[i] = window
            if self.cache is not None:
                with contextlib.suppress(OSError):
                    self.cache.put(points[i].window_digest, window)

    def _cached_window(self, i: int) -> bytes | None:
        point = self.index.checkpoints[i]
        if self.cache is None:
            return None
        data = self.cache.read(point.window_digest, 0, point.window_size)
        if data is None:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != point.window_digest:
            return None
        return data

    def window(self, i: int) -> bytes:
        """Checkpoint ``i``'s window (empty at a gzip member's start)."""
        if not self.index.checkpoints[i].window_size:
            return b""
        found = self._windows.get(i)
        if found is None:
            self._fetch_windows({i})
            found = self._windows[i]
        return found

    def units(
        self, entries: Sequence[TOCEntry], ranges: Sequence[tuple[int, int]], blobs: Sequence[bytes]
    ) -> list[tuple[list[TOCEntry], bytes]]:
        """One unit per span: the pieces of files that lie in it share its bytes."""
        groups: dict[int, tuple[list[TOCEntry], bytes]] = {}
        for e, member in members_of(entries, ranges, blobs):
            point = e.point if isinstance(e, SpanEntry) else -1
            group = groups.get(point)
            if group is None:
                groups[point] = ([e], member)
            else:
                group[0].append(e)
        return list(groups.values())

    def decode(
        self, unit: tuple[list[TOCEntry], bytes]
    ) -> list[tuple[TOCEntry, bytes | Exception]]:
        """The span, inflated once and verified, under the first piece (they share the
        span's digest, the key the cache keeps it under)."""
        entries, member = unit
        first = entries[0]
        if not isinstance(first, SpanEntry):
            return [(first, EStargzError("an indexed layer's chunk has no span"))]
        point = self.index.checkpoints[first.point]
        try:
            window = self.window(first.point)
        except Exception as exc:  # the index blob's source failed, or a window is bad
            bad = EStargzError(f"the window of checkpoint {first.point} is not available: {exc}")
            return [(first, bad)]
        try:
            return [(first, read_span(point, window, member, point.start))]
        except EStargzError as exc:
            return [(first, exc)]


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

    def entry(self, path: str) -> LEntry | Whiteout | None:
        full = self._abs(path)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None:
            parent, base = split_path(path)
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
