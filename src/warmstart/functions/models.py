"""Records describing a deployed function (frozen: a change makes a new record)."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import MISSING as dataclass_missing
from dataclasses import asdict as dataclasses_asdict
from dataclasses import dataclass, field, fields, replace
from typing import Any

from warmstart.errors import InvalidParameter
from warmstart.kinds import QoSClass

# Both are matched against the whole string (fullmatch): "$" would let a trailing newline in.
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
LATEST = "$LATEST"  # the unpublished, mutable version of every function
# Lambda's patterns: a published version is a number; an alias is not all digits.
VERSION_RE = re.compile(r"[0-9]{1,18}")
ALIAS_RE = re.compile(r"(?![0-9]+$)[a-zA-Z0-9_-]{1,128}")
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
    # "$LATEST" for the function itself; "1", "2", ... for a published version: an
    # immutable snapshot of $LATEST as it was when published.
    version: str = LATEST

    @property
    def published(self) -> bool:
        return self.version != LATEST

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

    def publish(self, number: int, description: str | None) -> FunctionRecord:
        """Version ``number`` of this $LATEST record: the same code, packages, image and
        configuration (its description replaced by ``description``, if given), with a
        revision id of its own."""
        config = self.config if description is None else self.config.updated(description=description)
        return replace(
            self,
            config=config,
            version=str(number),
            revision_id=str(uuid.uuid4()),
            last_modified=now_iso(),
            reserved_concurrency=None,  # the function's, never a version's
        )

    def same_deployment(self, other: FunctionRecord) -> bool:
        """Whether ``other`` runs the same code and configuration (what PublishVersion
        compares to decide that nothing changed since the last version)."""
        return (
            self.code_sha256 == other.code_sha256
            and self.packages == other.packages
            and self.image == other.image
            and self.package_type == other.package_type
            and replace(self.config, description="") == replace(other.config, description="")
        )

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidParameter(
                f"1 validation error detected: Value '{name}' at 'functionName' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+ (1-64 chars)"
            )
        return name


def check_alias_name(name: object) -> str:
    if not isinstance(name, str) or not ALIAS_RE.fullmatch(name):
        raise InvalidParameter(
            f"1 validation error detected: Value '{str(name)[:140]}' at 'name' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: "
            "(?!^[0-9]+$)([a-zA-Z0-9-_]+) (1-128 chars)"
        )
    return name


@dataclass(frozen=True)
class AliasRecord:
    """A name for a version of a function, optionally splitting invocations with a second
    version: ``weights`` is Lambda's ``RoutingConfig.AdditionalVersionWeights`` (at most
    one version, the share of invocations it gets)."""

    function: str
    name: str
    function_version: str  # "$LATEST" or a published version's number
    description: str = ""
    weights: tuple[tuple[str, float], ...] = ()
    revision_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        check_alias_name(self.name)
        if self.function_version != LATEST and not VERSION_RE.fullmatch(self.function_version):
            raise InvalidParameter(
                f"1 validation error detected: Value '{self.function_version[:64]}' at "
                "'functionVersion' failed to satisfy constraint: Member must satisfy regular "
                "expression pattern: (\\$LATEST|[0-9]+)"
            )
        if len(self.weights) > 1:
            raise InvalidParameter(
                "Number of items in AdditionalVersionWeights cannot be greater than 1"
            )
        for version, weight in self.weights:
            if not VERSION_RE.fullmatch(version):
                raise InvalidParameter(
                    f"Invalid AdditionalVersionWeights version '{version[:64]}': an additional "
                    "version must be a published version's number (not $LATEST)"
                )
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not 0.0 <= weight <= 1.0
            ):
                raise InvalidParameter(
                    f"Invalid weight {weight!r} for version {version}: "
                    "a weight must be a number between 0.0 and 1.0"
                )
            if version == self.function_version:
                raise InvalidParameter(
                    f"Version {version} is the alias's FunctionVersion: an additional "
                    "version must be another one"
                )
            if self.function_version == LATEST:
                raise InvalidParameter(
                    "$LATEST is not supported for an alias pointing to more than 1 version"
                )

    def versions(self) -> tuple[str, ...]:
        """Every version the alias may run."""
        return (self.function_version, *(v for v, _ in self.weights))

    def pick(self, draw: float) -> str:
        """The version an invocation runs, for ``draw`` uniform in [0, 1)."""
        for version, weight in self.weights:
            if draw < weight:
                return version
        return self.function_version

    def to_json(self) -> str:
        return json.dumps(dataclasses_asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> AliasRecord:
        """The alias ``to_json`` wrote; ``ValueError`` for anything else."""
        try:
            raw: dict[str, Any] = json.loads(text)
            raw["weights"] = tuple((str(v), float(w)) for v, w in raw.get("weights", ()))
            return cls(**raw)
        except (TypeError, KeyError, AttributeError, ValueError, InvalidParameter) as exc:
            raise ValueError(f"not an alias record: {type(exc).__name__}: {exc}") from exc
