"""Building a daemon's layers from its spec: TOCs (or gzip indexes) fetched, verified.

A blob's tail (TOC and footer) is kept in the cache directory next to the chunks, so a
remount (after a crash, or of another image sharing the layer) downloads no TOC; the TOC
is verified against its digest on every load, kept or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmstart.images.errors import EStargzError
from warmstart.images.estargz import read_toc
from warmstart.images.gzindex import parse_index
from warmstart.images.lazyfs.chunks import DIGEST_RE, ChunkCache
from warmstart.images.lazyfs.layers import DirLayer, IndexLayer, Layer, TOCLayer
from warmstart.images.lazyfs.sources import BlobSource, FileBlobSource, RegistryBlobSource
from warmstart.images.lazyfs.stats import Stats

if TYPE_CHECKING:
    from warmstart.images.lazymount import DaemonSpec, LayerSource

log = logging.getLogger(__name__)


class _TailReader:
    """``read_range`` for :func:`read_toc` that keeps the blob's tail (TOC and footer) in
    the cache directory, so a remount after a crash needs no TOC download. The TOC is
    verified against its digest on every load, cached or not."""

    def __init__(self, source: BlobSource, cache_dir: Path, digest: str, stats: Stats) -> None:
        self.source = source
        self.stats = stats
        self.file = cache_dir / "tocs" / digest[7:] if DIGEST_RE.fullmatch(digest) else None
        self.start = -1
        self.data = b""
        self.got: list[tuple[int, bytes]] = []
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = self.file.read_bytes()
                header, _, body = raw.partition(b"\n")
                self.start, self.data = int(header), body

    def __call__(self, start: int, end: int) -> bytes:
        if 0 <= self.start <= start and end <= self.start + len(self.data):
            return self.data[start - self.start : end - self.start]
        data = self.source.fetch([(start, end)])[0]
        self.stats.add(requests=1, bytes_fetched=len(data), toc_bytes=len(data))
        self.got.append((start, data))
        return data

    def save(self, blob_size: int) -> None:
        """Keep what was fetched if it is one contiguous run to the end of the blob."""
        if self.file is None or not self.got:
            return
        self.got.sort()
        start, data = self.got[0]
        for s, d in self.got[1:]:
            if s > start + len(data):
                return
            data = data[: s - start] + d + data[s - start + len(d) :]
        if start + len(data) != blob_size:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"%d\n" % start + data)
        os.replace(tmp, self.file)


def load_toc_layer(
    source: BlobSource, toc_digest: str, cache_dir: Path, stats: Stats, blob_digest: str = ""
) -> TOCLayer:
    """Read and verify a blob's TOC (from the cache when we have its tail) and index it."""
    reader = _TailReader(source, cache_dir, blob_digest, stats)
    size = source.size()
    try:
        toc = read_toc(reader, size, toc_digest or None)
    except EStargzError:
        if reader.start < 0:
            raise
        log.warning("cached TOC of %s is unusable: fetching it again", source.name)
        reader = _TailReader(source, cache_dir, "", stats)
        reader.file = cache_dir / "tocs" / blob_digest[7:]
        toc = read_toc(reader, size, toc_digest or None)
    if not toc_digest:
        log.warning("layer %s has no TOC digest: its TOC is not verified", source.name)
    reader.save(size)
    return TOCLayer(toc, source)


def load_index_layer(
    source: BlobSource,
    layer: LayerSource,
    cache_dir: Path,
    stats: Stats,
    client: Any = None,
) -> IndexLayer:
    """Read and check a plain gzip layer's index: its TOC member (fetched by one Range
    request, kept in the cache directory, verified against its digest on every load);
    the windows stay in the index blob until a read needs one."""
    windows: BlobSource
    if layer.index_path:
        windows = FileBlobSource(Path(layer.index_path))
        toc = Path(layer.index_path).read_bytes()
    else:
        from warmstart.images.reference import Reference

        windows = RegistryBlobSource(
            client, Reference.parse(layer.ref), layer.index_digest, layer.index_size
        )
        digest = layer.toc_digest
        kept = cache_dir / "indexes" / digest[7:] if DIGEST_RE.fullmatch(digest) else None
        toc = b""
        if kept is not None:
            with contextlib.suppress(OSError):
                toc = kept.read_bytes()
        if "sha256:" + hashlib.sha256(toc).hexdigest() != digest:
            toc = windows.fetch([(0, layer.toc_size)])[0]
            stats.add(requests=1, bytes_fetched=len(toc), toc_bytes=len(toc))
            got = "sha256:" + hashlib.sha256(toc).hexdigest()
            if got != digest:
                raise EStargzError(f"the TOC of index {layer.index_digest} hashes to {got}")
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
                tmp.write_bytes(toc)
                os.replace(tmp, kept)
    index = parse_index(toc, layer.digest, source.size())
    return IndexLayer(index, source, windows, ChunkCache(cache_dir))


def _registry_client(spec: DaemonSpec) -> Any:
    from warmstart.images.registry import RegistryClient

    settings = spec.registry
    credentials = None
    if settings.credentials_file:
        raw = json.loads(Path(settings.credentials_file).read_text())
        credentials = {str(host): (str(pair[0]), str(pair[1])) for host, pair in raw.items()}
    return RegistryClient(
        docker_config=Path(settings.docker_config) if settings.docker_config else None,
        credentials=credentials,
        insecure=settings.insecure,
        retries=settings.retries,
        timeout=settings.timeout,
    )


def load_layers(spec: DaemonSpec, stats: Stats) -> list[Layer]:
    """Build every layer of the spec; TOCs are fetched concurrently."""
    cache_dir = Path(spec.cache_dir)
    client: Any = None
    if any(
        layer.kind == "estargz" or (layer.kind == "gzindex" and layer.ref) for layer in spec.layers
    ):
        client = _registry_client(spec)

    def build(layer: LayerSource) -> Layer:
        if layer.kind == "dir":
            return DirLayer(Path(layer.path))
        source: BlobSource
        if layer.kind == "file" or (layer.kind == "gzindex" and layer.path):
            source = FileBlobSource(Path(layer.path))
        else:
            from warmstart.images.reference import Reference

            source = RegistryBlobSource(
                client, Reference.parse(layer.ref), layer.digest, layer.size
            )
        if layer.kind == "gzindex":
            return load_index_layer(source, layer, cache_dir, stats, client)
        return load_toc_layer(source, layer.toc_digest, cache_dir, stats, layer.digest)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(8, len(spec.layers))) as pool:
        layers = list(pool.map(build, spec.layers))
    stats.toc_seconds = time.monotonic() - started
    return layers
