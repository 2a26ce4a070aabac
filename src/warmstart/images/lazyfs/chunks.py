"""The chunk cache: verified chunk bytes on local disk, keyed by chunk digest.

Every daemon (one per mounted image) shares one cache directory, so a chunk two images
have in common is fetched once. A chunk's modification time says when it was last used
(a read touches it, at most once a ``TOUCH_INTERVAL_S``): the worker trims the directory
to its budget, least recently used first, at start and every so often while mounts run
(:meth:`warmstart.images.lazymount.LazyMounts.trim_cache`); a chunk removed under a
reader is fetched again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from warmstart.images.estargz import TOCEntry

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# A read marks its chunk used (its mtime) at most this often.
TOUCH_INTERVAL_S = 30.0


def cache_key(entry: TOCEntry) -> str:
    """The digest a data entry is cached under: its chunk digest (for a piece of a file in
    an indexed gzip layer, the digest of the whole span it lies in), or for a legacy
    unchunked file without one, the file digest (which then covers the same bytes)."""
    if entry.chunk_digest:
        return entry.chunk_digest
    if entry.chunk_offset == 0 and entry.chunk_size == entry.size:
        return entry.digest
    return ""


class ChunkCache:
    """Verified chunk bytes on local disk, one file per chunk digest.

    Files are written to ``tmp/`` and renamed into place, so a reader (in this or any
    other daemon sharing the directory) sees a whole chunk or none. Only digests of the
    form ``sha256:<64 hex>`` get a path: a TOC cannot steer a write outside the cache.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._touched: dict[str, float] = {}  # digest -> when a read last marked it used

    def path(self, digest: str) -> Path | None:
        if not DIGEST_RE.fullmatch(digest):
            return None
        hexd = digest[7:]
        return self.root / "sha256" / hexd[:2] / hexd

    def has(self, digest: str, size: int) -> bool:
        p = self.path(digest)
        if p is None:
            return False
        try:
            return p.stat().st_size == size
        except OSError:
            return False

    def read(self, digest: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a cached chunk, or None if it is not whole."""
        p = self.path(digest)
        if p is None:
            return None
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.pread(fd, length, offset)
            now = time.monotonic()
            if now - self._touched.get(digest, -TOUCH_INTERVAL_S) >= TOUCH_INTERVAL_S:
                self._touched[digest] = now
                with contextlib.suppress(OSError):
                    os.utime(fd)  # used now: the last to go when the cache is trimmed
        finally:
            os.close(fd)
        return data if len(data) == length else None

    def read_span(self, chunks: Sequence[TOCEntry], start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of a file, from its cached ``chunks`` that cover them
        (in file order); None if one of them is not whole in the cache."""
        parts = []
        for c in chunks:
            lo = max(start, c.chunk_offset)
            hi = min(end, c.chunk_offset + c.chunk_size)
            part = self.read(cache_key(c), lo - c.chunk_offset + c.cache_offset, hi - lo)
            if part is None:
                return None
            parts.append(part)
        return b"".join(parts)

    def put(self, digest: str, data: bytes) -> bool:
        """Store verified bytes; False if the digest cannot name a cache file."""
        p = self.path(digest)
        if p is None:
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest[7:]}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return True
