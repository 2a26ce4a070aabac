"""Seekable indexes of ordinary gzip layers: lazy loading without converting the image.

A plain ``tar.gz`` layer is one deflate stream: to read a file in the middle, a reader
would have to inflate everything before it. An index makes it seekable. While the layer
is inflated once, a *checkpoint* is kept at the first deflate block boundary after every
``spacing`` bytes of uncompressed data: the uncompressed offset, the compressed offset (a
byte, and how many bits of the byte before it belong to the next block) and the 32 KiB
of uncompressed data that precede it -- the window inflation needs to resume there. The
uncompressed bytes between two checkpoints are a *span*; the index records each span's
sha256. Next to the checkpoints it holds the layer's table of contents in eStargz's own
entry format (name, type, mode, owner, times, links, xattrs) with every regular file's
offset in the uncompressed tar.

A read of a file fetches, by HTTP Range requests, the compressed bytes of the spans its
bytes lie in, inflates each from its checkpoint with its window, and keeps a span (in
the chunk cache, under the span's digest) only if it hashes to the digest in the index:
a span is what a chunk is to eStargz, and every file that starts in it is then read from
the cache. The index is itself a blob named by its digest, pushed to the image's
repository as an OCI artifact whose ``subject`` is the image manifest
(:mod:`warmstart.images.indexes`).

Checkpoints are found with ``indexed_gzip`` (zran); resuming at one needs nothing but
zlib (``inflatePrime`` for a checkpoint that is not byte-aligned, through ctypes:
Python's zlib module cannot start mid-byte).

Blob layout: gzip members, concatenated::

    gzip(MAGIC | u32 length of the JSON | JSON)   the TOC member: checkpoints, entries
    gzip(window 0) gzip(window 1) ...             fetched by Range when first needed

The artifact's descriptor of each index blob carries the TOC member's size and digest, so
a mount downloads the TOC member alone; a window is fetched (and checked against its
sha256 in the TOC) the first time a read resumes at its checkpoint.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, cast

from isal import isal_zlib

from warmstart.images.errors import ChunkDigestError, CorruptLayer, EStargzError
from warmstart.images.estargz import TOC, TOCEntry, parse_index_entry, tar_toc_entry

MAGIC = b"WSGZIX01"
INDEX_MEDIA_TYPE = "application/vnd.warmstart.gzip-index.v1+gzip"
ARTIFACT_TYPE = "application/vnd.warmstart.gzip-index.v1"
# The annotation on each index blob's descriptor naming the layer it indexes.
LAYER_ANNOTATION = "dev.warmstart.gzip-index.layer"
# ... and the size and sha256 of the index blob's first gzip member (its TOC).
TOC_SIZE_ANNOTATION = "dev.warmstart.gzip-index.toc-size"
TOC_DIGEST_ANNOTATION = "dev.warmstart.gzip-index.toc-digest"
WINDOW_SIZE = 32 << 10
MIN_SPACING = 2 * WINDOW_SIZE
DEFAULT_SPACING = 256 << 10  # uncompressed bytes between checkpoints (at least)
MAX_INDEX_SIZE = 512 << 20  # decompressed
MAX_JSON = 256 << 20
MAX_SPAN = 256 << 20  # uncompressed bytes of one span

_GZIP_ERRORS: tuple[type[Exception], ...] = (
    cast("type[Exception]", isal_zlib.IsalError),
    zlib.error,
    EOFError,
    ValueError,
)


_INFLATE_ERRORS: tuple[type[Exception], ...] = (*_GZIP_ERRORS, EStargzError)


class IndexError_(EStargzError):
    """An index blob is malformed, or does not describe the layer it claims to."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A place where inflation of the layer can resume."""

    uncompressed: int  # offset in the uncompressed tar
    compressed: int  # the first whole byte of the block that starts here
    bits: int  # bits of the byte before ``compressed`` that belong to the block (0..7)
    window_size: int = 0  # bytes of window (0 at the start of a gzip member)
    window_at: int = 0  # where the window's gzip member is in the index blob
    window_len: int = 0  # that member's length
    window_digest: str = ""  # sha256 of the window
    span_size: int = 0  # uncompressed bytes from here to the next checkpoint
    span_end: int = 0  # the compressed byte after the last one the span needs
    span_digest: str = ""  # sha256 of the span

    @property
    def start(self) -> int:
        """The first compressed byte to fetch to resume here."""
        return self.compressed - (1 if self.bits else 0)


@dataclass
class SpanEntry(TOCEntry):
    """The piece of a regular file that lies in one span of an indexed layer.

    ``chunk_offset``/``chunk_size`` place the piece in its file, as for an eStargz chunk;
    ``chunk_digest`` is the digest of the whole span (the chunk cache keeps spans),
    ``span_offset`` where the piece starts in it, ``point`` the span's checkpoint, and
    ``offset``/``end_offset`` the span's compressed bytes."""

    inner: int = 0  # where the piece starts in the uncompressed tar
    point: int = 0
    span_offset: int = 0
    span_size: int = 0

    @property
    def order(self) -> tuple[int, int]:
        return (self.offset, self.inner)

    @property
    def cached_size(self) -> int:
        return self.span_size

    @property
    def cache_offset(self) -> int:
        return self.span_offset


@dataclass
class GzipIndex:
    """A parsed, checked index of one layer (its windows are fetched when needed)."""

    layer_digest: str
    layer_size: int
    uncompressed_size: int
    spacing: int
    checkpoints: list[Checkpoint]
    toc: TOC
    prioritized: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BuiltIndex:
    """An index blob as pushed: the TOC member first (``toc_size`` bytes, hashing to
    ``toc_digest``: what a reader fetches at mount), then one gzip member per window."""

    blob: bytes
    toc_size: int
    toc_digest: str


class _ZStream(ctypes.Structure):
    # zlib's z_stream, as zlib.h declares it
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


@functools.cache
def _libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    return lib


class Inflater:
    """Inflation resuming at a checkpoint, over compressed bytes that start at
    ``point.start``: :meth:`read` gives the next uncompressed bytes. Crosses gzip members.

    A byte-aligned checkpoint inflates with Python's zlib; one that starts mid-byte needs
    zlib's ``inflatePrime`` (through ctypes: Python's zlib cannot start mid-byte) until
    the end of its deflate stream, then Python's zlib takes over."""

    def __init__(self, point: Checkpoint, window: bytes, data: bytes) -> None:
        if len(window) != point.window_size:
            raise EStargzError("checkpoint window has the wrong size")
        self.data = data
        self.taken = 0  # input consumed by the zlib module's streams, finished or current
        self._d: Any = None
        self._raw = True  # the stream in progress is the raw deflate of the checkpoint
        self._strm: _ZStream | None = None
        self._src: Any = None
        if point.bits and data:
            self._start_primed(point, window)
        else:
            self._d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)

    def _start_primed(self, point: Checkpoint, window: bytes) -> None:
        lib = _libz()
        strm = _ZStream()
        ref = ctypes.byref(strm)
        if lib.inflateInit2_(ref, -15, lib.zlibVersion(), ctypes.sizeof(_ZStream)) != 0:
            raise EStargzError("zlib could not start inflating")
        self._strm = strm
        if lib.inflatePrime(ref, point.bits, self.data[0] >> (8 - point.bits)) != 0:
            self.close()
            raise EStargzError("zlib refused the checkpoint's bits")
        if window:
            win = ctypes.create_string_buffer(window, len(window))
            if lib.inflateSetDictionary(ref, win, len(window)) != 0:
                self.close()
                raise EStargzError("zlib refused the checkpoint's window")
        self._src = ctypes.create_string_buffer(self.data, len(self.data))
        strm.next_in = ctypes.addressof(self._src) + 1
        strm.avail_in = len(self.data) - 1

    def close(self) -> None:
        if self._strm is not None:
            _libz().inflateEnd(ctypes.byref(self._strm))
            self._strm = None
            self._src = None

    def __del__(self) -> None:
        self.close()

    def _read_primed(self, n: int) -> bytes:
        strm = self._strm
        assert strm is not None
        out = ctypes.create_string_buffer(n)
        strm.next_out = ctypes.addressof(out)
        strm.avail_out = n
        ret = _libz().inflate(ctypes.byref(strm), 0)
        if ret not in (0, 1, -5):  # Z_OK, Z_STREAM_END, Z_BUF_ERROR (input ran out)
            self.close()
            raise EStargzError(f"invalid deflate data (zlib error {ret})")
        produced = n - int(strm.avail_out)
        if ret == 1:  # the member's deflate stream ended: on with the zlib module
            self.taken = len(self.data) - int(strm.avail_in)
            self.close()
            self._d = None
        return out.raw[:produced]

    def read(self, n: int) -> bytes:
        """Up to ``n`` more uncompressed bytes (fewer only where the input ends)."""
        parts: list[bytes] = []
        while n > 0:
            if self._strm is not None:
                part = self._read_primed(n)
                if not part and self._strm is not None:
                    break  # input exhausted
            elif self._d is None:
                if self._raw:
                    self.taken += 8  # the finished member's trailer
                    self._raw = False
                if len(self.data) - self.taken < 10:
                    break
                self._d = zlib.decompressobj(31)
                continue
            else:
                d = self._d
                given = self.data[self.taken :] if self.taken else self.data
                part = d.decompress(given, n)
                used = len(given) - len(d.unconsumed_tail) - (len(d.unused_data) if d.eof else 0)
                self.taken += used
                if d.eof:
                    self._d = None
                elif not part:
                    break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)


def read_span(point: Checkpoint, window: bytes, blob: bytes, blob_start: int) -> bytes:
    """The span that starts at checkpoint ``point`` (whose ``window`` is given), inflated
    from compressed bytes starting at ``blob_start`` that cover it, and verified.

    Raises :class:`ChunkDigestError` if it does not hash to the index's digest,
    :class:`EStargzError` if the bytes do not inflate or end too soon."""
    try:
        inflater = Inflater(point, window, blob[point.start - blob_start :])
        try:
            data = inflater.read(point.span_size)
        finally:
            inflater.close()
    except _INFLATE_ERRORS as exc:
        raise EStargzError(
            f"span at compressed offset {point.start} does not inflate: {exc}"
        ) from exc
    if len(data) != point.span_size:
        raise EStargzError(
            f"span at compressed offset {point.start} is truncated "
            f"({len(data)} of {point.span_size} bytes)"
        )
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != point.span_digest:
        raise ChunkDigestError(
            f"span at compressed offset {point.start}: expected {point.span_digest}, got {got}"
        )
    return data


def read_window(point: Checkpoint, member: bytes) -> bytes:
    """A checkpoint's window from its gzip member in the index blob, verified."""
    try:
        window = isal_zlib.decompressobj(31).decompress(member, WINDOW_SIZE + 1)
    except _GZIP_ERRORS as exc:
        raise IndexError_(f"window at {point.window_at} of the index is not gzip: {exc}") from exc
    if "sha256:" + hashlib.sha256(window).hexdigest() != point.window_digest:
        raise IndexError_(f"window at {point.window_at} of the index does not match its digest")
    return window


# -- writing ----------------------------------------------------------------------------------
def _parse_zran_export(raw: bytes) -> tuple[int, list[tuple[Checkpoint, bytes]]]:
    """(uncompressed size, checkpoints) from ``indexed_gzip``'s exported index."""
    head = struct.Struct("<5sBBQQIII")
    if len(raw) < head.size:
        raise IndexError_("the zran index is truncated")
    ident, version, _flags, _csize, usize, _spacing, window, npoints = head.unpack_from(raw)
    if ident != b"GZIDX" or version > 1:
        raise IndexError_(f"unexpected zran index format {ident!r} v{version}")
    point = struct.Struct("<QQBB") if version >= 1 else struct.Struct("<QQB")
    pos = head.size
    raw_points = []
    for _ in range(npoints):
        fields = point.unpack_from(raw, pos)
        pos += point.size
        has_data = fields[3] if version >= 1 else int(fields[1] > 0)
        raw_points.append((fields[0], fields[1], fields[2], has_data))
    points = []
    for cmp, uncmp, bits, has_data in raw_points:
        win = b""
        if has_data:
            win = raw[pos : pos + window]
            pos += window
        points.append((Checkpoint(uncmp, cmp, bits, window_size=len(win)), win))
    return usize, points


class _SpanHasher(io.RawIOBase):
    """The uncompressed layer, read once in order: hashes each span as it goes by."""

    def __init__(self, raw: IO[bytes], ends: list[int]) -> None:
        self.raw = raw
        self.ends = ends
        self.digests: list[str] = []
        self.pos = 0
        self._h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if not n:
            return 0
        view = memoryview(buffer)[:n]
        while view and len(self.digests) < len(self.ends):
            take = min(len(view), self.ends[len(self.digests)] - self.pos)
            self._h.update(view[:take])
            self.pos += take
            view = view[take:]
            self._close_spans()
        return int(n)

    def _close_spans(self) -> None:
        while len(self.digests) < len(self.ends) and self.pos == self.ends[len(self.digests)]:
            self.digests.append("sha256:" + self._h.hexdigest())
            self._h = hashlib.sha256()


class _Counting(io.RawIOBase):
    """A readable file that reports how many bytes were read from it."""

    def __init__(self, raw: IO[bytes], seen: Callable[[int], None]) -> None:
        self.raw = raw
        self.seen = seen

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.seen(self.raw.tell())
        return int(n or 0)


def build_index(
    blob: IO[bytes],
    layer_digest: str,
    layer_size: int,
    *,
    spacing: int = DEFAULT_SPACING,
    prioritized: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> BuiltIndex:
    """Index a seekable gzip layer blob: one pass finds the checkpoints (at block
    boundaries, every ``spacing`` uncompressed bytes or more), a second walks the tar and
    hashes the spans.

    ``progress`` is told how many compressed bytes the second pass read so far. Raises
    :class:`CorruptLayer` if the blob is not a gzip-compressed tar."""
    import indexed_gzip  # type: ignore[import-untyped]

    if spacing < MIN_SPACING:
        raise ValueError(f"spacing must be at least {MIN_SPACING} bytes")
    # Pass 1: the checkpoints (zran, in C).
    try:
        gz = indexed_gzip.IndexedGzipFile(
            fileobj=blob, spacing=spacing, window_size=WINDOW_SIZE, readbuf_size=1 << 20
        )
        try:
            gz.build_full_index()
            exported = io.BytesIO()
            gz.export_index(fileobj=exported)
        finally:
            gz.close()
    except Exception as exc:
        raise CorruptLayer(f"layer {layer_digest} is not gzip: {exc}") from exc
    usize, points = _parse_zran_export(exported.getvalue())
    # A checkpoint at the very end (zran places one at a stream's end) starts no span.
    points = [pt for pt in points if pt[0].uncompressed < usize] or points[:1]
    # Pass 2: the tar's members and the spans' digests, in one sequential read.
    from isal import igzip

    blob.seek(0)
    source: IO[bytes] = blob
    if progress is not None:
        source = io.BufferedReader(_Counting(blob, progress), 1 << 20)
    ends = [p.uncompressed for p, _ in points[1:]] + [usize]
    entries: list[dict[str, Any]] = []
    try:
        with igzip.IGzipFile(fileobj=source, mode="rb") as unzipped:  # type: ignore[no-untyped-call]
            hasher = _SpanHasher(cast("IO[bytes]", unzipped), ends)
            stream = io.BufferedReader(hasher, 1 << 20)
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for info in tf:
                    entry = tar_toc_entry(info)
                    if entry is None:
                        continue
                    entries.append(entry)
                    if entry["type"] == "reg" and info.size:
                        entry["innerOffset"] = info.offset_data
            while stream.read(1 << 20):  # what follows the end-of-archive blocks
                pass
            hasher._close_spans()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CorruptLayer(f"layer {layer_digest} is not a gzip-compressed tar: {exc}") from exc
    if hasher.pos != usize or len(hasher.digests) != len(points):
        raise CorruptLayer(f"layer {layer_digest} changed while it was indexed")
    digests = hasher.digests
    # Windows: one gzip member each after the TOC member; their places go in the TOC, so
    # it is written last and the windows' offsets are relative to the TOC's end.
    members = [isal_zlib.compress(w, 1, wbits=31) if w else b"" for _, w in points]
    offsets = []
    at = 0
    for m in members:
        offsets.append(at)
        at += len(m)
    checkpoints = []
    for i, (p, w) in enumerate(points):
        last = i + 1 == len(points)
        span_end = layer_size if last else min(layer_size, points[i + 1][0].compressed + 1)
        span_size = (usize if last else points[i + 1][0].uncompressed) - p.uncompressed
        checkpoints.append(
            [
                p.uncompressed,
                p.compressed,
                p.bits,
                len(w),
                offsets[i],
                len(members[i]),
                "sha256:" + hashlib.sha256(w).hexdigest() if w else "",
                span_size,
                span_end,
                digests[i],
            ]
        )
    doc = {
        "version": 1,
        "layer": layer_digest,
        "layerSize": layer_size,
        "uncompressedSize": usize,
        "spacing": spacing,
        "checkpoints": checkpoints,
        "prioritized": list(prioritized),
        "entries": entries,
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    toc = isal_zlib.compress(MAGIC + struct.pack("<I", len(body)) + body, 1, wbits=31)
    return BuiltIndex(
        blob=toc + b"".join(members),
        toc_size=len(toc),
        toc_digest="sha256:" + hashlib.sha256(toc).hexdigest(),
    )


# -- reading the blob -------------------------------------------------------------------------
def _int(value: Any, what: str, maximum: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise IndexError_(f"index field {what} is not an integer in range: {value!r}")
    return value


def parse_index(toc_member: bytes, layer_digest: str, layer_size: int) -> GzipIndex:
    """Parse and check an index's TOC member (already verified against its digest; the
    whole blob will do too) for the layer ``layer_digest`` of ``layer_size`` compressed
    bytes. Everything a hostile index could use to make a reader misbehave is refused:
    offsets outside the layer, checkpoints out of order, chunks that do not tile their
    file, names that climb out (the TOC parser's rules)."""
    try:
        d = isal_zlib.decompressobj(31)
        raw = d.decompress(toc_member, MAX_INDEX_SIZE + 1)
    except _GZIP_ERRORS as exc:
        raise IndexError_(f"index is not gzip: {exc}") from exc
    if len(raw) > MAX_INDEX_SIZE:
        raise IndexError_("index decompresses to more than allowed")
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise IndexError_("not a warmstart gzip index")
    (n,) = struct.unpack_from("<I", raw, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_JSON or start + n > len(raw):
        raise IndexError_("index JSON is truncated")
    try:
        doc = json.loads(raw[start : start + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexError_(f"index JSON is bad: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise IndexError_("unsupported index version")
    if doc.get("layer") != layer_digest:
        raise IndexError_(f"index is for layer {doc.get('layer')!r}, not {layer_digest}")
    if _int(doc.get("layerSize"), "layerSize") != layer_size:
        raise IndexError_("index was built for a layer of another size")
    usize = _int(doc.get("uncompressedSize"), "uncompressedSize")
    spacing = _int(doc.get("spacing", 0), "spacing")
    raw_points = doc.get("checkpoints")
    if not isinstance(raw_points, list) or not raw_points:
        raise IndexError_("index has no checkpoints")
    points: list[Checkpoint] = []
    for item in raw_points:
        if not isinstance(item, list) or len(item) != 10:
            raise IndexError_("bad checkpoint")
        u = _int(item[0], "checkpoint uncompressed offset", usize)
        c = _int(item[1], "checkpoint compressed offset", layer_size)
        bits = _int(item[2], "checkpoint bits", 7)
        wsize = _int(item[3], "checkpoint window", WINDOW_SIZE)
        wat = _int(item[4], "window offset", MAX_INDEX_SIZE)
        wlen = _int(item[5], "window length", 2 * WINDOW_SIZE)
        wdigest, sdigest = item[6], item[9]
        if not isinstance(wdigest, str) or (wsize and not wdigest.startswith("sha256:")):
            raise IndexError_("bad window digest")
        if not isinstance(sdigest, str) or not sdigest.startswith("sha256:"):
            raise IndexError_("bad span digest")
        span_size = _int(item[7], "span size", MAX_SPAN)
        span_end = _int(item[8], "span end", layer_size)
        if c == 0 or (points and (u <= points[-1].uncompressed or c < points[-1].compressed)):
            raise IndexError_("checkpoints are out of order")
        if points and points[-1].uncompressed + points[-1].span_size != u:
            raise IndexError_("spans do not tile the layer")
        if span_end <= c - (1 if bits else 0):
            raise IndexError_("a span ends before its checkpoint")
        points.append(
            Checkpoint(u, c, bits, wsize, wat, wlen, wdigest, span_size, span_end, sdigest)
        )
    if points[0].uncompressed != 0:
        raise IndexError_("the first checkpoint is not at the start of the layer")
    if points[-1].uncompressed + points[-1].span_size != usize:
        raise IndexError_("spans do not tile the layer")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise IndexError_("index has no entries list")
    prioritized = doc.get("prioritized") or []
    if not isinstance(prioritized, list) or not all(isinstance(p, str) for p in prioritized):
        raise IndexError_("bad prioritized list")
    starts = [p.uncompressed for p in points]
    entries: list[TOCEntry] = []
    chunks: dict[str, list[TOCEntry]] = {}
    for item in raw_entries:
        base = parse_index_entry(item)
        if base.type == "chunk":
            raise IndexError_(f"an index lists no chunks ({base.name!r})")
        if base.type != "reg":
            chunks.pop(base.name, None)
            entries.append(base)
            continue
        chunks[base.name] = []
        if base.size == 0:
            entries.append(base)
            continue
        inner = _int(item.get("innerOffset"), "innerOffset", usize)
        if inner + base.size > usize:
            raise IndexError_(f"{base.name!r} is outside the layer")
        # One piece per span the file's bytes lie in.
        i = max(0, bisect.bisect_right(starts, inner) - 1)
        done = 0
        while done < base.size:
            point = points[i]
            at = inner + done - point.uncompressed
            n = min(base.size - done, point.span_size - at)
            e = SpanEntry(**{k: getattr(base, k) for k in TOCEntry.__dataclass_fields__})
            if done:
                e.type = "chunk"
            e.chunk_offset = done
            e.chunk_size = n
            e.chunk_digest = point.span_digest
            e.digest = ""
            e.inner = inner + done
            e.point = i
            e.span_offset = at
            e.span_size = point.span_size
            e.offset = point.start
            e.end_offset = point.span_end
            chunks[base.name].append(e)
            entries.append(e)
            done += n
            i += 1
    # Windows are placed after the TOC member: make their offsets absolute.
    toc_size = len(toc_member) - len(d.unused_data)
    points = [dataclasses.replace(p, window_at=p.window_at + toc_size) for p in points]
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    toc = TOC(version=1, entries=entries, digest=digest, prefetch_end=None, _chunks=chunks)
    return GzipIndex(
        layer_digest=layer_digest,
        layer_size=layer_size,
        uncompressed_size=usize,
        spacing=spacing,
        checkpoints=points,
        toc=toc,
        prioritized=[str(p) for p in prioritized],
    )
