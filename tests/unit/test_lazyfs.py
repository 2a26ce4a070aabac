"""The lazy filesystem on a real FUSE mount, served in-process from eStargz blobs on disk.

The blobs are built here by hand, independently of warmstart's writer: gzip members cut
where the eStargz spec says, a TOC, the 51-byte footer. The only fakes are blob sources
at the fetch seam (counting, slow, tampering, failing).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import stat
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from warmstart.images.errors import RegistryError
from warmstart.images.lazyfs.chunks import ChunkCache, cache_key
from warmstart.images.lazyfs.daemon import Daemon
from warmstart.images.lazyfs.fetcher import Fetcher
from warmstart.images.lazyfs.layers import DirLayer, Layer, TOCLayer
from warmstart.images.lazyfs.loading import load_toc_layer
from warmstart.images.lazyfs.sources import FileBlobSource
from warmstart.images.lazyfs.stats import Stats
from warmstart.images.lazymount import BackgroundFetch, detach, is_mounted

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs root and /dev/fuse"
)

MTIME = 1_700_000_000


# -- a hand-made eStargz producer --------------------------------------------------------------
@dataclass
class Member:
    """One tar member of a test layer."""

    name: str
    kind: str = "reg"  # reg dir symlink hardlink char block fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TAR_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _footer(toc_offset: int) -> bytes:
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def build_estargz(
    members: list[Member], *, chunk_size: int = 1 << 20, prioritized: int | None = None
) -> tuple[bytes, str]:
    """An eStargz blob of ``members`` and its TOC digest. With ``prioritized=n`` the
    first n members come before a ``.prefetch.landmark``."""
    if prioritized is not None:
        members = [
            *members[:prioritized],
            Member(".prefetch.landmark", data=b"\x0f"),
            *members[prioritized:],
        ]
    out = bytearray()
    buf = bytearray()
    entries: list[dict[str, Any]] = []

    def cut() -> None:
        if buf:
            out.extend(gzip.compress(bytes(buf), mtime=0))
            buf.clear()

    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type = _TAR_TYPES[m.kind]
        info.mode, info.uid, info.gid, info.mtime = m.mode, m.uid, m.gid, MTIME
        info.size = len(m.data) if m.kind == "reg" else 0
        info.linkname = m.link
        info.devmajor, info.devminor = m.dev
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in m.xattrs.items()
        }
        buf.extend(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        e: dict[str, Any] = {
            "name": m.name + ("/" if m.kind == "dir" else ""),
            "type": m.kind,
            "mode": m.mode,
            "uid": m.uid,
            "gid": m.gid,
            "modtime": "2023-11-14T22:13:20Z",
        }
        if m.link:
            e["linkName"] = m.link
        if m.kind in ("char", "block"):
            e["devMajor"], e["devMinor"] = m.dev
        if m.xattrs:
            e["xattrs"] = {k: base64.b64encode(v).decode() for k, v in m.xattrs.items()}
        if m.kind == "reg" and m.data:
            e["size"] = len(m.data)
            e["digest"] = "sha256:" + hashlib.sha256(m.data).hexdigest()
            for off in range(0, len(m.data), chunk_size):
                piece = m.data[off : off + chunk_size]
                cut()
                chunk: dict[str, Any] = e if off == 0 else {"name": m.name, "type": "chunk"}
                chunk["offset"] = len(out)
                chunk["chunkOffset"] = off
                if off + chunk_size < len(m.data):
                    chunk["chunkSize"] = len(piece)
                chunk["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
                if off:
                    entries.append(chunk)
                else:
                    entries.append(e)
                buf.extend(piece)
            buf.extend(b"\0" * (-len(m.data) % 512))
        else:
            entries.append(e)
    cut()
    toc_offset = len(out)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    info = tarfile.TarInfo("stargz.index.json")
    info.size, info.mtime = len(toc), MTIME
    buf.extend(info.tobuf(tarfile.GNU_FORMAT))
    buf.extend(toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024)
    cut()
    out.extend(_footer(toc_offset))
    return bytes(out), "sha256:" + hashlib.sha256(toc).hexdigest()


# -- blob sources at the seam ------------------------------------------------------------------
class CountingSource(FileBlobSource):
    """A blob on disk that records every fetch (and can be made to fail or tamper)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[list[tuple[int, int]]] = []
        self.fail = False
        self.tamper_at: int | None = None  # flip the byte at this blob offset
        self.forge: dict[int, bytes] = {}  # blob offset -> bytes served there instead
        self.gate: threading.Event | None = None  # block fetches until set

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls.append(list(ranges))
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            raise RegistryError("127.0.0.1:1 refused the connection (after 4 retries)")
        out = super().fetch(ranges)
        if self.tamper_at is not None:
            for i, (start, end) in enumerate(ranges):
                if start <= self.tamper_at < end:
                    b = bytearray(out[i])
                    b[self.tamper_at - start] ^= 0xFF
                    out[i] = bytes(b)
        for at, fake in self.forge.items():
            for i, (start, end) in enumerate(ranges):
                if start <= at and at + len(fake) <= end:
                    b = bytearray(out[i])
                    b[at - start : at - start + len(fake)] = fake
                    out[i] = bytes(b)
        return out

    def fetched(self) -> int:
        return sum(end - start for call in self.calls for start, end in call)


def blob_layer(
    tmp_path: Path, name: str, members: list[Member], cache: ChunkCache, **kwargs: Any
) -> tuple[TOCLayer, CountingSource]:
    blob, toc_digest = build_estargz(members, **kwargs)
    path = tmp_path / f"{name}.blob"
    path.write_bytes(blob)
    source = CountingSource(path)
    layer = load_toc_layer(source, toc_digest, cache.root, Stats())
    source.calls.clear()
    return layer, source


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


def _big(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


BASE = [
    Member("etc", "dir", mode=0o755),
    Member("etc/config", data=b"base config\n", mode=0o640, uid=0, gid=42),
    Member("etc/gone.txt", data=b"deleted above\n"),
    Member("usr", "dir", mode=0o755),
    Member("usr/bin", "dir", mode=0o755),
    Member("usr/bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1000, gid=1000),
    Member("usr/bin/tool-again", "hardlink", link="usr/bin/tool"),
    Member("usr/bin/sh", "symlink", link="tool", mode=0o777),
    Member("usr/lib", "dir", mode=0o755),
    Member("usr/lib/big.bin", data=_big(300_000), mode=0o644),
    Member("usr/lib/empty", data=b""),
    Member("usr/lib/caps", data=b"x", xattrs={"user.note": b"hello", "security.x": b"\x00\x01"}),
    Member("dev", "dir", mode=0o755),
    Member("dev/null", "char", dev=(1, 3), mode=0o666),
    Member("dev/sda", "block", dev=(8, 0), mode=0o660, gid=6),
    Member("dev/fifo", "fifo", mode=0o600),
    Member("opq", "dir", mode=0o755),
    Member("opq/old.txt", data=b"hidden by the opaque dir above\n"),
    Member("doomed", "dir", mode=0o700),
    Member("doomed/inner.txt", data=b"whited-out directory\n"),
    Member("local-gone.txt", data=b"whited out by the unpacked layer\n"),
    Member("local-opq", "dir"),
    Member("local-opq/below.txt", data=b"hidden by the xattr-opaque dir\n"),
]
UPPER = [
    Member("etc", "dir", mode=0o755),
    Member("etc/config", data=b"upper config\n", mode=0o600, uid=0, gid=0),
    Member("etc/.wh.gone.txt", data=b""),
    Member("opq", "dir", mode=0o750),
    Member("opq/.wh..wh..opq", data=b""),
    Member("opq/new.txt", data=b"new\n"),
    Member(".wh.doomed", data=b""),
    Member("usr/lib/python3", "dir"),
    Member("usr/lib/python3/mod.py", data=b"print('hi')\n"),
]


def make_local_layer(root: Path) -> Path:
    """An unpacked layer as unpack.py leaves it: overlayfs whiteouts and opaque xattrs."""
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/local.txt").write_bytes(b"from the unpacked layer\n")
    os.chmod(root / "usr/lib/local.txt", 0o600)
    os.mknod(root / "local-gone.txt", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (root / "local-opq").mkdir()
    os.setxattr(root / "local-opq", "trusted.overlay.opaque", b"y")
    (root / "local-opq/mine.txt").write_bytes(b"mine\n")
    os.link(root / "usr/lib/local.txt", root / "usr/lib/local-link.txt")
    return root


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
    big = _big(300_000)
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    assert len(layer.toc.chunks("usr/lib/big.bin")) == 5
    with mounted(tmp_path, [layer], cache, read_ahead=0) as (mnt, daemon):
        assert source.calls == []  # listing and stat need no content
        os.listdir(mnt / "usr/lib")
        os.stat(mnt / "usr/lib/big.bin")
        assert source.calls == []
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            f.seek(100_000)
            assert f.read(100) == big[100_000:100_100]
        assert len(source.calls) == 1 and len(source.calls[0]) == 1  # just that chunk
        assert (mnt / "usr/lib/big.bin").read_bytes() == big
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
        assert (mnt / "usr/lib/big.bin").read_bytes() == big
        assert source2.calls == []
        assert daemon.stats.cache_hits >= 5


def test_read_ahead_takes_following_members_in_one_request(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [Member("pkg", "dir")] + [
        Member(f"pkg/m{i}.py", data=_big(3000, seed=i)) for i in range(20)
    ]
    layer, source = blob_layer(tmp_path, "pkg", members, cache)
    with mounted(tmp_path, [layer], cache, read_ahead=1 << 20) as (mnt, _):
        for i in range(20):
            assert (mnt / f"pkg/m{i}.py").read_bytes() == _big(3000, seed=i)
        assert len(source.calls) == 1  # the first read brought its neighbours along
        assert len(source.calls[0]) == 1
    total = sum(e.end_offset - e.offset for e in layer.data)
    assert source.fetched() == total


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path: Path, cache: ChunkCache) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    source.gate = threading.Event()
    chunk = layer.toc.chunks("usr/lib/big.bin")[2]
    fetcher = Fetcher(cache, Stats(), read_ahead=0)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(fetcher.ensure, layer, [chunk])
            await trio.sleep(0.2)
            source.gate.set()  # type: ignore[union-attr]

    trio.run(scenario)
    assert len(source.calls) == 1
    assert (
        cache.read(cache_key(chunk), 0, chunk.chunk_size)
        == _big(300_000)[chunk.chunk_offset : chunk.chunk_offset + chunk.chunk_size]
    )


def test_prioritized_files_stream_in_one_request_and_reads_wait_for_it(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("app", "dir"),
        Member("app/main.py", data=b"import lib\n"),
        Member("app/lib.py", data=_big(50_000, seed=7)),
        Member("app/cold.bin", data=_big(200_000, seed=8)),
        Member("app/cold2.bin", data=_big(200_000, seed=9)),
    ]
    layer, source = blob_layer(tmp_path, "app", members, cache, prioritized=3)
    assert layer.toc.prefetch_end is not None
    with mounted(tmp_path, [layer], cache, read_ahead=0) as (mnt, daemon):
        # Prioritized files are claimed at mount: reading them waits for the prefetch
        # (one request up to the landmark) instead of fetching them on their own.
        assert (mnt / "app/main.py").read_bytes() == b"import lib\n"
        assert (mnt / "app/lib.py").read_bytes() == _big(50_000, seed=7)
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
        assert (mnt / "app/cold.bin").read_bytes() == _big(200_000, seed=8)
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
        assert (mnt / "usr/lib/big.bin").read_bytes() == _big(300_000)
        assert len(source.calls) == before
        snap = json.loads((tmp_path / "mnt2.stats.json").read_text())
        assert snap["background"]["total_bytes"] == snap["background"]["cached_bytes"]


def test_background_waits_while_a_foreground_read_is_fetching(
    tmp_path: Path, cache: ChunkCache
) -> None:
    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    gate = threading.Event()
    source.gate = gate
    fetcher = Fetcher(
        cache, Stats(), read_ahead=0, background=BackgroundFetch(enabled=True, batch_bytes=1)
    )
    chunk = layer.toc.chunks("usr/lib/big.bin")[0]

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetcher.ensure, layer, [chunk])
            await trio.sleep(0.05)
            nursery.start_soon(fetcher.background, [layer])
            await trio.sleep(0.3)
            # Only the foreground request went out while it was in flight.
            assert source.calls == [[(chunk.offset, chunk.end_offset)]]
            gate.set()

    trio.run(scenario)
    assert all(cache.has(cache_key(e), e.chunk_size) for e in layer.data)


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


def test_cache_refuses_digests_that_are_not_sha256_hex(cache: ChunkCache) -> None:
    assert cache.path("sha256:../../../etc/passwd") is None
    assert cache.path("md5:" + "a" * 32) is None
    assert cache.put("sha256:" + "g" * 64, b"x") is False
    good = "sha256:" + hashlib.sha256(b"x").hexdigest()
    assert cache.put(good, b"x") and cache.read(good, 0, 1) == b"x"
    assert cache.read(good, 0, 2) is None  # short: not whole
    assert list((cache.root / "tmp").iterdir()) == []


def test_toc_tail_is_cached_and_a_corrupt_copy_is_refetched(
    tmp_path: Path, cache: ChunkCache
) -> None:
    blob, toc_digest = build_estargz(BASE)
    path = tmp_path / "b.blob"
    path.write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    source = CountingSource(path)
    first = load_toc_layer(source, toc_digest, cache.root, Stats(), digest)
    assert source.calls
    source.calls.clear()
    again = load_toc_layer(source, toc_digest, cache.root, Stats(), digest)
    assert source.calls == [] and len(again.toc.entries) == len(first.toc.entries)
    saved = cache.root / "tocs" / digest[7:]
    raw = bytearray(saved.read_bytes())
    raw[-100] ^= 0xFF
    saved.write_bytes(bytes(raw))
    third = load_toc_layer(source, toc_digest, cache.root, Stats(), digest)
    assert source.calls and third.toc.digest == toc_digest


def test_local_blob_reads_without_verification_shortcuts(tmp_path: Path) -> None:
    """The TOC digest pins the chunk digests: a blob whose TOC was swapped is refused."""
    blob, _ = build_estargz(BASE)
    path = tmp_path / "b.blob"
    path.write_bytes(blob)
    from warmstart.images.errors import EStargzError

    with pytest.raises(EStargzError):
        load_toc_layer(FileBlobSource(path), "sha256:" + "0" * 64, tmp_path / "c", Stats())


def test_gzip_stream_of_hand_built_blob_is_a_valid_tar() -> None:
    blob, _ = build_estargz(BASE[:3])
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        names = tf.getnames()
    assert names[:3] == ["etc", "etc/config", "etc/gone.txt"] and names[-1] == "stargz.index.json"


def test_background_keeps_to_its_bandwidth(tmp_path: Path, cache: ChunkCache) -> None:
    """Paced on trio's clock: with a mock clock, the virtual time the background fetch
    takes is what its bandwidth allows, whatever the machine's speed."""
    from trio.testing import MockClock

    layer, source = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    bandwidth = 100_000
    batch = 32 << 10
    fetcher = Fetcher(
        cache,
        Stats(),
        background=BackgroundFetch(enabled=True, bandwidth=bandwidth, batch_bytes=batch),
    )
    elapsed: list[float] = []

    async def scenario() -> None:
        start = trio.current_time()
        await fetcher.background([layer])
        elapsed.append(trio.current_time() - start)

    trio.run(scenario, clock=MockClock(autojump_threshold=0))
    total = sum(e.end_offset - e.offset for e in layer.data)
    biggest = max(e.end_offset - e.offset for e in layer.data)
    assert fetcher.stats.background_done
    assert len(source.calls) > 3
    # Only the last batch may go out without waiting for its share of time.
    assert elapsed[0] >= (total - biggest - batch) / bandwidth


# -- the daemon's spec and entry point ---------------------------------------------------------
def test_daemon_spec_round_trips_and_bad_specs_are_refused(tmp_path: Path) -> None:
    from warmstart.images.errors import ImageError
    from warmstart.images.lazymount import DaemonSpec, LayerSource, MountSpec

    layers = (
        LayerSource.estargz("127.0.0.1:5000/app:1", "sha256:" + "a" * 64, "sha256:" + "b" * 64),
        LayerSource.directory(tmp_path),
    )
    spec = DaemonSpec(
        str(tmp_path / "m"),
        str(tmp_path / "c"),
        layers,
        background=BackgroundFetch(enabled=False, bandwidth=5),
    )
    assert DaemonSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    # The mount identity depends on the layers only.
    assert MountSpec(layers).key() == MountSpec(layers, background=BackgroundFetch(False)).key()
    assert MountSpec(layers).key() != MountSpec(layers[:1]).key()
    good = spec.to_json()
    for bad in (
        [],
        {**good, "layers": []},
        {**good, "layers": [{"kind": "tarball", "path": "/x"}]},
        {**good, "layers": [{"kind": "estargz", "ref": "r"}]},
        {**good, "layers": [{"kind": "dir"}]},
        {**good, "background": {"concurrency": 0}},
        {**good, "read_ahead": -1},
        {key: value for key, value in good.items() if key != "mountpoint"},
    ):
        with pytest.raises(ImageError):
            DaemonSpec.from_json(bad)


@pytest.mark.parametrize("spec_text", ["{not json", '{"mountpoint": "/nonexistent"}'])
def test_daemon_reports_a_bad_spec_on_its_ready_pipe(spec_text: str) -> None:
    import subprocess
    import sys

    r, w = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.images.lazyfs", "--spec", "-", "--ready-fd", str(w)],
        input=spec_text.encode(),
        pass_fds=(w,),
        capture_output=True,
        timeout=60,
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = json.loads(f.readline())
    assert proc.returncode == 1
    assert line["ready"] is False and line["error"]
    assert b"cannot mount" in proc.stderr


def test_mountinfo_unescaping() -> None:
    from warmstart.images.lazymount import _unescape_mountinfo

    assert _unescape_mountinfo(r"/a\040b\134c") == "/a b\\c"
    assert _unescape_mountinfo("/plain") == "/plain"
    assert _unescape_mountinfo("/trailing\\04") == "/trailing\\04"
