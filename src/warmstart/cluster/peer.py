"""The node-to-node hop of a forwarded invocation: kept HTTP/1.1 connections to peers.

A forwarded call adds a second HTTP exchange to a warm invocation that takes about half
a millisecond end to end, so the hop must cost tens of microseconds, not hundreds: httpx
measured here at ~0.8 ms more per forwarded call (``docs/benchmarks.md``, Cluster), most
of it in its generality.  This client does one thing: stream a request to a peer over a
connection it keeps open and read the answer with httptools' C parser (uvicorn's).  A
connection is an ``asyncio.Protocol``: the parser is fed straight from the socket and
the waiting call is woken once, when the answer is complete.  Idle connections are kept
per peer, most recently used first; one that fails is closed and never reused.

Errors say what the caller may do next: ``PeerUnreachable`` -- nothing was sent, run the
call elsewhere -- and ``PeerFailed`` -- the request went out, so the call may or may not
have run: answer 502.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

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


@dataclass
class PeerResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _Connection(asyncio.Protocol):
    """One kept connection; at most one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.answer: asyncio.Future[None] | None = None
        self.received = 0
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(PeerFailed(f"an answer that is not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_Closed(self.received))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)

    def begin(self) -> asyncio.Future[None]:
        self.headers, self.body, self.received = [], [], 0
        self.parser = httptools.HttpResponseParser(self)
        self.answer = asyncio.get_running_loop().create_future()
        return self.answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Closed(Exception):
    def __init__(self, received: int) -> None:
        super().__init__(f"the peer closed the connection after {received} bytes")
        self.received = received


class PeerClient:
    def __init__(self, *, connect_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    async def _connect(self, host: str, port: int, *, fresh: bool = False) -> _Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get((host, port))
        now = loop.time()
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < MAX_IDLE_S:
                conn.reused = True
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, host, port)
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(f"{host}:{port}: {exc or 'connection timed out'}") from exc
        return conn

    async def open(self, host: str, port: int) -> _Connection:
        """A connection to the peer (kept or new); ``PeerUnreachable`` if there is none."""
        return await self._connect(host, port)

    async def exchange(
        self,
        conn: _Connection,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | bytes,
        length: int,
        *,
        timeout: float,
    ) -> PeerResponse:
        """Send one request of ``length`` body bytes (``body`` streamed as it comes) and
        read the answer whole.  ``headers`` must not carry Host, Content-Length,
        Connection or Transfer-Encoding (this sets them)."""
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"Content-Length: %d\r\n\r\n" % length)
        answer = conn.begin()
        transport = conn.transport
        if transport is None or conn.closed:
            if conn.reused:
                raise _StaleConnection()
            raise PeerUnreachable(f"{host}:{port}: the connection closed before the request")
        try:
            if isinstance(body, bytes):
                transport.write(b"".join(head) + body)
            else:
                transport.write(b"".join(head))
                async for chunk in body:
                    transport.write(chunk)
            async with asyncio.timeout(timeout):
                await answer
        except _Closed as exc:
            conn.close()
            if exc.received == 0 and conn.reused:
                raise _StaleConnection() from exc
            raise PeerFailed(f"{host}:{port} closed the connection mid-answer") from exc
        except TimeoutError as exc:
            conn.close()
            raise PeerFailed(f"{host}:{port} did not answer in {timeout:.0f} s") from exc
        except BaseException:
            conn.close()
            raise
        response = PeerResponse(conn.parser.get_status_code(), conn.headers, b"".join(conn.body))
        if conn.parser.should_keep_alive() and not conn.closed:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < MAX_IDLE_PER_PEER:
                conn.idle_since = asyncio.get_running_loop().time()
                conn.reused = False
                idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        return response

    async def forward(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterator[bytes],
        length: int,
        *,
        timeout: float,
    ) -> PeerResponse:
        """Stream a request of ``length`` body bytes to the peer as they arrive.  What is
        sent is kept, so that a kept connection found closed can be retried once."""
        conn = await self._connect(host, port)
        sent: list[bytes] = []

        async def tee() -> AsyncIterator[bytes]:
            async for chunk in body:
                sent.append(chunk)
                yield chunk

        try:
            return await self.exchange(
                conn, host, port, method, target, headers, tee(), length, timeout=timeout
            )
        except _StaleConnection:
            rest = [chunk async for chunk in body]  # what had not arrived yet
            whole = b"".join([*sent, *rest])
            conn = await self._connect(host, port, fresh=True)
            try:
                return await self.exchange(
                    conn, host, port, method, target, headers, whole, len(whole), timeout=timeout
                )
            except _StaleConnection as exc:
                raise PeerFailed(f"{host}:{port} closed the connection without answering") from exc

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
        """One request with a body in hand.  A kept connection the peer had closed (its
        idle timeout) before our request reached it is retried once on a new one."""
        conn = await self._connect(host, port)
        try:
            return await self.exchange(
                conn, host, port, method, target, headers, body, len(body), timeout=timeout
            )
        except _StaleConnection:
            conn = await self._connect(host, port, fresh=True)
            try:
                return await self.exchange(
                    conn, host, port, method, target, headers, body, len(body), timeout=timeout
                )
            except _StaleConnection as exc:
                raise PeerFailed(f"{host}:{port} closed the connection without answering") from exc

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection ended before a byte of the answer came back: the peer closed
    it as idle, and the request never reached it."""
