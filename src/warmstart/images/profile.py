"""Record which files a workload opens under a mount, in first-open order (fanotify).

``warmstart image convert --profile`` runs a function once on the image's root and puts the
files it opened first in each eStargz layer (before the prefetch landmark), so a lazy mount
fetches them in one request before the function starts. fanotify sees every open on the
mount, whatever process or namespace makes it, without tracing the workload.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from warmstart.images.errors import ImageError

# <linux/fanotify.h>
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_UNLIMITED_QUEUE = 0x10
FAN_MARK_ADD = 0x01
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_OPEN = 0x20
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3

# struct fanotify_event_metadata: u32 event_len, u8 vers, u8 reserved, u16 metadata_len,
# u64 mask, s32 fd, s32 pid.
_EVENT = struct.Struct("=IBBHQii")
_BUFSIZE = 64 * 1024


class FanotifyEvent:
    __slots__ = ("fd", "mask", "pid")

    def __init__(self, mask: int, fd: int, pid: int) -> None:
        self.mask = mask
        self.fd = fd
        self.pid = pid


def parse_events(buf: bytes) -> list[FanotifyEvent]:
    """Split a buffer read from a fanotify fd into events (kernel ABI version 3)."""
    events = []
    pos = 0
    while pos + _EVENT.size <= len(buf):
        length, vers, _, _, mask, fd, pid = _EVENT.unpack_from(buf, pos)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ImageError(f"fanotify metadata version {vers} is not supported")
        if length < _EVENT.size or pos + length > len(buf):
            raise ImageError("truncated fanotify event")
        events.append(FanotifyEvent(mask, fd, pid))
        pos += length
    return events


def relative_to_mount(path: str, mount: str) -> str | None:
    """``path`` (as the kernel names an open file) relative to ``mount``, or None if the
    file is outside it or gone (an unlinked file is named "... (deleted)")."""
    if path.endswith(" (deleted)") or not path.startswith("/"):
        return None
    if mount == "/":
        return path.lstrip("/") or None
    if not path.startswith(mount + "/"):
        return None
    return path[len(mount) + 1 :]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_init.restype = ctypes.c_int
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    libc.fanotify_mark.restype = ctypes.c_int
    return libc


class _Recorder:
    """Owns the fanotify fd and the thread that turns its events into paths."""

    def __init__(self, mount: Path, whole_filesystem: bool) -> None:
        self.mount = os.path.realpath(mount)
        self.paths: list[str] = []
        self._seen: set[str] = set()
        self._own_pid = os.getpid()
        libc = _libc()
        fd = libc.fanotify_init(
            FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE,
            os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC,
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise ImageError(f"fanotify_init failed: {os.strerror(err)} (needs root)")
        self.fd = fd
        how = FAN_MARK_FILESYSTEM if whole_filesystem else FAN_MARK_MOUNT
        rc = libc.fanotify_mark(
            fd, FAN_MARK_ADD | how, FAN_OPEN | FAN_OPEN_EXEC, -1, self.mount.encode()
        )
        if rc < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise ImageError(f"fanotify_mark on {self.mount} failed: {os.strerror(err)}")
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.overflowed = False
        self._thread = threading.Thread(target=self._run, name="fanotify", daemon=True)
        self._thread.start()

    def _handle(self, buf: bytes) -> None:
        for ev in parse_events(buf):
            if ev.mask & FAN_Q_OVERFLOW or ev.fd == FAN_NOFD:
                self.overflowed = True
                continue
            try:
                if ev.pid == self._own_pid:
                    continue
                path = os.readlink(f"/proc/self/fd/{ev.fd}")
            except OSError:
                continue
            finally:
                os.close(ev.fd)
            rel = relative_to_mount(path, self.mount)
            if rel is not None and rel not in self._seen:
                self._seen.add(rel)
                self.paths.append(rel)

    def _drain(self) -> bool:
        """Read every queued event; False once the fd has nothing more."""
        try:
            buf = os.read(self.fd, _BUFSIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return True
            raise
        self._handle(buf)
        return bool(buf)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self.fd in ready:
                while self._drain():
                    pass
            if self._stop_r in ready:
                return

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        # Opens that happened just before stop may still be queued.
        while self._drain():
            pass
        for fd in (self.fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def record_opens(mount: Path, *, whole_filesystem: bool = False) -> Iterator[list[str]]:
    """Record the files opened (or executed) under ``mount`` while the block runs.

    Yields a list that fills, as events arrive, with paths relative to the mount, each
    once, in first-open order; it is complete when the block exits. Directories are not
    reported. By default only opens through this mount are seen (``FAN_MARK_MOUNT``);
    ``whole_filesystem`` marks the filesystem instead, catching opens through other
    mounts of it (bind mounts in a sandbox's namespace), whose paths must still resolve
    under ``mount`` from here to be recorded. Needs root (CAP_SYS_ADMIN).
    """
    recorder = _Recorder(Path(mount), whole_filesystem)
    try:
        yield recorder.paths
    finally:
        recorder.stop()
