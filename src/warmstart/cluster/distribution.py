"""Peer-to-peer blobs: a layer pulled from the registry once, shared between nodes in pieces.

When several nodes need one blob (an image layer), at most ``p2p_sources`` of them fetch it
from the registry -- "back to source" -- and the others fetch it piece by piece from nodes
that hold those pieces, the sources included while they are still downloading.  Pieces
are ``next_pow2(size / 500)`` clamped to [4 MiB, 64 MiB] (Dragonfly's rule).  Keys in etcd
(under the cluster prefix)::

    blobs/<hex>/source/<slot>    a node fetching from the registry, under its lease
    blobs/<hex>/pieces/<k>       the sha256 of piece k, published by the node that fetched it
                                 from the registry (kept under a retention lease)
    blobs/<hex>/holders/<node>   how many pieces, from the first, the node holds (its lease)

Every piece fetched from a peer is checked against its published digest and the whole blob
against the digest that names it: a peer that serves wrong bytes is dropped for that blob
and the piece fetched elsewhere; nothing unverified is kept.  A peer that dies mid-transfer
costs a retry on another; with no peer able to serve a piece (all gone, or none progressing
for ``stall_s``) the node takes a source slot if one is free, or goes to the registry for
the rest itself.  Peers serve only blobs they hold, by digest, to callers with the cluster's
token (``GET /cluster/blobs/<hex>/<k>``); registry credentials never leave a node.

The store's pull threads call ``P2PBlobFetcher.stream_blob`` (the same shape as
``RegistryClient.stream_blob``); etcd is reached through the node's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from warmstart.cluster.code import TOKEN_HEADER
from warmstart.cluster.etcd import ClusterUnavailable, Etcd
from warmstart.images.errors import DigestMismatch, ImageError
from warmstart.images.reference import Reference, check_digest, digest_hex

if TYPE_CHECKING:
    from warmstart.cluster.membership import Membership
    from warmstart.images.registry import RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")
BLOBS = "blobs/"
MIN_PIECE, MAX_PIECE = 4 << 20, 64 << 20
RETENTION_S = 7 * 24 * 3600  # piece digests outlive any pull of the blob
POLL_S = 0.05
PRUNE_GRACE_S = 600.0  # a complete blob is kept this long before it may be pruned


def piece_size(size: int) -> int:
    """Dragonfly's piece length: the next power of two of size/500, within 4-64 MiB."""
    want = max(1, size // 500)
    return min(MAX_PIECE, max(MIN_PIECE, 1 << (want - 1).bit_length()))


def piece_count(size: int, piece: int) -> int:
    return max(1, -(-size // piece))


@dataclass
class SwarmView:
    """What etcd says of a blob right now."""

    digests: dict[int, str] = field(default_factory=dict)  # piece -> sha256 hex
    holders: dict[str, int] = field(default_factory=dict)  # node -> pieces held from 0
    sources: int = 0  # nodes fetching it from the registry now


@dataclass
class DistributionStats:
    pieces_from_peers: int = 0
    pieces_from_registry: int = 0
    bytes_from_peers: int = 0
    bytes_from_registry: int = 0
    bytes_served: int = 0
    bad_pieces: int = 0
    uploads: int = 0  # pieces being served now


class Swarm:
    """A node's side of peer-to-peer blobs: its local pieces and its records in etcd."""

    def __init__(
        self,
        etcd: Etcd,
        membership: Membership,
        root: Path,
        *,
        sources: int = 1,
    ) -> None:
        self.etcd = etcd
        self.membership = membership
        self.root = root
        self.sources = max(1, sources)
        self.stats = DistributionStats()
        root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}  # hex -> pieces held from the first (in progress)
        self._lock = threading.Lock()
        self._retention = 0
        self._retention_granted = 0.0
        for leftover in [*root.glob("*.part"), *root.glob("*.size")]:  # a crashed pull's
            leftover.unlink(missing_ok=True)

    # -- local pieces ----------------------------------------------------------------------
    def complete_path(self, hex_: str) -> Path:
        return self.root / hex_

    def part_path(self, hex_: str) -> Path:
        return self.root / f"{hex_}.part"

    def held(self, hex_: str) -> int | None:
        """Pieces of ``hex_`` held here from the first (None: none, or not known)."""
        with self._lock:
            return self._held.get(hex_)

    def set_held(self, hex_: str, pieces: int) -> None:
        with self._lock:
            self._held[hex_] = pieces

    def read_piece(self, hex_: str, k: int) -> bytes | None:
        """Piece ``k`` of a blob held here: complete, or in progress and that far."""
        complete = self.complete_path(hex_)
        try:
            if complete.exists():
                path, size = complete, os.stat(complete).st_size
            else:
                held = self.held(hex_)
                if held is None or k >= held:
                    return None
                path, size = self.part_path(hex_), int((self.root / f"{hex_}.size").read_text())
            piece = piece_size(size)
            if k < 0 or k * piece >= size:
                return None
            with open(path, "rb") as f:
                f.seek(k * piece)
                return f.read(min(piece, size - k * piece))
        except (OSError, ValueError):
            return None

    def in_progress(self) -> set[str]:
        """Blobs being pulled here now."""
        with self._lock:
            held = list(self._held)
        return {h for h in held if not self.complete_path(h).exists()}

    async def serve_piece(self, hex_: str, k: int) -> bytes | None:
        """A peer asks for piece ``k`` (counted as an upload while it is read)."""
        self.stats.uploads += 1
        try:
            data = await asyncio.to_thread(self.read_piece, hex_, k)
        finally:
            self.stats.uploads -= 1
        if data is not None:
            self.stats.bytes_served += len(data)
        return data

    def prune(self, keep: set[str], grace_s: float = PRUNE_GRACE_S) -> int:
        """Delete complete blobs not in ``keep`` (their layers left the content store)
        that completed over ``grace_s`` ago -- a blob completes before the store has
        unpacked and recorded its layer; returns how many."""
        gone = 0
        now = time.time()
        for hex_ in self.complete_blobs():
            try:
                age = now - os.stat(self.complete_path(hex_)).st_mtime
            except OSError:
                continue
            if hex_ not in keep and age > grace_s:
                self.complete_path(hex_).unlink(missing_ok=True)
                with self._lock:
                    self._held.pop(hex_, None)
                gone += 1
        return gone

    def complete_blobs(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if len(p.name) == 64 and "." not in p.name
        )

    # -- etcd ------------------------------------------------------------------------------
    async def _lease(self) -> int:
        now = time.monotonic()
        if self._retention == 0 or now - self._retention_granted > 3600:
            self._retention = await self.etcd.grant(RETENTION_S)
            self._retention_granted = now
        return self._retention

    async def take_source_slot(self, hex_: str) -> str | None:
        """A back-to-source slot for this blob, under this node's lease; None if all are
        taken (``sources`` nodes fetch it from the registry already)."""
        lease = self.membership.lease
        if lease == 0:
            return None
        for slot in range(self.sources):
            key = f"{BLOBS}{hex_}/source/{slot}"
            if await self.etcd.create(key, self.membership.name.encode(), lease=lease):
                return key
        return None

    async def release(self, key: str) -> None:
        await self.etcd.delete(key)

    async def publish_piece(self, hex_: str, k: int, sha: str, held: int) -> None:
        """Piece ``k``'s digest (from the registry), then this node's progress."""
        await self.etcd.put(
            f"{BLOBS}{hex_}/pieces/{k:06d}", sha.encode(), lease=await self._lease()
        )
        await self.publish_progress(hex_, held)

    async def publish_progress(self, hex_: str, held: int) -> None:
        lease = self.membership.lease
        if lease:
            await self.etcd.put(
                f"{BLOBS}{hex_}/holders/{self.membership.name}", str(held).encode(), lease=lease
            )

    async def view(self, hex_: str) -> SwarmView:
        kvs, _ = await self.etcd.range(f"{BLOBS}{hex_}/")
        out = SwarmView()
        base = len(f"{BLOBS}{hex_}/")
        for kv in kvs:
            kind, _, name = kv.key[base:].partition("/")
            if kind == "pieces":
                out.digests[int(name)] = kv.value.decode()
            elif kind == "holders":
                out.holders[name] = int(kv.value or b"0")
            elif kind == "source":
                out.sources += 1
        return out

    async def announce_all(self) -> None:
        """After (re)joining: the blobs held here, complete, under the new lease."""
        for hex_ in self.complete_blobs():
            size = os.stat(self.complete_path(hex_)).st_size
            count = piece_count(size, piece_size(size))
            self.set_held(hex_, count)
            await self.publish_progress(hex_, count)


class P2PBlobFetcher:
    """``stream_blob`` for the content store's pull threads (see the module docstring)."""

    def __init__(
        self,
        swarm: Swarm,
        loop: asyncio.AbstractEventLoop,
        registry: RegistryClient,
        token: str,
        *,
        stall_s: float = 15.0,
        peer_timeout_s: float = 30.0,
    ) -> None:
        self.swarm = swarm
        self.loop = loop
        self.registry = registry
        self.token = token
        self.stall_s = stall_s
        self.http = httpx.Client(timeout=peer_timeout_s, headers={TOKEN_HEADER: token})
        self._bad: dict[str, set[str]] = {}  # blob hex -> peers that served wrong bytes

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=30)

    def close(self) -> None:
        self.http.close()

    def stream_blob(
        self, ref: Reference, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]:
        check_digest(digest)
        hex_ = digest_hex(digest)
        complete = self.swarm.complete_path(hex_)
        if complete.exists():
            yield from _file_chunks(complete)
            return
        if size is None:
            size = self.registry.blob_size(ref, digest)
        try:
            # Peers first: a node goes back to source only when no live peer holds any of
            # the blob and a source slot is free.
            view = self._run(self.swarm.view(hex_))
            live = {m.name for m in self.swarm.membership.peers()}
            held = any(n in live and count > 0 for n, count in view.holders.items())
            slot = None if held else self._run(self.swarm.take_source_slot(hex_))
        except ClusterUnavailable as exc:
            log.warning("p2p: %s; pulling %s from the registry", exc, digest[:19])
            yield from self.registry.stream_blob(ref, digest, size=size)
            return
        if slot is not None:
            yield from self._from_source(ref, digest, size, slot)
        else:
            yield from self._from_peers(ref, digest, size)

    # -- back to source and from peers: download ahead, unpack behind -----------------------
    def _spooled(self, hex_: str, size: int, produce: Any) -> Iterator[bytes]:
        """Run ``produce(out, spool)`` on a thread of its own -- it writes the blob into
        its part file as fast as the registry or the peers give it, publishing pieces as
        they complete -- and yield the bytes back in order as they land.  The download
        thus never waits for the unpacker (which is slower), so the pieces reach the
        other nodes at download speed."""
        part = self.swarm.part_path(hex_)
        (self.swarm.root / f"{hex_}.size").write_text(str(size))
        self.swarm.set_held(hex_, 0)
        spool = _Spool()
        # Both ends opened here, before the producer starts: the reader keeps the file
        # even once the producer has renamed it complete.
        out = open(part, "wb")  # noqa: SIM115 (closed by the producer)
        reader = open(part, "rb")  # noqa: SIM115 (closed below)

        def run() -> None:
            try:
                with out:
                    produce(out, spool)
                os.replace(part, self.swarm.complete_path(hex_))
                (self.swarm.root / f"{hex_}.size").unlink(missing_ok=True)
                spool.finish()
            except BaseException as exc:
                spool.finish(exc)

        producer = threading.Thread(target=run, name=f"p2p-{hex_[:12]}", daemon=True)
        producer.start()
        ok = False
        try:
            with reader:
                yield from spool.read(reader)
            ok = True
        finally:
            spool.cancel()
            producer.join()
            if not ok or spool.error is not None:
                part.unlink(missing_ok=True)
                self.swarm.set_held(hex_, 0)

    def _from_source(self, ref: Reference, digest: str, size: int, slot: str) -> Iterator[bytes]:
        hex_ = digest_hex(digest)
        piece = piece_size(size)

        def produce(out: Any, spool: _Spool) -> None:
            piece_hash = hashlib.sha256()
            in_piece = k = 0
            try:
                for chunk in self.registry.stream_blob(ref, digest, size=size):
                    if spool.cancelled:
                        raise _Cancelled()
                    out.write(chunk)
                    self.swarm.stats.bytes_from_registry += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        take = min(len(view), piece - in_piece)
                        piece_hash.update(view[:take])
                        in_piece += take
                        view = view[take:]
                        if in_piece == piece:
                            out.flush()
                            self._piece_done(hex_, k, piece_hash.hexdigest())
                            k, in_piece, piece_hash = k + 1, 0, hashlib.sha256()
                    out.flush()
                    spool.advance(len(chunk))
                if in_piece:
                    self._piece_done(hex_, k, piece_hash.hexdigest())
                    k += 1
                self.swarm.stats.pieces_from_registry += k
            finally:
                try:
                    self._run(self.swarm.release(slot))
                except (ClusterUnavailable, TimeoutError) as exc:
                    log.warning(
                        "p2p: could not release %s (it lapses with its lease): %s", slot, exc
                    )

        yield from self._spooled(hex_, size, produce)

    def _piece_done(self, hex_: str, k: int, sha: str) -> None:
        self.swarm.set_held(hex_, k + 1)
        try:
            self._run(self.swarm.publish_piece(hex_, k, sha, k + 1))
        except (ClusterUnavailable, TimeoutError) as exc:
            log.warning("p2p: could not publish piece %d of %s: %s", k, hex_[:12], exc)

    def _from_peers(self, ref: Reference, digest: str, size: int) -> Iterator[bytes]:
        hex_ = digest_hex(digest)
        piece = piece_size(size)
        count = piece_count(size, piece)

        def produce(out: Any, spool: _Spool) -> None:
            whole = hashlib.sha256()
            for k in range(count):
                if spool.cancelled:
                    raise _Cancelled()
                length = min(piece, size - k * piece)
                data = self._piece(ref, digest, k, piece, length)
                out.write(data)
                out.flush()
                whole.update(data)
                self.swarm.set_held(hex_, k + 1)
                try:
                    self._run(self.swarm.publish_progress(hex_, k + 1))
                except (ClusterUnavailable, TimeoutError) as exc:
                    log.debug("p2p: progress of %s not published: %s", hex_[:12], exc)
                spool.advance(len(data))
            if whole.hexdigest() != hex_:
                raise DigestMismatch(f"blob {digest}: the pieces put together do not match")

        yield from self._spooled(hex_, size, produce)

    def _piece(self, ref: Reference, digest: str, k: int, piece: int, length: int) -> bytes:
        """Piece ``k``, verified: from the least busy peer holding it, else the registry."""
        hex_ = digest_hex(digest)
        bad = self._bad.setdefault(hex_, set())
        me = self.swarm.membership.name
        last_progress = time.monotonic()
        best_seen = -1
        while True:
            try:
                view = self._run(self.swarm.view(hex_))
            except (ClusterUnavailable, TimeoutError) as exc:
                log.warning("p2p: %s; piece %d of %s from the registry", exc, k, digest[:19])
                return self._from_registry(ref, digest, k, piece, length)
            sha = view.digests.get(k)
            members = {m.name: m for m in self.swarm.membership.live()}
            holders = [
                n
                for n, held in view.holders.items()
                if held > k and n != me and n not in bad and n in members
            ]
            holders.sort(key=lambda n: int(members[n].state.get("uploads", 0)))
            if sha is not None:
                for name in holders:
                    data = self._fetch(members[name].url, hex_, k)
                    if data is None:
                        continue  # it died or lost it: the next one
                    if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
                        bad.add(name)
                        self.swarm.stats.bad_pieces += 1
                        log.error(
                            "p2p: node %s served a wrong piece %d of %s: dropped for this blob",
                            name,
                            k,
                            digest[:19],
                        )
                        continue
                    self.swarm.stats.pieces_from_peers += 1
                    self.swarm.stats.bytes_from_peers += len(data)
                    return data
            progress = max([h for n, h in view.holders.items() if n != me] + [-1])
            if progress > best_seen:
                best_seen, last_progress = progress, time.monotonic()
            nobody = view.sources == 0 and not holders
            if nobody or time.monotonic() - last_progress > self.stall_s:
                # No peer will have it: become a source if a slot is free, or fetch this
                # piece from the registry ourselves.
                log.info("p2p: no peer serves piece %d of %s: from the registry", k, digest[:19])
                return self._from_registry(ref, digest, k, piece, length)
            time.sleep(POLL_S)

    def _fetch(self, url: str, hex_: str, k: int) -> bytes | None:
        try:
            resp = self.http.get(f"{url}/cluster/blobs/{hex_}/{k}")
        except httpx.HTTPError as exc:
            log.warning("p2p: fetching piece %d of %s from %s failed: %s", k, hex_[:12], url, exc)
            return None
        if resp.status_code != 200:
            return None
        return resp.content

    def _from_registry(self, ref: Reference, digest: str, k: int, piece: int, length: int) -> bytes:
        start = k * piece
        (data,) = self.registry.fetch_ranges(ref, digest, [(start, start + length)])
        if len(data) != length:
            raise ImageError(f"blob {digest}: piece {k} came back short from the registry")
        self.swarm.stats.pieces_from_registry += 1
        self.swarm.stats.bytes_from_registry += len(data)
        return data


class _Cancelled(Exception):
    """The consumer went away (its pull failed): the download stops."""


class _Spool:
    """A blob being written by one thread and read back, in order, by another."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._written = 0
        self._done = False
        self.error: BaseException | None = None
        self.cancelled = False

    def advance(self, n: int) -> None:
        with self._cond:
            self._written += n
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self.error = error
            self._cond.notify_all()

    def cancel(self) -> None:
        self.cancelled = True

    def read(self, f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
        offset = 0
        while True:
            with self._cond:
                while self._written == offset and not self._done:
                    self._cond.wait()
                written, done, error = self._written, self._done, self.error
            if written > offset:
                data = f.read(min(chunk, written - offset))
                offset += len(data)
                yield data
                continue
            if error is not None and not isinstance(error, _Cancelled):
                raise error
            if done:
                return


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
