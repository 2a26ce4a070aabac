"""eStargz (``images/estargz.py``) and the lazy filesystem's view of a TOC
(``images/lazyfs/layers.py``, ``tree.py``): random and damaged footers, blobs and chunks;
TOC JSON with bad offsets, negative and huge numbers, wrong types, duplicate entries and
climbing names.  Parsing answers a TOC or ``EStargzError``; a TOC that parsed builds a
layer and a merged tree whose every node can be listed and stat'ed, all inside the root."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import scaled
from tests.lazyfs_blobs import Member, build_estargz
from warmstart.images.errors import EStargzError, ImageError
from warmstart.images.estargz import (
    FOOTER_SIZE,
    TOC,
    TOCEntry,
    make_footer,
    parse_footer,
    parse_toc,
    read_chunk,
    read_toc,
)
from warmstart.images.lazyfs.layers import TOCLayer
from warmstart.images.lazyfs.sources import BlobSource
from warmstart.images.lazyfs.tree import Node, Tree

# -- footers ---------------------------------------------------------------------------------


@given(st.integers(0, (1 << 64) - 1))
def test_a_footer_gives_back_its_offset(offset: int) -> None:
    assert parse_footer(make_footer(offset)) == offset


@given(st.integers(0, (1 << 64) - 1), st.integers(0, FOOTER_SIZE - 1), st.integers(0, 255))
def test_a_damaged_footer_is_refused_or_read(offset: int, at: int, value: int) -> None:
    footer = bytearray(make_footer(offset))
    footer[at] = value
    with contextlib.suppress(EStargzError):
        assert parse_footer(bytes(footer)) >= 0


@given(st.binary(max_size=200))
def test_random_tails_have_no_footer(tail: bytes) -> None:
    with contextlib.suppress(EStargzError):
        parse_footer(tail)


# -- whole blobs ------------------------------------------------------------------------------
_NAMES = st.sampled_from(["a", "b/c", "../../up", "/abs", "./d", "b", "stargz.index.json", "é"])
_MEMBERS = st.lists(
    st.builds(
        Member,
        _NAMES,
        st.sampled_from(["reg", "reg", "dir", "symlink", "hardlink", "fifo"]),
        st.binary(max_size=3000),
        st.sampled_from([0o644, 0o755, 0o4755]),
        link=st.sampled_from(["a", "b/c", "../../x", "missing"]),
    ),
    max_size=6,
)


@settings(max_examples=scaled(40))
@given(
    _MEMBERS,
    st.sampled_from([64, 1 << 20]),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
    st.sampled_from([None, "truncate"]),
)
def test_a_damaged_blob_gives_its_toc_or_an_estargz_error(
    members: list[Member],
    chunk_size: int,
    damage: list[tuple[float, int]],
    cut: str | None,
) -> None:
    blob, toc_digest = build_estargz(members, chunk_size=chunk_size)
    data = bytearray(blob)
    for at, value in damage:
        data[int(at * len(data))] = value
    if cut:
        data = data[: len(data) - 1 - int(damage[0][0] * 100 if damage else 0)]
    blob = bytes(data)

    def read_range(start: int, end: int) -> bytes:
        assert 0 <= start <= end <= len(blob)
        return blob[start:end]

    try:
        toc = read_toc(read_range, len(blob), toc_digest if damage else None)
    except EStargzError:
        return
    for e in toc.entries:
        if e.is_data:
            member = blob[e.offset : e.end_offset]
            with contextlib.suppress(EStargzError):
                read_chunk(member, e)
    explore(toc)


# -- TOC JSON ---------------------------------------------------------------------------------
_NUMBERS = st.one_of(
    st.integers(-5, 5000),
    st.sampled_from([-(1 << 70), 1 << 64, 1 << 32, (1 << 31) - 1, 2**53 + 1]),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.text(max_size=3),
)
_TOC_NAMES = st.one_of(
    st.sampled_from(
        ["", ".", "/", "a", "a/", "a/b", "./a/../b", "../../etc/passwd", "/a/b/", "a//b",
         ".wh.a", "a/.wh..wh..opq", ".wh.", ".prefetch.landmark", "a\x00b"]
    ),
    st.text(max_size=12),
)
_MODTIMES = st.one_of(
    st.sampled_from(["2023-11-14T22:13:20Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999+14:00",
                     "2023-02-30T00:00:00Z", "2023-11-14 22:13:20-07:30", "yesterday", ""]),
    st.text(max_size=25),
)
_DIGESTS = st.sampled_from(
    ["", "sha256:" + "0" * 64, "md5:abc", "sha256:", "sha256:" + hashlib.sha256(b"").hexdigest()]
)


def _entry() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "name": _TOC_NAMES,
            "type": st.sampled_from(
                ["reg", "reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "x"]
            ),
        },
        optional={
            "size": _NUMBERS,
            "offset": _NUMBERS,
            "chunkOffset": _NUMBERS,
            "chunkSize": _NUMBERS,
            "mode": _NUMBERS,
            "uid": _NUMBERS,
            "gid": _NUMBERS,
            "devMajor": _NUMBERS,
            "devMinor": _NUMBERS,
            "linkName": _TOC_NAMES,
            "modtime": _MODTIMES,
            "digest": _DIGESTS,
            "chunkDigest": _DIGESTS,
            "xattrs": st.one_of(
                st.dictionaries(
                    st.sampled_from(["user.a", "trusted.overlay.opaque", "security.capability"]),
                    st.one_of(st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode()),
                              st.text(max_size=4), st.integers()),
                    max_size=2,
                ),
                st.lists(st.integers(), max_size=1),
                st.none(),
            ),
        },
    )


_TOC_DOCS = st.one_of(
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, 1, 2, "1", None]), "entries": st.lists(_entry(), max_size=10)}
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=10,
    ),
)


class _NoSource:
    """A TOC layer that is only listed and stat'ed never reads its blob."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the blob was read ({name}) to list or stat a TOC layer")


def explore(toc: TOC) -> None:
    """Build the layer and the tree of ``toc``; list and stat every node."""
    layer = TOCLayer(toc, cast(BlobSource, _NoSource()))
    for path in layer.entries:
        assert not path.startswith("/") and ".." not in path.split("/"), path
        assert "\x00" not in path
    try:
        tree = Tree([layer])
    except ImageError:
        return
    pending: list[Node] = [tree.root]
    seen = 0
    while pending and seen < 500:
        node = pending.pop()
        seen += 1
        attrs = tree.attributes(node)
        # what FUSE hands the kernel must fit its fields
        assert 0 <= attrs.uid < 1 << 32 and 0 <= attrs.gid < 1 << 32, attrs
        assert 0 <= attrs.size < 1 << 63 and 0 <= attrs.rdev < 1 << 64, attrs
        assert 0 <= attrs.mtime_ns < 1 << 63, attrs
        if node.is_dir:
            for name in tree.listing(node):
                assert name not in ("", ".", "..") and "/" not in name
                child = tree.child(node, name)
                assert child is not None
                if child.ino != node.ino:
                    pending.append(child)


@given(_TOC_DOCS, st.integers(0, 1 << 20))
def test_toc_json_parses_or_is_an_estargz_error(doc: Any, toc_offset: int) -> None:
    data = json.dumps(doc).encode()
    try:
        toc = parse_toc(data, toc_offset)
    except EStargzError:
        return
    for e in toc.entries:
        assert isinstance(e, TOCEntry)
        if e.is_data:
            assert 0 < e.offset < e.end_offset <= toc_offset
            assert e.chunk_size > 0 and e.chunk_offset + e.chunk_size <= e.size
    explore(toc)


@given(st.binary(max_size=300), st.integers(0, 1 << 16))
def test_toc_bytes_that_are_no_json_are_refused(data: bytes, toc_offset: int) -> None:
    with contextlib.suppress(EStargzError):
        parse_toc(data, toc_offset)


@settings(max_examples=scaled(30))
@given(st.binary(max_size=400), st.integers(1, 1 << 12))
def test_a_chunk_of_random_bytes_is_refused(member: bytes, size: int) -> None:
    entry = TOCEntry(
        name="f",
        type="reg",
        size=size,
        offset=1,
        end_offset=1 + len(member),
        chunk_size=size,
        chunk_digest="sha256:" + "0" * 64,
    )
    with contextlib.suppress(EStargzError):
        read_chunk(member, entry)


_SOUND = [
    {"name": "d/", "type": "dir", "mode": 0o755},
    {"name": "d/dev", "type": "char", "devMajor": 1, "devMinor": 3},
    {"name": "d/empty", "type": "reg"},
    {"name": "d/link", "type": "symlink", "linkName": "empty"},
    {"name": "d/hard", "type": "hardlink", "linkName": "d/empty"},
]


@given(
    st.integers(0, len(_SOUND) - 1),
    st.sampled_from(["uid", "gid", "devMajor", "devMinor", "mode", "size", "modtime",
                     "xattrs", "name", "linkName"]),
    st.one_of(_NUMBERS, _TOC_NAMES, _MODTIMES,
              st.dictionaries(st.text(max_size=3), st.text(max_size=4), max_size=2)),
)
def test_one_bad_field_in_a_sound_toc(index: int, key: str, value: Any) -> None:
    """A TOC that is sound but for one field: deep enough to reach the layer and tree."""
    entries = [dict(e) for e in _SOUND]
    entries[index][key] = value
    data = json.dumps({"version": 1, "entries": entries}).encode()
    try:
        toc = parse_toc(data, 1000)
    except EStargzError:
        return
    explore(toc)
