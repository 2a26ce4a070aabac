"""The lazy filesystem on a real FUSE mount, served in-process from eStargz blobs on disk.

The blobs are hand-made (:mod:`tests.lazyfs_blobs`); the only fakes are blob sources at
the fetch seam (counting, slow, tampering, failing). Needs root and /dev/fuse; the pure
parts have their own tests (test_lazyfs_tree, _chunks, _planning, _loading).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import IS_ROOT, needs
from tests.lazyfs_blobs import (
    BASE,
    MTIME,
    UPPER,
    Member,
    big,
    blob_layer,
    make_local_layer,
)
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.daemon import Daemon
from warmstart.images.lazyfs.layers import DirLayer, Layer
from warmstart.images.lazyfs.stats import Stats
from warmstart.images.lazymount import BackgroundFetch, detach, is_mounted

pytestmark = needs(IS_ROOT and os.path.exists("/dev/fuse"), "needs root and /dev/fuse")


@contextlib.contextmanager
def mounted(
    tmp_path: Path,
    layers: list[Layer],
    cache: ChunkCache,
    *,
    background: BackgroundFetch | None = None,
    read_ahead: int = 512 << 10,
    name: str = "mnt",
) -> Iterator[tuple[Path, Daemon]]:
    """Serve ``layers`` on a real FUSE mount from a thread of this process."""
    mnt = tmp_path / name
    mnt.mkdir()
    daemon = Daemon(
        layers,
        mnt,
        cache,
        Stats(),
        background=background,
        read_ahead=read_ahead,
        stats_path=tmp_path / f"{name}.stats.json",
        stats_interval=0.05,
    )
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            trio.run(daemon.run, lambda _snapshot: ready.set())
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "mount did not become ready"
    if failure:
        raise failure[0]
    try:
        yield mnt, daemon
    finally:
        daemon.stop()
        thread.join(30)
        if is_mounted(mnt):
            detach(mnt)
        assert not failure, failure


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


# -- merging -----------------------------------------------------------------------------------
def test_merged_tree_applies_whiteouts_opaque_dirs_and_attributes(
    tmp_path: Path, cache: ChunkCache
) -> None:
    base, _ = blob_layer(tmp_path, "base", BASE, cache)
    upper, _ = blob_layer(tmp_path, "upper", UPPER, cache)
    local = DirLayer(make_local_layer(tmp_path / "local"))
    with mounted(tmp_path, [base, upper, local], cache) as (mnt, _):
        assert sorted(os.listdir(mnt)) == ["dev", "etc", "local-opq", "opq", "usr"]
        assert os.listdir(mnt / "etc") == ["config"]  # .wh.gone.txt deleted the lower file
        assert (mnt / "etc/config").read_bytes() == b"upper config\n"
        st = os.stat(mnt / "etc/config")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
        assert st.st_mtime == MTIME
        assert os.listdir(mnt / "opq") == ["new.txt"]  # opaque: old.txt hidden
        assert stat.S_IMODE(os.stat(mnt / "opq").st_mode) == 0o750
        assert not (mnt / "doomed").exists()
        assert not (mnt / "doomed/inner.txt").exists()
        assert not (mnt / "local-gone.txt").exists()  # 0/0 char device in the unpacked layer
        assert os.listdir(mnt / "local-opq") == ["mine.txt"]  # trusted.overlay.opaque=y
        assert sorted(os.listdir(mnt / "usr/lib")) == [
            "big.bin",
            "caps",
            "empty",
            "local-link.txt",
            "local.txt",
            "python3",
        ]
        assert (mnt / "usr/lib/local.txt").read_bytes() == b"from the unpacked layer\n"
        assert (mnt / "usr/lib/python3/mod.py").read_bytes() == b"print('hi')\n"
        # The unpacked layer's own hard link shares an inode, its overlay xattrs are hidden.
        a, b = os.stat(mnt / "usr/lib/local.txt"), os.stat(mnt / "usr/lib/local-link.txt")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert "trusted.overlay.opaque" not in os.listxattr(mnt / "local-opq")
        # Directory link counts: 2 + subdirectories of the merged directory.
        assert os.stat(mnt / "usr").st_nlink == 4  # bin, lib
        assert os.stat(mnt / "usr/lib").st_nlink == 3  # python3
        assert os.stat(mnt).st_nlink == 2 + 5


def test_file_types_links_devices_and_xattrs(tmp_path: Path, cache: ChunkCache) -> None:
    base, _ = blob_layer(tmp_path, "base", BASE, cache)
    with mounted(tmp_path, [base], cache) as (mnt, _):
        tool = os.stat(mnt / "usr/bin/tool")
        assert stat.S_ISREG(tool.st_mode) and stat.S_IMODE(tool.st_mode) == 0o4755
        assert (tool.st_uid, tool.st_gid, tool.st_size) == (1000, 1000, 20)
        again = os.stat(mnt / "usr/bin/tool-again")
        assert again.st_ino == tool.st_ino and tool.st_nlink == 2
        assert (mnt / "usr/bin/tool-again").read_bytes() == b"#!/bin/sh\necho tool\n"
        assert os.readlink(mnt / "usr/bin/sh") == "tool"
        assert stat.S_ISLNK(os.lstat(mnt / "usr/bin/sh").st_mode)
        null = os.lstat(mnt / "dev/null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        sda = os.lstat(mnt / "dev/sda")
        assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0)
        assert sda.st_gid == 6
        assert stat.S_ISFIFO(os.lstat(mnt / "dev/fifo").st_mode)
        with pytest.raises(PermissionError):  # nodev: a device node is metadata only
            os.open(mnt / "dev/null", os.O_RDONLY)
        assert sorted(os.listxattr(mnt / "usr/lib/caps")) == ["security.x", "user.note"]
        assert os.getxattr(mnt / "usr/lib/caps", "user.note") == b"hello"
        with pytest.raises(OSError) as info:
            os.getxattr(mnt / "usr/lib/caps", "user.absent")
        assert info.value.errno == errno.ENODATA
        assert (mnt / "usr/lib/empty").read_bytes() == b""
        with pytest.raises(OSError) as info:
            os.open(mnt / "etc/config", os.O_WRONLY)
        assert info.value.errno == errno.EROFS
        assert not (mnt / ".prefetch.landmark").exists()


def test_readdir_offsets_resume_a_large_directory(tmp_path: Path, cache: ChunkCache) -> None:
    names = [f"file-{i:04d}-{'x' * 40}" for i in range(600)]
    members = [Member("d", "dir")] + [Member(f"d/{n}", data=n.encode()) for n in names]
    layer, _ = blob_layer(tmp_path, "many", members, cache)
    with mounted(tmp_path, [layer], cache) as (mnt, _):
        # Far more than one readdir reply holds: the kernel resumes at our offsets.
        listed = os.listdir(mnt / "d")
        assert sorted(listed) == sorted(names) and len(listed) == len(set(listed))
        with os.scandir(mnt / "d") as it:
            assert sum(1 for _ in it) == 600
        assert (mnt / "d" / names[599]).read_bytes() == names[599].encode()


def test_hostile_toc_entries_stay_inside_and_dangling_hardlinks_are_hidden(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("../../escape.txt", data=b"climbed\n"),
        Member("a/b/c.txt", data=b"parents implied\n"),
        Member("link-to-nothing", "hardlink", link="missing"),
        Member("link-loop-1", "hardlink", link="link-loop-2"),
        Member("link-loop-2", "hardlink", link="link-loop-1"),
    ]
    layer, _ = blob_layer(tmp_path, "hostile", members, cache)
    with mounted(tmp_path, [layer], cache) as (mnt, _):
        assert sorted(os.listdir(mnt)) == ["a", "escape.txt"]
        assert (mnt / "escape.txt").read_bytes() == b"climbed\n"
        assert (mnt / "a/b/c.txt").read_bytes() == b"parents implied\n"
        assert stat.S_IMODE(os.stat(mnt / "a").st_mode) == 0o755
    assert not (tmp_path.parent / "escape.txt").exists()


# -- fetching ----------------------------------------------------------------------------------
def test_chunks_fetched_on_first_read_merged_verified_and_cached(
    tmp_path: Path, cache: ChunkCache
) -> None:
    data = big(300_000)
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    assert len(layer.toc.chunks("usr/lib/big.bin")) == 5
    with mounted(tmp_path, [layer], cache, read_ahead=0) as (mnt, daemon):
        assert source.calls == []  # listing and stat need no content
        os.listdir(mnt / "usr/lib")
        os.stat(mnt / "usr/lib/big.bin")
        assert source.calls == []
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            f.seek(100_000)
            assert f.read(100) == data[100_000:100_100]
        assert len(source.calls) == 1 and len(source.calls[0]) == 1  # just that chunk
        assert (mnt / "usr/lib/big.bin").read_bytes() == data
        # The rest of the file: adjacent chunks merged into one range per request.
        assert all(len(call) == 1 for call in source.calls)
        chunks = layer.toc.chunks("usr/lib/big.bin")
        for c in chunks:
            path = cache.path(cache_key(c))
            assert path is not None and path.stat().st_size == c.chunk_size
        assert daemon.stats.chunks_cached == 5
    # A second mount sharing the cache fetches nothing for those chunks.
    layer2, source2 = blob_layer(tmp_path, "base2", BASE, cache, chunk_size=64 << 10)
    with mounted(tmp_path, [layer2], cache, name="mnt2") as (mnt, daemon):
        assert (mnt / "usr/lib/big.bin").read_bytes() == data
        assert source2.calls == []
        assert daemon.stats.cache_hits >= 5


def test_read_ahead_takes_following_members_in_one_request(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [Member("pkg", "dir")] + [
        Member(f"pkg/m{i}.py", data=big(3000, seed=i)) for i in range(20)
    ]
    layer, source = blob_layer(tmp_path, "pkg", members, cache)
    with mounted(tmp_path, [layer], cache, read_ahead=1 << 20) as (mnt, _):
        for i in range(20):
            assert (mnt / f"pkg/m{i}.py").read_bytes() == big(3000, seed=i)
        assert len(source.calls) == 1  # the first read brought its neighbours along
        assert len(source.calls[0]) == 1
    total = sum(e.end_offset - e.offset for e in layer.data)
    assert source.fetched() == total


def test_prioritized_files_stream_in_one_request_and_reads_wait_for_it(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("app", "dir"),
        Member("app/main.py", data=b"import lib\n"),
        Member("app/lib.py", data=big(50_000, seed=7)),
        Member("app/cold.bin", data=big(200_000, seed=8)),
        Member("app/cold2.bin", data=big(200_000, seed=9)),
    ]
    layer, source = blob_layer(tmp_path, "app", members, cache, prioritized=3)
    assert layer.toc.prefetch_end is not None
    with mounted(tmp_path, [layer], cache, read_ahead=0) as (mnt, daemon):
        # Prioritized files are claimed at mount: reading them waits for the prefetch
        # (one request up to the landmark) instead of fetching them on their own.
        assert (mnt / "app/main.py").read_bytes() == b"import lib\n"
        assert (mnt / "app/lib.py").read_bytes() == big(50_000, seed=7)
        assert len(source.calls) == 1
        [(start, end)] = source.calls[0]
        assert end == layer.toc.prefetch_end and start == layer.data[0].offset
        deadline = time.monotonic() + 10
        while not daemon.stats.prefetch_done:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert daemon.stats.prefetch_chunks == 2
        deadline = time.monotonic() + 10
        while not json.loads((tmp_path / "mnt.stats.json").read_text())["prefetch"]["done"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (mnt / "app/cold.bin").read_bytes() == big(200_000, seed=8)
        assert len(source.calls) == 2


def test_background_fetch_caches_everything_and_can_be_off(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    with mounted(tmp_path, [layer], cache) as (mnt, daemon):
        (mnt / "usr/bin/tool").read_bytes()
        calls = len(source.calls)
    assert calls == 1  # background off: nothing but the read

    cache2 = ChunkCache(tmp_path / "cache2")
    layer, source = blob_layer(tmp_path, "base2", BASE, cache2, chunk_size=64 << 10)
    bg = BackgroundFetch(enabled=True, concurrency=2, batch_bytes=64 << 10)
    with mounted(tmp_path, [layer], cache2, background=bg, name="mnt2") as (mnt, daemon):
        for _ in range(600):
            if daemon.stats.background_done:
                break
            threading.Event().wait(0.05)
        assert daemon.stats.background_done
        assert all(cache2.has(cache_key(e), e.chunk_size) for e in layer.data)
        before = len(source.calls)
        assert (mnt / "usr/lib/big.bin").read_bytes() == big(300_000)
        assert len(source.calls) == before
        snap = json.loads((tmp_path / "mnt2.stats.json").read_text())
        assert snap["background"]["total_bytes"] == snap["background"]["cached_bytes"]


# -- failures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flipped-byte", "well-formed-wrong-content"])
def test_corrupt_chunk_answers_eio_and_is_never_cached(
    tmp_path: Path, cache: ChunkCache, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    victim = layer.toc.chunks("usr/lib/big.bin")[1]
    if how == "flipped-byte":  # caught by gzip's own CRC
        source.tamper_at = victim.offset + (victim.end_offset - victim.offset) // 2
        expect = "not valid gzip"
    else:  # a valid gzip member of the right length: only the chunk digest catches it
        fake = gzip.compress(b"\0" * victim.chunk_size, mtime=0)
        source.forge[victim.offset] = fake.ljust(victim.end_offset - victim.offset, b"\0")
        expect = "expected sha256:"
    caplog.set_level(logging.ERROR, logger="warmstart.images.lazyfs")
    with mounted(tmp_path, [layer], cache, read_ahead=0) as (mnt, daemon):
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            assert len(f.read(1000)) == 1000  # chunk 0 is fine
            f.seek(victim.chunk_offset + 10)
            with pytest.raises(OSError) as info:
                f.read(100)
        assert info.value.errno == errno.EIO
        assert not cache.has(cache_key(victim), victim.chunk_size)
        assert daemon.stats.read_errors >= 1 and daemon.stats.verify_errors >= 1
        assert (mnt / "etc/config").read_bytes() == b"base config\n"  # others unaffected
    assert any(
        "usr/lib/big.bin" in r.getMessage() and "EIO" in r.getMessage() for r in caplog.records
    )
    assert any(expect in r.getMessage() for r in caplog.records)


def test_dead_source_answers_eio_then_recovers_without_wrong_bytes(
    tmp_path: Path, cache: ChunkCache, caplog: pytest.LogCaptureFixture
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache)
    caplog.set_level(logging.ERROR, logger="warmstart.images.lazyfs")
    with mounted(tmp_path, [layer], cache) as (mnt, _):
        source.fail = True
        with pytest.raises(OSError) as info:
            (mnt / "etc/gone.txt").read_bytes()
        assert info.value.errno == errno.EIO
        assert any("refused the connection" in r.getMessage() for r in caplog.records)
        assert any("etc/gone.txt" in r.getMessage() for r in caplog.records)
        source.fail = False
        assert (mnt / "etc/gone.txt").read_bytes() == b"deleted above\n"
