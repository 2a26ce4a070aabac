"""The fetcher on trio, without FUSE: one fetch per chunk, prefetch claims, failures, and a
background fetch that yields to reads and keeps to its bandwidth."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.lazyfs_blobs import BASE, Member, big, blob_layer
from warmstart.images.errors import FetchError
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.fetcher import Fetcher
from warmstart.images.lazyfs.stats import Stats
from warmstart.images.lazymount import BackgroundFetch


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path: Path, cache: ChunkCache) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    gate = source.gate = threading.Event()
    chunk = layer.toc.chunks("usr/lib/big.bin")[2]
    fetcher = Fetcher(cache, Stats(), read_ahead=0)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(fetcher.ensure, layer, [chunk])
            # Every reader is now fetching (held at the gate) or waiting for that fetch.
            await trio.testing.wait_all_tasks_blocked()
            gate.set()

    trio.run(scenario)
    assert len(source.calls) == 1
    assert (
        cache.read(cache_key(chunk), 0, chunk.chunk_size)
        == big(300_000)[chunk.chunk_offset : chunk.chunk_offset + chunk.chunk_size]
    )


def test_a_read_of_a_claimed_chunk_waits_for_the_prefetch(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("app", "dir"),
        Member("app/main.py", data=b"import lib\n"),
        Member("app/lib.py", data=big(50_000, seed=7)),
        Member("app/cold.bin", data=big(50_000, seed=8)),
    ]
    layer, source = blob_layer(tmp_path, "app", members, cache, prioritized=3)
    fetcher = Fetcher(cache, Stats(), read_ahead=1 << 20)
    claims = fetcher.plan_prefetch([layer])
    assert [[e.name for e in c.entries] for c in claims] == [["app/main.py", "app/lib.py"]]
    lib = layer.toc.chunks("app/lib.py")

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.ensure, layer, lib)  # claimed: it must not fetch
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(fetcher.prefetch, [layer], claims)

    trio.run(scenario)
    # One request, the prioritized files only: the read's read-ahead never went out.
    assert source.calls == [[(layer.data[0].offset, layer.toc.prefetch_end)]]
    assert fetcher.prefetched.is_set() and fetcher.stats.prefetch_done
    assert fetcher.stats.prefetch_chunks == 2
    assert cache.read_span(lib, 0, 50_000) == big(50_000, seed=7)


def test_a_dead_source_raises_fetch_error_and_a_later_read_recovers(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache)
    chunks = layer.toc.chunks("etc/config")
    fetcher = Fetcher(cache, Stats(), read_ahead=0)
    source.fail = True
    with pytest.raises(FetchError, match="refused the connection"):
        trio.run(fetcher.ensure, layer, chunks)
    assert not cache.has(cache_key(chunks[0]), chunks[0].chunk_size)
    source.fail = False
    trio.run(fetcher.ensure, layer, chunks)
    assert cache.read_span(chunks, 0, len(b"base config\n")) == b"base config\n"


def test_a_chunk_that_fails_its_digest_is_a_fetch_error_and_never_cached(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    victim = layer.toc.chunks("usr/lib/big.bin")[1]
    # A valid gzip member of the right length: only the chunk digest catches it.
    fake = gzip.compress(b"\0" * victim.chunk_size, mtime=0)
    source.forge[victim.offset] = fake.ljust(victim.end_offset - victim.offset, b"\0")
    fetcher = Fetcher(cache, Stats(), read_ahead=0)
    with pytest.raises(FetchError, match="is bad"):
        trio.run(fetcher.ensure, layer, [victim])
    assert not cache.has(cache_key(victim), victim.chunk_size)
    assert fetcher.stats.verify_errors == 1


def test_background_waits_while_a_foreground_read_is_fetching(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    gate = source.gate = threading.Event()
    bg = BackgroundFetch(enabled=True, batch_bytes=1, quiet=0)
    fetcher = Fetcher(cache, Stats(), read_ahead=0, background=bg)
    chunk = layer.toc.chunks("usr/lib/big.bin")[0]

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.ensure, layer, [chunk])
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(fetcher.background, [layer])
            await trio.testing.wait_all_tasks_blocked()
            # The background has started but sent no batch: a batch registers its
            # chunks' flights before it goes to a thread.
            assert fetcher.stats.background_enabled
            assert list(fetcher._flights) == [cache_key(chunk)]
            gate.set()

    trio.run(scenario)
    assert source.calls[0] == [(chunk.offset, chunk.end_offset)]
    assert all(cache.has(cache_key(e), e.chunk_size) for e in layer.data)
    assert fetcher.stats.background_done


def test_background_keeps_to_its_bandwidth(tmp_path: Path, cache: ChunkCache) -> None:
    """Paced on trio's clock: with a mock clock, the virtual time the background fetch
    takes is what its bandwidth allows, whatever the machine's speed."""
    from trio.testing import MockClock

    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    bandwidth = 100_000
    batch = 32 << 10
    fetcher = Fetcher(
        cache,
        Stats(),
        background=BackgroundFetch(enabled=True, bandwidth=bandwidth, batch_bytes=batch),
    )
    elapsed: list[float] = []

    async def scenario() -> None:
        start = trio.current_time()
        await fetcher.background([layer])
        elapsed.append(trio.current_time() - start)

    trio.run(scenario, clock=MockClock(autojump_threshold=0))
    total = sum(e.end_offset - e.offset for e in layer.data)
    biggest = max(e.end_offset - e.offset for e in layer.data)
    assert fetcher.stats.background_done
    assert len(source.calls) > 3
    # Only the last batch may go out without waiting for its share of time.
    assert elapsed[0] >= (total - biggest - batch) / bandwidth
