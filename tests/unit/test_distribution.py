"""Peer-to-peer blobs at their seams: the in-memory etcd, peers behind httpx's mock
transport, a fake registry.  Back to source, pieces from peers, a tampering peer, a peer
lost mid-transfer, every peer gone, and chunks for lazy mounts from peers."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from warmstart.cluster.distribution import P2PBlobFetcher, Swarm, piece_count, piece_size
from warmstart.cluster.etcd import MemoryEtcd
from warmstart.images.errors import DigestMismatch
from warmstart.images.lazyfs.peers import PeerChunks
from warmstart.images.reference import Reference

MiB = 1 << 20
BLOB = os.urandom(10 * MiB + 12345)  # three 4 MiB pieces, the last one short
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HEX = DIGEST[7:]
REF = Reference.parse("registry.test:5000/app@" + DIGEST)


def test_piece_sizes_follow_dragonfly() -> None:
    assert piece_size(1) == 4 * MiB
    assert piece_size(130 * MiB) == 4 * MiB
    assert piece_size(4000 * MiB) == 8 * MiB  # next_pow2(8 MB) = 8 MiB
    assert piece_size(100_000 * MiB) == 64 * MiB
    assert piece_count(len(BLOB), piece_size(len(BLOB))) == 3


@dataclass
class FakeMember:
    name: str
    url: str
    state: dict[str, Any] = field(default_factory=dict)


class FakeMembership:
    def __init__(self, name: str, lease: int, others: list[str]) -> None:
        self.name = name
        self.lease = lease
        self.others = others

    def live(self) -> list[FakeMember]:
        return [FakeMember(n, f"http://{n}:8080") for n in [self.name, *self.others]]

    def peers(self) -> list[FakeMember]:
        return [m for m in self.live() if m.name != self.name]


class FakeRegistry:
    def __init__(self) -> None:
        self.streamed = 0
        self.ranges: list[tuple[int, int]] = []

    def blob_size(self, ref: Any, digest: str) -> int:
        return len(BLOB)

    def stream_blob(self, ref: Any, digest: str, *, size: int | None = None) -> Iterator[bytes]:
        for i in range(0, len(BLOB), MiB):
            self.streamed += min(MiB, len(BLOB) - i)
            yield BLOB[i : i + MiB]

    def fetch_ranges(self, ref: Any, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.ranges += ranges
        return [BLOB[s:e] for s, e in ranges]


def pieces() -> list[bytes]:
    p = piece_size(len(BLOB))
    return [BLOB[i : i + p] for i in range(0, len(BLOB), p)]


class World:
    """An event loop on a thread (the node's), the in-memory etcd, and a fetcher whose
    peers answer through ``handler``."""

    def __init__(self, tmp: Path, handler: Any = None, others: list[str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.etcd = MemoryEtcd()
        lease = self.run(self.etcd.grant(60))
        self.membership = FakeMembership("me", lease, others if others is not None else [])
        self.swarm = Swarm(self.etcd, self.membership, tmp / "p2p")  # type: ignore[arg-type]
        self.registry = FakeRegistry()
        self.fetcher = P2PBlobFetcher(
            self.swarm,
            self.loop,
            self.registry,
            "token",
            stall_s=0.3,  # type: ignore[arg-type]
        )
        if handler is not None:
            self.fetcher.http = httpx.Client(
                transport=httpx.MockTransport(handler),
                headers=self.fetcher.http.headers,  # the token
            )

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def publish_source(self, holder: str, held: int = 3) -> None:
        """``holder`` fetched the blob from the registry: its piece digests and progress."""
        for k, data in enumerate(pieces()):
            self.run(
                self.etcd.put(
                    f"blobs/{HEX}/pieces/{k:06d}", hashlib.sha256(data).hexdigest().encode()
                )
            )
        self.run(self.etcd.put(f"blobs/{HEX}/holders/{holder}", str(held).encode()))

    def pull(self) -> bytes:
        return b"".join(self.fetcher.stream_blob(REF, DIGEST, size=len(BLOB)))

    def close(self) -> None:
        self.fetcher.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def world_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[World] = []

    def make(handler: Any = None, others: list[str] | None = None) -> World:
        w = World(tmp_path / str(len(made)), handler, others)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def piece_of(request: httpx.Request) -> int:
    return int(request.url.path.rsplit("/", 1)[1])


def test_the_first_node_goes_back_to_source_and_publishes_pieces(world_factory: Any) -> None:
    w = world_factory()
    assert w.pull() == BLOB
    assert w.registry.streamed == len(BLOB)
    assert w.swarm.complete_path(HEX).read_bytes() == BLOB
    view = w.run(w.swarm.view(HEX))
    assert view.holders == {"me": 3} and view.sources == 0  # the slot was released
    assert [view.digests[k] for k in range(3)] == [hashlib.sha256(p).hexdigest() for p in pieces()]
    assert w.swarm.read_piece(HEX, 2) == pieces()[2]
    # A second pull is served from the local copy: no registry, no peers.
    assert w.pull() == BLOB and w.registry.streamed == len(BLOB)
    # A blob whose layer is not in the store is pruned -- not right after it completed
    # (its layer is recorded only once unpacked), after the grace period.
    assert w.swarm.prune(set()) == 0 and w.swarm.complete_path(HEX).exists()
    assert w.swarm.prune({HEX}, grace_s=0) == 0
    assert w.swarm.prune(set(), grace_s=0) == 1 and not w.swarm.complete_path(HEX).exists()


def test_the_others_fetch_verified_pieces_from_peers(world_factory: Any) -> None:
    asked: list[str] = []

    def peer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        assert request.headers["X-Warmstart-Cluster-Token"] == "token"
        return httpx.Response(200, content=pieces()[piece_of(request)])

    w = world_factory(peer, others=["a"])
    w.publish_source("a")
    assert w.pull() == BLOB
    assert w.registry.streamed == 0 and w.registry.ranges == []
    assert asked == ["a", "a", "a"]
    assert w.swarm.stats.pieces_from_peers == 3
    assert w.run(w.swarm.view(HEX)).holders["me"] == 3  # it serves others now


def test_a_tampering_peer_is_dropped_and_the_piece_fetched_elsewhere(world_factory: Any) -> None:
    served: dict[str, int] = {"bad": 0, "good": 0}

    def peers(request: httpx.Request) -> httpx.Response:
        data = pieces()[piece_of(request)]
        if request.url.host == "bad":
            served["bad"] += 1
            # The first byte flipped (a fixed byte would be no change at all when the
            # random piece happens to start with it).
            return httpx.Response(200, content=bytes([data[0] ^ 0xFF]) + data[1:])
        served["good"] += 1
        return httpx.Response(200, content=data)

    w = world_factory(peers, others=["bad", "good"])
    w.publish_source("bad")
    w.run(w.etcd.put(f"blobs/{HEX}/holders/good", b"3"))
    assert w.pull() == BLOB
    assert served["bad"] <= 1  # asked once at most, then never again for this blob
    assert w.swarm.stats.bad_pieces == served["bad"]
    assert served["good"] == 3 - w.swarm.stats.pieces_from_registry


def test_a_peer_lost_mid_transfer_costs_a_retry(world_factory: Any) -> None:
    def peers(request: httpx.Request) -> httpx.Response:
        k = piece_of(request)
        if request.url.host == "dying" and k >= 1:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, content=pieces()[k])

    w = world_factory(peers, others=["dying", "other"])
    w.publish_source("dying")
    w.run(w.etcd.put(f"blobs/{HEX}/holders/other", b"3"))
    assert w.pull() == BLOB
    assert w.swarm.stats.pieces_from_peers == 3 and w.registry.ranges == []


def test_with_every_peer_gone_the_node_goes_to_the_registry(world_factory: Any) -> None:
    def gone(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    w = world_factory(gone, others=["a"])
    w.publish_source("a", held=1)  # a held one piece, then died (its lease not lapsed yet)
    assert w.pull() == BLOB
    p = piece_size(len(BLOB))
    assert sorted(w.registry.ranges) == [(0, p), (p, 2 * p), (2 * p, len(BLOB))]


def test_pieces_that_do_not_make_the_blob_fail_the_pull(world_factory: Any) -> None:
    """Every peer agrees on wrong digests (a lying source): the blob digest catches it
    and nothing is kept."""
    wrong = [b"Y" * len(p) for p in pieces()]

    def liar(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=wrong[piece_of(request)])

    w = world_factory(liar, others=["liar"])
    for k, data in enumerate(wrong):
        w.run(w.etcd.put(f"blobs/{HEX}/pieces/{k:06d}", hashlib.sha256(data).hexdigest().encode()))
    w.run(w.etcd.put(f"blobs/{HEX}/holders/liar", b"3"))
    with pytest.raises(DigestMismatch):
        w.pull()
    assert not w.swarm.complete_path(HEX).exists()
    assert not w.swarm.part_path(HEX).exists()


class _ChunkPeer(http.server.BaseHTTPRequestHandler):
    chunks: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        digest = self.path.rsplit("/", 1)[1]
        body = self.chunks.get(digest)
        if body is None or self.headers.get("X-Warmstart-Cluster-Token") != "tok":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


def test_lazy_chunks_from_peers_are_verified(tmp_path: Path) -> None:
    good = b"chunk bytes" * 100
    good_digest = "sha256:" + hashlib.sha256(good).hexdigest()
    lie_digest = "sha256:" + hashlib.sha256(b"what it should be").hexdigest()
    _ChunkPeer.chunks = {good_digest: good, lie_digest: b"something else"}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkPeer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        peers_file = tmp_path / "peers.json"
        peers = PeerChunks(peers_file)
        assert peers.fetch(good_digest) is None  # no file: a single node asks nobody
        peers_file.write_text(json.dumps({"peers": [url], "token": "tok"}))
        assert peers.fetch(good_digest) == good
        assert peers.fetch("sha256:" + "0" * 64) is None  # not there: 404
        assert peers.fetch(lie_digest) is None and peers.bad == 1
        assert peers.peers() == []  # the liar is not asked again
        assert (peers.hits, peers.misses) == (1, 3)
    finally:
        server.shutdown()
