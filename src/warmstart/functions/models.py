"""Records describing a deployed function (frozen: a change makes a new record)."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import MISSING as dataclass_missing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from warmstart.errors import InvalidParameter
from warmstart.kinds import QoSClass

# Both are matched against the whole string (fullmatch): "$" would let a trailing newline in.
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
HANDLER_RE = re.compile(r"[^\s]+\.[^\s.]+")
RUNTIMES = ("python3.9", "python3.10", "python3.11", "python3.12", "python3.13", "python3.14")
# The variables Lambda sets itself and refuses in a function's configuration.
RESERVED_ENV = frozenset(
    {
        "_HANDLER",
        "_X_AMZN_TRACE_ID",
        "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_DEFAULT_REGION",
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_LAMBDA_RUNTIME_API",
        "AWS_REGION",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "LAMBDA_RUNTIME_DIR",
        "LAMBDA_TASK_ROOT",
        "TZ",
    }
)
ENV_KEY_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_]+")
# Lambda's quota: the variables' total size, measured as the JSON of the map.
MAX_ENV_BYTES = 4096
# EphemeralStorage.Size: /tmp, in MB.
MIN_EPHEMERAL, MAX_EPHEMERAL, DEFAULT_EPHEMERAL = 512, 10240, 512
_ENV_ERROR = "Lambda was unable to configure your environment variables because "


def check_environment(env: dict[str, str]) -> None:
    """Lambda's rules for Environment.Variables; ``InvalidParameter`` says which failed."""
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidParameter(
                _ENV_ERROR + "the environment variables must be string keys with string values"
            )
        if not ENV_KEY_RE.fullmatch(key):
            raise InvalidParameter(
                _ENV_ERROR + f"the key {key[:64]!r} failed to satisfy the constraint: Member "
                "must satisfy regular expression pattern: [a-zA-Z]([a-zA-Z0-9_])+"
            )
    bad = sorted(RESERVED_ENV.intersection(env))
    if bad:
        raise InvalidParameter(
            _ENV_ERROR + "the environment variables you have provided contain reserved keys "
            "that are currently not supported for modification. Reserved keys used in this "
            f"request: {', '.join(bad)}"
        )
    size = len(json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_ENV_BYTES:
        raise InvalidParameter(
            _ENV_ERROR + f"the environment variables you have provided exceeded the 4KB limit "
            f"({size} bytes measured over {len(env)} variables; at most {MAX_ENV_BYTES})"
        )


MIN_MEMORY, MAX_MEMORY = 128, 10240


def now_iso() -> str:
    """Lambda's LastModified format, in UTC with milliseconds."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}+0000"

MAX_TIMEOUT = 900
NETWORK_TAG = "warmstart:network"
QOS_TAG = "warmstart:qos"


@dataclass(frozen=True)
class FunctionConfig:
    """What the user controls; validated on construction."""

    handler: str
    runtime: str = "python3.11"
    memory_mb: int = 128
    timeout_s: int = 3
    environment: dict[str, str] = field(default_factory=dict)
    description: str = ""
    role: str = "arn:aws:iam::000000000000:role/warmstart"
    network: str = "none"  # "none": loopback only; "host": the host's network
    tags: dict[str, str] = field(default_factory=dict)
    ephemeral_mb: int = DEFAULT_EPHEMERAL  # EphemeralStorage.Size: /tmp's own limit

    def __post_init__(self) -> None:
        if (
            not isinstance(self.handler, str)
            or not HANDLER_RE.fullmatch(self.handler)
            or len(self.handler) > 128
        ):
            raise InvalidParameter(
                f"Handler '{self.handler}' must look like 'module.function' (at most 128 characters)"
            )
        if self.runtime not in RUNTIMES:
            raise InvalidParameter(
                f"Value {self.runtime} at 'runtime' failed to satisfy constraint: "
                f"Member must satisfy enum value set: {list(RUNTIMES)}"
            )
        if not MIN_MEMORY <= self.memory_mb <= MAX_MEMORY:
            raise InvalidParameter(
                f"MemorySize {self.memory_mb} must be between {MIN_MEMORY} and {MAX_MEMORY} MB"
            )
        if not 1 <= self.timeout_s <= MAX_TIMEOUT:
            raise InvalidParameter(
                f"Timeout {self.timeout_s} must be between 1 and {MAX_TIMEOUT} seconds"
            )
        if not isinstance(self.environment, dict):
            raise InvalidParameter("Environment.Variables must be a map of strings")
        check_environment(self.environment)
        if (
            not isinstance(self.ephemeral_mb, int)
            or not MIN_EPHEMERAL <= self.ephemeral_mb <= MAX_EPHEMERAL
        ):
            raise InvalidParameter(
                f"1 validation error detected: Value {self.ephemeral_mb} at "
                "'ephemeralStorage.size' failed to satisfy constraint: Member must have value "
                f"between {MIN_EPHEMERAL} and {MAX_EPHEMERAL} (MB)"
            )
        if QOS_TAG in self.tags:
            try:
                QoSClass.parse(self.tags[QOS_TAG])
            except ValueError:
                raise InvalidParameter(f"{QOS_TAG} must be 'ls' or 'be'") from None
        if self.network not in ("none", "host"):
            raise InvalidParameter(f"{NETWORK_TAG} must be 'none' or 'host', not {self.network!r}")

    def updated(self, **changes: Any) -> FunctionConfig:
        return replace(self, **changes)

    @classmethod
    def stored(cls, raw: dict[str, Any]) -> FunctionConfig:
        """A configuration read back from the store: validated when it was written, so
        not again (a rule added since must not make a node lose its functions).  Fields
        added since take their defaults."""
        config = cls.__new__(cls)
        for f in fields(cls):
            if f.name in raw:
                value = raw[f.name]
            elif f.default_factory is not dataclass_missing:
                value = f.default_factory()
            else:
                value = f.default
            object.__setattr__(config, f.name, value)
        return config

    @property
    def qos_class(self) -> QoSClass | None:
        """The class the ``warmstart:qos`` tag pins every invocation to, if any."""
        tag = self.tags.get(QOS_TAG)
        return None if tag is None else QoSClass.parse(tag)


@dataclass(frozen=True)
class ImageSource:
    """A function packaged as a container image: where it is and how to run it.

    ``command`` / ``entrypoint`` / ``working_directory`` are the image config's values
    overridden by the function's ImageConfig; ``env`` is the image's environment.  The
    handler is ``command[0]`` (as with Lambda's Python base images).
    """

    uri: str  # as given by the user: "registry/repo:tag" or "...@sha256:..."
    digest: str  # the manifest digest the function runs ("sha256:...")
    size: int  # compressed bytes of the image's layers
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    working_directory: str = "/var/task"
    env: tuple[str, ...] = ()  # "KEY=value" from the image config
    overrides: dict[str, Any] = field(default_factory=dict)  # the ImageConfig as given
    lazy: bool = False  # layers are eStargz: started from a lazy mount

    @property
    def resolved_uri(self) -> str:
        base = self.uri.split("@", 1)[0]
        return f"{base}@{self.digest}"

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            if key:
                out[key] = value
        return out


@dataclass(frozen=True)
class FunctionRecord:
    """A function as deployed: its config, its code and a revision that changes on update."""

    name: str
    config: FunctionConfig
    code_sha256: str  # hex digest of the zip
    code_size: int
    revision: int
    revision_id: str
    last_modified: str
    reserved_concurrency: int | None = None
    packages: tuple[str, ...] = ()  # resolved requirements, "name==version"
    package_type: str = "Zip"  # "Zip" (code_sha256 names the zip) or "Image"
    image: ImageSource | None = None  # for package_type "Image"

    @classmethod
    def new(
        cls,
        name: str,
        config: FunctionConfig,
        code_sha256: str,
        code_size: int,
        *,
        packages: tuple[str, ...] = (),
        image: ImageSource | None = None,
    ) -> FunctionRecord:
        """Revision 1 of a new function (a zip's digest and size, or an image's)."""
        cls.check_name(name)
        return cls(
            name,
            config,
            code_sha256,
            code_size,
            1,
            str(uuid.uuid4()),
            now_iso(),
            packages=packages,
            package_type="Zip" if image is None else "Image",
            image=image,
        )

    def next_revision(self, **changes: Any) -> FunctionRecord:
        """The next revision of this function, with ``changes``."""
        return replace(
            self,
            revision=self.revision + 1,
            revision_id=str(uuid.uuid4()),
            last_modified=now_iso(),
            **changes,
        )

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidParameter(
                f"1 validation error detected: Value '{name}' at 'functionName' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+ (1-64 chars)"
            )
        return name
