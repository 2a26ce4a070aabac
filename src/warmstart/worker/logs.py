"""Function logs: one append-only file per function, in Lambda's START / END / REPORT shape.

An invocation's log is written with one ``O_APPEND`` write of an fd kept open per
function, so concurrent invocations never interleave inside one another's record, and the
hot path pays one syscall.  ``LogType=Tail`` returns the end of that record.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_TAIL_BYTES = 4096  # what LogType=Tail returns, as Lambda does


class FunctionLogs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

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
            fd = os.open(
                self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            self._fds[name] = fd
        os.write(fd, text)
        return text

    def tail(self, name: str, size: int) -> bytes:
        """The last ``size`` bytes of a function's log (empty if it has none)."""
        try:
            with open(self.path(name), "rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(0, end - size))
                return f.read()
        except FileNotFoundError:
            return b""

    def forget(self, name: str) -> None:
        """The function is gone: close its fd (the file stays, as Lambda keeps logs)."""
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for name in list(self._fds):
            self.forget(name)
