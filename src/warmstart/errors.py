"""The error tree shared by every layer.

    WarmstartError
    ├── NotFound              a function (or other resource) does not exist
    ├── InvalidParameter      the caller sent something we cannot accept
    ├── Conflict              the resource exists already / is being changed
    ├── PreconditionFailed    the caller's RevisionId is not the current one
    ├── TooManyRequests       concurrency and queue limits are exhausted
    ├── InvalidRequestContent the invocation payload is not JSON
    ├── EntityTooLarge        a deploy's request or code zip is over Lambda's size limit
    └── PlatformError         something on our side failed (sandbox, cgroup, spawner)
        ├── SandboxError      a sandbox could not be created or controlled
        └── ServiceUnavailable  a dependency is unreachable for now (cluster: etcd), 503

Lower layers raise these; the API layer translates them into AWS Lambda's error shapes,
the CLI into one clear line. Causes are chained with ``raise ... from exc``.
"""

from __future__ import annotations


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


class EntityTooLarge(WarmstartError):
    pass


class PlatformError(WarmstartError):
    pass


class SandboxError(PlatformError):
    pass


class ServiceUnavailable(PlatformError):
    pass
