"""Cluster mode over HTTP: the node table, bundles between peers, and forwarded invocations.

``GET /cluster/nodes`` lists the live nodes with what each published.  ``GET`` and ``PUT``
``/cluster/code/<sha256>`` move code bundles between nodes; they answer only requests
that carry the cluster's token.  (Forwarded invocations go through ``api/forwarding.py``,
in front of the application.)
"""

from __future__ import annotations

import hmac
import logging
import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from warmstart.api.bodies import ENTITY_TOO_LARGE, BodyLimit, read_body
from warmstart.cluster.code import TOKEN_HEADER
from warmstart.errors import InvalidParameter, NotFound
from warmstart.kinds import SizeLimit

if TYPE_CHECKING:
    from warmstart.cluster.node import ClusterNode

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_BUNDLE = 256 << 20
BUNDLE_LIMIT = BodyLimit(MAX_BUNDLE, SizeLimit.BUNDLE, "PutCode", ENTITY_TOO_LARGE)


class ClusterAPI:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    def routes(self) -> list[Route]:
        return [
            Route("/cluster/nodes", self.nodes, methods=["GET"]),
            Route("/cluster/code/{sha}", self.get_code, methods=["GET"]),
            Route("/cluster/code/{sha}", self.put_code, methods=["PUT"]),
            Route("/cluster/blobs/{sha}/{piece:int}", self.get_piece, methods=["GET"]),
            Route("/cluster/chunks/sha256:{sha}", self.get_chunk, methods=["GET"]),
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

    async def get_piece(self, request: Request) -> Response:
        """A piece of a layer blob this node holds (peer-to-peer image distribution)."""
        sha = self._check_peer(request)
        data = await self.node.swarm.serve_piece(sha, int(request.path_params["piece"]))
        if data is None:
            raise NotFound(f"piece {request.path_params['piece']} of {sha[:12]} is not here")
        return Response(data, media_type="application/octet-stream")

    async def get_chunk(self, request: Request) -> Response:
        """A verified lazy-mount chunk this node has cached, by its digest."""
        sha = self._check_peer(request)
        path = self.node.chunk_path(f"sha256:{sha}")
        if path is None:
            raise NotFound(f"chunk {sha[:12]} is not cached here")
        return FileResponse(path, media_type="application/octet-stream")

    async def put_code(self, request: Request) -> Response:
        sha = self._check_peer(request)
        data = await read_body(request, BUNDLE_LIMIT)
        await self.node.code.receive(sha, data)
        return Response(status_code=204)
