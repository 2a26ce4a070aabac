"""A synchronous client for the OCI distribution API (any Docker/OCI registry).

Why synchronous: the store and the lazy filesystem call it from worker threads (the worker
uses ``asyncio.to_thread``, the FUSE daemon its own threads), and one ``httpx.Client`` shared
by those threads keeps one connection pool per registry.

What it guarantees to callers:

* every manifest and blob handed out has been hashed and compared with the digest that
  names it (:class:`DigestMismatch` otherwise), a streamed blob raises *before* its last
  chunk is considered delivered;
* authentication is transparent: Basic and Bearer challenges from ``WWW-Authenticate`` are
  answered with credentials given explicitly or found as a Docker client finds them
  (``config.json`` and the credential helpers it names, ``images/credentials.py``);
* a deployer's access is checked with the deployer's credentials alone
  (:meth:`RegistryClient.check_pull`), which are kept for that one request;
* an ``Authorization`` header never follows a redirect to another host (blob downloads are
  often redirected to a CDN or object store that must not see registry credentials);
* transient failures (connection errors, timeouts, 429 and 5xx) are retried with
  exponential backoff, then reported as one :class:`RegistryError` that names the registry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from warmstart.images.access import CredentialKind, RegistryCredential
from warmstart.images.credentials import DockerCredentials
from warmstart.images.errors import (
    AuthError,
    DigestMismatch,
    ImageAccessDenied,
    ImageError,
    ImageNotFound,
    RegistryError,
)
from warmstart.images.reference import (
    Reference,
    check_digest,
    new_hasher,
)

log = logging.getLogger("warmstart.images.registry")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

MAX_MANIFEST_BYTES = 4 << 20
"""Manifests and indexes larger than this are refused (the reference registry's limit)."""
MAX_CONFIG_BYTES = 16 << 20
_CHUNK = 1 << 20
_MAX_REDIRECTS = 8
_MAX_RANGES_PER_REQUEST = 64
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about one blob."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what}: descriptor is not an object")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(digest, str):
            raise ImageError(f"{what}: descriptor has no digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: descriptor {digest} has no valid size")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ImageError(f"{what}: annotations of {digest} are not an object")
        return cls(
            media_type=str(obj.get("mediaType") or ""),
            digest=check_digest(digest),
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class RawManifest:
    """Manifest or index bytes exactly as served, with the digest they were checked against."""

    raw: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        return _parse_json(self.raw, f"manifest {self.digest}")


@dataclass(frozen=True)
class ImageManifest:
    """One platform's image manifest, its parsed config, and its layers (bottom → top)."""

    ref: Reference
    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    config_json: dict[str, Any]
    layers: list[Descriptor]
    config_raw: bytes = field(default=b"", repr=False)  # the config blob as served (verified)

    @property
    def diff_ids(self) -> list[str]:
        """The uncompressed digests of the layers, from the config (``rootfs.diff_ids``)."""
        rootfs = self.config_json.get("rootfs")
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(ids, list) or len(ids) != len(self.layers):
            raise ImageError(
                f"{self.ref}: config lists {len(ids) if isinstance(ids, list) else 'no'} "
                f"diff_ids for {len(self.layers)} layers"
            )
        return [check_digest(d) for d in ids]


def _parse_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object")
    return obj


def _image_parts(ref: Reference, raw: bytes) -> tuple[Descriptor, list[Descriptor]]:
    body = _parse_json(raw, f"manifest of {ref}")
    if body.get("schemaVersion") == 1:
        raise ImageError(f"{ref}: Docker schema 1 manifests are not supported")
    if "layers" not in body or "config" not in body:
        raise ImageError(f"{ref}: not an image manifest (no config and layers)")
    layers_json = body["layers"]
    if not isinstance(layers_json, list):
        raise ImageError(f"{ref}: manifest layers is not a list")
    config = Descriptor.from_json(body["config"], f"{ref} config")
    return config, [Descriptor.from_json(d, f"{ref} layer") for d in layers_json]


def manifest_from_raw(ref: Reference, manifest: RawManifest, config_raw: bytes) -> ImageManifest:
    """An :class:`ImageManifest` from bytes already verified (fetched, or kept in a store)."""
    config, layers = _image_parts(ref, manifest.raw)
    return ImageManifest(
        ref=ref.with_digest(manifest.digest),
        digest=manifest.digest,
        media_type=manifest.media_type or OCI_MANIFEST,
        raw=manifest.raw,
        config=config,
        config_json=_parse_json(config_raw, f"{ref} config"),
        layers=layers,
        config_raw=config_raw,
    )


# -- credentials ---------------------------------------------------------------------------
_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ("bearer", {"realm": …, "service": …})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace(
            '\\"', '"'
        )
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


@dataclass
class _HostAuth:
    """What we learnt about one registry host's authentication."""

    scheme: str = ""  # "", "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # scope → (token, exp)


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _range_header(ranges: list[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _parse_content_range(value: str | None) -> tuple[int, int] | None:
    """``bytes 10-19/100`` → (10, 20), half-open."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)) + 1


def _parse_multipart(body: bytes, boundary: str) -> list[tuple[int, bytes]]:
    """The parts of a ``multipart/byteranges`` body as (start offset, bytes).

    Each part's length comes from its ``Content-Range``, so binary data that happens to
    contain the boundary string cannot cut a part short.
    """
    parts: list[tuple[int, bytes]] = []
    delim = b"--" + boundary.encode()
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ValueError("multipart part without header end")
        headers: dict[str, str] = {}
        for line in body[pos:head_end].split(b"\r\n"):
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        span = _parse_content_range(headers.get("content-range"))
        if span is None:
            raise ValueError("multipart part without a valid Content-Range")
        start = head_end + 4
        data = body[start : start + (span[1] - span[0])]
        if len(data) != span[1] - span[0]:
            raise ValueError("multipart part shorter than its Content-Range")
        parts.append((span[0], data))
        pos = body.find(delim, start + len(data))
    return parts


class RegistryClient:
    """Talks to OCI/Docker registries: resolve, download, range-read and push.

    Thread-safe: one instance is shared by the worker's threads. ``insecure`` hosts (and
    always loopback) are spoken to over plain HTTP, every other host over HTTPS.
    """

    def __init__(
        self,
        *,
        docker_config: Path | None = None,
        credentials: dict[str, tuple[str, str]] | None = None,
        insecure: Iterable[str] = (),
        retries: int = 4,
        timeout: float = 30.0,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        verify_tls: bool | str = True,
    ) -> None:
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._insecure = {h.strip().lower() for h in insecure}
        self.logins = DockerCredentials(docker_config, overrides=credentials)
        self._timeout = timeout
        self._verify_tls = verify_tls
        self._clients: dict[str, httpx.Client] = {}
        self._auth: dict[str, _HostAuth] = {}
        self._lock = threading.Lock()
        self._token_locks: dict[tuple[str, str], threading.Lock] = {}
        self.bytes_downloaded = 0
        self.requests = 0

    def _client(self, url: str) -> httpx.Client:
        """One connection pool per scheme, made on first use: loading the CA bundle for
        HTTPS costs ~0.1 s, which a node pulling only from a loopback registry never pays."""
        scheme = "https" if url.startswith("https:") else "http"
        with self._lock:
            client = self._clients.get(scheme)
            if client is None:
                client = self._clients[scheme] = httpx.Client(
                    timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                    follow_redirects=False,
                    verify=self._verify_tls if scheme == "https" else False,
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                    headers={"User-Agent": "warmstart/0.1"},
                )
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- URLs and auth ---------------------------------------------------------------------
    def _scheme(self, host: str) -> str:
        bare = host.lower()
        if bare.startswith("["):
            bare_host = bare.split("]", 1)[0] + "]"
        else:
            bare_host = bare.rsplit(":", 1)[0] if ":" in bare else bare
        if bare in self._insecure or bare_host in self._insecure or bare_host in _LOCAL_HOSTS:
            return "http"
        return "https"

    def _url(self, ref: Reference, path: str) -> str:
        return f"{self._scheme(ref.registry)}://{ref.registry}/v2/{ref.repository}/{path}"

    def _host_auth(self, host: str) -> _HostAuth:
        with self._lock:
            return self._auth.setdefault(host, _HostAuth())

    def _auth_header(self, host: str, scope: str) -> str | None:
        """The Authorization header to send up front, from what the host asked for before."""
        state = self._host_auth(host)
        if state.scheme == "basic":
            return self._basic(host)
        if state.scheme == "bearer":
            with self._lock:
                cached = state.tokens.get(scope)
            if cached and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
        return None

    def _basic(self, host: str) -> str | None:
        """Basic credentials for ``host``: its login, unless that is an identity token
        (which only a token server takes)."""
        login = self.logins.get(host)
        if login is None or login.identity_token:
            return None
        return "Basic " + base64.b64encode(f"{login.user}:{login.secret}".encode()).decode()

    def _answer_challenge(self, host: str, scope: str, header: str) -> str:
        """Turn a 401's ``WWW-Authenticate`` into an Authorization header, or raise."""
        scheme, params = parse_challenge(header)
        state = self._host_auth(host)
        if scheme == "basic":
            with self._lock:
                state.scheme = "basic"
            basic = self._basic(host)
            if basic is None:
                raise AuthError(f"registry {host} requires a username and password; none known")
            return basic
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {host}: unsupported authentication challenge {header!r}")
        with self._lock:
            state.scheme = "bearer"
            state.params = params
        return f"Bearer {self._token(host, scope, params)}"

    def _token(self, host: str, scope: str, params: dict[str, str]) -> str:
        """A bearer token for ``scope`` from the realm, cached until it expires."""
        key = (host, scope)
        with self._lock:
            lock = self._token_locks.setdefault(key, threading.Lock())
        with lock:
            state = self._host_auth(host)
            with self._lock:
                cached = state.tokens.get(scope)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            login = self.logins.get(host)
            try:
                if login is not None and login.identity_token:
                    token, expires = self._refresh_token(host, scope, params, login.secret)
                else:
                    basic = self._basic(host)
                    token, expires = self._fetch_token(
                        host,
                        scope,
                        params,
                        basic,
                        whose="our credentials" if basic else "anonymous access",
                        refused=AuthError,
                    )
            except AuthError:
                self.logins.forget(host)  # a helper is asked again next time
                raise
            with self._lock:
                state.tokens[scope] = (token, time.monotonic() + max(expires - 5, 1))
            return token

    def _refresh_token(
        self, host: str, scope: str, params: dict[str, str], refresh: str
    ) -> tuple[str, float]:
        """A token for ``scope`` in exchange for an identity token (OAuth2's refresh-token
        grant, a form POSTed to the realm, as Docker clients do)."""
        realm = params["realm"]
        realm_url = urlsplit(realm)
        if realm_url.scheme != "https" and self._scheme(realm_url.netloc) != "http":
            raise RegistryError(
                f"registry {host}: its token realm {realm_url.netloc} is plain HTTP; "
                "an identity token is not sent there (unless it is an insecure registry)"
            )
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": "warmstart",
            "scope": scope,
        }
        if params.get("service"):
            form["service"] = params["service"]
        body = urlencode(form).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        resp = self._with_retries(
            f"token for {host}", lambda: self._send("POST", realm, headers, lambda: body)
        )
        return self._token_answer(host, scope, resp, "our identity token")

    def _fetch_token(
        self,
        host: str,
        scope: str,
        params: dict[str, str],
        basic: str | None,
        *,
        whose: str,
        refused: type[ImageError],
        secure_only: bool = False,
    ) -> tuple[str, float]:
        """A token for ``scope`` from the realm in ``params`` and its lifetime in seconds,
        asked for with ``basic`` (an Authorization value; None: anonymously).  A refusal
        raises ``refused``.  ``secure_only``: credentials go to a plain-HTTP realm only if
        this client reaches that host over plain HTTP anyway (loopback, --insecure)."""
        query: dict[str, str] = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {}
        if basic:
            realm_url = urlsplit(realm)
            if (
                secure_only
                and realm_url.scheme != "https"
                and self._scheme(realm_url.netloc) != "http"
            ):
                raise RegistryError(
                    f"registry {host}: its token realm {realm_url.netloc} is plain HTTP; "
                    "credentials are not sent there (unless it is an insecure registry)"
                )
            headers["Authorization"] = basic
        resp = self._with_retries(f"token for {host}", lambda: self._send("GET", url, headers))
        return self._token_answer(host, scope, resp, whose, refused)

    @staticmethod
    def _token_answer(
        host: str,
        scope: str,
        resp: httpx.Response,
        whose: str,
        refused: type[ImageError] = AuthError,
    ) -> tuple[str, float]:
        """The token and its lifetime from a token server's answer, or the error."""
        try:
            resp.read()
        finally:
            resp.close()
        if resp.status_code in (400, 401, 403):
            raise refused(
                f"registry {host}: token server refused {whose} "
                f"for {scope} (HTTP {resp.status_code})"
            )
        if resp.status_code != 200:
            raise RegistryError(f"registry {host}: token server answered {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            expires = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise AuthError(f"registry {host}: token server sent no token") from exc
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {host}: token server sent no token")
        return token, expires

    # -- HTTP with redirects, auth and retries ---------------------------------------------
    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        content: Callable[[], Any] | None = None,
    ) -> httpx.Response:
        """One request, following redirects by hand so credentials stay with their host."""
        origin = urlsplit(url).netloc.lower()
        headers = dict(headers)
        for _ in range(_MAX_REDIRECTS + 1):
            http = self._client(url)
            request = http.build_request(
                method, url, headers=headers, content=content() if content else None
            )
            resp = http.send(request, stream=True)
            with self._lock:
                self.requests += 1
            if resp.status_code not in _REDIRECT_STATUS or "location" not in resp.headers:
                return resp
            resp.close()
            url = urljoin(url, resp.headers["location"])
            if urlsplit(url).netloc.lower() != origin:
                headers.pop("Authorization", None)
            if resp.status_code == 303:
                method, content = "GET", None
                headers.pop("Content-Length", None)
        raise RegistryError(f"too many redirects from {origin}")

    def _with_retries(self, what: str, attempt: Callable[[], httpx.Response]) -> httpx.Response:
        """Run ``attempt`` until it returns a response that is not worth retrying."""
        last = ""
        for n in range(self.retries + 1):
            retry_after: float | None = None
            try:
                resp = attempt()
                if resp.status_code not in _RETRY_STATUS:
                    return resp
                last = f"HTTP {resp.status_code}"
                with contextlib.suppress(ValueError):
                    retry_after = float(resp.headers.get("retry-after", ""))
                resp.close()
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except _Retry as exc:
                last, retry_after = exc.reason, exc.retry_after
            if n == self.retries:
                break
            delay = min(self.max_backoff, self.backoff * (2**n)) * (0.75 + random.random() / 2)
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.max_backoff)
            log.warning(
                "%s failed (%s); retry %d/%d in %.2f s", what, last, n + 1, self.retries, delay
            )
            time.sleep(delay)
        raise RegistryError(f"{what} failed after {self.retries + 1} attempts: {last}")

    def _request(
        self,
        method: str,
        ref: Reference,
        path_or_url: str,
        *,
        headers: dict[str, str] | None = None,
        push: bool = False,
        content: Callable[[], Any] | None = None,
        ok: Iterable[int] = (200,),
    ) -> httpx.Response:
        """A request to ``ref``'s registry, authenticated, retried, status-checked.

        The response is open (streamed): the caller reads and closes it.
        """
        host = ref.registry
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        url = path_or_url if "://" in path_or_url else self._url(ref, path_or_url)
        what = f"{method} {url}"
        ok = frozenset(ok)

        def attempt() -> httpx.Response:
            hdrs = dict(headers or {})
            auth = self._auth_header(host, scope)
            if auth is None and self._host_auth(host).scheme == "bearer":
                auth = f"Bearer {self._token(host, scope, self._host_auth(host).params)}"
            if auth:
                hdrs["Authorization"] = auth
            resp = self._send(method, url, hdrs, content)
            if resp.status_code == 401:
                challenge = resp.headers.get("www-authenticate", "")
                resp.close()
                if not challenge:
                    raise AuthError(f"registry {host} refused {what} (401, no challenge)")
                state = self._host_auth(host)
                if auth and auth.startswith("Bearer "):
                    with self._lock:
                        state.tokens.pop(scope, None)
                hdrs["Authorization"] = self._answer_challenge(host, scope, challenge)
                resp = self._send(method, url, hdrs, content)
                if resp.status_code == 401:
                    resp.close()
                    raise AuthError(f"registry {host} refused our credentials for {what}")
            return resp

        resp = self._with_retries(what, attempt)
        if resp.status_code in ok:
            return resp
        try:
            body = resp.read()[:4096]
        except httpx.HTTPError:
            body = b""
        finally:
            resp.close()
        detail = _error_detail(body)
        if resp.status_code == 404:
            raise ImageNotFound(f"{what}: not found{detail}")
        if resp.status_code == 403:
            raise AuthError(f"registry {host} denied {what}{detail}")
        raise RegistryError(f"{what}: HTTP {resp.status_code}{detail}")

    # -- manifests -------------------------------------------------------------------------
    def fetch_manifest(self, ref: Reference, reference: str | None = None) -> RawManifest:
        """The manifest or index ``reference`` (tag or digest; default: the ref's), verified.

        By digest: the bytes must hash to it. By tag: they must hash to the registry's
        ``Docker-Content-Digest`` header when it sends one.
        """
        reference = reference or ref.reference
        expected = check_digest(reference) if ":" in reference else None
        resp = self._request("GET", ref, f"manifests/{reference}", headers={"Accept": _ACCEPT})
        try:
            raw = self._read_limited(resp, MAX_MANIFEST_BYTES, f"manifest {ref}")
        finally:
            resp.close()
        header = resp.headers.get("docker-content-digest")
        algo_source = expected or (header if header and ":" in header else "sha256:")
        algo = algo_source.split(":", 1)[0]
        if algo not in ("sha256", "sha512"):
            algo = "sha256"
        actual = f"{algo}:{hashlib.new(algo, raw).hexdigest()}"
        if expected and actual != expected:
            raise DigestMismatch(f"manifest {ref.name}@{expected}: content hashes to {actual}")
        if header and header.startswith(f"{algo}:") and header != actual:
            raise DigestMismatch(
                f"manifest {ref}: registry says {header}, content hashes to {actual}"
            )
        media_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        try:
            declared = json.loads(raw).get("mediaType")
        except (ValueError, AttributeError, UnicodeDecodeError):
            declared = None
        if isinstance(declared, str) and declared:
            media_type = declared
        return RawManifest(raw, media_type, actual)

    def _read_limited(self, resp: httpx.Response, limit: int, what: str) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > limit:
                    raise ImageError(f"{what} is larger than {limit} bytes")
                chunks.append(chunk)
        except httpx.TransportError as exc:
            raise RegistryError(f"{what}: connection failed while reading: {exc}") from exc
        with self._lock:
            self.bytes_downloaded += total
        return b"".join(chunks)

    def resolve(self, ref: Reference, platform: str = "linux/amd64") -> ImageManifest:
        """Resolve ``ref`` to one platform's manifest and config, all verified."""
        manifest = self.fetch_manifest(ref)
        body = manifest.json()
        for _ in range(2):  # an index may point at another index, once
            if manifest.media_type in INDEX_TYPES or ("manifests" in body and "layers" not in body):
                chosen = select_platform(body, platform, str(ref))
                manifest = self.fetch_manifest(ref, chosen.digest)
                if len(manifest.raw) != chosen.size:
                    raise DigestMismatch(
                        f"manifest {chosen.digest}: {len(manifest.raw)} bytes, "
                        f"index says {chosen.size}"
                    )
                body = manifest.json()
        config, _ = _image_parts(ref, manifest.raw)
        if config.size > MAX_CONFIG_BYTES:
            raise ImageError(f"{ref}: config of {config.size} bytes is too large")
        config_raw = self.get_blob(ref, config.digest, max_bytes=MAX_CONFIG_BYTES)
        if len(config_raw) != config.size:
            raise DigestMismatch(f"{ref}: config is {len(config_raw)} bytes, not {config.size}")
        return manifest_from_raw(ref, manifest, config_raw)

    # -- deployer access -------------------------------------------------------------------
    def check_pull(self, ref: Reference, credential: RegistryCredential | None) -> None:
        """Return if ``credential`` (None: anonymous) may pull ``ref``: a HEAD of its
        manifest (a GET where the registry allows no HEAD) answers 200.

        Only that credential is used -- never the node's -- and nothing obtained with it
        is kept: a bearer token fetched for it serves this one check.  It goes only to
        ``ref``'s registry and the token realm the registry names, to a plain-HTTP realm
        only if the registry itself is reached over plain HTTP, and never follows a
        redirect to another host.  What the node learnt of the host (Basic or Bearer, the
        realm) saves the first 401.

        Raises :class:`ImageAccessDenied` (401, 403, or the token server refused),
        :class:`ImageNotFound` (404) or :class:`RegistryError`.
        """
        host = ref.registry
        scope = f"repository:{ref.repository}:pull"
        url = self._url(ref, f"manifests/{ref.reference}")
        whose = "anonymous access" if credential is None else "the credentials given"

        def authorization(challenge: str | None) -> str | None:
            """What to send: answering ``challenge``, or (None) up front."""
            if credential is not None and credential.kind is CredentialKind.BEARER:
                return credential.authorization()
            if challenge is None:
                state = self._host_auth(host)
                with self._lock:
                    scheme, params = state.scheme, dict(state.params)
            else:
                scheme, params = parse_challenge(challenge)
            if scheme == "basic":
                if credential is None and challenge is not None:
                    raise ImageAccessDenied(f"registry {host} allows no anonymous pulls")
                return credential.authorization() if credential is not None else None
            if scheme == "bearer" and "realm" in params:
                basic = credential.authorization() if credential is not None else None
                token, _ = self._fetch_token(
                    host,
                    scope,
                    params,
                    basic,
                    whose=whose,
                    refused=ImageAccessDenied,
                    secure_only=True,
                )
                return f"Bearer {token}"
            if challenge is not None:
                raise RegistryError(f"registry {host}: unsupported challenge {challenge!r}")
            return None

        def send(auth: str | None) -> httpx.Response:
            headers = {"Accept": _ACCEPT}
            if auth:
                headers["Authorization"] = auth
            resp = self._send("HEAD", url, headers)
            if resp.status_code == 405:
                resp.close()
                resp = self._send("GET", url, headers)
            resp.close()  # the status is the answer: no body is read
            return resp

        def attempt() -> httpx.Response:
            first = authorization(None)
            resp = send(first)
            challenge = resp.headers.get("www-authenticate", "")
            if resp.status_code == 401 and challenge and first is None:
                resp = send(authorization(challenge))  # else what we sent was refused
            return resp

        resp = self._with_retries(f"HEAD {url}", attempt)
        status = resp.status_code
        if status == 200:
            return
        if status in (401, 403):
            raise ImageAccessDenied(
                f"registry {host} refused {whose} for {ref.repository} (HTTP {status})"
            )
        if status == 404:
            raise ImageNotFound(f"{ref}: no such image in {host}")
        raise RegistryError(f"HEAD {url}: HTTP {status}")

    # -- blobs -----------------------------------------------------------------------------
    def blob_size(self, ref: Reference, digest: str) -> int:
        """The size of a blob, from a HEAD request."""
        resp = self._request("HEAD", ref, f"blobs/{check_digest(digest)}")
        resp.close()
        length = resp.headers.get("content-length")
        if length is None or not length.isdigit():
            raise RegistryError(f"HEAD blob {digest} at {ref.registry}: no Content-Length")
        return int(length)

    def stream_blob(
        self, ref: Reference, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]:
        """Yield a blob's bytes as they arrive; raise DigestMismatch at the end if the bytes
        do not hash to ``digest`` (or differ from ``size``), so a consumer never finishes
        successfully on bad data. A dropped connection is resumed with a Range request.
        """
        check_digest(digest)
        hasher = new_hasher(digest)
        done = 0
        failures = 0
        what = f"blob {ref.name}@{digest}"
        while True:
            headers = {"Accept-Encoding": "identity"}
            if done:
                headers["Range"] = f"bytes={done}-"
            resp = self._request("GET", ref, f"blobs/{digest}", headers=headers, ok=(200, 206))
            progressed = False
            try:
                skip = 0
                if done and resp.status_code == 200:
                    skip = done  # the server ignored our Range: drop what we already have
                elif done:
                    span = _parse_content_range(resp.headers.get("content-range"))
                    if span is None or span[0] != done:
                        raise RegistryError(f"{what}: bad Content-Range on resume")
                for chunk in resp.iter_raw(_CHUNK):  # the bytes as stored: never decoded
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    done += len(chunk)
                    progressed = True
                    if size is not None and done > size:
                        raise DigestMismatch(f"{what}: more than the {size} bytes announced")
                    hasher.update(chunk)
                    with self._lock:
                        self.bytes_downloaded += len(chunk)
                    yield chunk
                break
            except httpx.TransportError as exc:
                failures = 0 if progressed else failures + 1
                if failures > self.retries:
                    raise RegistryError(f"{what}: download failed: {exc}") from exc
                delay = min(self.max_backoff, self.backoff * (2**failures))
                log.warning("%s: connection lost at byte %d (%s); resuming", what, done, exc)
                time.sleep(delay)
            finally:
                resp.close()
        actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
        if size is not None and done != size:
            raise DigestMismatch(f"{what}: {done} bytes, descriptor says {size}")
        if actual != digest:
            raise DigestMismatch(f"{what}: content hashes to {actual}")

    def get_blob(self, ref: Reference, digest: str, *, max_bytes: int = 64 << 20) -> bytes:
        """A small blob in memory, verified."""
        out = bytearray()
        for chunk in self.stream_blob(ref, digest):
            out += chunk
            if len(out) > max_bytes:
                raise ImageError(f"blob {digest} is larger than {max_bytes} bytes")
        return bytes(out)

    def fetch_blob(
        self,
        ref: Reference,
        digest: str,
        dest: Path,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Download a blob to ``dest``: verified, then renamed into place (never partial).

        ``progress`` is called with the number of bytes received so far.
        """
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with open(tmp, "wb") as out:
                done = 0
                for chunk in self.stream_blob(ref, digest):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def fetch_ranges(
        self, ref: Reference, digest: str, ranges: list[tuple[int, int]]
    ) -> list[bytes]:
        """The bytes of half-open ranges of a blob, in the order asked.

        Adjacent and overlapping ranges are merged, then asked for together in one
        multi-range request (at most 64 ranges each); a server that does not answer with
        ``multipart/byteranges`` gets one request per range instead. Ranges cannot be
        checked against the blob digest: callers verify what they read (eStargz chunks
        carry their own digests).
        """
        check_digest(digest)
        for start, end in ranges:
            if start < 0 or end < start:
                raise ValueError(f"invalid range [{start}, {end})")
        merged = _merge_ranges(ranges)
        got: dict[tuple[int, int], bytes] = {}
        for i in range(0, len(merged), _MAX_RANGES_PER_REQUEST):
            batch = merged[i : i + _MAX_RANGES_PER_REQUEST]
            if len(batch) == 1:
                got[batch[0]] = self._fetch_one_range(ref, digest, batch[0])
                continue
            found = self._fetch_multi_range(ref, digest, batch)
            for r in batch:
                got[r] = found[r] if r in found else self._fetch_one_range(ref, digest, r)
        out = []
        for start, end in ranges:
            if start == end:
                out.append(b"")
                continue
            for (ms, me), data in got.items():
                if ms <= start and end <= me:
                    out.append(data[start - ms : end - ms])
                    break
        return out

    def _fetch_multi_range(
        self, ref: Reference, digest: str, batch: list[tuple[int, int]]
    ) -> dict[tuple[int, int], bytes]:
        """Ask for several ranges at once; {} when the server will not answer multipart."""
        what = f"ranges of blob {ref.name}@{digest}"

        def attempt() -> httpx.Response:
            resp = self._request(
                "GET",
                ref,
                f"blobs/{digest}",
                headers={"Range": _range_header(batch), "Accept-Encoding": "identity"},
                ok=(200, 206, 400, 416),
            )
            if resp.status_code != 206:
                resp.close()  # 200 would be the whole blob: do not read it
                return resp
            try:
                resp.read()
            except httpx.TransportError as exc:
                resp.close()
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            return resp

        resp = self._with_retries(what, attempt)
        if resp.status_code != 206:
            log.debug("%s: multi-range answered %d, asking range by range", what, resp.status_code)
            return {}
        body = resp.content
        with self._lock:
            self.bytes_downloaded += len(body)
        content_type = resp.headers.get("content-type", "")
        parts: list[tuple[int, bytes]]
        if content_type.lower().startswith("multipart/byteranges"):
            m = re.search(r'boundary="?([^";]+)"?', content_type)
            if not m:
                return {}
            try:
                parts = _parse_multipart(body, m.group(1))
            except ValueError as exc:
                log.warning("%s: bad multipart answer (%s), asking range by range", what, exc)
                return {}
        else:
            span = _parse_content_range(resp.headers.get("content-range"))
            if span is None or span[1] - span[0] != len(body):
                return {}
            parts = [(span[0], body)]
        found: dict[tuple[int, int], bytes] = {}
        for start, end in batch:
            for pstart, data in parts:
                if pstart <= start and end <= pstart + len(data):
                    found[(start, end)] = data[start - pstart : end - pstart]
                    break
        return found

    def _fetch_one_range(self, ref: Reference, digest: str, rng: tuple[int, int]) -> bytes:
        start, end = rng
        what = f"range {start}-{end} of blob {ref.name}@{digest}"
        result: list[bytes] = []

        def attempt() -> httpx.Response:
            resp = self._request(
                "GET",
                ref,
                f"blobs/{digest}",
                headers={"Range": _range_header([rng]), "Accept-Encoding": "identity"},
                ok=(200, 206, 416),
            )
            if resp.status_code == 416:
                resp.close()
                return resp
            try:
                if resp.status_code == 206:
                    span = _parse_content_range(resp.headers.get("content-range"))
                    if span is None or span[0] != start:
                        raise RegistryError(f"{what}: answer has Content-Range {span}")
                    skip = 0
                else:  # 200: the whole blob; read only as far as needed
                    skip = start
                buf = bytearray()
                for chunk in resp.iter_raw(_CHUNK):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    buf += chunk
                    if len(buf) >= end - start:
                        break
            except httpx.TransportError as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            finally:
                resp.close()
            with self._lock:
                self.bytes_downloaded += len(buf)
            if len(buf) < end - start:
                raise RegistryError(f"{what}: blob ended after {start + len(buf)} bytes")
            result.append(bytes(buf[: end - start]))
            return resp

        resp = self._with_retries(what, attempt)
        if resp.status_code == 416:
            raise RegistryError(f"{what}: range not satisfiable (past the end of the blob?)")
        return result[-1]

    # -- pushing ---------------------------------------------------------------------------
    def push_blob(
        self, ref: Reference, data: bytes | Path, digest: str | None = None
    ) -> Descriptor:
        """Upload a blob (monolithic upload); a blob the registry has already is skipped."""
        if isinstance(data, bytes):
            size = len(data)
            digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
            payload: bytes | Path = data
        else:
            path = Path(data)
            size = path.stat().st_size
            if digest is None:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(_CHUNK):
                        h.update(block)
                digest = "sha256:" + h.hexdigest()
            payload = path
        check_digest(digest)
        descriptor = Descriptor("application/octet-stream", digest, size, {})
        try:
            if self.blob_size(ref, digest) == size:
                return descriptor
        except ImageNotFound:
            pass
        start = self._request("POST", ref, "blobs/uploads/", push=True, ok=(202,))
        start.close()
        location = start.headers.get("location")
        if not location:
            raise RegistryError(f"{ref.registry}: upload started without a Location")
        upload = urljoin(self._url(ref, "blobs/uploads/"), location)
        upload += ("&" if "?" in upload else "?") + urlencode({"digest": digest})

        def body() -> Any:
            if isinstance(payload, bytes):
                return payload
            return _file_chunks(payload)

        resp = self._request(
            "PUT",
            ref,
            upload,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            push=True,
            content=body,
            ok=(201, 204),
        )
        resp.close()
        return descriptor

    def push_manifest(self, ref: Reference, raw: bytes, media_type: str) -> str:
        """PUT a manifest under the ref's tag (or digest); returns its digest."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and not ref.tag and ref.digest != digest:
            raise DigestMismatch(f"manifest hashes to {digest}, not {ref.digest}")
        self._put_manifest(ref, ref.tag or digest, raw, media_type, digest)
        return digest

    def push_referrer(self, ref: Reference, raw: bytes, media_type: str) -> tuple[str, bool]:
        """PUT a manifest that has a ``subject`` by its digest; returns (digest, whether
        the registry indexed the subject: it answers ``OCI-Subject`` when it has the
        referrers API -- otherwise the client keeps the ``sha256-<hex>`` tag itself)."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        headers = self._put_manifest(ref, digest, raw, media_type, digest)
        return digest, bool(headers.get("oci-subject"))

    def _put_manifest(
        self, ref: Reference, reference: str, raw: bytes, media_type: str, digest: str
    ) -> httpx.Headers:
        resp = self._request(
            "PUT",
            ref,
            f"manifests/{reference}",
            headers={"Content-Type": media_type},
            push=True,
            content=lambda: raw,
            ok=(201, 200),
        )
        resp.close()
        echoed = resp.headers.get("docker-content-digest")
        if echoed and echoed.startswith("sha256:") and echoed != digest:
            raise DigestMismatch(f"registry stored manifest as {echoed}, we sent {digest}")
        return resp.headers

    def referrers(self, ref: Reference, digest: str, artifact_type: str) -> list[Descriptor] | None:
        """The manifests whose ``subject`` is ``digest``, of ``artifact_type``, from the
        OCI referrers API; None when the registry has no such API."""
        check_digest(digest)
        try:
            resp = self._request(
                "GET",
                ref,
                f"referrers/{digest}?{urlencode({'artifactType': artifact_type})}",
                headers={"Accept": OCI_INDEX},
            )
        except ImageNotFound:
            return None
        except RegistryError as exc:
            if " HTTP 40" in str(exc):  # 400/405: not a route this registry knows
                return None
            raise
        try:
            raw = self._read_limited(resp, MAX_MANIFEST_BYTES, f"referrers of {digest}")
        finally:
            resp.close()
        if not resp.headers.get("content-type", "").startswith(OCI_INDEX):
            return None  # something else answered the path (an old registry's catch-all)
        body = _parse_json(raw, f"referrers of {digest}")
        return _artifact_descriptors(body, artifact_type, f"referrers of {digest}")


def _artifact_descriptors(body: dict[str, Any], artifact_type: str, what: str) -> list[Descriptor]:
    """The descriptors of an index (a referrers answer or tag) with ``artifact_type``."""
    found = body.get("manifests") or []
    if not isinstance(found, list):
        raise ImageError(f"{what}: manifests is not a list")
    return [
        Descriptor.from_json(item, what)
        for item in found
        if isinstance(item, dict) and item.get("artifactType") == artifact_type
    ]


def referrers_tag(digest: str) -> str:
    """The tag that stands in for the referrers API: ``sha256-<hex>``."""
    algo, _, hexd = check_digest(digest).partition(":")
    return f"{algo}-{hexd}"


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            yield block


def _error_detail(body: bytes) -> str:
    """``: MANIFEST_UNKNOWN manifest unknown`` from a distribution error body."""
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    except (ValueError, AttributeError, IndexError, TypeError, UnicodeDecodeError):
        return ""


def parse_platform(platform: str) -> tuple[str, str, str | None]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"platform must be os/arch[/variant], not {platform!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def select_platform(index: dict[str, Any], platform: str, what: str) -> Descriptor:
    """The index entry for ``platform`` (``os/arch[/variant]``)."""
    want_os, want_arch, want_variant = parse_platform(platform)
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: index has no manifests list")
    seen = []
    for entry in entries:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        seen.append(
            "/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k))
        )
        if plat.get("os") != want_os or plat.get("architecture") != want_arch:
            continue
        if want_variant is not None and plat.get("variant") != want_variant:
            continue
        return Descriptor.from_json(entry, what)
    raise ImageNotFound(
        f"{what}: no {platform} image in the index (has: {', '.join(seen) or 'nothing'})"
    )
