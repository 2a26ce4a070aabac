"""The counters one daemon keeps, and the JSON file the worker reads them from.

The worker turns them into the ``warmstart_image_lazy_*`` metrics; SIGUSR1 asks the
daemon for a fresh file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stats:
    """Counters the worker reads (as JSON, rewritten every ``stats_interval``).

    Mutated from fetch threads and the trio thread, hence the lock.
    """

    started: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    toc_bytes: int = 0
    toc_seconds: float = 0.0
    bytes_fetched: int = 0  # everything read from the blob sources, TOCs included
    requests: int = 0  # fetch calls (each one Range or multi-range request)
    chunks_fetched: int = 0
    chunks_cached: int = 0  # chunks this daemon wrote to the cache
    chunks_from_peers: int = 0  # chunks a cluster's other nodes served, verified
    cache_hits: int = 0  # chunks a read found cached
    read_errors: int = 0
    verify_errors: int = 0
    inodes_forgotten: int = 0  # file inodes dropped from memory once the kernel forgot them
    prefetch_done: bool = False
    prefetch_bytes: int = 0
    prefetch_chunks: int = 0
    prefetch_seconds: float = 0.0
    background_enabled: bool = False
    background_done: bool = False
    background_total_bytes: int = 0
    background_cached_bytes: int = 0
    background_failed_chunks: int = 0
    seq: int = 0  # bumped on every write of the stats file
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.seq += 1
            return {
                "seq": self.seq,
                "pid": os.getpid(),
                "ready": self.ready_seconds is not None,
                "ready_seconds": self.ready_seconds,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "toc_bytes": self.toc_bytes,
                "toc_seconds": round(self.toc_seconds, 4),
                "bytes_fetched": self.bytes_fetched,
                "requests": self.requests,
                "chunks_fetched": self.chunks_fetched,
                "chunks_cached": self.chunks_cached,
                "chunks_from_peers": self.chunks_from_peers,
                "cache_hits": self.cache_hits,
                "read_errors": self.read_errors,
                "verify_errors": self.verify_errors,
                "inodes_forgotten": self.inodes_forgotten,
                "prefetch": {
                    "done": self.prefetch_done,
                    "bytes": self.prefetch_bytes,
                    "chunks": self.prefetch_chunks,
                    "seconds": round(self.prefetch_seconds, 4),
                },
                "background": {
                    "enabled": self.background_enabled,
                    "done": self.background_done,
                    "total_bytes": self.background_total_bytes,
                    "cached_bytes": self.background_cached_bytes,
                    "failed_chunks": self.background_failed_chunks,
                },
            }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
