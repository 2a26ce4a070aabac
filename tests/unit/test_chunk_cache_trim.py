"""The lazy chunk cache stays within its budget: the oldest chunks go first, at start."""

from __future__ import annotations

import os
from pathlib import Path

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
