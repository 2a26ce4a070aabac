"""Image operations over HTTP: preheat jobs and the image cache, on every node.

    POST   /images/preheat          make a job: {"image", "nodes"|"selector", "parallelism",
                                    "timeoutSeconds", "backoffLimit",
                                    "ttlSecondsAfterFinished"} -> 202 and its status
    GET    /images/preheat          jobs, newest first
    GET    /images/preheat/<id>     a job's status and every node's progress
    DELETE /images/preheat/<id>     delete a job (204)
    PUT    /images/cache/<name>     {"image", "nodes"|"selector"} -> 201 made, 200 replaced
    GET    /images/cache            every entry, with each selected node's state
    GET    /images/cache/<name>     one entry
    DELETE /images/cache/<name>     drop it: the nodes unpin the image (204)

In a cluster the controllers are the ``ClusterNode``'s (``cluster/imageops.py``); on a
node alone the same API pulls and pins on that node.  Errors take the API's usual
shapes: 400 for a bad request (with what is wrong), 404 for an unknown job or entry,
413 for a body over 64 KB, 503 when etcd cannot be reached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from warmstart.api.bodies import ENTITY_TOO_LARGE, BodyLimit, parse_json, read_body
from warmstart.errors import InvalidParameter, NotFound
from warmstart.kinds import SizeLimit

if TYPE_CHECKING:
    from warmstart.cluster.imageops import ImageOps

BODY_LIMIT = BodyLimit(64 << 10, SizeLimit.CONTROL, "image", ENTITY_TOO_LARGE)


async def _json_body(request: Request) -> Any:
    raw = await read_body(request, BODY_LIMIT)
    try:
        return parse_json(raw or b"null")
    except ValueError as exc:
        raise InvalidParameter(f"the body is not JSON: {exc}") from None


class ImagesAPI:
    def __init__(self, ops: ImageOps) -> None:
        self.ops = ops

    def routes(self) -> list[Route]:
        return [
            Route("/images/preheat", self.create_preheat, methods=["POST"]),
            Route("/images/preheat", self.list_preheat, methods=["GET"]),
            Route("/images/preheat/{job_id}", self.get_preheat, methods=["GET"]),
            Route("/images/preheat/{job_id}", self.delete_preheat, methods=["DELETE"]),
            Route("/images/cache", self.list_cache, methods=["GET"]),
            Route("/images/cache/{name}", self.put_cache, methods=["PUT"]),
            Route("/images/cache/{name}", self.get_cache, methods=["GET"]),
            Route("/images/cache/{name}", self.delete_cache, methods=["DELETE"]),
        ]

    async def create_preheat(self, request: Request) -> Response:
        job = await self.ops.create_preheat(await _json_body(request))
        return JSONResponse(job, status_code=202)

    async def list_preheat(self, request: Request) -> Response:
        return JSONResponse({"jobs": await self.ops.preheat.all()})

    async def get_preheat(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await self.ops.preheat.get(job_id)
        if job is None:
            raise NotFound(f"no such preheat job: {job_id}")
        return JSONResponse(job)

    async def delete_preheat(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not await self.ops.preheat.delete(job_id):
            raise NotFound(f"no such preheat job: {job_id}")
        return Response(status_code=204)

    async def list_cache(self, request: Request) -> Response:
        return JSONResponse({"entries": await self.ops.cache.all()})

    async def put_cache(self, request: Request) -> Response:
        entry, created = await self.ops.put_cache(
            request.path_params["name"], await _json_body(request)
        )
        return JSONResponse(entry, status_code=201 if created else 200)

    async def get_cache(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = await self.ops.cache.get(name)
        if entry is None:
            raise NotFound(f"no such image cache entry: {name}")
        return JSONResponse(entry)

    async def delete_cache(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await self.ops.delete_cache(name):
            raise NotFound(f"no such image cache entry: {name}")
        return Response(status_code=204)
