"""Gzip indexes: checkpoints resume inflation anywhere, chunks verify, hostile indexes
are refused, and an indexed layer serves the tar's exact bytes on a real FUSE mount."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import struct
import tarfile
from pathlib import Path

import pytest
from isal import isal_zlib

from tests.conftest import IS_ROOT, needs
from warmstart.images import gzindex
from warmstart.images.errors import ChunkDigestError, CorruptLayer, EStargzError
from warmstart.images.gzindex import SpanEntry, build_index, parse_index, read_span
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.layers import IndexLayer
from warmstart.images.lazyfs.sources import FileBlobSource


def _tar(seed: int = 1, files: int = 120) -> tuple[bytes, dict[str, bytes]]:
    """A tar mixing incompressible data (stored deflate blocks), text, links, dirs."""
    rnd = random.Random(seed)
    contents: dict[str, bytes] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("usr/lib")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tf.addfile(d)
        for i in range(files):
            if i % 3 == 0:
                data = rnd.randbytes(rnd.randint(0, 60000))
            else:
                data = (b"line %d of a text file\n" % i) * rnd.randint(0, 9000)
            info = tarfile.TarInfo(f"usr/lib/d{i % 5}/f{i}.py")
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
            contents[info.name] = data
        link = tarfile.TarInfo("usr/bin/py")
        link.type = tarfile.SYMTYPE
        link.linkname = "../lib/d0/f0.py"
        tf.addfile(link)
        hard = tarfile.TarInfo("usr/lib/hard")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "usr/lib/d1/f1.py"
        tf.addfile(hard)
    return buf.getvalue(), contents


_BUILT: dict[int, bytes] = {}


def _index(blob: bytes, spacing: int = 64 << 10) -> gzindex.GzipIndex:
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    built = build_index(io.BytesIO(blob), digest, len(blob), spacing=spacing)
    assert built.blob[: built.toc_size] and built.toc_digest.startswith("sha256:")
    index = parse_index(built.blob[: built.toc_size], digest, len(blob))
    _BUILT[id(index)] = built.blob
    return index


def _read(
    index: gzindex.GzipIndex, entries: list[SpanEntry], blob: bytes, start: int
) -> list[tuple[SpanEntry, bytes | EStargzError]]:
    """What a reader gets: the window from the index blob, then the span, then each
    piece cut from it."""
    point = index.checkpoints[entries[0].point]
    window = b""
    if point.window_size:
        member = _BUILT[id(index)][point.window_at : point.window_at + point.window_len]
        window = gzindex.read_window(point, member)
    try:
        span = read_span(point, window, blob, start)
    except EStargzError as exc:
        return [(e, exc) for e in entries]
    return [(e, span[e.span_offset : e.span_offset + e.chunk_size]) for e in entries]


def _spans(index: gzindex.GzipIndex) -> list[SpanEntry]:
    return [e for e in index.toc.entries if isinstance(e, SpanEntry)]


@pytest.mark.parametrize("level", [1, 6, 9])
def test_every_chunk_inflates_from_its_checkpoint_to_the_tar_bytes(level: int) -> None:
    tar, _ = _tar()
    blob = gzip.compress(tar, level)
    index = _index(blob)
    assert len(index.checkpoints) > 10
    # Most checkpoints are not byte-aligned; some come after stored blocks.
    assert any(c.bits for c in index.checkpoints) and index.checkpoints[0].uncompressed == 0
    for e in _spans(index):
        [(got, data)] = _read(index, [e], blob[e.offset : e.end_offset], e.offset)
        assert got is e
        assert data == tar[e.inner : e.inner + e.chunk_size], e.name


def test_pieces_of_one_span_come_from_one_inflation() -> None:
    tar, _ = _tar(seed=2)
    blob = gzip.compress(tar, 6)
    index = _index(blob, spacing=256 << 10)
    # Spans tile the layer; a file's pieces tile the file.
    assert sum(p.span_size for p in index.checkpoints) == index.uncompressed_size
    groups: dict[int, list[SpanEntry]] = {}
    for e in _spans(index):
        groups.setdefault(e.point, []).append(e)
    _point, group = max(groups.items(), key=lambda kv: len(kv[1]))
    assert len(group) > 3
    start = min(e.offset for e in group)
    end = max(e.end_offset for e in group)
    out = _read(index, group, blob[start:end], start)
    assert [bytes(d) for _, d in out] == [tar[e.inner : e.inner + e.chunk_size] for e in group]  # type: ignore[arg-type]


def test_a_multi_member_gzip_blob_is_read_across_members() -> None:
    tar, _ = _tar(seed=3)
    cut = len(tar) // 3
    blob = gzip.compress(tar[:cut], 6) + gzip.compress(tar[cut:], 6)
    index = _index(blob)
    for e in _spans(index):
        [(_, data)] = _read(index, [e], blob[e.offset : e.end_offset], e.offset)
        assert data == tar[e.inner : e.inner + e.chunk_size]


def test_tampered_compressed_bytes_never_give_wrong_bytes() -> None:
    tar, _ = _tar(seed=4)
    blob = bytearray(gzip.compress(tar, 6))
    index = _index(bytes(blob))
    e = max(_spans(index), key=lambda s: s.chunk_size)
    rnd = random.Random(5)
    for _ in range(20):
        bad = bytearray(blob)
        pos = rnd.randrange(e.offset, e.end_offset)
        bad[pos] ^= 1 << rnd.randrange(8)
        [(_, data)] = _read(index, [e], bytes(bad[e.offset : e.end_offset]), e.offset)
        if isinstance(data, bytes):
            assert data == tar[e.inner : e.inner + e.chunk_size]  # a flip past what it reads
        else:
            assert isinstance(data, (ChunkDigestError, EStargzError))


def _rewrite(raw: bytes, change: dict[str, object] | None = None, entries=None) -> bytes:  # type: ignore[no-untyped-def]
    body = isal_zlib.decompress(raw, wbits=31)
    (n,) = struct.unpack_from("<I", body, len(gzindex.MAGIC))
    start = len(gzindex.MAGIC) + 4
    doc = json.loads(body[start : start + n])
    doc.update(change or {})
    if entries is not None:
        entries(doc["entries"])
    new = json.dumps(doc).encode()
    return gzip.compress(gzindex.MAGIC + struct.pack("<I", len(new)) + new + body[start + n :])


def test_hostile_or_mismatched_indexes_are_refused() -> None:
    tar, _ = _tar(seed=6, files=30)
    blob = gzip.compress(tar, 6)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    built = build_index(io.BytesIO(blob), digest, len(blob), spacing=64 << 10)
    raw = built.blob[: built.toc_size]
    parse_index(raw, digest, len(blob))
    parse_index(built.blob, digest, len(blob))  # the whole blob will do
    with pytest.raises(gzindex.IndexError_, match="not sha256"):
        parse_index(raw, "sha256:" + "0" * 64, len(blob))
    with pytest.raises(gzindex.IndexError_, match="another size"):
        parse_index(raw, digest, len(blob) + 1)
    with pytest.raises(gzindex.IndexError_):
        parse_index(b"not gzip", digest, len(blob))
    with pytest.raises(gzindex.IndexError_, match="not a warmstart"):
        parse_index(gzip.compress(b"{}"), digest, len(blob))

    def outside(entries: list[dict[str, object]]) -> None:
        for e in entries:
            if "innerOffset" in e:
                e["innerOffset"] = 1 << 40
                return

    with pytest.raises(gzindex.IndexError_, match=r"integer in range|outside"):
        parse_index(_rewrite(raw, entries=outside), digest, len(blob))

    def chunked(entries: list[dict[str, object]]) -> None:
        entries.append({"name": "usr/lib/d0/f0.py", "type": "chunk", "chunkOffset": 1})

    with pytest.raises(gzindex.IndexError_, match="no chunks"):
        parse_index(_rewrite(raw, entries=chunked), digest, len(blob))
    points = _points(raw)
    points[1][7] += 1  # a span one byte longer: the spans no longer tile the layer
    with pytest.raises(gzindex.IndexError_, match="tile"):
        parse_index(_rewrite(raw, {"checkpoints": points}), digest, len(blob))
    points = _points(raw)
    points[2][8] = points[2][1] - 2  # ends before it starts
    with pytest.raises(gzindex.IndexError_, match="ends before"):
        parse_index(_rewrite(raw, {"checkpoints": points}), digest, len(blob))
    with pytest.raises(gzindex.IndexError_, match="out of order"):
        points = _points(raw)
        points.reverse()
        parse_index(_rewrite(raw, {"checkpoints": points}), digest, len(blob))
    with pytest.raises(EStargzError, match=r"empty name"):

        def climb(entries: list[dict[str, object]]) -> None:
            entries.append({"name": "", "type": "reg", "size": 1})

        parse_index(_rewrite(raw, entries=climb), digest, len(blob))


def _points(raw: bytes) -> list[list[int]]:
    body = isal_zlib.decompress(raw, wbits=31)
    (n,) = struct.unpack_from("<I", body, len(gzindex.MAGIC))
    start = len(gzindex.MAGIC) + 4
    return list(json.loads(body[start : start + n])["checkpoints"])


def test_not_a_gzip_tar_is_a_corrupt_layer() -> None:
    with pytest.raises(CorruptLayer):
        build_index(io.BytesIO(b"plain bytes, not gzip" * 100), "sha256:" + "1" * 64, 2100)
    with pytest.raises(CorruptLayer):
        blob = gzip.compress(os.urandom(5000))
        build_index(io.BytesIO(blob), "sha256:" + "1" * 64, len(blob))


@needs(IS_ROOT and os.path.exists("/dev/fuse"), "needs root and /dev/fuse")
def test_an_indexed_layer_serves_the_tar_on_a_fuse_mount(tmp_path: Path) -> None:
    from tests.unit.test_lazyfs_fuse import mounted

    tar, contents = _tar(seed=7)
    blob = gzip.compress(tar, 6)
    layer_path = tmp_path / "layer.tar.gz"
    layer_path.write_bytes(blob)
    index = _index(blob)
    cache = ChunkCache(tmp_path / "cache")
    index_path = tmp_path / "index"
    index_path.write_bytes(_BUILT[id(index)])
    layer = IndexLayer(index, FileBlobSource(layer_path), FileBlobSource(index_path), cache)
    with mounted(tmp_path, [layer], cache) as (mnt, daemon):
        names = sorted(contents)
        random.Random(8).shuffle(names)
        for name in names:
            assert (mnt / name).read_bytes() == contents[name], name
        assert os.readlink(mnt / "usr/bin/py") == "../lib/d0/f0.py"
        assert (mnt / "usr/lib/hard").read_bytes() == contents["usr/lib/d1/f1.py"]
        assert os.stat(mnt / "usr/lib/hard").st_nlink == 2
        # A read in the middle of a file reads the right bytes.
        big = max(contents, key=lambda n: len(contents[n]))
        with open(mnt / big, "rb") as f:
            f.seek(len(contents[big]) // 2)
            assert f.read(1000) == contents[big][len(contents[big]) // 2 :][:1000]
        assert daemon.stats.snapshot()["verify_errors"] == 0
    # Windows were cached by digest: a new layer over the same cache fetches none.
    counting = _Counting(index_path)
    again = IndexLayer(index, FileBlobSource(layer_path), counting, cache)
    again.prepare(_spans(index))
    assert counting.calls == 0


class _Counting(FileBlobSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls = 0

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        return super().fetch(ranges)


class _Failing(FileBlobSource):
    """An index blob whose source fails until told otherwise, or serves tampered bytes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.mode = "fail"

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        if self.mode == "fail":
            raise OSError("the registry went away")
        got = super().fetch(ranges)
        if self.mode == "tamper":
            return [gzip.compress(b"\0" * len(isal_zlib.decompress(g, wbits=31))) for g in got]
        return got


def test_a_missing_or_tampered_window_is_an_error_never_wrong_bytes(tmp_path: Path) -> None:
    tar, _ = _tar(seed=9)
    blob = gzip.compress(tar, 6)
    layer_path = tmp_path / "layer.tar.gz"
    layer_path.write_bytes(blob)
    index = _index(blob)
    index_path = tmp_path / "index"
    index_path.write_bytes(_BUILT[id(index)])
    windows = _Failing(index_path)
    layer = IndexLayer(index, FileBlobSource(layer_path), windows, ChunkCache(tmp_path / "c"))
    e = next(s for s in _spans(index) if index.checkpoints[s.point].window_size)
    unit = ([e], blob[e.offset : e.end_offset])
    for mode in ("fail", "tamper"):
        windows.mode = mode
        [(_, got)] = layer.decode(unit)  # type: ignore[arg-type]
        assert isinstance(got, EStargzError), mode
    windows.mode = "ok"
    [(_, got)] = layer.decode(unit)  # type: ignore[arg-type]
    point = index.checkpoints[e.point]
    assert got == tar[point.uncompressed : point.uncompressed + point.span_size]
