"""Cluster mode: synchronous invocations placed on the node where they start fastest.

An ASGI layer in front of the application.  For ``POST .../functions/<fn>/invocations``
(RequestResponse) and ``POST /run/<fn>`` it asks the cluster where the call should run;
when that is another node it reads the request body, sends the call there in one hop
(``cluster.peer.PeerClient``: a kept connection, httptools) and writes the answer back
with the target's headers, ``X-Warmstart-Node`` naming it.  Everything else -- and a
call placed here, forwarded here (``X-Warmstart-Forwarded``), or for a function this
node does not know -- goes to the application untouched.  Working at this level keeps the
routing, request objects and middleware of the application off the forwarding path.

A target that cannot be reached is skipped and the call runs here; one that fails after
the request went out is a 502 ``ServiceException`` that says the call may have run.

A forwarded call's payload is held to the node's synchronous limit before it leaves: a
``Content-Length`` over it is a 413 here, without reading the body, and a body without
one is read only up to the limit (``api/bodies.py``).  The target checks it again with
its own limits, as it does every request: a forwarded call is trusted with nothing.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from warmstart.api.bodies import bounded_chunks, declared_length
from warmstart.api.lambda_api import error_response, sync_payload_limit
from warmstart.cluster.peer import PeerFailed, PeerUnreachable
from warmstart.cluster.router import FORWARDED_HEADER, NODE_HEADER
from warmstart.errors import RequestTooLarge, WarmstartError
from warmstart.images.access import REGISTRY_AUTH_HEADER

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping

    from warmstart.api.bodies import BodyLimit
    from warmstart.cluster.node import ClusterNode

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

INVOKE_PATH = re.compile(r"^/(?:2015-03-31/functions/([^/]+)/invocations|run/([^/]+))$")
_FORWARDED = FORWARDED_HEADER.lower().encode()
_NODE = NODE_HEADER.lower().encode()
_INVOCATION_TYPE = b"x-amz-invocation-type"
# Not passed to the target: the hop sets its own framing and connection handling, and a
# deployer's registry credentials never leave the node they were sent to.
_HOP = frozenset(
    {
        REGISTRY_AUTH_HEADER.lower().encode(),
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
    }
)
_RELAY_SKIP = frozenset(
    {b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
)


def _function(path: str) -> str | None:
    """The function name an invocation path names (without qualifier), or None."""
    m = INVOKE_PATH.match(path)
    if m is None:
        return None
    raw = unquote(m.group(1) or m.group(2))
    if raw.startswith("arn:"):
        parts = raw.split(":")
        if "function" not in parts:
            return None
        rest = parts[parts.index("function") + 1 :]
        return rest[0] if rest else None
    return raw.split(":", 1)[0] or None


class ForwardingMiddleware:
    def __init__(self, app: ASGIApp, node: ClusterNode) -> None:
        self.app = app
        self.node = node
        self.limit = sync_payload_limit(node.worker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        name = _function(scope["path"])
        if name is None:
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        for key, value in headers:
            if key == _FORWARDED or (key == _INVOCATION_TYPE and value != b"RequestResponse"):
                await self.app(scope, receive, send)  # runs here / Event, DryRun: here
                return
        try:
            rec = self.node.worker.get(name)
        except WarmstartError:
            await self.app(scope, receive, send)  # the application answers (404, 400)
            return
        placement = self.node.place(rec)
        if placement.local:
            await self.app(scope, receive, send)
            return
        host, port = _host_port(placement.url)
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        out_headers = [(k, v) for k, v in headers if k not in _HOP]
        out_headers.append((_FORWARDED, self.node.name.encode()))
        length = declared_length(headers)
        timeout = rec.config.timeout_s + 10.0
        try:
            if length is not None:  # the body streams through as it arrives
                if length > self.limit.size:
                    raise self.limit.error()
                resp = await self.node.peers.forward(
                    host,
                    port,
                    "POST",
                    target,
                    out_headers,
                    bounded_chunks(_body(receive), self.limit),
                    length,
                    timeout=timeout,
                )
            else:  # no length given (chunked): read it first, up to the limit
                body = await _read_body(receive, self.limit)
                resp = await self.node.peers.request(
                    host, port, "POST", target, out_headers, body, timeout=timeout
                )
        except RequestTooLarge as exc:
            self.node.worker.count_too_large(exc.limit)
            await error_response(exc)(scope, receive, send)
            return
        except PeerUnreachable as exc:
            # Nothing was sent, and (with a length) nothing read yet: the app reads the
            # request itself; without a length it gets the body read above.
            log.warning("cluster: %s unreachable, running %s here: %s", placement.node, name, exc)
            await self.app(scope, receive if length is not None else _replay(body), send)
            return
        except PeerFailed as exc:
            log.warning("cluster: forwarding %s to %s failed: %s", name, placement.node, exc)
            await _send_502(send, placement.node, str(exc))
            return
        relay = [(k.lower(), v) for k, v in resp.headers if k.lower() not in _RELAY_SKIP]
        if not any(k == _NODE for k, _ in relay):
            relay.append((_NODE, placement.node.encode()))
        relay.append((b"content-length", str(len(resp.body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": relay})
        await send({"type": "http.response.body", "body": resp.body})


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 80


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


async def _read_body(receive: Receive, limit: BodyLimit) -> bytes:
    """The whole body, if it is within ``limit`` (else ``limit.error()``, raised at the
    chunk that crosses it)."""
    return b"".join([chunk async for chunk in bounded_chunks(_body(receive), limit)])


def _replay(body: bytes) -> Receive:
    """A ``receive`` that gives the already-read body once, then a disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _send_502(send: Send, node: str, why: str) -> None:
    payload = json.dumps(
        {
            "Type": "Service",
            "message": f"node {node} failed while running the invocation ({why}); "
            "it may or may not have run",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 502,
            "headers": [
                (b"content-type", b"application/json"),
                (b"x-amzn-errortype", b"ServiceException"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
