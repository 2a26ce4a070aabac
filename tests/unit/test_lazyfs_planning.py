"""Fetch planning: which chunks a read, the prefetch and the background fetch take."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.lazyfs_blobs import BASE, Member, big, blob_layer
from warmstart.images.estargz import TOCEntry, read_chunk
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.layers import TOCLayer
from warmstart.images.lazyfs.planning import (
    blob_ranges,
    cached_bytes,
    chunks_covering,
    compressed_size,
    members_of,
    next_background_batch,
    plan_read,
    prefetch_chunks,
    unique_chunks,
)

MEMBER_SIZE = 3000


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def package(n: int = 20, seed: int = 0) -> list[Member]:
    """A directory of ``n`` small modules, each its own gzip member in the blob."""
    return [Member("pkg", "dir")] + [
        Member(f"pkg/m{i}.py", data=big(MEMBER_SIZE, seed=seed + i)) for i in range(n)
    ]


def names(entries: list[TOCEntry]) -> list[str]:
    return [e.name for e in entries]


def store(cache: ChunkCache, entry: TOCEntry, data: bytes) -> None:
    assert cache.put(cache_key(entry), data)


def test_a_read_takes_the_chunks_that_cover_its_range(tmp_path: Path, cache: ChunkCache) -> None:
    layer, _ = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    chunks = layer.toc.chunks("usr/lib/big.bin")
    starts = [c.chunk_offset for c in chunks]
    k = 64 << 10
    assert chunks_covering(chunks, starts, 100_000, 100_100) == chunks[1:2]
    assert chunks_covering(chunks, starts, k - 1, k + 1) == chunks[0:2]
    assert chunks_covering(chunks, starts, k, 2 * k) == chunks[1:2]  # end is exclusive
    assert chunks_covering(chunks, starts, 0, 300_000) == chunks
    assert chunks_covering(chunks, starts, 299_999, 300_000) == chunks[4:]


def test_read_ahead_follows_in_blob_order_within_its_budget(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, _ = blob_layer(tmp_path, "pkg", package(), cache)
    data = layer.data
    assert names(plan_read(layer, data[:1], 0, cache)) == ["pkg/m0.py"]
    assert plan_read(layer, data[:1], 1 << 20, cache) == data  # everything that follows
    assert plan_read(layer, data[10:11], 1 << 20, cache) == data[10:]  # never backwards
    # The budget counts compressed bytes after the missed chunks: exactly three fit.
    budget = compressed_size(data[1:4])
    assert plan_read(layer, data[:1], budget, cache) == data[:4]
    assert plan_read(layer, data[:1], budget - 1, cache) == data[:3]


def test_read_ahead_stops_at_a_chunk_cached_or_in_flight(tmp_path: Path, cache: ChunkCache) -> None:
    layer, _ = blob_layer(tmp_path, "pkg", package(), cache)
    data = layer.data
    store(cache, data[5], big(MEMBER_SIZE, seed=5))
    assert plan_read(layer, data[:1], 1 << 20, cache) == data[:5]
    busy = {cache_key(data[3])}
    assert plan_read(layer, data[:1], 1 << 20, cache, busy) == data[:3]
    # Missed chunks are fetched whatever else is true; each chunk once, in blob order.
    assert plan_read(layer, [data[7], data[2], data[7]], 0, cache) == [data[2], data[7]]


def test_adjacent_members_merge_into_one_range_and_are_cut_apart_again(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "pkg", package(6), cache)
    data = layer.data
    assert all(a.end_offset == b.offset for a, b in itertools.pairwise(data))
    assert blob_ranges(data[:3]) == [(data[0].offset, data[2].end_offset)]
    picked = [data[0], data[1], data[3], data[5]]
    ranges = blob_ranges(picked)
    assert ranges == [
        (data[0].offset, data[1].end_offset),
        (data[3].offset, data[3].end_offset),
        (data[5].offset, data[5].end_offset),
    ]
    members = members_of(picked, ranges, source.fetch(ranges))
    assert [e for e, _ in members] == picked
    for e, member in members:
        assert len(member) == e.end_offset - e.offset
        i = int(e.name.removeprefix("pkg/m").removesuffix(".py"))
        assert read_chunk(member, e) == big(MEMBER_SIZE, seed=i)


def test_prefetch_takes_the_prioritized_chunks_not_cached_once_each(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("app", "dir"),
        Member("app/main.py", data=b"import lib\n"),
        Member("app/lib.py", data=big(5000, seed=7)),
        Member("app/copy.py", data=big(5000, seed=7)),  # the same bytes: one chunk
        Member("app/cold.bin", data=big(5000, seed=8)),
    ]
    layer, _ = blob_layer(tmp_path, "app", members, cache, prioritized=4)
    assert names(prefetch_chunks(layer, cache)) == ["app/main.py", "app/lib.py"]
    store(cache, layer.data[0], b"import lib\n")
    assert names(prefetch_chunks(layer, cache)) == ["app/lib.py"]
    plain, _ = blob_layer(tmp_path, "plain", members, cache)  # no landmark
    assert prefetch_chunks(plain, cache) == []


def background_pass(
    layer: TOCLayer, batch_bytes: int, cache: ChunkCache, taken: set[str], busy: set[str]
) -> list[list[TOCEntry]]:
    batches = []
    i = 0
    while i < len(layer.data):
        batch, i = next_background_batch(layer, i, batch_bytes, cache, taken, busy)
        if batch:
            batches.append(batch)
    return batches


def test_background_batches_cover_what_is_missing_once(tmp_path: Path, cache: ChunkCache) -> None:
    layer, _ = blob_layer(tmp_path, "pkg", package(10), cache)
    data = layer.data
    store(cache, data[4], big(MEMBER_SIZE, seed=4))
    busy = {cache_key(data[7])}
    taken: set[str] = set()
    budget = compressed_size(data[:2])
    batches = background_pass(layer, budget, cache, taken, busy)
    flat = [e for b in batches for e in b]
    assert flat == [e for i, e in enumerate(data) if i not in (4, 7)]
    assert cache_key(data[7]) not in taken  # in flight elsewhere: not this pass's
    # Each batch but the last reaches the budget with its last chunk, not before.
    assert len(batches) > 2
    for batch in batches[:-1]:
        assert compressed_size(batch[:-1]) < budget <= compressed_size(batch)
    one_each = background_pass(layer, 1, cache, set(), busy)
    assert [len(b) for b in one_each] == [1] * 8
    assert background_pass(layer, 1, cache, taken, set()) == [[data[7]]]
    # A second layer sharing some chunks: what the first took is not taken again.
    other, _ = blob_layer(tmp_path, "other", package(12, seed=8), cache)
    again = background_pass(other, 1 << 20, cache, taken, set())
    assert names([e for b in again for e in b]) == [f"pkg/m{i}.py" for i in range(2, 12)]


def test_unique_chunks_and_the_bytes_cached(tmp_path: Path, cache: ChunkCache) -> None:
    a, _ = blob_layer(tmp_path, "a", package(4), cache)
    b, _ = blob_layer(tmp_path, "b", package(4, seed=2), cache)  # m0, m1 = a's m2, m3
    unique = unique_chunks([a, b])
    assert len(unique) == 6
    total = compressed_size(unique.values())
    assert cached_bytes(unique, cache) == (total, 0)
    store(cache, a.data[0], big(MEMBER_SIZE, seed=0))
    assert cached_bytes(unique, cache) == (total, a.data[0].end_offset - a.data[0].offset)
