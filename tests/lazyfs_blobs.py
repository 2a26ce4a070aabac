"""Hand-made eStargz blobs and blob sources for the lazy filesystem's tests.

The blobs are built here by hand, independently of warmstart's writer: gzip members cut
where the eStargz spec says, a TOC, the 51-byte footer. The sources sit at the fetch seam
(:class:`~warmstart.images.lazyfs.sources.BlobSource`): they count, gate, tamper or fail.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import stat
import struct
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart.images.errors import RegistryError
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.layers import TOCLayer
from warmstart.images.lazyfs.loading import load_toc_layer
from warmstart.images.lazyfs.sources import FileBlobSource
from warmstart.images.lazyfs.stats import Stats

MTIME = 1_700_000_000


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


def big(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that do not compress, the same for the same seed."""
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
    Member("usr/lib/big.bin", data=big(300_000), mode=0o644),
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


class CountingSource(FileBlobSource):
    """A blob on disk that records every fetch (and can be made to fail or tamper)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[list[tuple[int, int]]] = []
        self.fail = False
        self.tamper_at: int | None = None  # flip the byte at this blob offset
        self.forge: dict[int, bytes] = {}  # blob offset -> bytes served there instead
        self.gate: threading.Event | None = None  # block fetches until set
        self.entered = threading.Event()  # a fetch has begun (and is recorded in calls)

    def fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls.append(list(ranges))
        self.entered.set()
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
    """A layer of ``members`` (``build_estargz`` options in ``kwargs``) on disk, its TOC
    loaded; its source's call log starts empty."""
    blob, toc_digest = build_estargz(members, **kwargs)
    path = tmp_path / f"{name}.blob"
    path.write_bytes(blob)
    source = CountingSource(path)
    layer = load_toc_layer(source, toc_digest, cache.root, Stats())
    source.calls.clear()
    return layer, source
