"""The chunk cache on disk and the keys chunks are cached under."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from warmstart.images.estargz import TOCEntry
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def chunked(name: str, data: bytes, size: int) -> list[TOCEntry]:
    """The TOC entries of a file cut into ``size``-byte chunks (blob offsets made up)."""
    out = []
    for off in range(0, len(data), size):
        piece = data[off : off + size]
        out.append(
            TOCEntry(
                name=name,
                type="reg" if off == 0 else "chunk",
                size=len(data),
                digest=sha(data),
                offset=1000 + off,
                end_offset=1000 + off + len(piece),
                chunk_offset=off,
                chunk_size=len(piece),
                chunk_digest=sha(piece),
            )
        )
    return out


def test_a_stored_chunk_is_found_whole_and_read_at_any_offset(cache: ChunkCache) -> None:
    data = b"0123456789"
    digest = sha(data)
    assert not cache.has(digest, len(data))
    assert cache.put(digest, data)
    path = cache.path(digest)
    assert path == cache.root / "sha256" / digest[7:9] / digest[7:]
    assert cache.has(digest, len(data))
    assert not cache.has(digest, len(data) + 1)  # not the chunk the caller means
    assert cache.read(digest, 3, 4) == b"3456"
    assert cache.read(digest, 8, 4) is None  # past the end: not whole
    assert list(cache.tmp.iterdir()) == []  # written beside, renamed into place


def test_a_truncated_chunk_file_is_not_whole(cache: ChunkCache) -> None:
    data = bytes(range(200))
    digest = sha(data)
    cache.put(digest, data)
    path = cache.path(digest)
    assert path is not None
    os.truncate(path, 100)
    assert not cache.has(digest, len(data))
    assert cache.read(digest, 0, len(data)) is None
    assert cache.read(digest, 150, 10) is None


def test_digests_that_are_not_sha256_hex_get_no_path(cache: ChunkCache) -> None:
    assert cache.path("sha256:../../../etc/passwd") is None
    assert cache.path("md5:" + "a" * 32) is None
    assert cache.path("sha256:" + "A" * 64) is None
    assert cache.put("sha256:" + "g" * 64, b"x") is False
    assert not cache.has("sha256:../x", 1) and cache.read("", 0, 1) is None
    assert list(cache.root.rglob("*")) == [cache.tmp]


def test_cache_keys_are_chunk_digests_or_the_digest_of_an_unchunked_file() -> None:
    data = b"a" * 10
    [whole] = chunked("f", data, 10)
    assert cache_key(whole) == sha(data)  # one chunk: chunk digest == file digest
    pieces = chunked("g", b"abcdefghij", 4)
    assert [cache_key(c) for c in pieces] == [sha(b"abcd"), sha(b"efgh"), sha(b"ij")]
    # A legacy TOC without chunk digests: a whole file is keyed by its file digest...
    legacy = TOCEntry(name="h", type="reg", size=10, digest=sha(data), chunk_size=10)
    assert cache_key(legacy) == sha(data)
    # ...but a piece of a file has no digest of its own: it cannot be cached.
    part = TOCEntry(name="h", type="chunk", size=10, digest=sha(data), chunk_size=4)
    assert cache_key(part) == ""


def test_a_span_of_a_file_is_read_across_its_chunks(cache: ChunkCache) -> None:
    data = bytes(range(256)) * 4
    chunks = chunked("f", data, 100)
    for c in chunks:
        cache.put(c.chunk_digest, data[c.chunk_offset : c.chunk_offset + c.chunk_size])
    assert cache.read_span(chunks[1:4], 150, 390) == data[150:390]
    assert cache.read_span(chunks[:1], 0, 100) == data[:100]
    missing = chunks[2]
    path = cache.path(missing.chunk_digest)
    assert path is not None
    path.unlink()
    assert cache.read_span(chunks[1:4], 150, 390) is None
    assert cache.read_span(chunks[3:4], 300, 310) == data[300:310]
