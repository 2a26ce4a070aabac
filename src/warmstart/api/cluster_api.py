"""Cluster mode over HTTP: the node table, bundles between peers, and forwarded invocations.

``GET /cluster/nodes`` lists the live nodes with what each published.  ``GET`` and ``PUT``
``/cluster/code/<sha256>`` move code bundles between nodes; they answer only requests
that carry the cluster's token.  ``forward`` sends an invocation to the node placement
chose, streaming the request body there and the response back; the target's headers
are kept and ``X-Warmstart-Node`` names it.
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import TYPE_CHECKING

import httpx
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from warmstart.api.lambda_api import service_error
from warmstart.cluster.code import TOKEN_HEADER
from warmstart.cluster.router import FORWARDED_HEADER, NODE_HEADER, Placement, forward_headers
from warmstart.errors import InvalidParameter, NotFound, PlatformError

if TYPE_CHECKING:
    from warmstart.cluster.node import ClusterNode

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_BUNDLE = 256 << 20


def is_forwarded(request: Request) -> bool:
    """A call another node forwarded here runs here (never a second hop)."""
    return FORWARDED_HEADER in request.headers


class ClusterAPI:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def routes(self) -> list[Route]:
        return [
            Route("/cluster/nodes", self.nodes, methods=["GET"]),
            Route("/cluster/code/{sha}", self.get_code, methods=["GET"]),
            Route("/cluster/code/{sha}", self.put_code, methods=["PUT"]),
        ]

    async def nodes(self, request: Request) -> Response:
        return JSONResponse(self.node.nodes())

    def _check_peer(self, request: Request) -> str:
        token = request.headers.get(TOKEN_HEADER, "")
        if not self.node.token or not hmac.compare_digest(token, self.node.token):
            raise NotFound("no such resource")  # as if it did not exist
        sha = request.path_params["sha"]
        if not SHA_RE.match(sha):
            raise InvalidParameter("a bundle is named by its sha256 in hex")
        return str(sha)

    async def get_code(self, request: Request) -> Response:
        sha = self._check_peer(request)
        if not self.node.code.has(sha):
            raise NotFound(f"bundle {sha[:12]} is not on this node")
        return FileResponse(self.node.code.zip_path(sha), media_type="application/zip")

    async def put_code(self, request: Request) -> Response:
        sha = self._check_peer(request)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BUNDLE:
                raise InvalidParameter(f"a bundle may take at most {MAX_BUNDLE} bytes")
        await self.node.code.receive(sha, bytes(data))
        return Response(status_code=204)


async def forward(
    node: ClusterNode, request: Request, placement: Placement, timeout_s: float
) -> Response:
    """Send the invocation in ``request`` to ``placement``'s node and relay the answer.

    The request body streams through; the answer (at most Lambda's 6 MB) is read whole
    before it is relayed, so a node that dies half way through it is a clean 502 rather
    than a truncated 200.  A node that cannot be reached at all raises ``PlatformError``
    before anything was sent: the caller then runs the call itself."""
    url = placement.url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    upstream = node.http.build_request(
        request.method,
        url,
        headers=forward_headers(list(request.headers.items()), node.name),
        content=request.stream(),
        timeout=httpx.Timeout(10.0, read=timeout_s + 10.0),
    )
    try:
        resp = await node.http.send(upstream)
    except httpx.ConnectError as exc:
        raise PlatformError(f"node {placement.node} is unreachable: {exc}") from exc
    except httpx.HTTPError as exc:
        log.warning("cluster: forwarding to %s failed: %s", placement.node, exc)
        return service_error(
            502,
            f"node {placement.node} failed while running the invocation "
            f"({type(exc).__name__}); it may or may not have run",
        )
    headers = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in _NOT_RELAYED}
    headers.setdefault(NODE_HEADER.lower(), placement.node)
    return Response(resp.content, status_code=resp.status_code, headers=headers)


_NOT_RELAYED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
