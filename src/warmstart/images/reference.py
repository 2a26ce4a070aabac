"""Image references (``host:port/repo/name:tag@sha256:…``) and digests.

A reference names an image the way users type it; we normalise it once, here, so the rest of
the package compares references by value: Docker Hub short names gain their ``library/``
prefix and the API host, a reference without tag or digest means ``latest``. Digests are
checked strictly because they end up in URLs and file names.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

from warmstart.images.errors import InvalidReference

DOCKER_HUB = "registry-1.docker.io"
"""The API host of Docker Hub; ``docker.io`` and ``index.docker.io`` are aliases of it."""

_HUB_ALIASES = {"docker.io", "index.docker.io", DOCKER_HUB}

# One path component of a repository name (distribution's grammar): lowercase alphanumerics
# separated by ".", "_", "__" or runs of "-".
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_HOST_RE = re.compile(
    r"(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]{1,5})?"
)
_DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256/sha512 digest, else raise.

    Digests name files in the store and paths in registry URLs, so anything looser than
    ``algorithm:lowercase-hex`` of the right length is refused outright.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"not a valid digest: {digest!r}")
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a checked digest (what the store uses as a file name)."""
    return check_digest(digest).split(":", 1)[1]


def new_hasher(digest: str) -> hashlib._Hash:
    """A hash object for the algorithm ``digest`` names."""
    return hashlib.new(check_digest(digest).split(":", 1)[0])


def _is_host(component: str) -> bool:
    # distribution's rule: the first component is a host when it has a "." or ":" in it,
    # or is exactly "localhost"; otherwise it is part of a Docker Hub repository path.
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    ``registry`` is the host (and port) the distribution API is served from; Docker Hub's
    aliases all become ``registry-1.docker.io`` and are shown again as ``docker.io``.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse ``[host[:port]/]path[:tag][@digest]``; no tag and no digest means ``latest``."""
        if not isinstance(text, str) or not text or text != text.strip() or len(text) > 4096:
            raise InvalidReference(f"not an image reference: {text!r}")
        rest = text
        digest: str | None = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            try:
                check_digest(digest)
            except InvalidReference:
                raise InvalidReference(
                    f"{text!r}: digest must be sha256:<64 hex> or sha512:<128 hex>"
                ) from None
        registry = DOCKER_HUB
        first, sep, remainder = rest.partition("/")
        if sep and _is_host(first):
            if not _HOST_RE.fullmatch(first):
                raise InvalidReference(f"{text!r}: invalid registry host {first!r}")
            registry = DOCKER_HUB if first.lower() in _HUB_ALIASES else first
            rest = remainder
        tag: str | None = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG_RE.fullmatch(tag):
                raise InvalidReference(f"{text!r}: invalid tag {tag!r}")
        repository = rest
        if not _REPOSITORY_RE.fullmatch(repository) or len(repository) > 255:
            raise InvalidReference(
                f"{text!r}: invalid repository {repository!r} "
                "(lowercase letters, digits and . _ - separated by /)"
            )
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=check_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return replace(self, tag=tag)

    @property
    def name(self) -> str:
        """``registry/repository`` as users write it (``docker.io/library/python``)."""
        host = "docker.io" if self.registry == DOCKER_HUB else self.registry
        return f"{host}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the API: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
