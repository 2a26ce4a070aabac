"""The fetcher: gets chunks into the cache on demand, at mount, and in the background.

It runs on the daemon's trio thread; network, decompression, hashing and cache writes
run in worker threads. What to fetch is decided by :mod:`.planning`; this module owns
the timing: one fetch per chunk however many readers want it (a *flight* they wait on),
the prioritized files claimed before the mount goes up, and a background fetch that
yields to every foreground read.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import trio

from warmstart.images.errors import FetchError
from warmstart.images.estargz import TOCEntry
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.layers import TOCLayer
from warmstart.images.lazyfs.peers import PeerChunks
from warmstart.images.lazyfs.planning import (
    blob_ranges,
    cached_bytes,
    compressed_size,
    next_background_batch,
    plan_read,
    prefetch_chunks,
    unique_chunks,
)
from warmstart.images.lazyfs.stats import Stats
from warmstart.images.lazymount import BackgroundFetch

log = logging.getLogger(__name__)

_CONSECUTIVE_BACKGROUND_FAILURES = 3


class _Flight:
    """One chunk being fetched; readers of the same chunk wait here instead of fetching."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


@dataclass(frozen=True, slots=True)
class PrefetchClaim:
    """A layer's prioritized chunks, claimed (their flights registered) before the mount
    is up: a read of one of them waits for the prefetch instead of fetching it alone."""

    layer: TOCLayer
    entries: list[TOCEntry]
    flights: dict[str, _Flight]


@functools.cache
def _verify_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="verify")


MAX_PEER_BATCH = 32  # chunks of one fetch asked of peers, one request each


class Fetcher:
    """Gets chunks into the cache: on demand, ahead of time, and in the background.

    Runs on the trio thread; network and verification run in worker threads. A
    foreground fetch (a read that missed) makes background batches wait until it ends.
    """

    def __init__(
        self,
        cache: ChunkCache,
        stats: Stats,
        *,
        read_ahead: int = 64 << 10,
        background: BackgroundFetch | None = None,
        peers: PeerChunks | None = None,
    ) -> None:
        self.cache = cache
        self.peers = peers  # a cluster's other nodes, asked before the registry
        self.stats = stats
        self.read_ahead = read_ahead
        self.background_settings = background or BackgroundFetch(enabled=False)
        self._flights: dict[str, _Flight] = {}
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_foreground = -1e9  # trio time of the last foreground fetch's end
        self.prefetched = trio.Event()  # the prioritized files are in (or failed)

    # -- the foreground --
    def touch(self) -> None:
        """A file was opened or read: the background fetch waits for a quiet spell."""
        self._last_foreground = trio.current_time()

    async def ensure(self, layer: TOCLayer, chunks: Sequence[TOCEntry]) -> None:
        """Make sure every chunk is in the cache; raise :class:`FetchError` if one of them
        cannot be fetched or does not verify."""
        want: list[TOCEntry] = []
        waits: list[_Flight] = []
        hits = 0
        for c in chunks:
            key = cache_key(c)
            flight = self._flights.get(key)
            if flight is not None:
                waits.append(flight)
            elif self.cache.has(key, c.cached_size):
                hits += 1
            else:
                want.append(c)
        if hits:
            self.stats.add(cache_hits=hits)
        if not want and not waits:
            return
        self._foreground += 1
        self._idle = trio.Event() if self._foreground == 1 else self._idle
        try:
            if want:
                plan = plan_read(layer, want, self.read_ahead, self.cache, self._flights)
                errors = await self._fetch(layer, plan)
                failed = [errors[cache_key(c)] for c in want if errors.get(cache_key(c))]
                if failed:
                    raise FetchError(failed[0])
            for flight in waits:
                await flight.done.wait()
                if flight.error:
                    raise FetchError(flight.error)
        finally:
            self._foreground -= 1
            self._last_foreground = trio.current_time()
            if self._foreground == 0:
                self._idle.set()

    def _register(self, entries: list[TOCEntry]) -> dict[str, _Flight]:
        """Flights for the chunks of ``entries`` that no other fetch carries yet."""
        flights: dict[str, _Flight] = {}
        for e in entries:
            key = cache_key(e)
            # Identical chunks (same digest) can appear at several offsets, and another
            # fetch may already carry this one: register each key once, never overwrite.
            if key not in flights and key not in self._flights:
                flights[key] = self._flights[key] = _Flight()
        return flights

    def _land(self, flights: dict[str, _Flight], key: str, error: str | None) -> None:
        """One chunk of a fetch is verified and cached (or failed): wake its readers."""
        flight = flights.get(key)
        if flight is None or flight.done.is_set():
            return
        flight.error = error
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    async def _fetch(
        self,
        layer: TOCLayer,
        entries: list[TOCEntry],
        *,
        limiter: trio.CapacityLimiter | None = None,
        abandon: bool = False,
        flights: dict[str, _Flight] | None = None,
        stream: bool = False,
    ) -> dict[str, str | None]:
        """Fetch, verify and cache ``entries`` (one call to the source, contiguous ranges
        merged); returns each chunk's error, None for success.  With ``stream``, readers
        waiting for a chunk wake as soon as that chunk is cached, not when all are."""
        if flights is None:
            flights = self._register(entries)
        notify = None
        if stream:
            token = trio.lowlevel.current_trio_token()
            registered = flights

            def notify(key: str, error: str | None) -> None:
                trio.from_thread.run_sync(self._land, registered, key, error, trio_token=token)

        results: dict[str, str | None] = {}
        failure = "fetch cancelled"
        try:
            results = await trio.to_thread.run_sync(
                functools.partial(self._fetch_sync, layer, entries, notify),
                limiter=limiter,
                abandon_on_cancel=abandon,
            )
        except Exception as exc:
            failure = f"fetch from {layer.source.name} failed: {type(exc).__name__}: {exc}"
            log.exception("%s", failure)
            results = {key: failure for key in flights}
        finally:
            for key in list(flights):
                self._land(flights, key, results.get(key, failure))
        return results

    def _fetch_sync(
        self,
        layer: TOCLayer,
        entries: list[TOCEntry],
        notify: Callable[[str, str | None], None] | None = None,
    ) -> dict[str, str | None]:
        from_peers = self._from_peers(entries, notify) if self.peers is not None else {}
        if from_peers:
            entries = [e for e in entries if cache_key(e) not in from_peers]
            if not entries:
                return from_peers
        ranges = blob_ranges(entries)
        nbytes = sum(t - s for s, t in ranges)
        started = time.monotonic()
        try:
            # What decoding needs besides the bytes (an indexed layer's windows) comes
            # from another blob: fetched alongside, not before.
            preparing = _verify_pool().submit(layer.prepare, entries)
            blobs = layer.source.fetch(ranges)
            preparing.result()
            if len(blobs) != len(ranges) or any(
                len(b) != t - s for b, (s, t) in zip(blobs, ranges, strict=False)
            ):
                raise FetchError("the source answered with short or missing ranges")
        except Exception as exc:
            reason = (
                f"fetching {len(ranges)} range(s), {nbytes} bytes, of {layer.source.name} "
                f"failed: {type(exc).__name__}: {exc}"
            )
            log.error("%s", reason)
            self.stats.add(requests=1)
            return {**from_peers, **{cache_key(e): reason for e in entries}}
        fetched = time.monotonic()
        self.stats.add(requests=1, bytes_fetched=nbytes)

        def store(unit: tuple[list[TOCEntry], bytes]) -> list[tuple[str, str | None, bool, bool]]:
            """Decode and verify one unit's chunks and cache them: per chunk (key, error or
            None, newly cached, bad)."""
            out: list[tuple[str, str | None, bool, bool]] = []
            for e, data in layer.decode(unit):
                key = cache_key(e)
                if isinstance(data, Exception):
                    reason = f"chunk at offset {e.offset} of {layer.source.name} is bad: {data}"
                    log.error("%s", reason)
                    out.append((key, reason, False, True))
                    continue
                try:
                    new = self.cache.put(key, data)
                except OSError as exc:
                    reason = f"cannot store a chunk in the cache {self.cache.root}: {exc}"
                    log.error("%s", reason)
                    out.append((key, reason, False, False))
                    continue
                if notify is not None:
                    notify(key, None)
                out.append((key, None, new, False))
            return out

        units = layer.units(entries, ranges, blobs)
        # Decompressing, hashing and writing release the GIL: a large batch (the
        # prioritized files at mount) uses every core.
        if len(units) > 8:
            done = [r for rs in _verify_pool().map(store, units) for r in rs]
        else:
            done = [r for unit in units for r in store(unit)]
        cached = sum(1 for _, _, new, _ in done if new)
        bad = sum(1 for *_, is_bad in done if is_bad)
        results: dict[str, str | None] = {**from_peers, **{key: err for key, err, _, _ in done}}
        self.stats.add(chunks_fetched=len(entries) - bad, chunks_cached=cached, verify_errors=bad)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "fetched %d bytes in %d range(s), %d chunk(s) in %.1f ms (network %.1f ms): %s",
                nbytes,
                len(ranges),
                len(entries),
                1000 * (time.monotonic() - started),
                1000 * (fetched - started),
                ", ".join(sorted({e.name for e in entries})[:8]),
            )
        return results

    def _from_peers(
        self, entries: list[TOCEntry], notify: Callable[[str, str | None], None] | None
    ) -> dict[str, str | None]:
        """Chunks other nodes of a cluster have cached, verified and cached here too
        (on-demand fetches of a few chunks; large batches go to the registry at once)."""
        peers = self.peers
        if peers is None or len(entries) > MAX_PEER_BATCH or not peers.peers():
            return {}
        got: dict[str, str | None] = {}
        for e in entries:
            key = cache_key(e)
            if not key or key in got:
                continue
            data = peers.fetch(key)
            if data is None:
                break  # peers lack what this read needs: the rest in one registry request
            try:
                self.cache.put(key, data)
            except OSError:
                continue
            got[key] = None
            if notify is not None:
                notify(key, None)
        if got:
            self.stats.add(chunks_from_peers=len(got))
        return got

    # -- ahead of time --
    def plan_prefetch(self, layers: Sequence[TOCLayer]) -> list[PrefetchClaim]:
        """Claim every layer's prioritized chunks that are not cached yet: from now on a
        read of one of them waits for the prefetch instead of fetching it alone."""
        plan = []
        for layer in layers:
            entries = prefetch_chunks(layer, self.cache)
            if entries:
                plan.append(PrefetchClaim(layer, entries, self._register(entries)))
        return plan

    async def prefetch(
        self, layers: Sequence[TOCLayer], plan: list[PrefetchClaim] | None = None
    ) -> None:
        """Fetch every layer's prioritized files, one request per layer, concurrently,
        waking each reader as soon as its chunk is in (files come in first-use order)."""
        started = time.monotonic()
        if plan is None:
            plan = self.plan_prefetch(layers)

        async def one(claim: PrefetchClaim) -> None:
            errors = await self._fetch(
                claim.layer, claim.entries, flights=claim.flights, stream=True
            )
            failed = [err for err in errors.values() if err]
            if failed:
                log.warning(
                    "prefetch of %s: %d of %d chunks failed; they will be fetched on read",
                    claim.layer.source.name,
                    len(failed),
                    len(claim.entries),
                )
            self.stats.add(
                prefetch_chunks=len(claim.entries) - len(failed),
                prefetch_bytes=compressed_size(claim.entries),
            )

        async with trio.open_nursery() as nursery:
            for claim in plan:
                nursery.start_soon(one, claim)
        with self.stats.lock:
            self.stats.prefetch_done = True
            self.stats.prefetch_seconds = time.monotonic() - started
        self.prefetched.set()

    # -- in the background --
    async def _wait_quiet(self, quiet: float) -> None:
        """Wait for a spell of ``quiet`` seconds without a foreground fetch, open or read.

        A starting function reads in bursts: waiting for the current fetch alone is not
        enough to keep the background from competing with a start for the registry or
        the CPU."""
        while True:
            while self._foreground:
                await self._idle.wait()
            since = trio.current_time() - self._last_foreground
            if since >= quiet:
                return
            await trio.sleep(quiet - since)

    async def background(self, layers: Sequence[TOCLayer]) -> None:
        """Fetch everything not cached yet, batch by batch, yielding to foreground reads
        and keeping within the configured concurrency and bandwidth."""
        bg = self.background_settings
        unique = unique_chunks(layers)
        total, cached = cached_bytes(unique, self.cache)
        with self.stats.lock:
            self.stats.background_enabled = True
            self.stats.background_total_bytes = total
            self.stats.background_cached_bytes = cached
        if bg.delay:
            await trio.sleep(bg.delay)
        limiter = trio.CapacityLimiter(bg.concurrency)
        slots = trio.Semaphore(bg.concurrency)
        started = trio.current_time()
        sent = 0
        failures = 0
        taken: set[str] = set()

        async def batch_task(layer: TOCLayer, batch: list[TOCEntry]) -> None:
            nonlocal failures
            try:
                errors = await self._fetch(layer, batch, limiter=limiter, abandon=True)
            finally:
                slots.release()
            ok = compressed_size(e for e in batch if not errors.get(cache_key(e)))
            bad = sum(1 for e in batch if errors.get(cache_key(e)))
            self.stats.add(background_cached_bytes=ok, background_failed_chunks=bad)
            failures = failures + 1 if bad == len(batch) else 0

        async with trio.open_nursery() as nursery:
            for layer in layers:
                i = 0
                while i < len(layer.data):
                    if failures >= _CONSECUTIVE_BACKGROUND_FAILURES:
                        log.error(
                            "background fetch stopped after %d failed batches in a row; "
                            "the rest is fetched on read",
                            failures,
                        )
                        return
                    await self._wait_quiet(bg.quiet)
                    # Chosen only now: what reads fetched while we waited is left out.
                    batch, i = next_background_batch(
                        layer, i, bg.batch_bytes, self.cache, taken, self._flights
                    )
                    if not batch:
                        continue
                    nbytes = compressed_size(batch)
                    if bg.bandwidth:
                        wait = started + sent / bg.bandwidth - trio.current_time()
                        if wait > 0:
                            await trio.sleep(wait)
                    sent += nbytes
                    await slots.acquire()
                    nursery.start_soon(batch_task, layer, batch)
        # Foreground reads fetched some chunks meanwhile: count what is really cached.
        _, cached = cached_bytes(unique, self.cache)
        with self.stats.lock:
            self.stats.background_done = True
            self.stats.background_cached_bytes = cached
        log.info("background fetch done: %d of %d bytes cached", cached, total)
