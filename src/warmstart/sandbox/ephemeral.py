"""Ephemeral storage: each instance's ``/tmp``, a small ext4 of its own on a loop device.

Lambda gives a function ``EphemeralStorage.Size`` MB of ``/tmp`` (512 to 10240), apart
from its memory.  A tmpfs cannot do that: its pages are charged to the memory cgroup of
whoever writes them, so writing 128 MB to /tmp with MemorySize=128 ends in the OOM
killer, not in ENOSPC.  Here /tmp is a filesystem on disk of exactly the function's size:

* a sparse file under the data dir (it takes only the blocks written), formatted ext4
  without a journal (nothing in /tmp outlives the instance), attached to a free loop
  device with direct I/O -- so the backing file's pages are not cached twice -- and with
  autoclear, so the device detaches itself when its filesystem is last unmounted;
* the file is unlinked at once (the loop device holds it) and the filesystem is mounted
  only for as long as it takes to clone it into a detached mount tree (``open_tree``),
  then unmounted on the host.  The pool holds that tree's fd; the sandbox attaches it at
  /tmp inside its own mount namespace.  When the sandbox dies the last reference goes,
  the filesystem is unmounted, the loop device detaches and the blocks are freed: a
  crashed worker leaves nothing behind but the ``.tmp-*`` files start-up removes.

Writes to /tmp still go through the page cache, charged to the instance, but dirty file
pages are written back and reclaimed under the memory limit instead of pinning memory
as tmpfs pages do.  Each size's empty filesystem is made once with mkfs (a template
in the work dir); each /tmp is a sparse copy of its few hundred KB of metadata, attached,
mounted and cloned: ~1-2 ms, on a thread.  A few are kept ready per size, restocked just
after a start (not during it: mkfs and copies compete with the start for the CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

from warmstart.errors import SandboxError
from warmstart.lifecycle import Supervisor
from warmstart.runtime import syscalls as sc

log = logging.getLogger(__name__)

# ext4 keeps some of a small filesystem for itself (inode tables, bitmaps): the file is a
# little larger than the size promised, so that all of it is usable.
_OVERHEAD = 1.05
_MIN_OVERHEAD_MB = 16


# How long a restock waits after a filesystem is taken (see _fill).
REFILL_DELAY_S = 0.05


def _image_bytes(size_mb: int) -> int:
    return max(int(size_mb * _OVERHEAD), size_mb + _MIN_OVERHEAD_MB) << 20


class EphemeralStorage:
    """Per-size stocks of ready /tmp filesystems (detached mount trees, as fds)."""

    def __init__(self, work_dir: Path, tasks: Supervisor, *, stock: int = 4) -> None:
        self.work_dir = work_dir  # sparse backing files (unlinked once attached)
        self.staging = work_dir / "mnt"  # each is mounted for a moment at mnt/<seq>
        self.tasks = tasks
        self.stock = stock
        self._ready: dict[int, list[int]] = {}
        self._filling: set[int] = set()
        # Guards the stock and the sequence number only (the event loop takes it): each
        # filesystem is made and cloned at a staging point of its own, without it.
        self._lock = threading.Lock()
        self._template_lock = threading.Lock()
        self._seq = 0
        self._closed = False

    def start(self, sizes: tuple[int, ...] = ()) -> None:
        """Clear what a crashed worker left, check the tools, and stock ``sizes``."""
        if shutil.which("mkfs.ext4") is None:
            raise SandboxError("mkfs.ext4 (e2fsprogs) is needed for ephemeral storage")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        for point in [self.staging, *self.staging.iterdir()]:
            while sc.is_mount_point(str(point)):
                sc.umount(str(point), sc.MNT_DETACH)
            if point != self.staging:
                with contextlib.suppress(OSError):
                    point.rmdir()
        for p in self.work_dir.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                p.unlink()
        for size in sizes:
            self._refill(size)

    async def take(self, size_mb: int) -> int:
        """A fresh /tmp of ``size_mb`` MB as a detached mount tree; the caller owns it."""
        with self._lock:
            stock = self._ready.get(size_mb)
            fd = stock.pop() if stock else -1
        self._refill(size_mb)
        if fd < 0:
            fd = await asyncio.to_thread(self.make, size_mb)
        return fd

    def _refill(self, size_mb: int) -> None:
        if self._closed or size_mb in self._filling:
            return
        if len(self._ready.get(size_mb, ())) >= self.stock:
            return
        self._filling.add(size_mb)
        self.tasks.spawn(self._fill(size_mb), f"ephemeral storage {size_mb} MB")

    async def _fill(self, size_mb: int) -> None:
        try:
            # Taken at the start of a sandbox: restock once that start has had the CPU
            # (mkfs is a process of its own, and this machine may have two cores).
            await asyncio.sleep(REFILL_DELAY_S)
            while not self._closed and len(self._ready.get(size_mb, ())) < self.stock:
                fd = await asyncio.to_thread(self.make, size_mb)
                with self._lock:
                    if self._closed:
                        os.close(fd)
                        return
                    self._ready.setdefault(size_mb, []).append(fd)
        finally:
            self._filling.discard(size_mb)

    def make(self, size_mb: int) -> int:
        """Make one (blocking: a few ms for any size, the file being sparse)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        image = self.work_dir / f".tmp-{os.getpid()}-{seq}"
        try:
            template = self._template(size_mb)
            _copy_sparse(template, image)
            device, loop = sc.attach_loop(image)
            try:
                image.unlink()  # the loop device holds it: freed when the device detaches
                staging = self.staging / str(seq)
                staging.mkdir(exist_ok=True)
                try:
                    sc.mount(device, str(staging), "ext4", sc.MS_NOSUID | sc.MS_NODEV, "")
                    try:
                        os.chmod(staging, 0o1777)
                        return sc.clone_tree(str(staging))
                    finally:
                        sc.umount(str(staging), sc.MNT_DETACH)
                finally:
                    staging.rmdir()
            finally:
                os.close(loop)  # from here the mount tree is the device's only user
        except OSError as exc:
            raise SandboxError(f"cannot make ephemeral storage of {size_mb} MB: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()

    def _template(self, size_mb: int) -> Path:
        """An empty filesystem of ``size_mb`` made once with mkfs (each /tmp is a sparse
        copy of it: a few hundred KB of metadata, ~10x cheaper than running mkfs)."""
        template = self.work_dir / f"template-{size_mb}.img"
        if template.exists():
            return template
        with self._template_lock:  # a restock and a start may both want a new size's
            if template.exists():
                return template
            return self._make_template(size_mb, template)

    def _make_template(self, size_mb: int, template: Path) -> Path:
        part = self.work_dir / f".tmp-{os.getpid()}-template-{size_mb}"
        with open(part, "wb") as f:
            f.truncate(_image_bytes(size_mb))
        done = subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal,^resize_inode",
                "-E",
                "lazy_itable_init=1,nodiscard,root_owner=0:0",
                str(part),
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise SandboxError(f"mkfs.ext4 failed: {done.stderr.decode(errors='replace').strip()}")
        part.rename(template)
        return template

    def close(self) -> None:
        """Drop the stock (each filesystem and its loop device go with its fd)."""
        with self._lock:
            self._closed = True
            for fds in self._ready.values():
                for fd in fds:
                    os.close(fd)
            self._ready.clear()


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst`` of the same size, writing only its data extents (the
    holes stay holes), in the kernel."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole to the end
                    return
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), hole - pos, pos, pos)
                if copied == 0:
                    raise OSError(errno.EIO, f"short copy of {src}")
                pos += copied
            offset = hole
