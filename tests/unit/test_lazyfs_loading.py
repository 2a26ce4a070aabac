"""Loading a daemon's layers: TOCs fetched and verified, their blob's tail kept on disk."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from tests.lazyfs_blobs import BASE, UPPER, CountingSource, build_estargz
from warmstart.images.errors import EStargzError
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.layers import DirLayer, TOCLayer
from warmstart.images.lazyfs.loading import load_layers, load_toc_layer
from warmstart.images.lazyfs.sources import FileBlobSource
from warmstart.images.lazyfs.stats import Stats
from warmstart.images.lazymount import DaemonSpec, LayerSource


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def test_toc_tail_is_cached_and_a_corrupt_copy_is_refetched(
    tmp_path: Path, cache: ChunkCache
) -> None:
    blob, toc_digest = build_estargz(BASE)
    path = tmp_path / "b.blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    source = CountingSource(path)
    stats = Stats()
    first = load_toc_layer(source, toc_digest, cache.root, stats, digest)
    assert source.calls and stats.toc_bytes == source.fetched()
    source.calls.clear()
    again = load_toc_layer(source, toc_digest, cache.root, Stats(), digest)
    assert source.calls == [] and len(again.toc.entries) == len(first.toc.entries)
    saved = cache.root / "tocs" / digest[7:]
    raw = bytearray(saved.read_bytes())
    raw[-100] ^= 0xFF
    saved.write_bytes(bytes(raw))
    third = load_toc_layer(source, toc_digest, cache.root, Stats(), digest)
    assert source.calls and third.toc.digest == toc_digest


def test_a_blob_whose_toc_was_swapped_is_refused(tmp_path: Path) -> None:
    """The TOC digest pins the chunk digests: a blob whose TOC was swapped is refused."""
    blob, _ = build_estargz(BASE)
    path = tmp_path / "b.blob"
    path.write_bytes(blob)
    with pytest.raises(EStargzError):
        load_toc_layer(FileBlobSource(path), "sha256:" + "0" * 64, tmp_path / "c", Stats())


def test_gzip_stream_of_hand_built_blob_is_a_valid_tar() -> None:
    blob, _ = build_estargz(BASE[:3])
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        names = tf.getnames()
    assert names[:3] == ["etc", "etc/config", "etc/gone.txt"] and names[-1] == "stargz.index.json"


def test_a_spec_of_local_blobs_and_directories_loads_in_order(tmp_path: Path) -> None:
    layers = []
    for name, members in (("base", BASE), ("upper", UPPER)):
        blob, toc_digest = build_estargz(members)
        (tmp_path / f"{name}.blob").write_bytes(blob)
        layers.append(LayerSource.blob_file(tmp_path / f"{name}.blob", toc_digest))
    (tmp_path / "unpacked").mkdir()
    layers.append(LayerSource.directory(tmp_path / "unpacked"))
    spec = DaemonSpec(str(tmp_path / "mnt"), str(tmp_path / "cache"), tuple(layers))
    stats = Stats()
    loaded = load_layers(spec, stats)
    assert [type(layer) for layer in loaded] == [TOCLayer, TOCLayer, DirLayer]
    assert isinstance(loaded[1], TOCLayer) and "etc/config" in loaded[1].entries
    assert stats.toc_bytes > 0
