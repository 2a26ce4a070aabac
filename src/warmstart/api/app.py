"""The ASGI application: Lambda REST API + native API, over one Worker."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from warmstart import __version__
from warmstart.api.bodies import BodyLimit, parse_json, read_body
from warmstart.api.lambda_api import (
    LambdaAPI,
    error_response,
    function_name,
    lambda_error,
    result_headers,
    sync_payload_limit,
)
from warmstart.errors import InvalidParameter, NotFound, RequestTooLarge, WarmstartError
from warmstart.kinds import SizeLimit
from warmstart.lifecycle import close_all
from warmstart.worker import Worker
from warmstart.worker.registry import parse_qualifier

if TYPE_CHECKING:
    from warmstart.cluster.node import ClusterNode

log = logging.getLogger(__name__)


class NativeAPI:
    def __init__(self, worker: Worker, cluster: ClusterNode | None = None) -> None:
        self.worker = worker
        self.cluster = cluster
        self.request_limit = sync_payload_limit(worker)
        self.job_limit = BodyLimit(worker.settings.max_job_bytes, SizeLimit.JOB, "SubmitJob")

    def routes(self) -> list[Route]:
        return [
            Route("/run/{name}", self.run, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/functions/{name}/logs", self.logs, methods=["GET"]),
            Route("/instances", self.instances, methods=["GET"]),
            Route("/zygotes", self.zygotes, methods=["GET"]),
            Route("/node", self.node, methods=["GET"]),
            Route("/events/{event_id}", self.event, methods=["GET"]),
            Route("/jobs", self.submit_job, methods=["POST"]),
            Route("/jobs", self.list_jobs, methods=["GET"]),
            Route("/jobs/{job_id}", self.job, methods=["GET"]),
            Route("/jobs/{job_id}/results", self.job_results, methods=["GET"]),
        ]

    async def run(self, request: Request) -> Response:
        """POST /run/<fn>: JSON event in, handler result out (502 if the handler failed)."""
        name, qualifier = function_name(request.path_params["name"])
        result = await self.worker.invoke(
            name,
            await read_body(request, self.request_limit),
            qualifier=parse_qualifier(qualifier),
        )
        status = 200
        if result.function_error:
            status = 504 if b"Sandbox.Timedout" in result.payload else 502
        return Response(
            result.payload,
            status_code=status,
            headers=result_headers(result, self.cluster),
            media_type="application/json",
        )

    async def healthz(self, request: Request) -> Response:
        health = {**self.worker.health(), "version": __version__}
        if self.cluster is not None:
            health["cluster"] = cluster = self.cluster.health()
            if cluster["degraded"]:
                health["status"] = "degraded"
        return JSONResponse(health)

    async def metrics(self, request: Request) -> Response:
        return Response(
            generate_latest(self.worker.metrics_registry), media_type=CONTENT_TYPE_LATEST
        )

    async def logs(self, request: Request) -> Response:
        name, _ = function_name(request.path_params["name"])
        try:
            tail = int(request.query_params.get("tail", "65536"))
        except ValueError:
            raise InvalidParameter("tail must be a number of bytes") from None
        if tail < 0:
            raise InvalidParameter("tail must be a number of bytes")
        text = self.worker.read_log(name, tail)
        return PlainTextResponse(text.decode(errors="replace"))

    async def instances(self, request: Request) -> Response:
        return JSONResponse({"instances": await self.worker.instances()})

    async def node(self, request: Request) -> Response:
        """The node's status: capacity, LS/BE/system usage, reclaimed capacity, queues."""
        return JSONResponse(await self.worker.node_status())

    async def zygotes(self, request: Request) -> Response:
        return JSONResponse(self.worker.zygotes())

    async def submit_job(self, request: Request) -> Response:
        """POST /jobs: {"function": F, "inputs": [...]}, or JSON lines with ?function=F.
        The body takes at most ``max_job_bytes``, each input ``max_event_bytes``."""
        raw = await read_body(request, self.job_limit)
        if (
            "ndjson" in request.headers.get("content-type", "")
            or "function" in request.query_params
        ):
            name = request.query_params.get("function", "")
            inputs = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    parse_json(line)
                except ValueError:
                    raise InvalidParameter(f"input line {n} is not JSON") from None
                self._check_input(f"input line {n}", line)
                inputs.append(line)
        else:
            try:
                body = parse_json(raw)
            except ValueError:
                raise InvalidParameter("the body must be JSON or JSON lines") from None
            if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
                raise InvalidParameter('expected {"function": NAME, "inputs": [...]}')
            name = str(body.get("function", ""))
            inputs = [json.dumps(item).encode() for item in body["inputs"]]
            for n, item in enumerate(inputs):
                self._check_input(f"inputs[{n}]", item)
        name, qualifier = function_name(name)
        job_id = await self.worker.submit_job(name, inputs, parse_qualifier(qualifier))
        return JSONResponse({"JobId": job_id, "total": len(inputs)}, status_code=202)

    def _check_input(self, where: str, item: bytes) -> None:
        """A job's item is an Event payload: it takes at most ``max_event_bytes``."""
        limit = self.worker.settings.max_event_bytes
        if len(item) > limit:
            raise RequestTooLarge(
                f"{where} takes {len(item)} bytes: a job's input must be smaller than "
                f"{limit} bytes (the node's Event payload limit)",
                limit=SizeLimit.JOB_INPUT,
            )

    async def list_jobs(self, request: Request) -> Response:
        return JSONResponse({"jobs": await self.worker.jobs()})

    async def job(self, request: Request) -> Response:
        """GET /jobs/<id>: a job's progress; a unique prefix of the id (>= 6 chars) will do."""
        job_id = request.path_params["job_id"]
        job = await self.worker.job(job_id)
        if job is None:
            raise NotFound(self._gone("job", job_id))
        return JSONResponse(job)

    async def job_results(self, request: Request) -> Response:
        """GET /jobs/<id>/results: each result as the JSON value the handler returned."""
        job = await self.worker.job(request.path_params["job_id"])
        if job is None:
            raise NotFound(self._gone("job", request.path_params["job_id"]))
        results = await self.worker.job_results(job["JobId"])
        if results is None:
            raise NotFound(self._gone("job", job["JobId"]))
        return JSONResponse({"JobId": job["JobId"], "results": results})

    async def event(self, request: Request) -> Response:
        ev = await self.worker.event(request.path_params["event_id"])
        if ev is None:
            raise NotFound(self._gone("event", request.path_params["event_id"]))
        return JSONResponse(ev)

    def _gone(self, what: str, ident: str) -> str:
        """A 404's message for an event or job: unknown, or finished and deleted."""
        hours = self.worker.settings.event_retention_hours
        return (
            f"no such {what}: {ident} (unknown, or it finished more than {hours:g} h ago "
            "and its record expired)"
        )


async def _warmstart_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, WarmstartError):
        if isinstance(exc, RequestTooLarge):
            request.app.state.worker.count_too_large(exc.limit)
        if not isinstance(exc, (NotFound, InvalidParameter)):
            log.info("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(exc)
    raise exc


async def _no_route(request: Request, exc: Exception) -> Response:
    """A path no route serves (404) or a method the path does not take (405), in the
    API's error shape like every other refusal: ``UnknownOperationException``."""
    if not isinstance(exc, HTTPException):
        raise exc
    code = "UnknownOperationException" if exc.status_code in (404, 405) else "ServiceException"
    response = lambda_error(exc.status_code, code, exc.detail)
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"Type": "Service", "message": f"internal error: {type(exc).__name__}"},
        status_code=500,
        headers={"x-amzn-ErrorType": "ServiceException"},
    )


def create_app(worker: Worker, cluster: ClusterNode | None = None) -> Starlette:
    """The app for one node; in cluster mode ``cluster`` is the node's ``ClusterNode``
    (which owns ``worker``): invocations are placed across the cluster, and the cluster's
    own routes are served."""

    from warmstart.api.images_api import ImagesAPI
    from warmstart.cluster.imageops import ImageOps, LocalImageOps

    # Preheat jobs and the image cache: the cluster's, or this node's alone.
    local_images: LocalImageOps | None = None
    images: ImageOps
    if cluster is not None:
        images = cluster.images
    else:
        images = local_images = LocalImageOps.for_worker(worker)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owner = cluster if cluster is not None else worker
        await owner.start()
        try:
            if local_images is not None:
                await local_images.start()
            yield
        finally:
            await close_all(
                ("image operations", local_images.close if local_images else lambda: None),
                ("node", owner.close),
            )

    routes: list[Any] = [
        *LambdaAPI(worker, cluster).routes(),
        *NativeAPI(worker, cluster).routes(),
        *ImagesAPI(images).routes(),
    ]
    if cluster is not None:
        from warmstart.api.cluster_api import ClusterAPI

        routes += ClusterAPI(cluster).routes()
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            WarmstartError: _warmstart_error,
            HTTPException: _no_route,
            Exception: _unexpected,
        },
    )
    app.state.worker = worker
    return app


def create_asgi(worker: Worker, cluster: ClusterNode | None = None) -> Any:
    """What a server runs: the app, behind cluster mode's forwarding layer when there is
    a cluster (``api/forwarding.py``)."""
    app = create_app(worker, cluster)
    if cluster is None:
        return app
    from warmstart.api.forwarding import ForwardingMiddleware

    return ForwardingMiddleware(app, cluster)
