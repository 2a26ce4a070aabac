"""Which chunks to fetch: for a read, before the mount is ready, and in the background.

Pure decisions over a layer's chunks in blob order (:attr:`TOCLayer.data`), the chunk
cache and the set of chunks already in flight; :mod:`.fetcher` carries them out. Every
chunk is named by its cache key, so a chunk that several files (or layers) share is
planned once.
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Iterable, Sequence

from warmstart.images.estargz import TOCEntry
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.layers import TOCLayer, members_of

__all__ = ["members_of"]


def compressed_size(entries: Iterable[TOCEntry]) -> int:
    """The blob bytes (compressed) that hold ``entries`` (a chunk of an indexed gzip
    layer counts its share of the span it is inflated from)."""
    return sum(e.cost for e in entries)


def chunks_covering(
    chunks: Sequence[TOCEntry], starts: Sequence[int], start: int, end: int
) -> Sequence[TOCEntry]:
    """The chunks of a file that hold its bytes ``[start, end)``: ``chunks`` in file
    order, ``starts`` their offsets in the file."""
    first = max(0, bisect.bisect_right(starts, start) - 1)
    last = bisect.bisect_left(starts, end)
    return chunks[first:last]


def plan_read(
    layer: TOCLayer,
    want: Sequence[TOCEntry],
    read_ahead: int,
    cache: ChunkCache,
    busy: Container[str] = (),
) -> list[TOCEntry]:
    """What a read that missed ``want`` fetches, in blob order: those chunks plus the
    members that follow them in the blob (files packed next to each other are usually
    used together), at most ``read_ahead`` compressed bytes, stopping at one that is
    cached, in flight (its key in ``busy``) or too big to fit."""
    chosen = {cache_key(c): c for c in want}
    last = max(want, key=lambda c: c.order)
    i = layer.position[id(last)] + 1
    extra = 0
    while i < len(layer.data):
        e = layer.data[i]
        key = cache_key(e)
        i += 1
        if key in chosen:
            continue
        extra += e.cost
        if extra > read_ahead or key in busy:
            break
        if cache.has(key, e.cached_size):
            break
        chosen[key] = e
    return sorted(chosen.values(), key=lambda c: c.order)


def blob_ranges(entries: Sequence[TOCEntry]) -> list[tuple[int, int]]:
    """The half-open blob ranges that hold ``entries`` (in blob order), adjacent or
    overlapping members merged into one range."""
    spans: list[list[int]] = []
    for e in entries:
        if spans and spans[-1][1] >= e.offset:
            spans[-1][1] = max(spans[-1][1], e.end_offset)
        else:
            spans.append([e.offset, e.end_offset])
    return [(s, t) for s, t in spans]


def prefetch_chunks(layer: TOCLayer, cache: ChunkCache) -> list[TOCEntry]:
    """The layer's prioritized chunks (those before its ``.prefetch.landmark``) that are
    not cached yet, each key once, in blob order: one request fetches them at mount."""
    todo: dict[str, TOCEntry] = {}
    for e in layer.prioritized():
        key = cache_key(e)
        if key not in todo and not cache.has(key, e.cached_size):
            todo[key] = e
    return list(todo.values())


def unique_chunks(layers: Iterable[TOCLayer]) -> dict[str, TOCEntry]:
    """Every chunk of the layers, once per cache key."""
    unique: dict[str, TOCEntry] = {}
    for layer in layers:
        for e in layer.data:
            unique.setdefault(cache_key(e), e)
    return unique


def cached_bytes(unique: dict[str, TOCEntry], cache: ChunkCache) -> tuple[int, int]:
    """(compressed bytes of all these chunks, of those in the cache)."""
    total = cached = 0
    for key, e in unique.items():
        total += e.cost
        if cache.has(key, e.cached_size):
            cached += e.cost
    return total, cached


def next_background_batch(
    layer: TOCLayer,
    start: int,
    batch_bytes: int,
    cache: ChunkCache,
    taken: set[str],
    busy: Container[str] = (),
) -> tuple[list[TOCEntry], int]:
    """The background fetch's next batch of one layer, from ``layer.data[start]`` on, and
    where the batch after it starts: chunks not cached, not in flight (``busy``) and not
    taken by an earlier batch (``taken``, which this updates and may be shared across
    layers), about ``batch_bytes`` compressed bytes. The batch may be empty (everything
    in its stretch of the blob is there already); the layer is done at ``len(data)``."""
    batch: list[TOCEntry] = []
    nbytes = 0
    i = start
    while i < len(layer.data) and nbytes < batch_bytes:
        e = layer.data[i]
        i += 1
        key = cache_key(e)
        if key in taken or key in busy:
            continue
        taken.add(key)
        if cache.has(key, e.cached_size):
            continue
        batch.append(e)
        nbytes += e.cost
    return batch, i
