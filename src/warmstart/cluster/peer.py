"""The node-to-node hop of a forwarded invocation: pooled keep-alive HTTP/1.1 connections.

A forwarded call adds a second HTTP exchange to a warm invocation that takes well under
a millisecond end to end, so the hop must cost tens of microseconds, not hundreds: httpx
measured here at ~0.6 ms per request on loopback, most of it in its generality
(``docs/benchmarks.md``, Cluster).  This client does one thing: send a request with a
known body to a peer over a connection it keeps open, and read the answer with httptools'
C parser (uvicorn's).  Idle connections are kept per peer (most recently used first); a
connection that fails is closed and never reused.

Errors say what the caller may do next: ``PeerUnreachable`` -- nothing was sent, run the
call elsewhere -- and ``PeerFailed`` -- the request went out, so the call may or may not
have run: answer 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import httptools

from warmstart.errors import PlatformError

MAX_IDLE_PER_PEER = 64
# A kept connection older than this is not reused: the peer's server closes idle ones
# (warmstart serve keeps them SERVER_KEEP_ALIVE_S), and a request written into a
# connection the peer is closing is lost.
MAX_IDLE_S = 20.0
SERVER_KEEP_ALIVE_S = 60


class PeerUnreachable(PlatformError):
    """The peer could not be reached: the request was not sent."""


class PeerFailed(PlatformError):
    """The peer failed after the request was sent (it died, or broke the connection)."""


class _ClosedBeforeAnswer(Exception):
    """A reused connection ended before a byte of the answer came back."""


@dataclass
class PeerResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    done: bool = False
    reused: bool = False
    idle_since: float = 0.0

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class PeerClient:
    def __init__(self, *, connect_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def _connect(self, host: str, port: int, *, fresh: bool = False) -> _Conn:
        idle = self._idle.get((host, port))
        now = asyncio.get_running_loop().time()
        while idle and not fresh:
            conn = idle.pop()
            if (
                not conn.reader.at_eof()
                and not conn.writer.is_closing()
                and now - conn.idle_since < MAX_IDLE_S
            ):
                conn.reused = True
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(f"{host}:{port}: {exc or 'connection timed out'}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        timeout: float,
    ) -> PeerResponse:
        """Send one request; its answer, read whole.  ``headers`` must not carry Host,
        Content-Length, Connection or Transfer-Encoding (this sets them)."""
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        request = b"".join(head) + body
        conn = await self._connect(host, port)
        try:
            return await self._exchange(conn, host, port, request, timeout)
        except _ClosedBeforeAnswer:
            # A kept connection the peer had closed (its idle timeout): the request never
            # reached it.  Once more on a new connection.
            conn = await self._connect(host, port, fresh=True)
            try:
                return await self._exchange(conn, host, port, request, timeout)
            except _ClosedBeforeAnswer as exc:
                raise PeerFailed(f"{host}:{port} closed the connection without answering") from exc

    async def _exchange(
        self, conn: _Conn, host: str, port: int, request: bytes, timeout: float
    ) -> PeerResponse:
        try:
            conn.writer.write(request)
        except (OSError, RuntimeError) as exc:
            conn.close()
            raise PeerUnreachable(f"{host}:{port}: {exc}") from exc
        conn.status, conn.headers, conn.body, conn.done = 0, [], [], False
        parser = httptools.HttpResponseParser(conn)
        received = 0
        try:
            async with asyncio.timeout(timeout):
                while not conn.done:
                    try:
                        data = await conn.reader.read(65536)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        if received == 0 and conn.reused:
                            raise _ClosedBeforeAnswer()
                        raise PeerFailed(f"{host}:{port} closed the connection mid-answer")
                    received += len(data)
                    parser.feed_data(data)
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            conn.close()
            what = "did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise PeerFailed(f"{host}:{port}: {what}") from exc
        except BaseException:
            conn.close()
            raise
        response = PeerResponse(parser.get_status_code(), conn.headers, b"".join(conn.body))
        if parser.should_keep_alive():
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < MAX_IDLE_PER_PEER:
                conn.idle_since = asyncio.get_running_loop().time()
                idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        return response

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
