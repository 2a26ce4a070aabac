"""Registry logins from a Docker client's configuration, credential helpers included.

A Docker ``config.json`` says where each registry's login lives:

* ``credHelpers`` maps a registry host to a helper, ``credsStore`` names the helper for
  every other host: the login is what ``docker-credential-<helper> get`` prints for the
  host (it reads the server URL on stdin and answers ``{"Username", "Secret"}`` in JSON,
  or exits non-zero saying the credentials are not found);
* otherwise ``auths.<host>`` holds it: ``auth`` (base64 of ``user:password``), the
  explicit ``username``/``password`` pair, or an ``identitytoken``.

A helper answering the user name ``<token>`` gives an identity token (an OAuth2 refresh
token), as does ``identitytoken``: such a login is exchanged at the registry's token
server (``grant_type=refresh_token``) and never sent as Basic credentials.

Helpers run when a registry first asks for credentials, on the registry client's thread,
with a timeout; an answer is kept for ``HELPER_TTL_S`` (helpers for cloud registries hand
out short-lived passwords), a "not found" for ``MISS_TTL_S``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from warmstart.images.errors import AuthError
from warmstart.images.reference import DOCKER_HUB

log = logging.getLogger(__name__)

# The server URL Docker stores and asks helpers for, for Docker Hub.
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
# The user name by which a helper says its secret is an identity token.
IDENTITY_TOKEN_USER = "<token>"
HELPER_TIMEOUT_S = 15.0
HELPER_TTL_S = 300.0
MISS_TTL_S = 30.0


def normalise_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``registry-1.docker.io``; ``host:port`` unchanged."""
    host = key.strip()
    if "://" in host:
        host = urlsplit(host).netloc
    host = host.split("/", 1)[0]
    if host.lower() in ("docker.io", "index.docker.io", DOCKER_HUB):
        return DOCKER_HUB
    return host


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


@dataclass(frozen=True)
class Login:
    """One registry login: a user and password, or an identity token."""

    user: str
    secret: str

    @property
    def identity_token(self) -> bool:
        return self.user == IDENTITY_TOKEN_USER

    def pair(self) -> tuple[str, str]:
        return self.user, self.secret


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read Docker config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise AuthError(f"Docker config {path} is not a JSON object")
    return data


def _static_logins(path: Path, data: dict[str, Any]) -> dict[str, Login]:
    auths = data.get("auths")
    out: dict[str, Login] = {}
    if not isinstance(auths, dict):
        return out
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        login = None
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            login = Login(IDENTITY_TOKEN_USER, entry["identitytoken"])
        elif isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise AuthError(f"{path}: auths.{key}.auth is not base64 of user:password") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise AuthError(f"{path}: auths.{key}.auth has no ':' between user and password")
            login = Login(user, password)
        elif isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            login = Login(entry["username"], entry["password"])
        if login is not None:
            out[normalise_host(str(key))] = login
    return out


def _helper_names(path: Path, data: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    store = data.get("credsStore")
    if store is not None and (not isinstance(store, str) or not _valid_helper(store)):
        raise AuthError(f"{path}: credsStore {store!r} is not a credential helper's name")
    helpers: dict[str, str] = {}
    raw = data.get("credHelpers") or {}
    if not isinstance(raw, dict):
        raise AuthError(f"{path}: credHelpers must map registry hosts to helper names")
    for key, name in raw.items():
        if not isinstance(name, str) or not _valid_helper(name):
            raise AuthError(f"{path}: credHelpers.{key} {name!r} is not a credential helper's name")
        helpers[normalise_host(str(key))] = name
    return store or None, helpers


def _valid_helper(name: str) -> bool:
    # The name becomes part of an executable's name looked up on PATH: no paths.
    return bool(name) and "/" not in name and name not in (".", "..") and name.isprintable()


def run_helper(helper: str, server: str, timeout: float = HELPER_TIMEOUT_S) -> Login | None:
    """``docker-credential-<helper> get`` for ``server``: its login, or None if it has
    none; ``AuthError`` if the helper is missing, fails or answers nonsense."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        raise AuthError(
            f"credential helper docker-credential-{helper} (named in the Docker config) "
            "is not installed or not on PATH"
        )
    try:
        done = subprocess.run(
            [exe, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AuthError(
            f"credential helper docker-credential-{helper} gave no answer for {server} "
            f"within {timeout:.0f} s"
        ) from None
    except OSError as exc:
        raise AuthError(f"credential helper docker-credential-{helper} did not run: {exc}") from exc
    said = (done.stdout or b"").decode(errors="replace").strip()
    if done.returncode != 0:
        # The helpers' protocol: "credentials not found in native keychain" on stdout.
        if "credentials not found" in said.lower():
            return None
        why = (done.stderr or b"").decode(errors="replace").strip() or said
        raise AuthError(
            f"credential helper docker-credential-{helper} failed for {server} "
            f"(exit {done.returncode}): {why[:300]}"
        )
    try:
        answer = json.loads(said)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(
            f"credential helper docker-credential-{helper} answered something other than "
            "{Username, Secret} JSON"
        ) from None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    return Login(user, secret)


class DockerCredentials:
    """The logins a Docker client would use, by registry host.  Thread-safe.

    ``overrides`` (a host's user and password, given explicitly) win over the file.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        overrides: dict[str, tuple[str, str]] | None = None,
        helper_timeout: float = HELPER_TIMEOUT_S,
    ) -> None:
        self.path = path if path is not None else default_docker_config()
        data = _read_config(self.path)
        self._static = _static_logins(self.path, data)
        self._store, self._helpers = _helper_names(self.path, data)
        self._overrides = {normalise_host(h): Login(*pair) for h, pair in (overrides or {}).items()}
        self._timeout = helper_timeout
        self._cache: dict[str, tuple[Login | None, float]] = {}
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self.helper_runs = 0

    def static(self) -> dict[str, tuple[str, str]]:
        """The logins written in the file itself (no helper run)."""
        return {h: login.pair() for h, login in self._static.items()}

    def helper_for(self, host: str) -> str | None:
        """The helper that holds ``host``'s login, if the config names one."""
        host = normalise_host(host)
        return self._helpers.get(host) or self._store

    def server_url(self, host: str) -> str:
        """What a helper is asked for, as Docker asks: the registry's host (with its port),
        Docker Hub by its v1 index URL."""
        host = normalise_host(host)
        return DOCKER_HUB_SERVER if host == DOCKER_HUB else host

    def get(self, host: str) -> Login | None:
        """``host``'s login, or None (anonymous).  May run a helper (seconds)."""
        host = normalise_host(host)
        if host in self._overrides:
            return self._overrides[host]
        helper = self.helper_for(host)
        if helper is None:
            return self._static.get(host)
        with self._lock:
            lock = self._host_locks.setdefault(host, threading.Lock())
        with lock:
            now = time.monotonic()
            cached = self._cache.get(host)
            if cached is not None and cached[1] > now:
                return cached[0]
            server = self.server_url(host)
            self.helper_runs += 1
            login = run_helper(helper, server, self._timeout)
            if login is None:
                # A store that does not hold the host: what the file says, if anything.
                login = self._static.get(host)
            ttl = HELPER_TTL_S if login is not None else MISS_TTL_S
            self._cache[host] = (login, now + ttl)
            log.debug(
                "registry login for %s from docker-credential-%s: %s",
                host,
                helper,
                "found" if login is not None else "none",
            )
            return login

    def forget(self, host: str) -> None:
        """Drop a helper's cached answer (the registry refused it: ask again next time)."""
        with self._lock:
            self._cache.pop(normalise_host(host), None)
