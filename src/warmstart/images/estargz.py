"""eStargz: seekable tar.gz layers that can be mounted before they are downloaded.

An eStargz blob is an ordinary gzip-compressed tar (so eStargz-unaware runtimes pull it
like any other layer) whose gzip members are cut at known places: a new member starts at
the payload of every non-empty regular file, inside large payloads (chunks), at the tar
header of the table of contents, and at the footer. The TOC (``stargz.index.json``, the
last tar entry) records every entry's metadata and the compressed offset of every chunk;
the 51-byte footer (an empty gzip member) records the TOC's offset. A reader fetches the
footer and TOC with Range requests, then any chunk on its own, verified against the
``chunkDigest`` in the TOC, whose own digest is pinned by the manifest annotation
:data:`TOC_DIGEST_ANNOTATION`.

This module holds both directions: the reader (:func:`parse_footer`, :func:`read_toc`,
:func:`read_chunk`) used by the lazy filesystem, and the writer (:func:`write_estargz`)
used to convert images.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import posixpath
import re
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, cast

from isal import isal_zlib

from warmstart.images.errors import ChunkDigestError, CorruptLayer, EStargzError

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
# Entries that describe the blob rather than the layer's files: a filesystem hides them.
LANDMARK_NAMES = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
LANDMARK_CONTENT = b"\x0f"

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

DEFAULT_CHUNK_SIZE = 4 << 20
# A TOC is metadata only; anything bigger than this is a hostile or broken blob, and
# refusing it keeps a gzip bomb from exhausting memory.
MAX_TOC_SIZE = 256 << 20
# How much of the blob's end to fetch first: footer plus, usually, the whole TOC, so a
# mount costs one round trip for small layers.
TAIL_PREFETCH = 256 << 10

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})

_GZIP_MAGIC = b"\x1f\x8b\x08"
_GZIP_ERRORS: tuple[type[Exception], ...] = (
    cast("type[Exception]", isal_zlib.IsalError),
    zlib.error,
)
_FEXTRA = 0x04


# -- reader -------------------------------------------------------------------------------------
def _footer_offset(footer: bytes) -> int | None:
    """TOC offset encoded in one candidate footer (51 or 47 bytes), or None if not one."""
    if len(footer) < 12 or footer[:3] != _GZIP_MAGIC or not footer[3] & _FEXTRA:
        return None
    (xlen,) = struct.unpack_from("<H", footer, 10)
    extra = footer[12 : 12 + xlen]
    if len(footer) == FOOTER_SIZE:
        # eStargz: an RFC 1952 subfield "SG", LEN=22, "%016xSTARGZ".
        if xlen != 26 or extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
            return None
        payload = extra[4:]
    else:
        # Legacy stargz: the extra field is the bare "%016xSTARGZ".
        if xlen != 22:
            return None
        payload = extra
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        return None
    try:
        offset = int(payload[:16].decode("ascii"), 16)
        # The footer must be a complete, empty gzip member.
        d = zlib.decompressobj(31)
        if d.decompress(footer) != b"" or not d.eof or d.unused_data:
            return None
    except (ValueError, zlib.error):
        return None
    return offset


def _parse_footer(tail: bytes) -> tuple[int, int]:
    """(TOC offset, footer size) from the blob's tail."""
    if len(tail) >= FOOTER_SIZE:
        off = _footer_offset(tail[-FOOTER_SIZE:])
        if off is not None:
            return off, FOOTER_SIZE
    if len(tail) >= LEGACY_FOOTER_SIZE:
        off = _footer_offset(tail[-LEGACY_FOOTER_SIZE:])
        if off is not None:
            return off, LEGACY_FOOTER_SIZE
    raise EStargzError("no eStargz footer at the end of the blob")


def parse_footer(tail: bytes) -> int:
    """The TOC's offset from the last bytes of a blob (at least 51; the 47-byte legacy
    stargz footer is accepted too). Raises :class:`EStargzError` if there is no footer."""
    return _parse_footer(tail)[0]


@dataclass
class TOCEntry:
    """One TOC entry, normalised so consumers need no knowledge of the writer's quirks.

    ``name`` has no leading ``./`` or ``/`` and no trailing ``/``; the root directory, if
    listed, is ``""``. For data entries (non-empty ``reg`` and ``chunk``) ``end_offset``
    and ``chunk_size`` are resolved, so ``blob[offset:end_offset]`` is everything needed
    to produce ``chunk_size`` bytes of the file at ``chunk_offset``. A ``chunk`` entry's
    ``size`` is its file's size. ``mode`` defaults to 0o755 for directories and 0o644
    otherwise when the TOC omits it (as the reference writer does for zero values).
    """

    name: str
    type: str
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    offset: int = 0
    end_offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""

    @property
    def is_data(self) -> bool:
        """True if this entry names compressed file bytes in the blob."""
        return self.type == "chunk" or (self.type == "reg" and self.size > 0)

    @property
    def cost(self) -> int:
        """The compressed bytes this chunk adds to a fetch (its member's size)."""
        return self.end_offset - self.offset

    @property
    def order(self) -> tuple[int, int]:
        """Where the chunk sits in the blob, for sorting."""
        return (self.offset, 0)

    @property
    def cached_size(self) -> int:
        """The size of what the chunk cache keeps under this chunk's key."""
        return self.chunk_size

    @property
    def cache_offset(self) -> int:
        """Where this chunk's bytes start in what the cache keeps under its key."""
        return 0


@dataclass
class TOC:
    """A parsed, verified table of contents."""

    version: int
    entries: list[TOCEntry]  # in blob order; chunk entries follow their reg entry
    digest: str  # sha256 of the uncompressed TOC JSON
    prefetch_end: int | None  # compressed offset where the prioritized files end
    _chunks: dict[str, list[TOCEntry]] = field(default_factory=dict, repr=False)

    def chunks(self, name: str) -> list[TOCEntry]:
        """The data chunks of regular file ``name`` (normalised), in file order.

        The ``reg`` entry itself is the first chunk. Empty for empty files and non-files.
        When a tar holds a name twice, the later entry wins, as when extracting it.
        """
        return self._chunks.get(name, [])


def normalize_name(name: str) -> str:
    """A tar/TOC name as a clean relative path; ``..`` cannot climb above the root.

    Matches how the reference implementation cleans names (resolving ``..`` against the
    root), so both agree on which file a hostile name denotes: it lands inside the layer.
    """
    if "\x00" in name:
        raise EStargzError(f"TOC entry name contains NUL: {name!r}")
    clean = posixpath.normpath("/" + name).lstrip("/")
    return "" if clean == "." else clean


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)?\Z"
)


def _parse_time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 time (Go writes up to nanoseconds)."""
    m = _RFC3339.match(text)
    if not m:
        raise EStargzError(f"bad modtime in TOC: {text!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        base = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=UTC)
    except ValueError as exc:
        raise EStargzError(f"bad modtime in TOC: {text!r}") from exc
    t = base.timestamp()
    if tz and tz not in "Zz":
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    if frac:
        t += int(frac) / 10 ** len(frac)
    return t


_MAX_ID = (1 << 32) - 2  # uid_t/gid_t, without -1 ("no change")
_MAX_DEV = (1 << 32) - 1  # a device number's major or minor part
_MAX_OFFSET = (1 << 63) - 1  # sizes and offsets: what off_t holds


def _int_field(raw: dict[str, Any], key: str, *, maximum: int = _MAX_OFFSET) -> int:
    value = raw.get(key, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise EStargzError(f"TOC field {key!r} must be an integer in [0, {maximum}]: {value!r}")
    return value


def _str_field(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EStargzError(f"TOC field {key!r} must be a string: {value!r}")
    return value


def _entry_from_json(raw: Any) -> TOCEntry:
    if not isinstance(raw, dict):
        raise EStargzError("TOC entry is not an object")
    type_ = _str_field(raw, "type")
    if type_ not in ENTRY_TYPES:
        raise EStargzError(f"unknown TOC entry type {type_!r}")
    name = normalize_name(_str_field(raw, "name"))
    if name == "" and type_ != "dir":
        raise EStargzError(f"TOC {type_} entry has an empty name")
    link_name = _str_field(raw, "linkName")
    if type_ == "hardlink":
        link_name = normalize_name(link_name)
        if not link_name:
            raise EStargzError(f"hardlink {name!r} has no target")
    elif type_ == "symlink" and ("\x00" in link_name or not link_name):
        raise EStargzError(f"symlink {name!r} has a bad target")
    xattrs: dict[str, bytes] = {}
    raw_x = raw.get("xattrs") or {}
    if not isinstance(raw_x, dict):
        raise EStargzError(f"xattrs of {name!r} is not an object")
    for key, val in raw_x.items():
        if not isinstance(val, str):
            raise EStargzError(f"xattr {key!r} of {name!r} is not base64 text")
        try:
            xattrs[key] = base64.b64decode(val, validate=True)
        except ValueError as exc:  # binascii.Error, or text that is not even ASCII
            raise EStargzError(f"xattr {key!r} of {name!r} is not base64") from exc
    modtime = _str_field(raw, "modtime")
    return TOCEntry(
        name=name,
        type=type_,
        size=_int_field(raw, "size"),
        # Writers put either bare permission bits or the full st_mode here; keep only the
        # permission and setuid/setgid/sticky bits, the type comes from "type".
        mode=_int_field(raw, "mode") & 0o7777
        if "mode" in raw
        else (0o755 if type_ == "dir" else 0o644),
        uid=_int_field(raw, "uid", maximum=_MAX_ID),
        gid=_int_field(raw, "gid", maximum=_MAX_ID),
        mtime=_parse_time(modtime) if modtime else 0.0,
        link_name=link_name,
        dev_major=_int_field(raw, "devMajor", maximum=_MAX_DEV),
        dev_minor=_int_field(raw, "devMinor", maximum=_MAX_DEV),
        xattrs=xattrs,
        digest=_str_field(raw, "digest"),
        offset=_int_field(raw, "offset"),
        chunk_offset=_int_field(raw, "chunkOffset"),
        chunk_size=_int_field(raw, "chunkSize"),
        chunk_digest=_str_field(raw, "chunkDigest"),
    )


def parse_index_entry(raw: Any) -> TOCEntry:
    """One entry in eStargz's JSON form, checked and normalised (as in a TOC)."""
    return _entry_from_json(raw)


def parse_toc(data: bytes, toc_offset: int, digest: str | None = None) -> TOC:
    """Parse TOC JSON bytes found at compressed offset ``toc_offset`` of a blob.

    Resolves each data entry's ``end_offset`` (the next distinct member offset, or the
    TOC's offset for the last data) and ``chunk_size``; checks that every regular file's
    chunks are in range and tile the file exactly, so a reader can trust the layout.
    """
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest is not None and digest != actual:
        raise EStargzError(f"TOC digest mismatch: expected {digest}, got {actual}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EStargzError(f"TOC is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("entries", []), list):
        raise EStargzError("TOC is not an object with an entries list")
    version = doc.get("version")
    if version != 1:
        raise EStargzError(f"unsupported TOC version {version!r}")
    entries = [_entry_from_json(raw) for raw in doc.get("entries") or []]

    offsets = sorted({e.offset for e in entries if e.is_data} | {toc_offset})
    next_offset = dict(itertools.pairwise(offsets))
    chunks: dict[str, list[TOCEntry]] = {}
    current: TOCEntry | None = None  # the reg entry whose chunks follow
    for e in entries:
        if e.type == "chunk":
            if current is None or current.name != e.name:
                raise EStargzError(f"chunk of {e.name!r} does not follow its file")
            e.size = current.size
        elif e.type == "reg":
            current = e
            chunks[e.name] = []
            if e.size == 0:
                e.chunk_size = 0
                continue
        else:
            current = None
            chunks.pop(e.name, None)
            continue
        if not 0 < e.offset < toc_offset:
            raise EStargzError(f"data of {e.name!r} at offset {e.offset} is outside the blob")
        if e.chunk_size == 0:
            e.chunk_size = e.size - e.chunk_offset
        e.end_offset = next_offset[e.offset]
        chunk_list = chunks[e.name]
        expected = chunk_list[-1].chunk_offset + chunk_list[-1].chunk_size if chunk_list else 0
        if (
            e.chunk_offset != expected
            or e.chunk_size <= 0
            or e.chunk_offset + e.chunk_size > e.size
        ):
            raise EStargzError(f"chunks of {e.name!r} do not tile the file")
        chunk_list.append(e)
    for name, chunk_list in chunks.items():
        if chunk_list and chunk_list[-1].chunk_offset + chunk_list[-1].chunk_size != (
            chunk_list[0].size
        ):
            raise EStargzError(f"chunks of {name!r} do not cover the file")

    prefetch_end = None
    for e in entries:
        if e.name == PREFETCH_LANDMARK and e.type == "reg":
            prefetch_end = e.offset
    return TOC(version=1, entries=entries, digest=actual, prefetch_end=prefetch_end, _chunks=chunks)


def _gunzip_member(data: bytes, limit: int, what: str) -> tuple[bytes, bool]:
    """Decompress the gzip member at the start of ``data``: (bytes, member complete)."""
    d = isal_zlib.decompressobj(31)
    try:
        out = d.decompress(data, limit + 1)
    except _GZIP_ERRORS as exc:
        raise EStargzError(f"{what} is not valid gzip: {exc}") from exc
    if len(out) > limit:
        raise EStargzError(f"{what} decompresses to more than {limit} bytes")
    return out, d.eof


def _toc_from_tar(data: bytes) -> bytes:
    """The contents of the ``stargz.index.json`` entry in the decompressed TOC member."""
    import io

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            info = tf.next()
            if info is None or normalize_name(info.name) != TOC_NAME or not info.isreg():
                raise EStargzError(f"the entry at the TOC offset is not {TOC_NAME}")
            f = tf.extractfile(info)
            assert f is not None
            toc = f.read()
    except (tarfile.TarError, EOFError) as exc:
        raise EStargzError(f"bad TOC tar entry: {exc}") from exc
    if len(toc) != info.size:
        raise EStargzError("TOC entry is truncated")
    return toc


def read_toc(
    read_range: Callable[[int, int], bytes],
    blob_size: int,
    expected_digest: str | None = None,
) -> TOC:
    """Fetch, verify and parse a blob's TOC through ``read_range(start, end)`` (half-open).

    Usually one call: the blob's last :data:`TAIL_PREFETCH` bytes hold the footer and the
    TOC. ``expected_digest`` (the manifest's toc.digest annotation) should always be given
    for blobs from a registry: it is what makes every chunk digest trustworthy.
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise EStargzError(f"blob of {blob_size} bytes is too small to be eStargz")
    tail_start = max(0, blob_size - TAIL_PREFETCH)
    tail = read_range(tail_start, blob_size)
    if len(tail) != blob_size - tail_start:
        raise EStargzError("short read of the blob's tail")
    toc_offset, footer_size = _parse_footer(tail)
    toc_end = blob_size - footer_size
    if not 0 <= toc_offset < toc_end:
        raise EStargzError(f"TOC offset {toc_offset} is outside the blob")
    if toc_offset >= tail_start:
        member = tail[toc_offset - tail_start : toc_end - tail_start]
    else:
        # Only the part of the TOC not already in the tail.
        head = read_range(toc_offset, tail_start)
        if len(head) != tail_start - toc_offset:
            raise EStargzError("short read of the TOC")
        member = head + tail[: toc_end - tail_start]
    data, complete = _gunzip_member(member, MAX_TOC_SIZE, "TOC")
    if not complete:
        raise EStargzError("TOC gzip member is truncated")
    return parse_toc(_toc_from_tar(data), toc_offset, expected_digest)


def read_chunk(member: bytes, entry: TOCEntry) -> bytes:
    """The file bytes of one chunk from ``blob[entry.offset:entry.end_offset]``, verified.

    Raises :class:`ChunkDigestError` if they do not match the TOC's ``chunkDigest`` (or,
    for a legacy unchunked file without one, its ``digest``), :class:`EStargzError` if the
    member is malformed or short. Never returns unverified bytes.
    """
    if not entry.is_data:
        raise EStargzError(f"{entry.name!r} ({entry.type}) has no data")
    # The member goes on past the chunk (tar padding, following headers): stop there.
    try:
        data = isal_zlib.decompressobj(31).decompress(member, entry.chunk_size)
    except _GZIP_ERRORS as exc:
        raise EStargzError(f"chunk of {entry.name!r} is not valid gzip: {exc}") from exc
    if len(data) < entry.chunk_size:
        raise EStargzError(
            f"chunk of {entry.name!r} at {entry.chunk_offset} is truncated "
            f"({len(data)} of {entry.chunk_size} bytes)"
        )
    want = entry.chunk_digest
    if not want and entry.chunk_offset == 0 and entry.chunk_size == entry.size:
        want = entry.digest
    if not want:
        raise EStargzError(f"chunk of {entry.name!r} has no digest to verify")
    algo, _, hexd = want.partition(":")
    if algo != "sha256":
        raise EStargzError(f"unsupported digest algorithm in {want!r}")
    got = hashlib.sha256(data).hexdigest()
    if got != hexd:
        raise ChunkDigestError(
            f"chunk of {entry.name!r} at {entry.chunk_offset}: expected {want}, got sha256:{got}"
        )
    return data


# -- writer -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EStargzLayer:
    """What a written eStargz blob is, as the manifest and config need it."""

    toc_digest: str  # -> TOC_DIGEST_ANNOTATION
    uncompressed_size: int  # -> UNCOMPRESSED_SIZE_ANNOTATION
    diff_id: str  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)
    digest: str  # sha256 of the blob
    size: int  # bytes of the blob

    def annotations(self) -> dict[str, str]:
        """The layer descriptor annotations eStargz-aware runtimes look for."""
        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }


def make_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member whose extra field holds the TOC
    offset as an RFC 1952 subfield ("SG", 22 bytes of ``%016xSTARGZ``)."""
    payload = b"%016xSTARGZ" % toc_offset
    header = _GZIP_MAGIC + bytes([_FEXTRA]) + b"\x00\x00\x00\x00" + b"\x00\xff"
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    empty_stored_block = b"\x01\x00\x00\xff\xff"
    footer = header + struct.pack("<H", len(extra)) + extra + empty_stored_block + b"\0" * 8
    assert len(footer) == FOOTER_SIZE
    return footer


_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR_PREFIX = "SCHILY.xattr."
_RESERVED_NAMES = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_BATCH_BYTES = 1 << 20  # small members are compressed in batches this big, not one by one


def _format_time(mtime: float) -> str:
    try:
        return datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def _toc_entry(info: tarfile.TarInfo, type_: str) -> dict[str, Any]:
    """The TOC entry of a tar member, zero fields omitted as the reference writer does."""
    e: dict[str, Any] = {"name": info.name, "type": type_}
    if type_ == "reg" and info.size:
        e["size"] = info.size
    modtime = _format_time(info.mtime)
    if modtime:
        e["modtime"] = modtime
    if info.linkname and type_ in ("symlink", "hardlink"):
        e["linkName"] = info.linkname
    for key, value in (
        ("mode", info.mode),
        ("uid", info.uid),
        ("gid", info.gid),
        ("userName", info.uname),
        ("groupName", info.gname),
    ):
        if value:
            e[key] = value
    if type_ in ("char", "block"):
        e["devMajor"] = info.devmajor
        e["devMinor"] = info.devminor
    xattrs = {
        k[len(_XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
        for k, v in info.pax_headers.items()
        if k.startswith(_XATTR_PREFIX)
    }
    if xattrs:
        e["xattrs"] = xattrs
    return e


def tar_toc_entry(info: tarfile.TarInfo) -> dict[str, Any] | None:
    """The TOC entry of a tar member, or None for what an unpacker would not create."""
    type_ = _TYPES.get(info.type, "reg" if info.isreg() else "")
    return _toc_entry(info, type_) if type_ else None


class _Member:
    """The uncompressed bytes of one gzip member, and the TOC entries that start there."""

    __slots__ = ("chunk", "chunk_entry", "entries", "nbytes", "pieces", "whole_file")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.nbytes = 0
        self.entries: list[dict[str, Any]] = []  # their "offset" is this member's start
        self.chunk: bytes = b""  # file data to digest into chunk_entry
        self.chunk_entry: dict[str, Any] | None = None
        self.whole_file = False  # the chunk is the whole file: its digest is the file's


def _compress_batch(members: list[_Member], level: int) -> list[bytes]:
    """Compress members into consecutive gzip members and digest their chunks.

    Runs in worker threads: isal and hashlib release the GIL, so batches compress in
    parallel while the main thread reads the tar.
    """
    out = []
    for m in members:
        out.append(isal_zlib.compress(b"".join(m.pieces), level, 31))
        if m.chunk_entry is not None:
            digest = "sha256:" + hashlib.sha256(m.chunk).hexdigest()
            m.chunk_entry["chunkDigest"] = digest
            if m.whole_file:
                m.chunk_entry["digest"] = digest
            m.chunk = b""
        m.pieces = []
    return out


class _BlobWriter:
    """Cuts the output tar into gzip members, compresses them in a thread pool and writes
    them in order, assigning each TOC entry the compressed offset of its member."""

    def __init__(self, out: IO[bytes], level: int, workers: int) -> None:
        self.out = out
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz")
        self.max_inflight = 2 * workers + 1
        self.pending: deque[tuple[Future[list[bytes]], list[_Member]]] = deque()
        self.batch: list[_Member] = []
        self.batch_bytes = 0
        self.cur = _Member()
        self.diff_id = hashlib.sha256()
        self.usize = 0
        self.blob = hashlib.sha256()
        self.csize = 0

    def raw(self, data: bytes) -> None:
        """Append uncompressed tar bytes to the open member."""
        self.cur.pieces.append(data)
        self.cur.nbytes += len(data)
        self.diff_id.update(data)
        self.usize += len(data)

    def cut(self) -> None:
        """Close the open member (if it holds anything) and open a new one."""
        if not self.cur.nbytes:
            return
        self.batch.append(self.cur)
        self.batch_bytes += self.cur.nbytes
        self.cur = _Member()
        if self.batch_bytes >= _BATCH_BYTES:
            self.submit()

    def submit(self) -> None:
        if not self.batch:
            return
        fut = self.pool.submit(_compress_batch, self.batch, self.level)
        self.pending.append((fut, self.batch))
        self.batch, self.batch_bytes = [], 0
        while len(self.pending) > self.max_inflight:
            self.drain_one()

    def drain_one(self) -> None:
        fut, members = self.pending.popleft()
        compressed = fut.result()
        # Offsets are known only once everything before has been compressed.
        for m, data in zip(members, compressed, strict=True):
            for e in m.entries:
                e["offset"] = self.csize
            self.csize += len(data)
        self.out.writelines(compressed)
        for data in compressed:
            self.blob.update(data)

    def finish(self) -> None:
        self.cut()
        self.submit()
        while self.pending:
            self.drain_one()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _prioritized_order(members: list[tarfile.TarInfo], prioritized: Sequence[str]) -> list[int]:
    """Indexes of the members to put before the prefetch landmark, in first-use order.

    A prioritized entry brings along its not-yet-placed parent directories and, for a hard
    link, its target, so the archive still extracts correctly in order. Names that occur
    more than once in the layer keep their place: moving one would change which wins.
    """
    by_name: dict[str, list[int]] = {}
    for i, info in enumerate(members):
        by_name.setdefault(normalize_name(info.name), []).append(i)

    def unique(name: str) -> int | None:
        found = by_name.get(name)
        return found[0] if found is not None and len(found) == 1 else None

    placed: set[int] = set()
    order: list[int] = []

    def place(i: int, depth: int = 0) -> None:
        if i in placed or depth > 8:
            return
        info = members[i]
        name = normalize_name(info.name)
        parts = name.split("/")
        for k in range(1, len(parts)):
            parent = unique("/".join(parts[:k]))
            if parent is not None and members[parent].isdir() and parent not in placed:
                placed.add(parent)
                order.append(parent)
        if info.islnk():
            target = unique(normalize_name(info.linkname))
            if target is None:
                return  # cannot tell which target the link means: leave it in place
            place(target, depth + 1)
        placed.add(i)
        order.append(i)

    for name in prioritized:
        try:
            found = unique(normalize_name(name))
        except EStargzError:
            continue
        if found is not None:
            place(found)
    return order


def _open_tar(stream: IO[bytes], *, sequential: bool) -> tarfile.TarFile:
    try:
        if sequential:
            return tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
        return tarfile.open(fileobj=stream, mode="r:", errorlevel=2)
    except (tarfile.TarError, EOFError) as exc:
        raise CorruptLayer(f"layer is not a readable tar: {exc}") from exc


def _iter_input(
    tar_stream: IO[bytes], prioritized: Sequence[str] | None
) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile] | str]:
    """The input's members in output order, with the name of the landmark to insert where
    it belongs: ``.no.prefetch.landmark`` first when no prioritized file is in this layer
    (as the reference writer does), else ``.prefetch.landmark`` after the prioritized ones.

    Without a prioritized list the tar is read as a stream (one pass, no temporary copy);
    with one, it is read with seeks (spooled to a temporary file if it cannot seek).
    """
    if not prioritized:
        yield NO_PREFETCH_LANDMARK
        tf = _open_tar(tar_stream, sequential=True)
        try:
            for info in tf:
                yield info, tf
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptLayer(f"layer is not a readable tar: {exc}") from exc
        return
    with contextlib.ExitStack() as stack:
        seekable = tar_stream
        if not (hasattr(tar_stream, "seekable") and tar_stream.seekable()):
            seekable = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(tar_stream, seekable, 1 << 20)
            seekable.seek(0)
        tf = stack.enter_context(_open_tar(seekable, sequential=False))
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptLayer(f"layer is not a readable tar: {exc}") from exc
        first = _prioritized_order(members, prioritized)
        if first:
            for i in first:
                yield members[i], tf
            yield PREFETCH_LANDMARK
        else:
            yield NO_PREFETCH_LANDMARK
        chosen = set(first)
        for i, info in enumerate(members):
            if i not in chosen:
                yield info, tf


def _landmark(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENT)
    info.mode = 0o644
    return info


def write_estargz(
    tar_stream: IO[bytes],
    out: IO[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] | None = None,
    compression_level: int = 3,
    workers: int | None = None,
) -> EStargzLayer:
    """Rewrite an uncompressed tar as an eStargz blob written to ``out``.

    ``prioritized`` names files (paths relative to the image root, in first-use order) to
    put first, before ``.prefetch.landmark``, so a lazy mount fetches them in one request;
    names not in this layer are ignored. ``compression_level`` is ISA-L's 0..3. Members are
    compressed by ``workers`` threads (default: one per CPU, at most 4) and written in
    order. Raises :class:`CorruptLayer` if the input is not a readable tar.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    w = _BlobWriter(out, compression_level, n_workers)
    entries: list[dict[str, Any]] = []

    def add(info: tarfile.TarInfo, read: Callable[[int], bytes] | None) -> None:
        type_ = _TYPES.get(info.type, "reg" if info.isreg() else "")
        if not type_:
            return  # GNU volume headers and the like: nothing an unpacker would create
        entry = _toc_entry(info, type_)
        entries.append(entry)
        try:
            w.raw(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        except ValueError as exc:
            raise CorruptLayer(f"cannot re-encode tar entry {info.name!r}: {exc}") from exc
        if type_ != "reg" or info.size == 0:
            return
        assert read is not None
        whole = info.size <= chunk_size
        file_hash = None if whole else hashlib.sha256()
        done = 0
        while done < info.size:
            n = min(chunk_size, info.size - done)
            data = read(n)
            if len(data) != n:
                raise CorruptLayer(f"layer tar is truncated inside {info.name!r}")
            ent = entry
            if done:
                ent = {"name": info.name, "type": "chunk"}
                entries.append(ent)
            # Keys in a fixed order before worker threads fill some in: the TOC's bytes
            # (and so its digest) must not depend on thread timing.
            if not done:
                ent["digest"] = ""
            ent["offset"] = 0
            if done:
                ent["chunkOffset"] = done
            if done + n < info.size:
                ent["chunkSize"] = n
            ent["chunkDigest"] = ""
            w.cut()
            w.cur.entries.append(ent)
            w.cur.chunk, w.cur.chunk_entry, w.cur.whole_file = data, ent, whole
            w.raw(data)
            if file_hash is not None:
                file_hash.update(data)
            done += n
        if info.size % tarfile.BLOCKSIZE:
            w.raw(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
        if file_hash is not None:
            entry["digest"] = "sha256:" + file_hash.hexdigest()

    def landmark(name: str) -> None:
        add(_landmark(name), lambda n: LANDMARK_CONTENT[:n])

    try:
        try:
            for item in _iter_input(tar_stream, prioritized):
                if isinstance(item, str):
                    landmark(item)
                    continue
                info, tf = item
                if normalize_name(info.name) in _RESERVED_NAMES:
                    continue  # a previous conversion's TOC or landmark: rebuilt below
                if info.isreg() and info.size:
                    f = tf.extractfile(info)
                    assert f is not None
                    add(info, f.read)
                else:
                    add(info, None)
        except (tarfile.TarError, EOFError, EStargzError) as exc:
            raise CorruptLayer(f"layer is not a readable tar: {exc}") from exc
        w.finish()
        toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
        toc_offset = w.csize
        toc_info = tarfile.TarInfo(TOC_NAME)
        toc_info.size = len(toc)
        toc_info.mode = 0o644
        tail = b"".join(
            (
                toc_info.tobuf(tarfile.PAX_FORMAT),
                toc,
                tarfile.NUL * (-len(toc) % tarfile.BLOCKSIZE),
                tarfile.NUL * (2 * tarfile.BLOCKSIZE),  # end of archive
            )
        )
        w.raw(tail)
        toc_member = isal_zlib.compress(tail, compression_level, 31)
        footer = make_footer(toc_offset)
        for data in (toc_member, footer):
            out.write(data)
            w.blob.update(data)
            w.csize += len(data)
    finally:
        w.close()
    return EStargzLayer(
        toc_digest="sha256:" + hashlib.sha256(toc).hexdigest(),
        uncompressed_size=w.usize,
        diff_id="sha256:" + w.diff_id.hexdigest(),
        digest="sha256:" + w.blob.hexdigest(),
        size=w.csize,
    )
