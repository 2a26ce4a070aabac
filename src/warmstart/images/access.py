"""Deployer access: may whoever deploys a function pull its image?

A node pulls images with its own credentials and keeps what it pulled, so without a check
anyone who may call ``CreateFunction`` could run any image the node can reach or has
cached.  Here a deploy is checked against the registry *with the deployer's own
credentials*: a manifest HEAD of the reference, whether or not the bytes are already on
the node (``RegistryClient.check_pull`` does the HEAD and the token exchange with those
credentials only).

How a deployer presents them -- Lambda's API has no field for it -- is a warmstart
extension, the ``X-Warmstart-Registry-Auth`` header on ``CreateFunction``,
``UpdateFunctionCode`` and ``UpdateFunctionConfiguration``: ``Basic <base64 of
user:password>`` (the bare base64, as in a Docker ``config.json``, also works) or
``Bearer <registry token>``.  :class:`RegistryCredential` is its parsed form.

What happens to them: they stay in memory for the one check and go only to the image's
registry and the token realm that registry names; they are never logged (the record's
``repr`` hides them, no message quotes them), never stored, never forwarded to another
node.  A success is remembered for a short TTL under (registry, repository, a keyed hash
of the credential) so a burst of deploys costs one registry round trip; the hash key is
random per process, so the cache holds nothing that could be matched to a password.
Refusals are not remembered: access granted a second ago works at once.

Policy (``AccessPolicy``): by default a deploy without credentials is not checked -- the
node's own credentials pull it, as a single-tenant node always did.  With
``require_deployer_credentials`` such a deploy is checked anonymously: public images
still deploy, anything else is refused until the deployer says who they are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from warmstart.errors import InvalidParameter
from warmstart.images.errors import ImageAccessDenied
from warmstart.images.reference import Reference

REGISTRY_AUTH_HEADER = "X-Warmstart-Registry-Auth"
"""The request header that carries the deployer's registry credentials."""

MAX_HEADER_CHARS = 8192
_FORMAT = f"{REGISTRY_AUTH_HEADER} must be 'Basic <base64 of user:password>' or 'Bearer <token>'"
# RFC 7235's token68, the characters a bearer token may use.
_TOKEN68 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


class CredentialKind(enum.Enum):
    BASIC = "basic"  # username and password (sent as Basic, or to the token realm)
    BEARER = "bearer"  # a registry token, sent as it is


@dataclass(frozen=True)
class RegistryCredential:
    """A deployer's registry credential.  Its ``repr`` shows the kind only."""

    kind: CredentialKind
    username: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)  # the password, or the bearer token

    @classmethod
    def basic(cls, username: str, password: str) -> RegistryCredential:
        if not username or ":" in username:
            raise InvalidParameter("a registry user name must be non-empty, without ':'")
        return cls(CredentialKind.BASIC, username, password)

    @classmethod
    def bearer(cls, token: str) -> RegistryCredential:
        if not token or not set(token) <= _TOKEN68:
            raise InvalidParameter(
                "a registry token must be non-empty, made of A-Z a-z 0-9 - . _ ~ + / ="
            )
        return cls(CredentialKind.BEARER, "", token)

    @classmethod
    def from_header(cls, value: str) -> RegistryCredential:
        """Parse the header's value; an error names the expected form, never the value."""
        value = value.strip()
        if not value:
            raise InvalidParameter(f"{_FORMAT} (it is empty)")
        if len(value) > MAX_HEADER_CHARS:
            raise InvalidParameter(f"{_FORMAT} (it is longer than {MAX_HEADER_CHARS} characters)")
        scheme, sep, rest = value.partition(" ")
        if sep and scheme.lower() not in ("basic", "bearer"):
            raise InvalidParameter(f"{_FORMAT} (unknown scheme)")
        try:
            if sep and scheme.lower() == "bearer":
                return cls.bearer(rest.strip())
            encoded = rest.strip() if sep else value  # bare: a config.json "auth" value
            try:
                decoded = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, ValueError, UnicodeDecodeError):
                raise InvalidParameter("the Basic value is not base64 of UTF-8") from None
            username, colon, password = decoded.partition(":")
            if not colon:
                raise InvalidParameter("no ':' between user and password")
            return cls.basic(username, password)
        except InvalidParameter as exc:
            raise InvalidParameter(f"{_FORMAT} ({exc})") from None

    def authorization(self) -> str:
        """The ``Authorization`` header value this credential sends."""
        if self.kind is CredentialKind.BEARER:
            return f"Bearer {self.secret}"
        pair = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def __repr__(self) -> str:
        return f"RegistryCredential({self.kind.value}, <hidden>)"

    __str__ = __repr__


@dataclass(frozen=True)
class AccessPolicy:
    """The node's rules for deployer access (``warmstart serve`` flags)."""

    require_deployer_credentials: bool = False  # else: none given → the node's own pull
    ttl_s: float = 60.0  # how long a successful check is remembered (0: never)


@dataclass(frozen=True)
class AccessStatistics:
    checks: int  # registry checks made
    cache_hits: int  # deploys answered from a remembered success
    denied: int  # deploys refused
    remembered: int  # successes remembered now (some may have expired)


Probe = Callable[[Reference, RegistryCredential | None], None]
"""Check at the registry that a credential (None: anonymous) may pull a reference; raises
ImageAccessDenied, ImageNotFound or RegistryError (``RegistryClient.check_pull``)."""

_Key = tuple[str, str, str]  # registry, repository, credential fingerprint


class AccessChecker:
    """Checks deploys against the registry with the deployer's credentials; remembers
    successes for ``policy.ttl_s``.  ``probe`` is the one seam to the registry (a blocking
    call, run on a thread); ``clock`` is ``time.monotonic`` but for tests."""

    def __init__(
        self,
        probe: Probe,
        policy: AccessPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_remembered: int = 4096,
    ) -> None:
        self.policy = policy or AccessPolicy()
        self._probe = probe
        self._clock = clock
        self._max = max_remembered
        self._hash_key = secrets.token_bytes(32)
        self._granted: OrderedDict[_Key, float] = OrderedDict()  # key -> expiry (clock)
        self._pending: dict[_Key, asyncio.Lock] = {}
        self._checks = self._hits = self._denied = 0

    def fingerprint(self, credential: RegistryCredential | None) -> str:
        """What the cache keeps of a credential: a keyed hash (never the credential)."""
        if credential is None:
            return "anonymous"
        material = "\0".join((credential.kind.value, credential.username, credential.secret))
        return hmac.new(self._hash_key, material.encode(), hashlib.sha256).hexdigest()

    async def check(self, ref: Reference, credential: RegistryCredential | None) -> None:
        """Return if the deployer may use ``ref``; raise :class:`ImageAccessDenied` if not
        (``ImageNotFound``, ``RegistryError`` pass through)."""
        if credential is None and not self.policy.require_deployer_credentials:
            return  # the node's own credentials pull it: the single-tenant default
        key = (ref.registry, ref.repository, self.fingerprint(credential))
        if self._remembered(key):
            self._hits += 1
            return
        lock = self._pending.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # one check per key at a time: a burst waits for the first
                if self._remembered(key):
                    self._hits += 1
                    return
                self._checks += 1
                try:
                    await asyncio.to_thread(self._probe, ref, credential)
                except ImageAccessDenied as exc:
                    self._denied += 1
                    raise ImageAccessDenied(_denial(ref, credential, str(exc))) from exc
                self._remember(key)
        finally:
            if not lock.locked() and self._pending.get(key) is lock:
                del self._pending[key]

    def _remembered(self, key: _Key) -> bool:
        expiry = self._granted.get(key)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        del self._granted[key]
        return False

    def _remember(self, key: _Key) -> None:
        if self.policy.ttl_s <= 0:
            return
        now = self._clock()
        self._granted[key] = now + self.policy.ttl_s
        self._granted.move_to_end(key)
        if len(self._granted) > self._max:
            for stale in [k for k, exp in self._granted.items() if exp <= now]:
                del self._granted[stale]
            while len(self._granted) > self._max:
                self._granted.popitem(last=False)  # the oldest

    def statistics(self) -> AccessStatistics:
        return AccessStatistics(self._checks, self._hits, self._denied, len(self._granted))


def _denial(ref: Reference, credential: RegistryCredential | None, detail: str) -> str:
    if credential is None:
        return (
            f"Access denied to image {ref}: it is not public, and this node requires the "
            f"deployer's own registry credentials for such images. Send them in the "
            f"{REGISTRY_AUTH_HEADER} header (warmstart deploy --registry-user ... "
            f"--registry-password-stdin). ({detail})"
        )
    return (
        f"Access denied to image {ref}: the deployer has no access to it with the "
        f"registry credentials given. A node only runs an image for a deployer who may "
        f"pull it from its registry, even when the image is cached there. ({detail})"
    )
