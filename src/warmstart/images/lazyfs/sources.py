"""Where a layer blob's bytes come from: the :class:`BlobSource` seam.

The daemon reads a registry blob with Range requests, a layer kept on disk with
``pread``; unit tests put their own sources here (counting, slow, failing, tampering).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class BlobSource(Protocol):
    """Random access to one compressed layer blob."""

    name: str  # for log lines: where the blob lives

    def size(self) -> int: ...

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each half-open range, in order; raises on failure."""
        ...


class RegistryBlobSource:
    """A blob in a registry, read with Range requests by the shared ``RegistryClient``
    (which merges adjacent ranges, batches them into multi-range requests and retries)."""

    def __init__(self, client: Any, ref: Any, digest: str, size: int = 0) -> None:
        self.client = client
        self.ref = ref
        self.digest = digest
        self._size = size
        self.name = f"{ref.registry}/{ref.repository}@{digest}"

    def size(self) -> int:
        if not self._size:
            self._size = int(self.client.blob_size(self.ref, self.digest))
        return self._size

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return list(self.client.fetch_ranges(self.ref, self.digest, ranges))


class FileBlobSource:
    """A blob on local disk: a layer kept from an earlier pull, and tests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def size(self) -> int:
        return self.path.stat().st_size

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, end - start, start) for start, end in ranges]
        finally:
            os.close(fd)
