"""eStargz reader and writer: round trips, layout, footers, and every kind of bad blob."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tools
from warmstart.images import estargz
from warmstart.images.errors import ChunkDigestError, CorruptLayer, EStargzError, ImageError
from warmstart.images.estargz import (
    FOOTER_SIZE,
    TOC_NAME,
    EStargzLayer,
    make_footer,
    parse_footer,
    parse_toc,
    read_chunk,
    read_toc,
    write_estargz,
)

Member = tuple[tarfile.TarInfo, bytes | None]


def info(name: str, type_: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def convert(raw: bytes, **kwargs: Any) -> tuple[bytes, EStargzLayer]:
    out = io.BytesIO()
    layer = write_estargz(io.BytesIO(raw), out, **kwargs)
    return out.getvalue(), layer


def reader(blob: bytes) -> Callable[[int, int], bytes]:
    return lambda start, end: blob[start:end]


def file_bytes(blob: bytes, toc: estargz.TOC, name: str) -> bytes:
    return b"".join(read_chunk(blob[c.offset : c.end_offset], c) for c in toc.chunks(name))


def tar_contents(blob: bytes) -> dict[str, bytes | None]:
    """What an eStargz-unaware reader sees: every member and its bytes."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            out[ti.name] = f.read() if f is not None else None
    return out


BIG = os.urandom(3 * 1024 * 1024 + 12345)


def sample_members() -> list[Member]:
    cap = info("./usr/bin/ping", mode=0o4755, uid=0, gid=0)
    cap.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
    return [
        (info("./", tarfile.DIRTYPE, mode=0o755), None),
        (info("./usr/", tarfile.DIRTYPE, mode=0o755), None),
        (info("./usr/bin/", tarfile.DIRTYPE, mode=0o755), None),
        (cap, b"\x7fELF ping"),
        (info("./usr/lib/big.so", mode=0o644, uid=1000, gid=1001, uname="u", gname="g"), BIG),
        (info("./etc/empty", mode=0o600), b""),
        (info("./etc/motd", mode=0o644), b"hello\n" * 1000),
        (info("./usr/bin/sh", tarfile.SYMTYPE, linkname="dash"), None),
        (info("./usr/bin/pong", tarfile.LNKTYPE, linkname="./usr/bin/ping"), None),
        (info("./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (info("./run/fifo", tarfile.FIFOTYPE), None),
        (info("./etc/.wh.gone"), b""),
    ]


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, bytes, EStargzLayer]:
    raw = make_tar(sample_members())
    blob, layer = convert(raw, chunk_size=1 << 20)
    return raw, blob, layer


# -- round trips ---------------------------------------------------------------------------------
def test_round_trip_metadata_and_contents(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, layer = sample
    toc = read_toc(reader(blob), len(blob), layer.toc_digest)
    by_name = {e.name: e for e in toc.entries if e.type != "chunk"}
    assert by_name[""].type == "dir"
    ping = by_name["usr/bin/ping"]
    assert (ping.type, ping.mode, ping.size) == ("reg", 0o4755, len(b"\x7fELF ping"))
    assert ping.xattrs == {"security.capability": b"\x01\x00\x00\x02"}
    assert ping.mtime == 1_700_000_000
    big = by_name["usr/lib/big.so"]
    assert (big.uid, big.gid, big.size) == (1000, 1001, len(BIG))
    assert big.digest == "sha256:" + hashlib.sha256(BIG).hexdigest()
    assert by_name["usr/bin/sh"].link_name == "dash"
    assert by_name["usr/bin/pong"].link_name == "usr/bin/ping"
    dev = by_name["dev/null"]
    assert (dev.type, dev.dev_major, dev.dev_minor, dev.mode) == ("char", 1, 3, 0o666)
    assert by_name["run/fifo"].type == "fifo"
    assert by_name["etc/empty"].size == 0 and toc.chunks("etc/empty") == []
    assert by_name["etc/.wh.gone"].type == "reg"
    assert file_bytes(blob, toc, "usr/lib/big.so") == BIG
    assert file_bytes(blob, toc, "etc/motd") == b"hello\n" * 1000
    assert toc.prefetch_end is None
    assert toc.entries[0].name == estargz.NO_PREFETCH_LANDMARK


def test_blob_is_an_ordinary_tar_gz(
    sample: tuple[bytes, bytes, EStargzLayer], tmp_path: Path
) -> None:
    raw, blob, layer = sample
    # Every member of the input survives with identical bytes.
    seen = tar_contents(blob)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            assert seen[ti.name] == (f.read() if f is not None else None)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        input_names = set(tf.getnames())
    assert set(seen) - input_names == {estargz.NO_PREFETCH_LANDMARK, TOC_NAME}
    # Layer facts match the bytes.
    plain = gzip.decompress(blob)
    assert layer.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert layer.uncompressed_size == len(plain)
    assert layer.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert layer.size == len(blob)
    assert layer.annotations() == {
        estargz.TOC_DIGEST_ANNOTATION: layer.toc_digest,
        estargz.UNCOMPRESSED_SIZE_ANNOTATION: str(len(plain)),
    }
    # And GNU gzip/tar agree.
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(blob)
    require_tools("gzip", "tar")
    subprocess.run(["gzip", "-t", str(path)], check=True)
    listing = subprocess.run(
        ["tar", "tzf", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "./usr/lib/big.so" in listing and listing[-1] == TOC_NAME


def test_members_start_where_the_toc_says(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, layer = sample
    toc = read_toc(reader(blob), len(blob))
    assert toc.digest == layer.toc_digest
    toc_offset = parse_footer(blob[-FOOTER_SIZE:])
    for e in toc.entries:
        if e.is_data:
            # Each data entry's range is exactly one gzip member holding its bytes first.
            d = zlib.decompressobj(31)
            out = d.decompress(blob[e.offset : e.end_offset])
            assert d.eof and not d.unused_data
            assert len(out) >= e.chunk_size
    # The TOC member starts with the TOC's tar header and ends with the archive end.
    member = zlib.decompressobj(31).decompress(blob[toc_offset : len(blob) - FOOTER_SIZE])
    assert tarfile.TarInfo.frombuf(member[:512], "utf-8", "strict").name == TOC_NAME
    assert member.endswith(b"\0" * 1024)


def test_large_file_is_chunked() -> None:
    data = os.urandom(5 * 1024 * 1024 + 7)
    blob, _ = convert(make_tar([(info("f"), data)]), chunk_size=1 << 20)
    toc = read_toc(reader(blob), len(blob))
    chunks = toc.chunks("f")
    assert [c.type for c in chunks] == ["reg"] + ["chunk"] * 5
    assert [c.chunk_offset for c in chunks] == [i << 20 for i in range(6)]
    assert [c.chunk_size for c in chunks] == [1 << 20] * 5 + [7]
    assert all(a.end_offset == b.offset for a, b in itertools.pairwise(chunks))
    for c in chunks:
        part = data[c.chunk_offset : c.chunk_offset + c.chunk_size]
        assert c.chunk_digest == "sha256:" + hashlib.sha256(part).hexdigest()
        assert read_chunk(blob[c.offset : c.end_offset], c) == part
    assert chunks[0].digest == "sha256:" + hashlib.sha256(data).hexdigest()
    # As the spec asks, the last chunk's chunkSize is written as 0 (omitted).
    raw_entries = json.loads(_toc_json(blob))["entries"]
    f_entries = [e for e in raw_entries if e["name"] == "f"]
    assert "chunkSize" not in f_entries[-1] and f_entries[0]["chunkSize"] == 1 << 20


def test_output_does_not_depend_on_thread_count() -> None:
    raw = make_tar(sample_members())
    one, layer_one = convert(raw, chunk_size=1 << 20, workers=1)
    three, layer_three = convert(raw, chunk_size=1 << 20, workers=3)
    assert one == three and layer_one == layer_three


def test_reconverting_replaces_toc_and_landmark(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    again, _ = convert(gzip.decompress(blob))
    names = list(tar_contents(again))
    assert names.count(TOC_NAME) == 1 and names.count(estargz.NO_PREFETCH_LANDMARK) == 1


# -- prioritized files ---------------------------------------------------------------------------
def test_prioritized_files_come_first(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    raw, _, _ = sample
    prio = ["/etc/motd", "usr/bin/pong", "not/in/this/layer", "usr/lib/big.so"]
    blob, layer = convert(raw, chunk_size=1 << 20, prioritized=prio)
    toc = read_toc(reader(blob), len(blob), layer.toc_digest)
    names = [e.name for e in toc.entries if e.type != "chunk"]
    landmark = names.index(estargz.PREFETCH_LANDMARK)
    # The hard link's target and the files' parent directories come along, in order.
    assert names[:landmark] == [
        "etc/motd",
        "usr",
        "usr/bin",
        "usr/bin/ping",
        "usr/bin/pong",
        "usr/lib/big.so",
    ]
    assert estargz.NO_PREFETCH_LANDMARK not in names
    lm = next(e for e in toc.entries if e.name == estargz.PREFETCH_LANDMARK)
    assert toc.prefetch_end == lm.offset
    # Everything prioritized lies below prefetch_end, everything else above.
    for e in toc.entries:
        if e.is_data and e.name not in estargz.LANDMARK_NAMES:
            assert (e.end_offset <= lm.offset) == (names.index(e.name) < landmark)
    # Still the same files for an unaware reader.
    assert tar_contents(blob).keys() - {estargz.PREFETCH_LANDMARK} == (
        tar_contents(convert(raw)[0]).keys() - {estargz.NO_PREFETCH_LANDMARK}
    )


def test_prioritized_from_a_non_seekable_stream(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    raw, _, _ = sample

    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            chunk = self.inner.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    out = io.BytesIO()
    write_estargz(Pipe(raw), out, prioritized=["etc/motd"])  # type: ignore[arg-type]
    blob = out.getvalue()
    toc = read_toc(reader(blob), len(blob))
    assert [e.name for e in toc.entries[:2]] == ["etc/motd", estargz.PREFETCH_LANDMARK]


def test_prioritized_list_without_matches_gives_no_prefetch_landmark(
    sample: tuple[bytes, bytes, EStargzLayer],
) -> None:
    blob, _ = convert(sample[0], prioritized=["nothing/here"])
    toc = read_toc(reader(blob), len(blob))
    assert toc.entries[0].name == estargz.NO_PREFETCH_LANDMARK and toc.prefetch_end is None


def test_duplicate_names_keep_their_order() -> None:
    raw = make_tar([(info("a"), b"old"), (info("b"), b"b"), (info("a"), b"new")])
    blob, _ = convert(raw, prioritized=["a"])
    toc = read_toc(reader(blob), len(blob))
    assert toc.entries[0].name == estargz.NO_PREFETCH_LANDMARK
    assert file_bytes(blob, toc, "a") == b"new"  # the later entry wins, as on extraction


# -- bad input tars ------------------------------------------------------------------------------
@pytest.mark.parametrize("prioritized", [None, ["a"]])
def test_truncated_input_tar_is_corrupt_layer(prioritized: list[str] | None) -> None:
    raw = make_tar([(info("a"), os.urandom(100_000))])
    with pytest.raises(CorruptLayer):
        convert(raw[:50_000], prioritized=prioritized)


def test_garbage_input_is_corrupt_layer() -> None:
    with pytest.raises(CorruptLayer):
        convert(b"this is not a tar archive" * 40)


# -- footers -------------------------------------------------------------------------------------
def legacy_footer(offset: int) -> bytes:
    """The 47-byte footer of the original stargz format (bare extra field)."""
    extra = b"%016xSTARGZ" % offset
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def test_footer_layout() -> None:
    footer = make_footer(0x1234)
    assert len(footer) == FOOTER_SIZE == 51
    assert footer[12:16] == b"SG\x16\x00" and footer[16:38] == b"0000000000001234STARGZ"
    assert gzip.decompress(footer) == b""
    assert parse_footer(b"junk" + footer) == 0x1234
    assert len(legacy_footer(5)) == 47 and gzip.decompress(legacy_footer(5)) == b""
    assert parse_footer(b"x" * 10 + legacy_footer(0xABC)) == 0xABC


def test_legacy_footer_blob_reads(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, layer = sample
    offset = parse_footer(blob[-FOOTER_SIZE:])
    legacy = blob[:-FOOTER_SIZE] + legacy_footer(offset)
    toc = read_toc(reader(legacy), len(legacy), layer.toc_digest)
    assert file_bytes(legacy, toc, "etc/motd") == b"hello\n" * 1000


@pytest.mark.parametrize(
    "tail",
    [
        b"\0" * 64,
        b"\x1f\x8b\x08\x00" + b"\0" * 60,
        make_footer(5)[:-1] + b"\x01",  # bad gzip trailer
        make_footer(5).replace(b"STARGZ", b"STARGX"),
        make_footer(5).replace(b"SG", b"XX"),
        make_footer(5).replace(b"0000000000000005", b"zzzzzzzzzzzzzzzz"),
    ],
)
def test_bad_footer(tail: bytes) -> None:
    with pytest.raises(EStargzError):
        parse_footer(tail)


# -- bad blobs -----------------------------------------------------------------------------------
def _toc_json(blob: bytes) -> bytes:
    offset = parse_footer(blob[-FOOTER_SIZE:])
    member = zlib.decompressobj(31).decompress(blob[offset:])
    with tarfile.open(fileobj=io.BytesIO(member)) as tf:
        f = tf.extractfile(TOC_NAME)
        assert f is not None
        return f.read()


def retoc(blob: bytes, toc: bytes) -> bytes:
    """``blob`` with its TOC replaced by ``toc`` (bytes), footer rewritten."""
    offset = parse_footer(blob[-FOOTER_SIZE:])
    ti = tarfile.TarInfo(TOC_NAME)
    ti.size = len(toc)
    tail = ti.tobuf(tarfile.PAX_FORMAT) + toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024
    return blob[:offset] + gzip.compress(tail) + make_footer(offset)


def mutate_toc(blob: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(_toc_json(blob))
    change(doc)
    return retoc(blob, json.dumps(doc).encode())


def test_truncated_blob(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    for cut in (len(blob) - 1, len(blob) // 2, 100, 10):
        with pytest.raises(EStargzError):
            read_toc(reader(blob[:cut]), cut)


def test_short_reads_are_errors(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    with pytest.raises(EStargzError):
        read_toc(lambda s, e: blob[s : e - 1], len(blob))


def test_toc_digest_mismatch(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    with pytest.raises(EStargzError, match="digest"):
        read_toc(reader(blob), len(blob), "sha256:" + "0" * 64)


def test_toc_offset_outside_blob(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    bad = blob[:-FOOTER_SIZE] + make_footer(len(blob) + 100)
    with pytest.raises(EStargzError):
        read_toc(reader(bad), len(bad))
    # An offset inside the blob that is not the TOC member.
    bad = blob[:-FOOTER_SIZE] + make_footer(0)
    with pytest.raises(EStargzError):
        read_toc(reader(bad), len(bad))


@pytest.mark.parametrize(
    "toc",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "entries": []}',
        b'{"version": 1, "entries": {}}',
        b'{"version": 1, "entries": [{"name": "a", "type": "socket"}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": -1}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": "5"}]}',
        b'{"version": 1, "entries": [{"name": "a\\u0000b", "type": "dir"}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir", "modtime": "yesterday"}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"k": "!!"}}]}',
        b'{"version": 1, "entries": [{"name": "..", "type": "reg"}]}',
        b'{"version": 1, "entries": [{"name": "l", "type": "hardlink"}]}',
        b'{"version": 1, "entries": [{"name": "c", "type": "chunk", "offset": 5}]}',
    ],
)
def test_bad_toc(sample: tuple[bytes, bytes, EStargzLayer], toc: bytes) -> None:
    bad = retoc(sample[1], toc)
    with pytest.raises(EStargzError):
        read_toc(reader(bad), len(bad))


def _entry(doc: dict[str, Any], name: str, type_: str = "reg") -> dict[str, Any]:
    return next(e for e in doc["entries"] if e["name"].strip("./") == name and e["type"] == type_)


def _last_chunk(doc: dict[str, Any]) -> dict[str, Any]:
    return [e for e in doc["entries"] if e["type"] == "chunk"][-1]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: _entry(d, "usr/lib/big.so").update(offset=10**12),  # past the TOC
        lambda d: _entry(d, "usr/lib/big.so").update(offset=0),
        lambda d: _entry(d, "usr/lib/big.so", "chunk").update(chunkOffset=3),  # gap
        lambda d: _last_chunk(d).update(chunkSize=5),  # the file's end is not covered
        lambda d: _entry(d, "usr/lib/big.so").update(chunkSize=len(BIG) * 2),  # overflow
        lambda d: d["entries"].insert(0, _entry(d, "usr/lib/big.so", "chunk")),  # orphan
    ],
)
def test_inconsistent_chunks(
    sample: tuple[bytes, bytes, EStargzLayer], change: Callable[[dict[str, Any]], None]
) -> None:
    bad = mutate_toc(sample[1], change)
    with pytest.raises(EStargzError):
        read_toc(reader(bad), len(bad))


def test_toc_bomb_is_refused(
    sample: tuple[bytes, bytes, EStargzLayer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, blob, _ = sample
    monkeypatch.setattr(estargz, "MAX_TOC_SIZE", 4096)
    with pytest.raises(EStargzError, match="more than"):
        read_toc(reader(blob), len(blob))


def test_hostile_names_are_normalised(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["entries"] += [
            {"name": "../../etc/passwd", "type": "dir"},
            {"name": "/abs/path/", "type": "dir"},
            {"name": "./a/./b/../c", "type": "symlink", "linkName": "/etc/shadow"},
            {"name": "x", "type": "hardlink", "linkName": "../../../usr/bin/ping"},
        ]

    bad = mutate_toc(sample[1], change)
    toc = read_toc(reader(bad), len(bad))
    tail = [(e.name, e.link_name) for e in toc.entries[-4:]]
    # Names stay inside the layer; a symlink's target is data, served as is.
    assert tail == [
        ("etc/passwd", ""),
        ("abs/path", ""),
        ("a/c", "/etc/shadow"),
        ("x", "usr/bin/ping"),
    ]


# -- chunks --------------------------------------------------------------------------------------
def test_corrupted_chunk(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    toc = read_toc(reader(blob), len(blob))
    motd = toc.chunks("etc/motd")[0]
    # A well-formed member with other bytes: only the digest can tell.
    forged = gzip.compress(b"HELLO\n" + b"hello\n" * 999)
    with pytest.raises(ChunkDigestError):
        read_chunk(forged, motd)
    # Damaged deflate data: either malformed or a digest mismatch, never bytes.
    member = bytearray(blob[motd.offset : motd.end_offset])
    member[20] ^= 0xFF
    with pytest.raises(EStargzError):
        read_chunk(bytes(member), motd)
    # Truncated member.
    with pytest.raises(EStargzError):
        read_chunk(blob[motd.offset : motd.offset + 15], motd)
    # Not gzip at all.
    with pytest.raises(EStargzError):
        read_chunk(b"\0" * 64, motd)


def test_read_chunk_refuses_entries_without_data(
    sample: tuple[bytes, bytes, EStargzLayer],
) -> None:
    _, blob, _ = sample
    toc = read_toc(reader(blob), len(blob))
    d = next(e for e in toc.entries if e.type == "dir")
    with pytest.raises(EStargzError):
        read_chunk(b"", d)


def test_unsupported_or_missing_digest(sample: tuple[bytes, bytes, EStargzLayer]) -> None:
    _, blob, _ = sample
    toc = read_toc(reader(blob), len(blob))
    c = toc.chunks("usr/lib/big.so")[1]
    member = blob[c.offset : c.end_offset]
    c.chunk_digest = "md5:abc"
    with pytest.raises(EStargzError, match="algorithm"):
        read_chunk(member, c)
    c.chunk_digest = ""  # a middle chunk without chunkDigest cannot be verified
    with pytest.raises(EStargzError, match="no digest"):
        read_chunk(member, c)


# -- TOCs as other writers produce them ----------------------------------------------------------
def test_reference_style_toc_defaults_and_offsets() -> None:
    """Zero fields omitted, st_mode-style modes, Go time formats, chunkSize 0 = to the end,
    end offsets resolved to the next distinct offset (or the TOC itself)."""
    doc = {
        "version": 1,
        "entries": [
            {"name": "bin/", "type": "dir", "modtime": "2019-08-20T10:30:43Z", "mode": 0o40755},
            {
                "name": "bin/sh",
                "type": "reg",
                "size": 10,
                "offset": 100,
                "mode": 0o100755,
                "modtime": "2019-08-20T12:30:43.5+02:00",
                "chunkDigest": "sha256:aa",
            },
            {"name": "big", "type": "reg", "size": 30, "offset": 200, "chunkSize": 10},
            {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 10, "chunkSize": 10},
            {"name": "big", "type": "chunk", "offset": 400, "chunkOffset": 20},
            {"name": "empty", "type": "reg", "offset": 400},
            {"name": "etc", "type": "dir"},
            {"name": "etc/f", "type": "reg"},
            {"name": "last", "type": "reg", "size": 1, "offset": 500},
        ],
    }
    toc = parse_toc(json.dumps(doc).encode(), 600)
    e = {(x.name, x.chunk_offset): x for x in toc.entries}
    assert e[("bin", 0)].mode == 0o755 and e[("bin", 0)].uid == 0
    assert e[("bin", 0)].mtime == 1566297043.0
    assert e[("bin/sh", 0)].mtime == 1566297043.5
    assert e[("bin/sh", 0)].mode == 0o755
    assert e[("etc", 0)].mode == 0o755 and e[("etc/f", 0)].mode == 0o644
    assert (e[("bin/sh", 0)].end_offset, e[("bin/sh", 0)].chunk_size) == (200, 10)
    assert [(c.offset, c.end_offset, c.chunk_size) for c in toc.chunks("big")] == [
        (200, 300, 10),
        (300, 400, 10),
        (400, 500, 10),
    ]
    assert (e[("last", 0)].end_offset, e[("last", 0)].chunk_size) == (600, 1)
    assert toc.chunks("empty") == [] and toc.chunks("etc") == []


def test_errors_are_image_errors() -> None:
    assert issubclass(ChunkDigestError, EStargzError)
    assert issubclass(EStargzError, ImageError)


def test_hostile_tar_names_land_inside_the_layer_in_the_toc() -> None:
    raw = make_tar(
        [
            (info("../../etc/evil"), b"x"),
            (info("/abs/file"), b"y"),
            (info("a/../../b"), b"z"),
            (info("l", tarfile.LNKTYPE, linkname="../../etc/passwd"), None),
        ]
    )
    blob, _ = convert(raw)
    toc = read_toc(reader(blob), len(blob))
    got = {(e.name, e.link_name) for e in toc.entries if e.name not in estargz.LANDMARK_NAMES}
    assert got == {("etc/evil", ""), ("abs/file", ""), ("b", ""), ("l", "etc/passwd")}
    assert file_bytes(blob, toc, "etc/evil") == b"x"


def test_large_toc_is_read_in_two_requests() -> None:
    """A TOC bigger than the tail fetched first costs one more request, for the rest only."""
    members = [(info(f"dir/file-{i:05d}-{'x' * 80}"), b"%d" % i) for i in range(6000)]
    blob, layer = convert(make_tar(members))
    calls: list[tuple[int, int]] = []

    def read_range(start: int, end: int) -> bytes:
        calls.append((start, end))
        return blob[start:end]

    toc = read_toc(read_range, len(blob), layer.toc_digest)
    assert len(toc.entries) == 6001
    assert len(calls) == 2 and calls[1][1] == calls[0][0]
    assert file_bytes(blob, toc, "dir/file-05999-" + "x" * 80) == b"5999"
