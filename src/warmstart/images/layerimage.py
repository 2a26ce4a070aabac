"""Layers as read-only filesystem images: one squashfs file per layer, no per-file writes.

Unpacking a layer creates every file on the host's filesystem, and on an aged disk
creating thousands of small files costs far more than the download or the
decompression.  This module builds one squashfs image per layer instead:

1. The layer's tar is read as it streams in, by the unpacker's reader and under the
   unpacker's rules (``unpack``'s module docstring: names normalised, ``..`` refused,
   nothing written through a symlink, hard links only to earlier entries of the layer,
   no device nodes, no setuid/setgid bits, only ``user.*`` xattrs, whiteouts in
   overlayfs's form) -- the same code: ``_ImageModel`` is the unpacker with its disk
   operations replaced by a table of the layer's final state in memory.  File data is
   appended to one spool file; nothing else touches the disk.
2. A clean tar of that final state -- parents before children, each name once, hard
   links by their first name, whiteouts as 0/0 character devices, opaque directories
   with ``trusted.overlay.opaque=y`` -- is piped to ``tar2sqfs`` (squashfs-tools-ng),
   which writes the image (lz4: compressing costs little and halves the bytes read).

The image is loop-mounted read-only and used as an overlayfs lower layer like an
unpacked directory.  squashfs keeps times in whole seconds up to 2106: later times are
clamped.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from warmstart.images.errors import CorruptLayer, ImageError
from warmstart.images.unpack import (
    OPAQUE_XATTR,
    TarEntry,
    TarReader,
    UnpackResult,
    _dir_mode,
    _safe_mode,
    _Unpacker,
    _user_xattrs,
)
from warmstart.runtime import syscalls

TAR2SQFS = "tar2sqfs"
COMPRESSOR = "lz4"
_MAX_MTIME = (1 << 32) - 1  # squashfs: unsigned 32-bit seconds


class LayerImageError(ImageError):
    """The layer image could not be built (the tool failed; not the layer's fault)."""


def available() -> bool:
    """Whether this machine can build layer images (``tar2sqfs`` on PATH)."""
    return shutil.which(TAR2SQFS) is not None


@dataclass(slots=True)
class _Node:
    """One name of the layer's final state."""

    kind: str  # "dir" | "file" | "link" | "other" (a fifo) | "wh"
    uid: int = 0
    gid: int = 0
    mode: int = 0o755  # permission bits
    mtime: float = 0.0
    inode: int = 0  # files, links, fifos: hard links share it
    offset: int = 0  # files: their data in the spool
    size: int = 0
    linkname: str = ""  # symlinks
    xattrs: dict[str, bytes] = field(default_factory=dict)
    opaque: bool = False  # directories


class _ImageModel(_Unpacker):
    """The unpacker's rules, recording the layer's final state instead of writing it."""

    def __init__(self, spool: BinaryIO) -> None:
        super().__init__(Path("/nonexistent-layer-root"))
        self.spool = spool
        self.spooled = 0
        self.nodes: dict[str, _Node] = {"": _Node("dir", mtime=time.time())}
        self._next_inode = 1

    def _inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _make_dir(self, rel: str, mode: int) -> None:
        # As a directory made on disk: the builder's owner, now; an entry for it sets more.
        self.nodes[rel] = _Node("dir", mode=mode, mtime=time.time())

    def _delete(self, rel: str, kind: str) -> None:
        self.nodes.pop(rel, None)
        if kind == "dir":
            prefix = rel + "/"
            for key in [k for k in self.nodes if k.startswith(prefix)]:
                del self.nodes[key]

    def _dir_xattrs(self, rel: str, xattrs: list[tuple[str, bytes]]) -> None:
        self.nodes[rel].xattrs.update(xattrs)

    def _make_symlink(self, rel: str, entry: TarEntry) -> None:
        self.nodes[rel] = _Node(
            "link",
            entry.uid,
            entry.gid,
            0o777,
            entry.mtime,
            self._inode(),
            linkname=entry.linkname,
        )

    def _make_fifo(self, rel: str, entry: TarEntry) -> None:
        self.nodes[rel] = _Node(
            "other", entry.uid, entry.gid, _safe_mode(entry.mode), entry.mtime, self._inode()
        )

    def _make_file(self, rel: str, entry: TarEntry, data: Iterable[bytes | memoryview]) -> None:
        offset = self.spooled
        for block in data:
            self.spool.write(block)
            self.spooled += len(block)
        self.nodes[rel] = _Node(
            "file",
            entry.uid,
            entry.gid,
            _safe_mode(entry.mode),
            entry.mtime,
            self._inode(),
            offset,
            self.spooled - offset,
            xattrs=dict(_user_xattrs(entry.xattrs)),
        )

    def _make_hardlink(self, rel: str, target: str) -> None:
        source = self.nodes[target]
        # The same inode: its data, metadata and identity (emitted as a tar hard link).
        self.nodes[rel] = source

    def _make_whiteout(self, rel: str) -> None:
        self.nodes[rel] = _Node("wh", mode=0o600, mtime=time.time(), inode=self._inode())

    def _mark_opaque(self, rel: str) -> None:
        self.nodes[rel].opaque = True

    def _dir_meta(self, rel: str, entry: TarEntry) -> None:
        node = self.nodes[rel]
        node.uid, node.gid = entry.uid, entry.gid
        node.mode = _dir_mode(entry.mode)
        node.mtime = entry.mtime


class _SpoolSlice(io.RawIOBase):
    """``size`` bytes of the spool from ``offset``, read with ``pread``."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.pos, self.left = fd, offset, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self.left)
        if want <= 0:
            return 0
        data = os.pread(self.fd, want, self.pos)
        if not data:
            raise CorruptLayer("the layer's spool ended early")
        n = len(data)
        buffer[:n] = data
        self.pos += n
        self.left -= n
        return n


def _mtime(value: float) -> int:
    if not value > 0:
        return 0
    return min(int(value), _MAX_MTIME)


def _xattr_headers(node: _Node) -> dict[str, str]:
    headers = {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in node.xattrs.items()
    }
    if node.opaque:
        headers[f"SCHILY.xattr.{OPAQUE_XATTR}"] = "y"
    return headers


def _members(model: _ImageModel) -> Iterator[tuple[tarfile.TarInfo, _Node]]:
    """The final state as tar members: parents before children, hard links after the
    first name of their inode."""
    first_name: dict[int, str] = {}
    for rel in sorted(model.nodes, key=lambda r: r.split("/")):
        if not rel:
            continue
        node = model.nodes[rel]
        info = tarfile.TarInfo(rel)
        info.uid, info.gid = node.uid, node.gid
        info.mode = node.mode
        info.mtime = _mtime(node.mtime)
        info.pax_headers = _xattr_headers(node)
        if node.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif node.inode in first_name:
            info.type = tarfile.LNKTYPE
            info.linkname = first_name[node.inode]
            info.pax_headers = {}
        elif node.kind == "file":
            info.type = tarfile.REGTYPE
            info.size = node.size
        elif node.kind == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = node.linkname
        elif node.kind == "other":
            info.type = tarfile.FIFOTYPE
        else:  # a whiteout: overlayfs's 0/0 character device
            info.type = tarfile.CHRTYPE
            info.devmajor = info.devminor = 0
        if node.kind != "dir":
            first_name.setdefault(node.inode, rel)
        yield info, node


def build_squashfs(
    stream: BinaryIO, dest: Path, *, workdir: Path, jobs: int | None = None
) -> UnpackResult:
    """Read the uncompressed layer tar ``stream`` under the unpacker's rules and write its
    squashfs image to ``dest``.  ``workdir`` holds the spool (the same filesystem as
    ``dest`` is best).  Raises ``UnsafeLayer`` / ``CorruptLayer`` as ``unpack`` does and
    ``LayerImageError`` when ``tar2sqfs`` fails; ``dest`` is then removed."""
    exe = shutil.which(TAR2SQFS)
    if exe is None:
        raise LayerImageError(f"{TAR2SQFS} (Debian package squashfs-tools-ng) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    spool_path = workdir / f"spool-{os.getpid()}-{time.monotonic_ns()}"
    reader = TarReader(stream)
    try:
        with open(spool_path, "w+b") as spool:
            model = _ImageModel(spool)
            while (entry := reader.next()) is not None:
                model.apply(reader, entry)
            model.finish()
            diff_id = reader.diff_id()
            spool.flush()
            _write_image(exe, model, spool.fileno(), dest, jobs or os.cpu_count() or 1)
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise
    finally:
        reader.close()
        with contextlib.suppress(OSError):
            spool_path.unlink()
    return UnpackResult(
        diff_id=diff_id,
        tar_bytes=reader.size,
        file_bytes=model.file_bytes,
        entries=model.entries,
        skipped=model.skipped,
    )


def _write_image(exe: str, model: _ImageModel, spool_fd: int, dest: Path, jobs: int) -> None:
    root = model.nodes[""]
    defaults = f"uid={root.uid},gid={root.gid},mode=0{root.mode:o},mtime={_mtime(root.mtime)}"
    proc = subprocess.Popen(
        [
            exe,
            "--quiet",
            "--force",
            "--no-skip",
            "--compressor",
            COMPRESSOR,
            "--num-jobs",
            str(max(1, jobs)),
            "--defaults",
            defaults,
            str(dest),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stderr is not None
    broken = False
    try:
        with tarfile.open(
            fileobj=proc.stdin,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as out:
            for info, node in _members(model):
                data = None
                if info.type == tarfile.REGTYPE:
                    data = io.BufferedReader(_SpoolSlice(spool_fd, node.offset, node.size), 1 << 20)
                out.addfile(info, data)
    except BrokenPipeError:
        broken = True  # the tool stopped reading: its exit status says why
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    code = proc.wait()
    if code != 0 or broken:
        raise LayerImageError(f"{TAR2SQFS} failed (exit {code}): {err[-500:]}")


def mount_image(image: Path, target: Path) -> None:
    """Mount the layer image ``image`` read-only at ``target`` (a loop device, direct
    I/O: the image's pages are cached once, as the filesystem's; detached with the
    mount)."""
    target.mkdir(parents=True, exist_ok=True)
    device, loop = syscalls.attach_loop(image, read_only=True)
    try:
        syscalls.mount(
            device,
            str(target),
            "squashfs",
            syscalls.MS_RDONLY | syscalls.MS_NODEV | syscalls.MS_NOSUID,
            "",
        )
    except OSError as exc:
        raise LayerImageError(f"cannot mount layer image {image} at {target}: {exc}") from exc
    finally:
        os.close(loop)  # the mount is now the device's only user
