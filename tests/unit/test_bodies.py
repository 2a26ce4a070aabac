"""Bodies read within a bound (api/bodies.py), the forwarding layer's limit, and the
worker's side of a reply over its limit -- over plain ASGI messages and a socketpair."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from warmstart.api.bodies import BodyLimit, bounded_chunks, declared_length, read_body
from warmstart.errors import RequestTooLarge
from warmstart.kinds import SizeLimit
from warmstart.runtime.protocol import HEADER
from warmstart.worker.settings import Settings

LIMIT = BodyLimit(10, SizeLimit.INVOKE, "InvokeFunction")


class Client:
    """An ASGI ``receive`` that hands out ``chunks`` one message at a time and counts
    how many the application asked for."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def receive(self) -> dict[str, Any]:
        if self.pulled >= len(self.chunks):
            return {"type": "http.disconnect"}
        chunk = self.chunks[self.pulled]
        self.pulled += 1
        more = self.pulled < len(self.chunks)
        return {"type": "http.request", "body": chunk, "more_body": more}


def scope(length: int | None, path: str = "/run/f") -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }


def read(length: int | None, client: Client) -> bytes:
    return asyncio.run(read_body(Request(scope(length), client.receive), LIMIT))


def test_a_body_within_the_limit_is_read_whole() -> None:
    client = Client([b"12345", b"67890"])  # exactly the limit
    assert read(10, client) == b"1234567890"
    assert read(None, Client([b"1234", b"", b"567890"])) == b"1234567890"


def test_a_declared_length_over_the_limit_is_refused_without_reading() -> None:
    client = Client([b"x" * 11])
    with pytest.raises(RequestTooLarge) as err:
        read(11, client)
    assert client.pulled == 0
    assert str(err.value) == "Request must be smaller than 10 bytes for the InvokeFunction operation"
    assert err.value.error_type == "RequestTooLargeException"
    assert err.value.limit is SizeLimit.INVOKE


def test_a_chunked_body_is_counted_and_reading_stops_at_the_limit() -> None:
    client = Client([b"x" * 6, b"x" * 6, b"x" * 6, b"x" * 6])
    with pytest.raises(RequestTooLarge):
        read(None, client)
    assert client.pulled == 2  # the chunk that crossed the limit, and nothing after it


def test_a_body_longer_than_its_declared_length_is_still_cut_at_the_limit() -> None:
    # The server frames the body by Content-Length; even if it did not, the count holds.
    client = Client([b"x" * 8, b"x" * 8, b"x" * 8])
    with pytest.raises(RequestTooLarge):
        read(5, client)
    assert client.pulled == 2


def test_bounded_chunks_passes_chunks_through_until_the_limit() -> None:
    async def chunks() -> Any:
        for c in (b"abc", b"def", b"ghij", b"k"):
            yield c

    async def collect() -> list[bytes]:
        got = []
        with pytest.raises(RequestTooLarge):
            async for c in bounded_chunks(chunks(), LIMIT):
                got.append(c)
        return got

    assert asyncio.run(collect()) == [b"abc", b"def", b"ghij"]


def test_declared_length() -> None:
    assert declared_length([(b"Content-Length", b"42")]) == 42
    assert declared_length([(b"content-length", b"x")]) is None
    assert declared_length([]) is None


def test_payload_limits_default_to_lambdas_and_are_checked() -> None:
    s = Settings()
    assert (s.max_request_bytes, s.max_response_bytes, s.max_event_bytes) == (
        6_291_456,
        6_291_556,
        262_144,
    )
    assert Settings(max_event_bytes=1 << 20).max_event_bytes == 1 << 20
    with pytest.raises(ValueError, match="at most 1048576"):
        Settings(max_event_bytes=(1 << 20) + 1)
    with pytest.raises(ValueError, match="positive"):
        Settings(max_request_bytes=0)


# -- cluster mode: a forwarded invocation is held to the limit before it leaves --------------
Send = Callable[[dict[str, Any]], Awaitable[None]]


def forward_through(length: int | None, client: Client) -> tuple[list[dict[str, Any]], Any]:
    from warmstart.api.forwarding import ForwardingMiddleware

    forwarded: list[bytes] = []
    counted: list[SizeLimit] = []

    async def forward(*args: Any, **kw: Any) -> Any:
        async for chunk in args[5]:
            forwarded.append(chunk)
        return SimpleNamespace(status=200, headers=[], body=b"{}")

    async def request(*args: Any, **kw: Any) -> Any:
        forwarded.append(args[5])
        return SimpleNamespace(status=200, headers=[], body=b"{}")

    rec = SimpleNamespace(config=SimpleNamespace(timeout_s=3))
    node = SimpleNamespace(
        name="n1",
        worker=SimpleNamespace(
            get=lambda name: rec,
            settings=Settings(max_request_bytes=10),
            count_too_large=counted.append,
        ),
        place=lambda rec: SimpleNamespace(local=False, url="http://10.0.0.2:8080", node="n2"),
        peers=SimpleNamespace(forward=forward, request=request),
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the call should have been forwarded or refused")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = ForwardingMiddleware(app, node)  # type: ignore[arg-type]
    asyncio.run(middleware(scope(length), client.receive, send))
    return sent, SimpleNamespace(forwarded=forwarded, counted=counted)


def _status_and_body(sent: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), dict(start["headers"])


def test_a_forwarded_call_over_the_limit_is_refused_here_unread() -> None:
    client = Client([b"x" * 11])
    sent, seen = forward_through(11, client)
    status, body, headers = _status_and_body(sent)
    assert status == 413
    assert headers[b"x-amzn-errortype"] == b"RequestTooLargeException"
    assert "smaller than 10 bytes" in body["message"]
    assert client.pulled == 0 and seen.forwarded == []
    assert seen.counted == [SizeLimit.INVOKE]


def test_a_chunked_forwarded_call_is_read_only_up_to_the_limit() -> None:
    client = Client([b"x" * 6] * 5)
    sent, seen = forward_through(None, client)
    assert _status_and_body(sent)[0] == 413
    assert client.pulled == 2 and seen.forwarded == []


def test_a_forwarded_call_within_the_limit_goes_through() -> None:
    sent, seen = forward_through(None, Client([b"12345", b"678"]))
    assert _status_and_body(sent)[0] == 200
    assert seen.forwarded == [b"12345678"]
    sent, seen = forward_through(8, Client([b"12345", b"678"]))
    assert _status_and_body(sent)[0] == 200
    assert b"".join(seen.forwarded) == b"12345678"


# -- the worker's side of a reply: nothing over the limit is read ----------------------------
def test_a_reply_over_the_limit_is_not_read_past_its_header() -> None:
    from warmstart.worker.instance import Instance, InstanceDied, ReplyTooLarge

    async def main() -> None:
        ours, theirs = socket.socketpair()
        inst = Instance(SimpleNamespace(sock=ours, id="i"), "f", 1, 128)  # type: ignore[arg-type]
        await inst.connect()
        meta = b'{"type": "result"}'
        # The runtime announces 200 MB and sends what a socket buffer holds of it.
        theirs.setblocking(False)
        theirs.send(HEADER.pack(len(meta), 200 << 20, 0) + meta + b"x" * 4096)
        with pytest.raises(ReplyTooLarge) as err:
            # (Reading the announced payload would wait forever: the guard fails it.)
            async with asyncio.timeout(30):
                await inst.read_reply(1000)
        assert (err.value.size, err.value.limit) == (200 << 20, 1000)
        assert isinstance(err.value, InstanceDied)  # whoever knows only that, drops it
        inst.close()
        theirs.close()

    asyncio.run(main())


def test_a_reply_within_the_limit_is_read() -> None:
    from warmstart.runtime.protocol import encode
    from warmstart.worker.instance import Instance

    async def main() -> None:
        ours, theirs = socket.socketpair()
        inst = Instance(SimpleNamespace(sock=ours, id="i"), "f", 1, 128)  # type: ignore[arg-type]
        await inst.connect()
        theirs.sendall(encode(b'{"type": "result"}', b"x" * 1000, b"log"))
        reply = await inst.read_reply(1000)
        assert (reply.kind, len(reply.payload), reply.logs) == ("result", 1000, b"log")
        inst.close()
        theirs.close()

    asyncio.run(main())
