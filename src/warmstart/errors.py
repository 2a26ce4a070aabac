"""The error tree shared by every layer.

    WarmstartError
    ├── NotFound              a function (or other resource) does not exist
    ├── InvalidParameter      the caller sent something we cannot accept
    ├── Conflict              the resource exists already / is being changed
    ├── PreconditionFailed    the caller's RevisionId is not the current one
    ├── TooManyRequests       concurrency and queue limits are exhausted
    ├── InvalidRequestContent the invocation payload is not JSON
    ├── RequestTooLarge       a request body over one of the node's size limits (413)
    │   └── EntityTooLarge  a deploy's request or its code zip is over Lambda's limit
    └── PlatformError         something on our side failed (sandbox, cgroup, spawner)
        ├── SandboxError      a sandbox could not be created or controlled
        └── ServiceUnavailable  a dependency is unreachable for now (cluster: etcd), 503

Lower layers raise these; the API layer translates them into AWS Lambda's error shapes,
the CLI into one clear line. Causes are chained with ``raise ... from exc``.
"""

from __future__ import annotations

from warmstart.kinds import SizeLimit


class WarmstartError(Exception):
    """Base of every error warmstart raises on purpose."""


class NotFound(WarmstartError):
    pass


class InvalidParameter(WarmstartError):
    pass


class Conflict(WarmstartError):
    pass


class PreconditionFailed(WarmstartError):
    pass


class TooManyRequests(WarmstartError):
    def __init__(
        self, message: str, reason: str = "ReservedFunctionConcurrentInvocationLimitExceeded"
    ):
        super().__init__(message)
        self.reason = reason


class InvalidRequestContent(WarmstartError):
    pass


class RequestTooLarge(WarmstartError):
    """A request body over a size limit of the node's, refused before it was read in full.

    ``error_type`` is Lambda's name for it (``RequestTooLargeException`` for an invocation's
    payload; ``RequestEntityTooLargeException`` for a deploy's request); ``limit`` says
    which limit was hit, for the node's metrics.
    """

    def __init__(
        self, message: str, *, limit: SizeLimit, error_type: str = "RequestTooLargeException"
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.error_type = error_type


class EntityTooLarge(RequestTooLarge):
    """A deploy's request or its code zip over Lambda's size limit
    (``RequestEntityTooLargeException``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, limit=SizeLimit.CODE, error_type="RequestEntityTooLargeException")


class PlatformError(WarmstartError):
    pass


class SandboxError(PlatformError):
    pass


class ServiceUnavailable(PlatformError):
    pass
