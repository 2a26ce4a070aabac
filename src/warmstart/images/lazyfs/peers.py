"""Chunks from peers: a cluster's other nodes, asked before the registry.

In cluster mode the node keeps a small file (``peers.json`` beside the chunk cache) listing
the other nodes' URLs and the cluster's token, rewritten when membership changes.  Before
a foreground fetch goes to the registry, each missing chunk is asked of up to three peers
by its digest (``GET /cluster/chunks/<digest>``); what a peer returns is kept only if it
hashes to that digest (a chunk's digest is the sha256 of its uncompressed bytes), so a
peer can save a registry request but never put wrong bytes in the cache.  A peer that
served wrong bytes is not asked again.  Without the file (a single node) nothing is asked.

Standard library only (urllib), like the rest of the daemon's pure parts: no event loop,
no FUSE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

PEERS_FILE = "peers.json"
TOKEN_HEADER = "X-Warmstart-Cluster-Token"
MAX_PEERS = 3


class PeerChunks:
    def __init__(self, path: Path, *, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout
        self._mtime = -1.0
        self._peers: list[str] = []
        self._token = ""
        self._bad: set[str] = set()
        self.hits = 0
        self.misses = 0
        self.bad = 0

    def _load(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            self._peers = []
            return
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text())
            self._peers = [str(u) for u in data.get("peers", [])]
            self._token = str(data.get("token", ""))
            self._mtime = mtime
        except (OSError, ValueError) as exc:
            log.warning("peers: cannot read %s: %s", self.path, exc)

    def peers(self) -> list[str]:
        self._load()
        return [p for p in self._peers if p not in self._bad][:MAX_PEERS]

    def fetch(self, digest: str) -> bytes | None:
        """The chunk ``digest`` from a peer, verified; None if no peer has it."""
        if not digest.startswith("sha256:"):
            return None
        for url in self.peers():
            req = urllib.request.Request(
                f"{url}/cluster/chunks/{digest}", headers={TOKEN_HEADER: self._token}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data: bytes = resp.read()
            except (urllib.error.URLError, OSError, ValueError):
                continue  # not there (404), or the peer is gone: the next one
            if hashlib.sha256(data).hexdigest() != digest.split(":", 1)[1]:
                self._bad.add(url)
                self.bad += 1
                log.error("peers: %s served a wrong chunk %s: not asked again", url, digest)
                continue
            self.hits += 1
            return data
        self.misses += 1
        return None
