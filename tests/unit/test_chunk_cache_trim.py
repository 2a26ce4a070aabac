"""The lazy chunk cache stays within its budget: the least recently used chunks go first,
at start and, by the trimmer, while mounts run."""

from __future__ import annotations

import os
import time
from pathlib import Path

from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazymount import LazyMounts


def _chunk(cache: Path, name: str, size: int, mtime: float) -> Path:
    path = cache / "sha256" / name[:2] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_trim_removes_the_oldest_chunks_until_the_cache_fits(tmp_path: Path) -> None:
    mounts = LazyMounts(tmp_path / "lazy")
    cache = mounts.cache_dir
    old = _chunk(cache, "aa" + "0" * 62, 4000, 1_000)
    mid = _chunk(cache, "bb" + "0" * 62, 4000, 2_000)
    new = _chunk(cache, "cc" + "0" * 62, 4000, 3_000)
    partial = cache / "tmp" / "dd.123.abcd"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"half")
    assert mounts.trim_cache(10_000) == 4000
    assert not old.exists() and mid.exists() and new.exists()
    assert not partial.exists()  # a crashed daemon's unfinished write
    assert mounts.trim_cache(10_000) == 0  # fits now: nothing more goes
    assert mounts.trim_cache(0) == 8000
    assert not mid.exists() and not new.exists()


def test_a_read_marks_its_chunk_used_so_it_goes_last(tmp_path: Path) -> None:
    mounts = LazyMounts(tmp_path / "lazy")
    cache = ChunkCache(mounts.cache_dir)
    first, second = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32
    assert cache.put(first, b"1" * 4000) and cache.put(second, b"2" * 4000)
    for digest, when in ((first, 1_000), (second, 2_000)):
        path = cache.path(digest)
        assert path is not None
        os.utime(path, (when, when))
    assert cache.read(first, 0, 10) == b"1" * 10  # the older one is read: used now
    assert mounts.trim_cache(4000) == 4000
    assert cache.has(first, 4000) and not cache.has(second, 4000)


def test_recently_used_chunks_stay_even_over_the_budget(tmp_path: Path) -> None:
    mounts = LazyMounts(tmp_path / "lazy")
    cache = mounts.cache_dir
    now = time.time()
    old = _chunk(cache, "aa" + "1" * 62, 4000, now - 600)
    recent = _chunk(cache, "bb" + "1" * 62, 4000, now - 5)
    partial = cache / "tmp" / "cc.1.abcd"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"being written")
    assert mounts.trim_cache(0, keep_recent_s=60) == 4000
    assert not old.exists() and recent.exists()
    assert mounts.trim_cache(0) == 4000 and not recent.exists()


def test_the_trimmer_keeps_the_cache_within_its_budget(tmp_path: Path) -> None:
    mounts = LazyMounts(
        tmp_path / "lazy", cache_budget_bytes=5000, trim_interval=0.05, keep_recent_s=0
    )
    try:
        cache = mounts.cache_dir
        for i in range(4):
            _chunk(cache, f"{i:02d}" + "2" * 62, 4000, 1_000 + i)
        deadline = time.monotonic() + 30
        while mounts.trimmed_bytes < 12_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mounts.trimmed_bytes == 12_000
        left = [p.name[:2] for p in (cache / "sha256").glob("*/*")]
        assert left == ["03"]  # the most recently used one
    finally:
        mounts.close()
