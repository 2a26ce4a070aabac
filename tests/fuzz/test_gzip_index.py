"""Gzip indexes (``images/gzindex.py``): generated layers (files of random and repetitive
bytes, links, directories; one or several gzip members, any level) are indexed at any
spacing, and every file read back through its spans is the tar's bytes; an index whose
JSON is damaged is refused with the module's own error or read without a crash, and a
damaged checkpoint never gives wrong bytes."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import struct
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st
from isal import isal_zlib

from tests.fuzz import scaled
from warmstart.images import gzindex
from warmstart.images.errors import EStargzError
from warmstart.images.gzindex import SpanEntry, build_index, parse_index, read_span, read_window

_CONTENT = st.one_of(
    st.binary(max_size=40_000),
    st.builds(lambda piece, n: piece * n, st.binary(min_size=1, max_size=64), st.integers(0, 3000)),
)
_FILES = st.lists(st.tuples(st.sampled_from(["a", "b", "c/d", "c/e", "f"]), _CONTENT), max_size=12)


def _layer(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, bytes]]:
    buf = io.BytesIO()
    final: dict[str, bytes] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            final[name] = data
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "a"
        tf.addfile(link)
    return buf.getvalue(), final


def _read_file(index: gzindex.GzipIndex, blob: bytes, built: bytes, name: str) -> bytes:
    out = []
    for piece in index.toc.chunks(name):
        assert isinstance(piece, SpanEntry)
        point = index.checkpoints[piece.point]
        window = b""
        if point.window_size:
            window = read_window(point, built[point.window_at : point.window_at + point.window_len])
        span = read_span(point, window, blob[point.start : point.span_end], point.start)
        out.append(span[piece.span_offset : piece.span_offset + piece.chunk_size])
    return b"".join(out)


@settings(max_examples=scaled(40), deadline=None)
@given(
    files=_FILES,
    level=st.integers(0, 9),
    members=st.integers(1, 3),
    spacing=st.sampled_from([64 << 10, 96 << 10, 256 << 10]),
)
def test_every_file_reads_back_through_its_spans(
    files: list[tuple[str, bytes]], level: int, members: int, spacing: int
) -> None:
    tar, final = _layer(files)
    cuts = [len(tar) * i // members for i in range(members + 1)]
    blob = b"".join(gzip.compress(tar[a:b], level) for a, b in itertools.pairwise(cuts))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    built = build_index(io.BytesIO(blob), digest, len(blob), spacing=spacing)
    index = parse_index(built.blob[: built.toc_size], digest, len(blob))
    assert sum(p.span_size for p in index.checkpoints) == len(tar)
    for name, data in final.items():
        assert _read_file(index, blob, built.blob, name) == data, name


def _doc(toc: bytes) -> dict[str, object]:
    raw = isal_zlib.decompress(toc, wbits=31)
    (n,) = struct.unpack_from("<I", raw, len(gzindex.MAGIC))
    start = len(gzindex.MAGIC) + 4
    doc: dict[str, object] = json.loads(raw[start : start + n])
    return doc


def _pack(doc: object) -> bytes:
    body = json.dumps(doc).encode()
    return gzip.compress(gzindex.MAGIC + struct.pack("<I", len(body)) + body)


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=20),
    st.lists(st.integers(-5, 2**40), max_size=12),
)


@settings(max_examples=scaled(60), deadline=None)
@given(
    where=st.sampled_from(["checkpoints", "entries", "layerSize", "uncompressedSize", "top"]),
    pick=st.integers(0, 1000),
    field=st.integers(0, 12),
    junk=_JUNK,
)
def test_a_damaged_index_is_refused_or_still_reads_right(
    where: str, pick: int, field: int, junk: object
) -> None:
    tar, final = _layer([("a", b"x" * 50_000), ("c/d", bytes(range(256)) * 300)])
    blob = gzip.compress(tar, 6)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    built = build_index(io.BytesIO(blob), digest, len(blob), spacing=64 << 10)
    doc = _doc(built.blob[: built.toc_size])
    if where == "top":
        doc = junk  # type: ignore[assignment]
    elif where in ("layerSize", "uncompressedSize"):
        doc[where] = junk
    else:
        items = doc[where]
        assert isinstance(items, list)
        item = items[pick % len(items)]
        if isinstance(item, list):
            item[field % len(item)] = junk
        else:
            keys = sorted(item)
            item[keys[field % len(keys)]] = junk
    toc = _pack(doc)
    try:
        index = parse_index(toc, digest, len(blob))
    except EStargzError:
        return  # refused, with the module's own error
    # Accepted. Spans are verified by their digests: a damaged checkpoint gives the tar's
    # bytes or an error. A damaged entry is metadata the index vouches for (as a TOC does
    # in eStargz): reading it may give other boundaries, but never crashes the reader.
    rebuilt = toc + built.blob[built.toc_size :]
    for name, data in final.items():
        if not index.toc.chunks(name):
            continue
        try:
            got = _read_file(index, blob, rebuilt, name)
        except EStargzError:
            continue
        if where != "entries":
            assert got == data, name
