"""Seekable indexes of ordinary gzip layers: lazy loading without converting the image.

A plain ``tar.gz`` layer is one deflate stream: to read a file in the middle, a reader
would have to inflate everything before it. An index makes it seekable. While the layer
is inflated once, a *checkpoint* is kept every ``spacing`` bytes of uncompressed data at
a deflate block boundary: the uncompressed offset, the compressed offset (a byte, and
how many bits of the byte before it belong to the next block) and the 32 KiB of
uncompressed data that precede it -- the window inflation needs to resume there. Next to
the checkpoints the index holds a table of contents in eStargz's own entry format (name,
type, mode, owner, times, links, xattrs), and for every regular file its chunks (at most
:data:`CHUNK_SIZE` each) with their offset in the uncompressed tar and their sha256.

A reader of one file chunk fetches, by an HTTP Range request, the compressed bytes from
the checkpoint before the chunk to the checkpoint after it, inflates from the checkpoint
with its window, and keeps the chunk only if it hashes to the digest in the index. The
index is itself a blob named by its digest: it is pushed to the image's repository as an
OCI artifact whose ``subject`` is the image manifest (:mod:`.gzindex_registry`).

Checkpoints are found with ``indexed_gzip`` (zran); resuming at one needs nothing but
zlib (``inflatePrime`` for a checkpoint that is not byte-aligned, through ctypes:
Python's zlib module cannot start mid-byte).

Blob layout (gzip-compressed as a whole)::

    MAGIC | u32 length of the JSON | JSON (checkpoints, entries) | windows, in order
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
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
WINDOW_SIZE = 32 << 10
DEFAULT_SPACING = 2 << 20
CHUNK_SIZE = 1 << 20
MAX_INDEX_SIZE = 512 << 20  # decompressed
MAX_JSON = 256 << 20

_GZIP_ERRORS: tuple[type[Exception], ...] = (
    cast("type[Exception]", isal_zlib.IsalError),
    zlib.error,
    EOFError,
    ValueError,
)


class IndexError_(EStargzError):
    """An index blob is malformed, or does not describe the layer it claims to."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A place where inflation of the layer can resume."""

    uncompressed: int  # offset in the uncompressed tar
    compressed: int  # the first whole byte of the block that starts here
    bits: int  # bits of the byte before ``compressed`` that belong to the block (0..7)
    window: bytes  # the uncompressed bytes just before (empty at a gzip member's start)

    @property
    def start(self) -> int:
        """The first compressed byte to fetch to resume here."""
        return self.compressed - (1 if self.bits else 0)


@dataclass
class SpanEntry(TOCEntry):
    """A file chunk of an indexed layer: ``inner`` is its offset in the uncompressed tar,
    ``point`` the checkpoint inflation resumes from; ``offset``/``end_offset`` are the
    compressed bytes from that checkpoint to the one after the chunk's end."""

    inner: int = 0
    point: int = 0
    share: int = 0  # the compressed bytes this chunk accounts for, in proportion

    @property
    def cost(self) -> int:
        return self.share

    @property
    def order(self) -> tuple[int, int]:
        return (self.offset, self.inner)


@dataclass
class GzipIndex:
    """A parsed, checked index of one layer."""

    layer_digest: str
    layer_size: int
    uncompressed_size: int
    spacing: int
    checkpoints: list[Checkpoint]
    toc: TOC
    prioritized: list[str] = field(default_factory=list)

    # -- reading --
    def point_for(self, inner: int) -> int:
        """The last checkpoint at or before uncompressed offset ``inner``."""
        starts = [c.uncompressed for c in self.checkpoints]
        return max(0, bisect.bisect_right(starts, inner) - 1)


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


def _inflate_primed(point: Checkpoint, data: bytes, length: int) -> tuple[bytes, bytes | None]:
    """Raw inflation resuming mid-byte: zlib's ``inflatePrime`` takes the bits of the first
    byte that belong to the block (Python's zlib module has no way to say that). Returns
    (output, the input after the deflate stream's end, or None if it did not end)."""
    lib = _libz()
    strm = _ZStream()
    ref = ctypes.byref(strm)
    version = lib.zlibVersion()
    if lib.inflateInit2_(ref, -15, version, ctypes.sizeof(_ZStream)) != 0:
        raise EStargzError("zlib could not start inflating")
    try:
        if lib.inflatePrime(ref, point.bits, data[0] >> (8 - point.bits)) != 0:
            raise EStargzError("zlib refused the checkpoint's bits")
        if point.window:
            win = ctypes.create_string_buffer(point.window, len(point.window))
            if lib.inflateSetDictionary(ref, win, len(point.window)) != 0:
                raise EStargzError("zlib refused the checkpoint's window")
        src = ctypes.create_string_buffer(data[1:], len(data) - 1)
        out = ctypes.create_string_buffer(length)
        strm.next_in = ctypes.cast(src, ctypes.c_void_p)
        strm.avail_in = len(data) - 1
        strm.next_out = ctypes.cast(out, ctypes.c_void_p)
        strm.avail_out = length
        ret = lib.inflate(ref, 0)
        if ret not in (0, 1, -5):  # Z_OK, Z_STREAM_END, Z_BUF_ERROR (input ran out)
            raise EStargzError(f"invalid deflate data (zlib error {ret})")
        produced = length - strm.avail_out
        rest = None
        if ret == 1:
            used = len(data) - 1 - strm.avail_in
            rest = data[1 + used :]
        return out.raw[:produced], rest
    finally:
        lib.inflateEnd(ref)


def inflate_from(point: Checkpoint, data: bytes, length: int) -> bytes:
    """``length`` uncompressed bytes from checkpoint ``point``, given the compressed bytes
    from ``point.start`` on. Shorter if ``data`` ends first; crosses gzip members."""
    parts: list[bytes] = []
    got = 0
    if point.bits:
        first, rest = _inflate_primed(point, data, length)
        parts.append(first)
        got = len(first)
        if got >= length or rest is None:
            return first
        pending = rest
        d = None
    else:
        d = (
            isal_zlib.decompressobj(-15, zdict=point.window)
            if point.window
            else isal_zlib.decompressobj(-15)
        )
        pending = data
    while got < length:
        if d is None:
            # A gzip member ended: past its 8-byte trailer, the next member (if any).
            pending = pending[8:]
            if len(pending) < 10:
                break
            d = isal_zlib.decompressobj(31)
        part = d.decompress(pending, length - got)
        parts.append(part)
        got += len(part)
        if got >= length:
            break
        if d.eof:
            pending, d = d.unused_data, None
        elif d.unconsumed_tail:
            pending = d.unconsumed_tail
        else:
            break
    return b"".join(parts)


def read_span_chunks(
    index_points: Sequence[Checkpoint], entries: Sequence[SpanEntry], blob: bytes, blob_start: int
) -> list[tuple[SpanEntry, bytes | EStargzError]]:
    """Each entry's verified bytes (or why not), for entries that resume from the same
    checkpoint, given compressed bytes starting at ``blob_start`` that cover them all.
    The span is inflated once, up to the last byte any of them needs."""
    point = index_points[entries[0].point]
    end = max(e.inner + e.chunk_size for e in entries)
    try:
        data = inflate_from(point, blob[point.start - blob_start :], end - point.uncompressed)
    except _GZIP_ERRORS as exc:
        bad = EStargzError(f"span at compressed offset {point.start} does not inflate: {exc}")
        return [(e, bad) for e in entries]
    out: list[tuple[SpanEntry, bytes | EStargzError]] = []
    for e in entries:
        lo = e.inner - point.uncompressed
        chunk = data[lo : lo + e.chunk_size]
        if len(chunk) != e.chunk_size:
            out.append((e, EStargzError(f"chunk of {e.name!r} at {e.chunk_offset} is truncated")))
            continue
        got = "sha256:" + hashlib.sha256(chunk).hexdigest()
        if got != e.chunk_digest:
            out.append(
                (
                    e,
                    ChunkDigestError(
                        f"chunk of {e.name!r} at {e.chunk_offset}: expected {e.chunk_digest}, "
                        f"got {got}"
                    ),
                )
            )
            continue
        out.append((e, chunk))
    return out


# -- writing ----------------------------------------------------------------------------------
def _parse_zran_export(raw: bytes) -> tuple[int, list[Checkpoint]]:
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
        points.append(Checkpoint(uncompressed=uncmp, compressed=cmp, bits=bits, window=win))
    return usize, points


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
    chunk_size: int = CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """Index a seekable gzip layer blob in one pass; returns the index blob.

    ``progress`` is told how many compressed bytes were read so far. Raises
    :class:`CorruptLayer` if the blob is not a gzip-compressed tar."""
    import indexed_gzip  # type: ignore[import-untyped]

    if spacing < WINDOW_SIZE or chunk_size <= 0:
        raise ValueError("spacing must be at least the window, chunk_size positive")
    source: IO[bytes] = blob
    if progress is not None:
        source = io.BufferedReader(_Counting(blob, progress), 1 << 20)
    entries: list[dict[str, Any]] = []
    try:
        gz = indexed_gzip.IndexedGzipFile(
            fileobj=source, spacing=spacing, window_size=WINDOW_SIZE, readbuf_size=1 << 20
        )
    except Exception as exc:
        raise CorruptLayer(f"layer {layer_digest} is not gzip: {exc}") from exc
    try:
        try:
            with tarfile.open(fileobj=gz, mode="r:") as tf:
                for info in tf:
                    entry = tar_toc_entry(info)
                    if entry is None:
                        continue
                    entries.append(entry)
                    if entry["type"] != "reg" or not info.size:
                        continue
                    f = tf.extractfile(info)
                    assert f is not None
                    done = 0
                    file_hash = hashlib.sha256()
                    while done < info.size:
                        n = min(chunk_size, info.size - done)
                        data = f.read(n)
                        if len(data) != n:
                            raise CorruptLayer(f"layer tar is truncated inside {info.name!r}")
                        file_hash.update(data)
                        ent: dict[str, Any] = (
                            entry if not done else {"name": info.name, "type": "chunk"}
                        )
                        if done:
                            entries.append(ent)
                            ent["chunkOffset"] = done
                        ent["chunkSize"] = n
                        ent["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
                        ent["innerOffset"] = info.offset_data + done
                        done += n
                    entry["digest"] = "sha256:" + file_hash.hexdigest()
            gz.build_full_index()
            exported = io.BytesIO()
            gz.export_index(fileobj=exported)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise CorruptLayer(f"layer {layer_digest} is not a gzip-compressed tar: {exc}") from exc
    finally:
        gz.close()
    usize, points = _parse_zran_export(exported.getvalue())
    doc = {
        "version": 1,
        "layer": layer_digest,
        "layerSize": layer_size,
        "uncompressedSize": usize,
        "spacing": spacing,
        "checkpoints": [[p.uncompressed, p.compressed, p.bits, len(p.window)] for p in points],
        "prioritized": list(prioritized),
        "entries": entries,
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    raw = b"".join([MAGIC, struct.pack("<I", len(body)), body, *(p.window for p in points)])
    return isal_zlib.compress(raw, 1, wbits=31)


# -- reading the blob -------------------------------------------------------------------------
def _int(value: Any, what: str, maximum: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise IndexError_(f"index field {what} is not an integer in range: {value!r}")
    return value


def parse_index(blob: bytes, layer_digest: str, layer_size: int) -> GzipIndex:
    """Parse and check an index blob (already verified against its own digest) for the
    layer ``layer_digest`` of ``layer_size`` compressed bytes. Everything a hostile index
    could use to make a reader misbehave is refused here: offsets outside the layer,
    checkpoints out of order, chunks that do not tile their file, names that climb out."""
    try:
        d = isal_zlib.decompressobj(31)
        raw = d.decompress(blob, MAX_INDEX_SIZE + 1)
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
    pos = start + n
    points: list[Checkpoint] = []
    for item in raw_points:
        if not isinstance(item, list) or len(item) != 4:
            raise IndexError_("bad checkpoint")
        u = _int(item[0], "checkpoint uncompressed offset", usize)
        c = _int(item[1], "checkpoint compressed offset", layer_size)
        bits = _int(item[2], "checkpoint bits", 7)
        wlen = _int(item[3], "checkpoint window", WINDOW_SIZE)
        if c == 0 or (points and (u <= points[-1].uncompressed or c < points[-1].compressed)):
            raise IndexError_("checkpoints are out of order")
        window = raw[pos : pos + wlen]
        if len(window) != wlen:
            raise IndexError_("index windows are truncated")
        pos += wlen
        points.append(Checkpoint(u, c, bits, window))
    if points[0].uncompressed != 0:
        raise IndexError_("the first checkpoint is not at the start of the layer")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise IndexError_("index has no entries list")
    prioritized = doc.get("prioritized") or []
    if not isinstance(prioritized, list) or not all(isinstance(p, str) for p in prioritized):
        raise IndexError_("bad prioritized list")
    starts = [p.uncompressed for p in points]
    entries: list[TOCEntry] = []
    chunks: dict[str, list[TOCEntry]] = {}
    current: TOCEntry | None = None
    for item in raw_entries:
        base = parse_index_entry(item)
        if base.type == "chunk":
            if current is None or current.name != base.name:
                raise IndexError_(f"chunk of {base.name!r} does not follow its file")
            base.size = current.size
        elif base.type == "reg":
            current = None
            chunks[base.name] = []
            if base.size == 0:
                entries.append(base)
                continue
        else:
            current = None
            chunks.pop(base.name, None)
            entries.append(base)
            continue
        inner = _int(item.get("innerOffset"), "innerOffset", usize)
        if base.chunk_size <= 0 or inner + base.chunk_size > usize:
            raise IndexError_(f"chunk of {base.name!r} is outside the layer")
        if not base.chunk_digest.startswith("sha256:"):
            raise IndexError_(f"chunk of {base.name!r} has no sha256 digest")
        point = max(0, bisect.bisect_right(starts, inner) - 1)
        after = bisect.bisect_left(starts, inner + base.chunk_size)
        end = layer_size if after >= len(points) else min(layer_size, points[after].compressed)
        e = SpanEntry(
            **{k: getattr(base, k) for k in TOCEntry.__dataclass_fields__},
        )
        e.inner = inner
        e.point = point
        e.offset = points[point].start
        e.end_offset = max(end, e.offset + 1)
        e.share = max(1, e.chunk_size * layer_size // max(1, usize))
        if e.type == "reg":
            current = e
            chunks[e.name] = []
        chunk_list = chunks[e.name]
        expected = chunk_list[-1].chunk_offset + chunk_list[-1].chunk_size if chunk_list else 0
        if e.chunk_offset != expected or e.chunk_offset + e.chunk_size > e.size:
            raise IndexError_(f"chunks of {e.name!r} do not tile the file")
        chunk_list.append(e)
        entries.append(e)
    for name, chunk_list in chunks.items():
        if chunk_list and chunk_list[-1].chunk_offset + chunk_list[-1].chunk_size != (
            chunk_list[0].size
        ):
            raise IndexError_(f"chunks of {name!r} do not cover the file")
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
