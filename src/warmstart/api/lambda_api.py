"""AWS Lambda's REST API (rest-json), enough for boto3's ``lambda`` client and the AWS CLI.

Errors carry Lambda's shapes: status code, ``x-amzn-ErrorType`` header and a JSON body
with ``Type`` and ``message`` -- botocore reads the error code from either.

Versions and aliases: a ``Qualifier`` (query parameter, ``name:qualifier`` in the path,
or a qualified ARN) names ``$LATEST``, a published version or an alias.  Reads
(GetFunction, GetFunctionConfiguration) and Invoke take any; DeleteFunction a version
only (as Lambda: never ``$LATEST`` alone, nor an alias); the function-wide changes
(UpdateFunctionCode/Configuration, the concurrency operations) ``$LATEST`` or none, like
Lambda, which refuses other qualifiers for them.

One extension: a deploy of an image (``CreateFunction``, ``UpdateFunctionCode``,
``UpdateFunctionConfiguration`` with ``ImageConfig``) may carry the deployer's registry
credentials in ``X-Warmstart-Registry-Auth`` (``images/access.py``); the image is used
only if the registry lets them pull it.  The header is read here and nowhere else, and
never logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from warmstart.api.bodies import (
    CODE_REQUEST_BYTES,
    CONTROL_REQUEST_BYTES,
    ENTITY_TOO_LARGE,
    BodyLimit,
    parse_json,
    read_body,
)
from warmstart.errors import (
    Conflict,
    InvalidParameter,
    InvalidRequestContent,
    NotFound,
    PreconditionFailed,
    RequestTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    WarmstartError,
)
from warmstart.functions import FunctionConfig, FunctionRecord
from warmstart.functions.models import (
    DEFAULT_EPHEMERAL,
    LATEST,
    NETWORK_TAG,
    VERSION_RE,
    AliasRecord,
    check_alias_name,
)
from warmstart.images.access import REGISTRY_AUTH_HEADER, RegistryCredential
from warmstart.kinds import SizeLimit
from warmstart.worker import InvokeResult, Worker
from warmstart.worker.registry import parse_qualifier

if TYPE_CHECKING:
    from warmstart.cluster.node import ClusterNode

log = logging.getLogger(__name__)
NODE_HEADER = "X-Warmstart-Node"


def lambda_error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = {"Type": "User", "message": message, **extra}
    return JSONResponse(body, status_code=status, headers={"x-amzn-ErrorType": code})


# The error tree, translated to Lambda's status codes and error types (first match wins:
# subclasses before their bases).
_LAMBDA_ERRORS: tuple[tuple[type[WarmstartError], int, str], ...] = (
    (NotFound, 404, "ResourceNotFoundException"),
    (InvalidParameter, 400, "InvalidParameterValueException"),
    (InvalidRequestContent, 400, "InvalidRequestContentException"),
    (Conflict, 409, "ResourceConflictException"),
    (PreconditionFailed, 412, "PreconditionFailedException"),
    (TooManyRequests, 429, "TooManyRequestsException"),
)


def error_response(exc: WarmstartError) -> JSONResponse:
    """A ``WarmstartError`` in Lambda's shape; anything not the caller's fault (a
    ``PlatformError`` and whatever else) is a ``ServiceException``: 503 when a dependency
    is unreachable for now (the cluster's etcd), else 500."""
    if isinstance(exc, RequestTooLarge):
        return lambda_error(413, exc.error_type, str(exc))
    for kind, status, code in _LAMBDA_ERRORS:
        if isinstance(exc, kind):
            extra = {"Reason": exc.reason} if isinstance(exc, TooManyRequests) else {}
            return lambda_error(status, code, str(exc), **extra)
    return service_error(503 if isinstance(exc, ServiceUnavailable) else 500, str(exc))


def service_error(status: int, message: str) -> JSONResponse:
    """Lambda's ``ServiceException``: the service failed, not the caller."""
    return JSONResponse(
        {"Type": "Service", "message": message},
        status_code=status,
        headers={"x-amzn-ErrorType": "ServiceException"},
    )


def function_name(raw: str) -> tuple[str, str | None]:
    """Accept a name, ``name:qualifier``, or a (partial) ARN; return (name, qualifier)."""
    raw = unquote(raw)
    if raw.startswith("arn:"):
        parts = raw.split(":")
        try:
            i = parts.index("function")
        except ValueError:
            raise InvalidParameter(f"Invalid function ARN: {raw}") from None
        rest = parts[i + 1 :]
    else:
        rest = raw.split(":")
    if not rest or len(rest) > 2 or not rest[0]:
        raise InvalidParameter(f"Invalid function name: {raw}")
    FunctionRecord.check_name(rest[0])
    return rest[0], (rest[1] if len(rest) == 2 else None)


def sync_payload_limit(worker: Worker) -> BodyLimit:
    """A synchronous invocation's payload limit (Invoke, ``/run``, forwarded calls)."""
    return BodyLimit(worker.settings.max_request_bytes, SizeLimit.INVOKE, "InvokeFunction")


def request_target(request: Request) -> tuple[str, str | None]:
    """The function a request names and its qualifier (from the path -- ``name:q`` or a
    qualified ARN -- or the ``Qualifier`` query parameter; both must agree), checked."""
    name, in_path = function_name(request.path_params["name"])
    in_query = request.query_params.get("Qualifier")
    in_path, in_query = parse_qualifier(in_path), parse_qualifier(in_query)
    if in_path is not None and in_query is not None and in_path != in_query:
        raise InvalidParameter(
            "The derived qualifier from the function name does not match the specified qualifier."
        )
    return name, in_path or in_query


def unqualified(qualifier: str | None) -> None:
    """Function-wide changes take no qualifier but $LATEST (as Lambda)."""
    if qualifier not in (None, LATEST):
        raise InvalidParameter(
            "Current operation does not support versions other than $LATEST. "
            "Please set version to $LATEST or do not set a version in your ARN."
        )


def _marker_page(request: Request, items: int, most: int = 10000) -> tuple[int, int]:
    """The (start, size) of the page a list request asks for: ``Marker`` is an offset
    this API returned, ``MaxItems`` at most ``most``."""
    marker = request.query_params.get("Marker")
    try:
        max_items = int(request.query_params.get("MaxItems", "50"))
    except ValueError:
        raise InvalidParameter("MaxItems must be an integer") from None
    max_items = max(1, min(max_items, most))
    # A marker is an offset this API returned: ASCII digits ("²".isdigit() is true too).
    if marker and not (marker.isascii() and marker.isdigit() and len(marker) <= 18):
        raise InvalidParameter(f"Marker {marker[:64]!r} is not one this API returned")
    return (int(marker) if marker else 0), max_items


def alias_configuration(worker: Worker, alias: AliasRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "AliasArn": worker.arn(alias.function, alias.name),
        "Name": alias.name,
        "FunctionVersion": alias.function_version,
        "Description": alias.description,
        "RevisionId": alias.revision_id,
    }
    if alias.weights:
        out["RoutingConfig"] = {"AdditionalVersionWeights": dict(alias.weights)}
    return out


def _routing(body: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """``RoutingConfig.AdditionalVersionWeights`` as (version, weight) pairs (checked
    further by ``AliasRecord``)."""
    raw = body.get("RoutingConfig")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise InvalidParameter("RoutingConfig must be {'AdditionalVersionWeights': {...}}")
    weights = raw.get("AdditionalVersionWeights") or {}
    if not isinstance(weights, dict):
        raise InvalidParameter("RoutingConfig.AdditionalVersionWeights must be a map")
    out = []
    for version, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidParameter(
                f"Invalid weight for version {str(version)[:64]}: it must be a number "
                "between 0.0 and 1.0"
            )
        out.append((str(version), float(weight)))
    return tuple(out)


def _description(body: dict[str, Any]) -> str | None:
    value = body.get("Description")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise InvalidParameter("Description must be a string of at most 256 characters")
    return value


async def json_body(
    request: Request, operation: str, limit: int = CONTROL_REQUEST_BYTES
) -> dict[str, Any]:
    """A control-plane request's JSON object body, of at most ``limit`` bytes (else 413
    ``RequestEntityTooLargeException``, as Lambda says it for ``operation``)."""
    what = SizeLimit.CODE if limit == CODE_REQUEST_BYTES else SizeLimit.CONTROL
    raw = await read_body(request, BodyLimit(limit, what, operation, ENTITY_TOO_LARGE))
    if not raw:
        return {}
    try:
        body = parse_json(raw)
    except ValueError as exc:
        raise InvalidParameter("Request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise InvalidParameter("Request body must be a JSON object")
    return body


def decode_zip(value: Any) -> bytes:
    if not isinstance(value, str):
        raise InvalidParameter("Code.ZipFile must be base64-encoded zip bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParameter("Code.ZipFile is not valid base64") from exc


def configuration(
    worker: Worker, rec: FunctionRecord, qualifier: str | None = None
) -> dict[str, Any]:
    """A version's configuration; its ARN carries ``qualifier`` (as asked: an alias, or
    ``$LATEST``), else a published version's number."""
    cfg = rec.config
    out: dict[str, Any] = {
        "FunctionName": rec.name,
        "FunctionArn": worker.arn(rec.name, qualifier or (rec.version if rec.published else None)),
        "Runtime": cfg.runtime,
        "Role": cfg.role,
        "Handler": cfg.handler,
        "CodeSize": rec.code_size,
        "Description": cfg.description,
        "Timeout": cfg.timeout_s,
        "MemorySize": cfg.memory_mb,
        "LastModified": rec.last_modified,
        "CodeSha256": base64.b64encode(bytes.fromhex(rec.code_sha256)).decode(),
        "Version": rec.version,
        "TracingConfig": {"Mode": "PassThrough"},
        "RevisionId": rec.revision_id,
        **worker.state(rec).fields(),  # State, LastUpdateStatus and their reasons
        "PackageType": rec.package_type,
        "Architectures": ["x86_64"],
        "EphemeralStorage": {"Size": cfg.ephemeral_mb},
    }
    if rec.image is not None:
        # Image functions have no Runtime or Handler of their own in Lambda's shapes.
        out.pop("Runtime")
        out.pop("Handler")
        if rec.image.overrides:
            out["ImageConfigResponse"] = {"ImageConfig": dict(rec.image.overrides)}
    if cfg.environment:
        out["Environment"] = {"Variables": dict(cfg.environment)}
    return out


def deployer_credential(request: Request) -> RegistryCredential | None:
    """The deployer's registry credentials (``X-Warmstart-Registry-Auth``), if sent."""
    value = request.headers.get(REGISTRY_AUTH_HEADER)
    return None if value is None else RegistryCredential.from_header(value)


def _int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"{key} must be an integer")
    return value


def _env(body: dict[str, Any], default: dict[str, str]) -> dict[str, str]:
    env = body.get("Environment")
    if env is None:
        return default
    if not isinstance(env, dict) or not isinstance(env.get("Variables", {}), dict):
        raise InvalidParameter("Environment must be {'Variables': {...}}")
    return dict(env.get("Variables") or {})


def _ephemeral(body: dict[str, Any], default: int) -> int:
    raw = body.get("EphemeralStorage")
    if raw is None:
        return default
    if not isinstance(raw, dict) or "Size" not in raw:
        raise InvalidParameter("EphemeralStorage must be {'Size': MB}")
    return _int(raw, "Size", default)


def _image_config(body: dict[str, Any]) -> dict[str, Any]:
    """The ImageConfig of a request: EntryPoint, Command (lists), WorkingDirectory."""
    raw = body.get("ImageConfig") or {}
    if not isinstance(raw, dict):
        raise InvalidParameter("ImageConfig must be a map")
    out: dict[str, Any] = {}
    for key in ("EntryPoint", "Command"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidParameter(f"ImageConfig.{key} must be a list of strings")
            out[key] = list(value)
    if "WorkingDirectory" in raw:
        wd = raw["WorkingDirectory"]
        if not isinstance(wd, str) or not wd.startswith("/"):
            raise InvalidParameter("ImageConfig.WorkingDirectory must be an absolute path")
        out["WorkingDirectory"] = wd
    unknown = set(raw) - {"EntryPoint", "Command", "WorkingDirectory"}
    if unknown:
        raise InvalidParameter(f"Unknown ImageConfig keys: {sorted(unknown)}")
    return out


class LambdaAPI:
    def __init__(self, worker: Worker, cluster: ClusterNode | None = None) -> None:
        self.worker = worker
        self.cluster = cluster
        self.request_limit = sync_payload_limit(worker)
        self.event_limit = BodyLimit(
            worker.settings.max_event_bytes, SizeLimit.EVENT, "InvokeFunction"
        )

    def routes(self) -> list[Route]:
        p = "/2015-03-31/functions"
        return [
            Route(f"{p}", self.create_function, methods=["POST"]),
            Route(f"{p}/", self.list_functions, methods=["GET"]),
            Route(f"{p}", self.list_functions, methods=["GET"]),
            Route(p + "/{name}", self.get_function, methods=["GET"]),
            Route(p + "/{name}", self.delete_function, methods=["DELETE"]),
            Route(p + "/{name}/configuration", self.get_configuration, methods=["GET"]),
            Route(p + "/{name}/configuration", self.update_configuration, methods=["PUT"]),
            Route(p + "/{name}/code", self.update_code, methods=["PUT"]),
            Route(p + "/{name}/code-download", self.download_code, methods=["GET"]),
            Route(p + "/{name}/invocations", self.invoke, methods=["POST"]),
            Route(p + "/{name}/versions", self.publish_version, methods=["POST"]),
            Route(p + "/{name}/versions", self.list_versions, methods=["GET"]),
            Route(p + "/{name}/aliases", self.create_alias, methods=["POST"]),
            Route(p + "/{name}/aliases", self.list_aliases, methods=["GET"]),
            Route(p + "/{name}/aliases/{alias}", self.get_alias, methods=["GET"]),
            Route(p + "/{name}/aliases/{alias}", self.update_alias, methods=["PUT"]),
            Route(p + "/{name}/aliases/{alias}", self.delete_alias, methods=["DELETE"]),
            Route(
                "/2017-10-31/functions/{name}/concurrency", self.put_concurrency, methods=["PUT"]
            ),
            Route(
                "/2017-10-31/functions/{name}/concurrency",
                self.delete_concurrency,
                methods=["DELETE"],
            ),
            Route(
                "/2019-09-30/functions/{name}/concurrency", self.get_concurrency, methods=["GET"]
            ),
        ]

    def _rec(self, request: Request) -> FunctionRecord:
        """The version a read names ($LATEST, a version, an alias's primary version)."""
        name, qualifier = request_target(request)
        return self.worker.target(name, qualifier)

    def _latest(self, request: Request) -> FunctionRecord:
        """The function a function-wide change names (no qualifier but $LATEST)."""
        name, qualifier = request_target(request)
        unqualified(qualifier)
        return self.worker.get(name)

    async def create_function(self, request: Request) -> Response:
        body = await json_body(request, "CreateFunction", CODE_REQUEST_BYTES)
        name = body.get("FunctionName")
        if not isinstance(name, str):
            raise InvalidParameter("FunctionName is required")
        name, _ = function_name(name)
        package_type = body.get("PackageType", "Zip")
        if package_type not in ("Zip", "Image"):
            raise InvalidParameter("PackageType must be Zip or Image")
        code = body.get("Code") or {}
        if not isinstance(code, dict):
            raise InvalidParameter("Code must be a map")
        if package_type == "Zip" and "ZipFile" not in code:
            raise InvalidParameter("Code.ZipFile is required (S3 code locations are not supported)")
        if package_type == "Image" and not isinstance(code.get("ImageUri"), str):
            raise InvalidParameter("Code.ImageUri is required for PackageType=Image")
        tags = body.get("Tags") or {}
        if not isinstance(tags, dict):
            raise InvalidParameter("Tags must be a map")
        handler = body.get("Handler")
        if package_type == "Image":
            handler = "image.handler"  # replaced by the image's CMD / ImageConfig.Command
        if not isinstance(handler, str):
            raise InvalidParameter("Handler is required")
        config = FunctionConfig(
            handler=handler,
            runtime=body.get("Runtime") or "python3.11",
            memory_mb=_int(body, "MemorySize", 128),
            timeout_s=_int(body, "Timeout", 3),
            environment=_env(body, {}),
            ephemeral_mb=_ephemeral(body, DEFAULT_EPHEMERAL),
            description=str(body.get("Description", "")),
            role=str(body.get("Role") or "arn:aws:iam::000000000000:role/warmstart"),
            network=str(tags.get(NETWORK_TAG, "none")),
            tags={str(k): str(v) for k, v in tags.items()},
        )
        if package_type == "Image":
            image = await self.worker.inspect_image(
                code["ImageUri"], _image_config(body), deployer_credential(request)
            )
            rec = await self.worker.create_image_function(name, config, image)
        else:
            rec = await self.worker.create_function(name, config, decode_zip(code["ZipFile"]))
        return JSONResponse(await self._published(rec, body), status_code=201)

    async def _published(self, rec: FunctionRecord, body: dict[str, Any]) -> dict[str, Any]:
        """The answer to a deploy: with ``Publish: true`` (CreateFunction,
        UpdateFunctionCode) a version is published from it and that version's
        configuration is the answer, as Lambda does."""
        if body.get("Publish") is True:
            rec, _ = await self.worker.publish_version(rec)
        return configuration(self.worker, rec)

    async def list_functions(self, request: Request) -> Response:
        """ListFunctions: every function's $LATEST; with ``FunctionVersion=ALL``, each
        followed by its published versions (as Lambda)."""
        functions = self.worker.functions()
        every = request.query_params.get("FunctionVersion")
        if every is not None and every != "ALL":
            raise InvalidParameter("FunctionVersion must be ALL")
        if every:
            functions = [r for f in functions for r in (f, *self.worker.versions(f.name))]
        start, max_items = _marker_page(request, len(functions))
        page = functions[start : start + max_items]
        out: dict[str, Any] = {"Functions": [configuration(self.worker, rec) for rec in page]}
        if start + max_items < len(functions):
            out["NextMarker"] = str(start + max_items)
        return JSONResponse(out)

    async def get_function(self, request: Request) -> Response:
        name, qualifier = request_target(request)
        rec = self.worker.target(name, qualifier)
        url = str(request.base_url).rstrip("/") + f"/2015-03-31/functions/{rec.name}/code-download"
        if rec.published:
            url += f"?Qualifier={rec.version}"
        out: dict[str, Any] = {
            "Configuration": configuration(self.worker, rec, qualifier),
            "Code": {"RepositoryType": "S3", "Location": url},
            "Tags": dict(rec.config.tags),
        }
        if rec.image is not None:
            out["Code"] = {
                "RepositoryType": "ECR",
                "ImageUri": rec.image.uri,
                "ResolvedImageUri": rec.image.resolved_uri,
            }
        reserved = self.worker.get(rec.name).reserved_concurrency  # the function's
        if reserved is not None:
            out["Concurrency"] = {"ReservedConcurrentExecutions": reserved}
        return JSONResponse(out)

    async def download_code(self, request: Request) -> Response:
        rec = self._rec(request)
        if rec.image is not None:
            raise InvalidParameter(f"{rec.name} is an image function: its code is {rec.image.uri}")
        return FileResponse(
            self.worker.code_zip(rec),
            media_type="application/zip",
            filename=f"{rec.name}.zip",
        )

    async def get_configuration(self, request: Request) -> Response:
        name, qualifier = request_target(request)
        rec = self.worker.target(name, qualifier)
        return JSONResponse(configuration(self.worker, rec, qualifier))

    def _check_revision(self, rec: FunctionRecord, body: dict[str, Any]) -> None:
        rid = body.get("RevisionId")
        if rid is not None and rid != rec.revision_id:
            raise PreconditionFailed(
                "The Revision Id provided does not match the latest Revision Id. "
                "Call the GetFunction/GetAlias API to retrieve the latest Revision Id"
            )

    async def update_configuration(self, request: Request) -> Response:
        rec = self._latest(request)
        body = await json_body(request, "UpdateFunctionConfiguration")
        self._check_revision(rec, body)
        cfg = rec.config
        changes: dict[str, Any] = {}
        if "ImageConfig" in body:
            if rec.image is None:
                raise InvalidParameter("ImageConfig applies to PackageType=Image functions only")
            image = await self.worker.inspect_image(
                rec.image.resolved_uri, _image_config(body), deployer_credential(request)
            )
            rec = await self.worker.update_image(rec.name, image)
            cfg = rec.config
        if "Handler" in body and rec.image is not None:
            raise InvalidParameter("An image function's handler is its ImageConfig.Command")
        if "Handler" in body:
            changes["handler"] = body["Handler"]
        if "Runtime" in body:
            changes["runtime"] = body["Runtime"]
        if "MemorySize" in body:
            changes["memory_mb"] = _int(body, "MemorySize", cfg.memory_mb)
        if "Timeout" in body:
            changes["timeout_s"] = _int(body, "Timeout", cfg.timeout_s)
        if "Environment" in body:
            changes["environment"] = _env(body, cfg.environment)
        if "EphemeralStorage" in body:
            changes["ephemeral_mb"] = _ephemeral(body, cfg.ephemeral_mb)
        if "Description" in body:
            changes["description"] = str(body["Description"])
        if "Role" in body:
            changes["role"] = str(body["Role"])
        new = await self.worker.update_config(rec.name, **changes)
        return JSONResponse(configuration(self.worker, new))

    async def update_code(self, request: Request) -> Response:
        rec = self._latest(request)
        body = await json_body(request, "UpdateFunctionCode", CODE_REQUEST_BYTES)
        self._check_revision(rec, body)
        if isinstance(body.get("ImageUri"), str):
            overrides = dict(rec.image.overrides) if rec.image is not None else {}
            image = await self.worker.inspect_image(
                body["ImageUri"], overrides, deployer_credential(request)
            )
            if body.get("DryRun"):
                return JSONResponse(configuration(self.worker, rec))
            new = await self.worker.update_image(rec.name, image)
            return JSONResponse(await self._published(new, body))
        if "ZipFile" not in body:
            raise InvalidParameter("ZipFile or ImageUri is required (S3 code is not supported)")
        data = decode_zip(body["ZipFile"])
        if body.get("DryRun"):
            return JSONResponse(configuration(self.worker, rec))
        new = await self.worker.update_code(rec.name, data)
        return JSONResponse(await self._published(new, body))

    async def delete_function(self, request: Request) -> Response:
        """The function with its versions and aliases; with a qualifier, one version."""
        name, qualifier = request_target(request)
        if qualifier is None:
            await self.worker.delete_function(self.worker.get(name).name)
        elif qualifier == LATEST:
            raise InvalidParameter(
                "$LATEST version cannot be deleted without deleting the function."
            )
        elif not VERSION_RE.fullmatch(qualifier):
            raise InvalidParameter("Deletion of aliases is not supported.")
        else:
            await self.worker.delete_version(name, qualifier)
        return Response(status_code=204)

    # -- versions ------------------------------------------------------------------------------
    async def publish_version(self, request: Request) -> Response:
        """PublishVersion: $LATEST as it is now, if it still has the ``CodeSha256`` and
        ``RevisionId`` given; an unchanged $LATEST gives the newest version back."""
        body = await json_body(request, "PublishVersion")
        rec = self._latest(request)  # as it is once the body is in: what gets published
        self._check_revision(rec, body)
        sha = configuration(self.worker, rec)["CodeSha256"]
        wanted = body.get("CodeSha256")
        if wanted is not None and wanted != sha:
            raise InvalidParameter(
                f"CodeSHA256 ({str(wanted)[:64]}) is different from current CodeSHA256 in "
                f"$LATEST ({sha}). Please try again with the current CodeSHA256."
            )
        version, _ = await self.worker.publish_version(rec, _description(body))
        return JSONResponse(configuration(self.worker, version), status_code=201)

    async def list_versions(self, request: Request) -> Response:
        """ListVersionsByFunction: $LATEST first, then the versions oldest first (at most
        50 a page, as Lambda)."""
        name, qualifier = request_target(request)
        unqualified(qualifier)
        latest = self.worker.get(name)
        records = [latest, *self.worker.versions(name)]
        start, max_items = _marker_page(request, len(records), most=50)
        page = records[start : start + max_items]
        out: dict[str, Any] = {
            "Versions": [
                configuration(self.worker, r, None if r.published else LATEST) for r in page
            ]
        }
        if start + max_items < len(records):
            out["NextMarker"] = str(start + max_items)
        return JSONResponse(out)

    # -- aliases -------------------------------------------------------------------------------
    def _alias_target(self, request: Request) -> tuple[str, str]:
        name, qualifier = request_target(request)
        unqualified(qualifier)
        return self.worker.get(name).name, check_alias_name(unquote(request.path_params["alias"]))

    async def create_alias(self, request: Request) -> Response:
        name, qualifier = request_target(request)
        unqualified(qualifier)
        self.worker.get(name)
        body = await json_body(request, "CreateAlias")
        version = body.get("FunctionVersion")
        if not isinstance(version, str):
            raise InvalidParameter("FunctionVersion is required")
        alias = AliasRecord(
            name,
            check_alias_name(body.get("Name")),
            version,
            _description(body) or "",
            _routing(body),
        )
        created = await self.worker.create_alias(alias)
        return JSONResponse(alias_configuration(self.worker, created), status_code=201)

    async def get_alias(self, request: Request) -> Response:
        name, alias = self._alias_target(request)
        return JSONResponse(alias_configuration(self.worker, self.worker.alias(name, alias)))

    async def update_alias(self, request: Request) -> Response:
        name, alias = self._alias_target(request)
        body = await json_body(request, "UpdateAlias")
        changes: dict[str, Any] = {}
        if "FunctionVersion" in body:
            if not isinstance(body["FunctionVersion"], str):
                raise InvalidParameter("FunctionVersion must be a version number or $LATEST")
            changes["function_version"] = body["FunctionVersion"]
        if "Description" in body:
            changes["description"] = _description(body) or ""
        if "RoutingConfig" in body:
            changes["weights"] = _routing(body)
        rid = body.get("RevisionId")
        if rid is not None and not isinstance(rid, str):
            raise InvalidParameter("RevisionId must be a string")
        updated = await self.worker.update_alias(name, alias, rid, **changes)
        return JSONResponse(alias_configuration(self.worker, updated))

    async def delete_alias(self, request: Request) -> Response:
        name, alias = self._alias_target(request)
        await self.worker.delete_alias(name, alias)
        return Response(status_code=204)

    async def list_aliases(self, request: Request) -> Response:
        name, qualifier = request_target(request)
        unqualified(qualifier)
        aliases = self.worker.aliases(name)
        version = request.query_params.get("FunctionVersion")
        if version is not None:
            aliases = [a for a in aliases if version in a.versions()]
        start, max_items = _marker_page(request, len(aliases))
        page = aliases[start : start + max_items]
        out: dict[str, Any] = {"Aliases": [alias_configuration(self.worker, a) for a in page]}
        if start + max_items < len(aliases):
            out["NextMarker"] = str(start + max_items)
        return JSONResponse(out)

    # -- concurrency ---------------------------------------------------------------------------
    async def put_concurrency(self, request: Request) -> Response:
        rec = self._latest(request)
        body = await json_body(request, "PutFunctionConcurrency")
        value = body.get("ReservedConcurrentExecutions")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidParameter("ReservedConcurrentExecutions must be an integer >= 0")
        await self.worker.put_concurrency(rec.name, value)
        return JSONResponse({"ReservedConcurrentExecutions": value})

    async def delete_concurrency(self, request: Request) -> Response:
        rec = self._latest(request)
        await self.worker.put_concurrency(rec.name, None)
        return Response(status_code=204)

    async def get_concurrency(self, request: Request) -> Response:
        rec = self._latest(request)
        if rec.reserved_concurrency is None:
            return JSONResponse({})
        return JSONResponse({"ReservedConcurrentExecutions": rec.reserved_concurrency})

    async def invoke(self, request: Request) -> Response:
        name, qualifier = request_target(request)
        kind = request.headers.get("x-amz-invocation-type", "RequestResponse")
        limit = self.event_limit if kind == "Event" else self.request_limit
        payload = await read_body(request, limit)
        if kind == "DryRun":
            await self.worker.check_invocable(name, qualifier)  # exists, not Failed
            version = self.worker.target(name, qualifier).version
            return Response(status_code=204, headers={"X-Amz-Executed-Version": version})
        if kind == "Event":
            # The request id is the queued event's: GET /events/<id> follows it.  An
            # alias's version is drawn now; the event runs it even if the alias moves.
            event_id, version = await self.worker.invoke_async(name, payload, qualifier)
            return Response(
                status_code=202,
                headers={"x-amzn-RequestId": event_id, "X-Amz-Executed-Version": version},
            )
        if kind != "RequestResponse":
            raise InvalidParameter(f"Unknown InvocationType {kind!r}")
        cc = request.headers.get("x-amz-client-context")
        result = await self.worker.invoke(
            name, payload, client_context=_client_context(cc), qualifier=qualifier
        )
        headers = result_headers(result, self.cluster)
        if request.headers.get("x-amz-log-type") == "Tail":
            headers["X-Amz-Log-Result"] = result.log_tail_b64()
        return Response(
            result.payload, status_code=200, headers=headers, media_type="application/json"
        )


def _client_context(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return parse_json(base64.b64decode(raw))
    except (ValueError, binascii.Error):
        raise InvalidParameter("X-Amz-Client-Context must be base64-encoded JSON") from None


def result_headers(result: InvokeResult, cluster: ClusterNode | None = None) -> dict[str, str]:
    headers = {
        "X-Amz-Executed-Version": result.version,
        "x-amzn-RequestId": result.request_id,
        "X-Warmstart-Start": result.start.value,
        "X-Warmstart-Duration-Ms": f"{result.duration_ms:.3f}",
    }
    if result.function_error:
        headers["X-Amz-Function-Error"] = result.function_error
    if cluster is not None:
        headers[NODE_HEADER] = cluster.name
    return headers
