"""An instance: one sandbox running the runtime for one function revision."""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warmstart.kinds import StartKind
from warmstart.runtime.protocol import HEADER, MAX_PAYLOAD, check_sizes, encode

if TYPE_CHECKING:
    from warmstart.sandbox import Sandbox
    from warmstart.zygote.launcher import Zygote


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    FROZEN = "frozen"
    BUSY = "busy"
    DEAD = "dead"


class InstanceDied(Exception):
    """The runtime closed its socket (exited, crashed, was killed)."""


class NotDelivered(InstanceDied):
    """The runtime is gone and never read the request whole: writing it met a closed
    socket, or the runtime's end was closed with it unread.  Its handler did not run with
    it, so whoever catches this may give the call to another instance."""


class ReplyTooLarge(InstanceDied):
    """The runtime announced a reply payload over the limit it was given.  Nothing past
    the frame's header was read, so the socket is mid-frame: the instance is as good as
    dead and must go (whoever catches only ``InstanceDied`` treats it so)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"reply payload of {size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Reply:
    kind: str  # ready | init_error | result | error | invalid_event | response_too_large
    payload: bytes
    logs: bytes


class Instance:
    def __init__(self, sandbox: Sandbox, function: str, revision: int, memory_mb: int):
        self.sandbox = sandbox
        self.function = function
        self.version = "$LATEST"  # or the published version it was started for
        self.revision = revision
        self.memory_mb = memory_mb
        self.state = State.STARTING
        self.memory_bytes = 0
        self.invocations = 0
        self.last_used = time.monotonic()
        self.freeze_handle: asyncio.TimerHandle | None = None
        self.start_kind = StartKind.COLD  # or FORK: forked from a zygote
        self.ready_payload = b""  # what the runtime said with "ready" (imported packages)
        self.evicted = False  # killed by the QoS manager: its work goes back to the queue
        self.zygote: Zygote | None = None
        # Its first request was written before it was ready (the caller sends no other).
        self.first_sent = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def id(self) -> str:
        return self.sandbox.id

    def alive(self) -> bool:
        """False once the runtime's end of the socket closed (seen by the event loop)."""
        reader = self._reader
        return reader is not None and not reader.at_eof() and reader.exception() is None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sandbox.sock)

    async def read_reply(self, max_payload: int = MAX_PAYLOAD) -> Reply:
        """The runtime's next frame.  One whose payload is over ``max_payload`` is not
        read: ``ReplyTooLarge`` (the worker never buffers more than the limit)."""
        if self._reader is None:
            raise InstanceDied("not connected")
        try:
            head = await self._reader.readexactly(HEADER.size)
            meta_len, payload_len, logs_len = HEADER.unpack(head)
            check_sizes(meta_len, 0, logs_len)
            if payload_len > max_payload:
                raise ReplyTooLarge(payload_len, max_payload)
            body = await self._reader.readexactly(meta_len + payload_len + logs_len)
        except ConnectionResetError as exc:
            # ECONNRESET, not EOF: the kernel says so when the last holder of the
            # runtime's end closed it with data still unread there.  All we ever send
            # unanswered is the current request, so the runtime never read it whole: it
            # died before the request reached it (killed while frozen, say).
            raise NotDelivered(f"the runtime ended with the request unread ({exc})") from exc
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            raise InstanceDied(str(exc)) from exc
        meta = json.loads(body[:meta_len])
        return Reply(
            meta["type"], body[meta_len : meta_len + payload_len], body[meta_len + payload_len :]
        )

    async def send(self, meta: bytes, payload: bytes) -> None:
        """Write one request frame; ``NotDelivered`` when the runtime's end was closed
        before the whole frame was in its socket."""
        if self._writer is None:
            raise InstanceDied("not connected")
        transport = self._writer.transport
        try:
            self._writer.write(encode(meta, payload))
            if transport.get_write_buffer_size():
                await self._writer.drain()
        except ConnectionError as exc:  # a later part of the frame met EPIPE
            raise NotDelivered(str(exc)) from exc
        # asyncio does not raise when the first send() fails (EPIPE: the peer's end is
        # closed): it closes the transport and drops the data.  No syscall to ask.
        if transport.is_closing():
            raise NotDelivered("the runtime's end of the socket was closed")

    def close(self) -> None:
        self.state = State.DEAD
        if self.freeze_handle is not None:
            self.freeze_handle.cancel()
            self.freeze_handle = None
        if self._writer is not None:
            self._writer.close()
