"""Function logs: one append-only file per function, in Lambda's START / END / REPORT shape.

An invocation's log is written with one ``O_APPEND`` write of an fd kept open per
function, so concurrent invocations never interleave inside one another's record, and the
hot path pays one syscall.  ``LogType=Tail`` returns the end of that record.

Each file is rotated by size: once ``NAME.log`` would grow past ``max_bytes``, it is
renamed ``NAME.log.1`` (``.1`` to ``.2`` and so on, up to ``backups`` files; the oldest
goes) and a new ``NAME.log`` is opened.  The size is counted in memory, so the check costs
nothing, and a rotation is a few renames -- metadata only, on the event loop like the
write itself, so no write lands in a file being renamed.  (The stdlib's
``RotatingFileHandler`` does the same for ``logging`` records through a buffered stream;
an invocation's record is one ``os.write`` here, which it would not keep.)  ``tail``
reads across the newest rotated file, so a tail asked for right after a rotation is whole.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

LOG_TAIL_BYTES = 4096  # what LogType=Tail returns, as Lambda does
MAX_BYTES = 10 << 20  # a function's log file before it is rotated
BACKUPS = 1  # rotated files kept per function


class FunctionLogs:
    def __init__(
        self, directory: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS
    ) -> None:
        if max_bytes <= 0 or backups < 1:
            raise ValueError("function logs need a positive size limit and at least one backup")
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups
        directory.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}  # bytes in each open file
        self.rotations = 0

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def rotated(self, name: str, n: int) -> Path:
        """The ``n``-th rotated file (1: the newest)."""
        return self.directory / f"{name}.log.{n}"

    def append(
        self,
        name: str,
        request_id: str,
        version: str,
        memory_mb: int,
        duration_ms: float,
        output: bytes,
        error: bytes | None,
    ) -> bytes:
        """Write one invocation's record; returns it (the caller keeps its tail).  The
        error payload is logged only when the runtime captured no output of its own."""
        report = (
            f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\t"
            f"Duration: {duration_ms:.2f} ms\tBilled Duration: {max(1, int(duration_ms + 0.999))} ms\t"
            f"Memory Size: {memory_mb} MB\n"
        ).encode()
        parts = [f"START RequestId: {request_id} Version: {version}\n".encode(), output]
        if error is not None and not output:
            parts.append(error + b"\n")
        parts.append(report)
        text = b"".join(parts)
        fd = self._fds.get(name)
        if fd is None:
            fd = self._open(name)
        size = self._sizes[name]
        if size and size + len(text) > self.max_bytes:  # a record never straddles two files
            self._rotate(name)
            fd = self._open(name)
        os.write(fd, text)
        self._sizes[name] += len(text)
        return text

    def _open(self, name: str) -> int:
        fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fds[name] = fd
        self._sizes[name] = os.fstat(fd).st_size  # what an earlier run wrote counts too
        return fd

    def _rotate(self, name: str) -> None:
        """NAME.log becomes NAME.log.1, each older one moves up, the oldest goes."""
        self.forget(name)
        for n in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.rotated(name, n), self.rotated(name, n + 1))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path(name), self.rotated(name, 1))
        self.rotations += 1

    def tail(self, name: str, size: int) -> bytes:
        """The last ``size`` bytes of a function's log (empty if it has none), reaching
        into the newest rotated file when the current one holds less."""
        recent = _tail(self.path(name), size)
        if len(recent) < size:
            recent = _tail(self.rotated(name, 1), size - len(recent)) + recent
        return recent

    def forget(self, name: str) -> None:
        """The function is gone: close its fd (the files stay, as Lambda keeps logs)."""
        fd = self._fds.pop(name, None)
        self._sizes.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self.forget(name)


def _tail(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - size))
            return f.read()
    except FileNotFoundError:
        return b""
