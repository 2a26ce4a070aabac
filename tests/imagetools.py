"""Test tooling for container images: the real OCI registry on loopback (open, or behind
a token server of ours that grants pulls per user and repository), images built with
umoci and pushed with skopeo (tools independent of warmstart), a Debian root with Python.

Everything here shells out to Debian's packages (docker-registry, umoci, skopeo,
debootstrap), which ``scripts/test`` installs.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

CACHE = Path(os.environ.get("WARMSTART_TEST_CACHE", "/var/cache/warmstart-test"))
# A Debian mirror for debootstrap; unset, debootstrap uses its own configured default.
DEBIAN_MIRROR = os.environ.get("WARMSTART_TEST_MIRROR") or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A running ``docker-registry`` (the reference distribution implementation)."""

    host: str  # "127.0.0.1:PORT" (or the address given): image references start with it
    root: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Start the same registry again (same port, same storage) after stop()."""
        self.stop()
        self.proc = _spawn_registry(self.config_path, self.log_path)
        _wait_registry(self)


def _spawn_registry(
    config: Path, log_path: Path, detached: bool = False
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detached,  # detached: outlives this process and its terminal
        )


def _wait_registry(reg: Registry, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{reg.log()}")
        try:
            r = httpx.get(f"{reg.url}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not come up:\n{reg.log()}")


def start_registry(
    root: Path,
    *,
    auth_yaml: str = "",
    port: int | None = None,
    log_level: str = "warn",
    detached: bool = False,
    address: str = "127.0.0.1",
) -> Registry:
    """Start a registry storing under ``root``; ``auth_yaml`` is an indented ``auth:`` block.
    ``detached``: in a session of its own, to outlive the caller (scripts/local-registry).
    ``address``: where it listens (a local cluster's nodes reach this machine at its
    bridge's address, ``cluster.plan.gateway``)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"log:\n  level: {log_level}\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}:{port}\n"
        + (f"auth:\n{auth_yaml}" if auth_yaml else "")
    )
    log_path = root / "registry.log"
    proc = _spawn_registry(config, log_path, detached)
    reg = Registry(f"{address}:{port}", root, proc, log_path, config)
    _wait_registry(reg)
    return reg


# -- a token server for the registry's token authentication ---------------------------------
@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered (or refused)."""

    user: str | None  # the user the credentials named; None: anonymous
    scopes: tuple[str, ...]
    service: str
    refused: bool  # the password was wrong (HTTP 401)


class TokenServer:
    """Issues RS256 JWTs signed by a self-signed certificate, the way a registry's token
    service does.  ``users`` maps a user name to its password and the repositories it may
    pull and push (fnmatch patterns); anyone may pull the ``public`` ones.  A scope beyond
    what the caller may do gets a token without it (the registry then answers 401
    ``insufficient_scope``); wrong credentials get a 401 from here.  A POST with
    OAuth2's refresh-token grant exchanges a refresh token (``refresh_token(user)``) for an
    access token, as Docker clients do with an identity token.  Every request is recorded
    in ``requests``."""

    def __init__(
        self,
        root: Path,
        users: dict[str, tuple[str, tuple[str, ...]]] | None = None,
        public: tuple[str, ...] = (),
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users if users is not None else {"alice": ("s3cret", ("*",))}
        self.public = public
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "warmstart test tokens")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = root / "token-cert.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[TokenRequest] = []
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user, ok = server.authenticate(self.headers.get("Authorization", ""))
                scopes = tuple(query.get("scope", []))
                service = query.get("service", [""])[0]
                with server.lock:
                    server.requests.append(TokenRequest(user, scopes, service, not ok))
                if not ok:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = server.token(user, scopes, service)
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                grant = form.get("grant_type", [""])[0]
                user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                scopes = tuple(form.get("scope", [""])[0].split())
                service = form.get("service", [""])[0]
                ok = grant == "refresh_token" and user is not None
                with server.lock:
                    server.requests.append(TokenRequest(user, scopes, service, not ok))
                if not ok:
                    self.send_response(400 if grant != "refresh_token" else 401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = server.token(user, scopes, service)
                body = json.dumps({"access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def auth_yaml(self) -> str:
        """The registry's ``auth:`` block for :func:`start_registry`."""
        return (
            "  token:\n"
            f"    realm: {self.realm}\n"
            "    service: warmstart-test-registry\n"
            "    issuer: warmstart-test-issuer\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    def authenticate(self, header: str) -> tuple[str | None, bool]:
        """The user a Basic header names (None: no header) and whether its password is
        right (anonymous is)."""
        if not header.startswith("Basic "):
            return None, True
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "", False
        known = self.users.get(user)
        return user, known is not None and known[0] == password

    def may(self, user: str | None, repository: str, action: str) -> bool:
        if action == "pull" and any(fnmatch.fnmatchcase(repository, p) for p in self.public):
            return True
        grants = self.users[user][1] if user is not None else ()
        return any(fnmatch.fnmatchcase(repository, p) for p in grants)

    def token(self, user: str | None, scopes: tuple[str, ...], service: str) -> str:
        import jwt

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if self.may(user, name, a)]
            if allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {
            "iss": "warmstart-test-issuer",
            "sub": user or "",
            "aud": service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        headers = {"x5c": [base64.b64encode(self.cert_der).decode()]}
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)

    def refresh_token(self, user: str) -> str:
        """A refresh token for ``user`` (what ``docker login`` keeps as an identity token)."""
        token = uuid.uuid4().hex
        with self.lock:
            self.refresh_tokens[token] = user
        return token

    def asked_by(self, user: str) -> int:
        """How many requests named ``user`` so far (refused ones too)."""
        with self.lock:
            return sum(1 for r in self.requests if r.user == user)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a Debian root with Python ---------------------------------------------------------------
def base_rootfs() -> Path:
    """A minimal Debian bookworm with python3, made once by debootstrap and cached."""
    dest = CACHE / "bookworm-python3"
    if (dest / "usr/bin/python3").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".bookworm-python3.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3",
            "bookworm",
            str(tmp),
            *([DEBIAN_MIRROR] if DEBIAN_MIRROR else []),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (tmp / junk).glob("*"):
            if p.is_file():
                p.unlink()
    tmp.rename(dest)
    return dest


# -- building images with umoci and pushing them with skopeo ---------------------------------
def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}{res.stdout}")
    return res.stdout


def debian_layout() -> Path:
    """An OCI layout (tag "img") whose one layer is :func:`base_rootfs`, made once and
    cached beside it: images built on it (``build_image(base=...)``) skip tarring and
    compressing 170 MB, and their pushes skip the layer the registry already has."""
    root = base_rootfs()
    st = root.stat()
    dest = CACHE / f"bookworm-python3-oci-{st.st_ino}-{st.st_mtime_ns}"
    if (dest / "index.json").exists():
        return dest
    for stale in CACHE.glob("bookworm-python3-oci-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = CACHE / f".bookworm-python3-oci.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        layout = tmp / "layout"
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", f"{layout}:img")
        _add_directory_layer(layout, root, tmp / "bundle")
        try:
            layout.rename(dest)
        except OSError:
            if not (dest / "index.json").exists():
                raise  # else another test run made it first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _copy_layout(src: Path, dst: Path) -> None:
    """Copy an OCI layout; blobs (content-addressed, never rewritten) are hard-linked."""

    def link_or_copy(s: str, d: str) -> None:
        if "/blobs/" in s:
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def _add_directory_layer(layout: Path, directory: Path, bundle: Path) -> None:
    """Append a layer holding a copy of ``directory`` (umoci unpack, copy, repack)."""
    shutil.rmtree(bundle, ignore_errors=True)
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:img", str(bundle))
    subprocess.run(["cp", "-a", f"{directory}/.", str(bundle / "rootfs")], check=True)
    run("umoci", "repack", "--image", f"{layout}:img", str(bundle))
    shutil.rmtree(bundle, ignore_errors=True)


LAYER_MTIME = 1_700_000_000  # file layers are reproducible: the same files, the same blob


def _add_files_layer(layout: Path, files: dict[str, str | bytes], tar_path: Path) -> None:
    """Append a layer made of ``files`` (see :func:`build_image`), written as a tar here
    and added with ``umoci raw add-layer`` (no unpacking of the layers below)."""
    import io

    def header(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, LAYER_MTIME
        return info

    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for raw_name, content in files.items():
        name = raw_name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, (header(parent, tarfile.DIRTYPE, 0o755), None))
        if raw_name.endswith("/"):
            entries[name] = (header(name, tarfile.DIRTYPE, 0o755), None)
        elif isinstance(content, str) and content.startswith("->"):
            info = header(name, tarfile.SYMTYPE, 0o777)
            info.linkname = content[2:]
            entries[name] = (info, None)
        else:
            data = content if isinstance(content, bytes) else content.encode()
            info = header(name, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            entries[name] = (info, data)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries.values():
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:img", str(tar_path))
    tar_path.unlink()


def build_image(
    workdir: Path,
    layers: list[Path | dict[str, str | bytes]],
    *,
    ref: str,
    base: Path | None = None,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    workingdir: str | None = None,
) -> str:
    """Build an OCI image and push it to ``ref`` (``host:port/repo:tag``) over plain HTTP;
    return ``ref``.

    The image starts from the layout ``base`` (e.g. :func:`debian_layout`), or empty, and
    gets one layer per item of ``layers``: a directory (copied), a tar file (added as it
    is: :func:`tar_layer` writes hostile ones) or a map of files
    (path → text or bytes; a text ``"->target"`` is a symlink, a path ending in ``/`` an
    empty directory; parent directories are added, mode 0755).
    """
    layout = workdir / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    if base is not None:
        _copy_layout(base, layout)
    else:
        run("umoci", "init", "--layout", str(layout))
        run("umoci", "new", "--image", f"{layout}:img")
    for layer in layers:
        if isinstance(layer, Path) and layer.is_file():  # a tar, as it is (tar_layer)
            run("umoci", "raw", "add-layer", "--image", f"{layout}:img", str(layer))
        elif isinstance(layer, Path):
            _add_directory_layer(layout, layer, workdir / "bundle")
        else:
            _add_files_layer(layout, layer, workdir / "layer.tar")
    config = ["umoci", "config", "--image", f"{layout}:img"]
    for c in cmd or []:
        config += ["--config.cmd", c]
    for e in entrypoint or []:
        config += ["--config.entrypoint", e]
    for e in env or []:
        config += ["--config.env", e]
    if workingdir:
        config += ["--config.workingdir", workingdir]
    config += ["--os", "linux", "--architecture", "amd64"]
    run(*config)
    push(f"oci:{layout}:img", ref)
    shutil.rmtree(layout, ignore_errors=True)
    return ref


def push(src: str, ref: str) -> None:
    run(
        "skopeo",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        src,
        f"docker://{ref}",
    )


def copy_image(src: str, dst: str, *extra: str) -> None:
    """``skopeo copy`` between references of plain-HTTP registries."""
    run(
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *extra,
        f"docker://{src}",
        f"docker://{dst}",
    )


def tar_layer(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a raw tar (for hostile-layer tests) with exactly the given members."""
    import io

    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def layer_digests(registry_url: str, ref: str) -> list[str]:
    """The layer blob digests of ``ref`` (``host:port/repo:tag``) in the registry."""
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")
    accept = ", ".join(
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
    )
    r = httpx.get(f"{registry_url}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    r.raise_for_status()
    return [layer["digest"] for layer in r.json()["layers"]]


class GatedProxy:
    """A plain-HTTP proxy in front of a registry that holds the requests for chosen blobs
    until :meth:`release` -- a pull that stays under way for as long as a test needs
    (and lets the test change the registry meanwhile: delete a blob, revoke a user)."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        self.upstream = upstream.rstrip("/")
        self._held: set[str] = set()
        self._gate = threading.Event()
        self._gate.set()
        self.holding = 0  # requests waiting at the gate now
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, "GET")

            def do_HEAD(self) -> None:
                proxy._forward(self, "HEAD")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def hold(self, digests: list[str]) -> None:
        """Hold every request for these blobs from now until :meth:`release`."""
        self._held = set(digests)
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def _forward(self, h: Any, method: str) -> None:
        path = h.path
        self.requests.append(f"{method} {path}")
        if "/blobs/" in path and path.rsplit("/", 1)[-1] in self._held:
            self.holding += 1
            try:
                self._gate.wait(300)
            finally:
                self.holding -= 1
        skip = {"host", "connection", "accept-encoding"}
        headers = {k: v for k, v in h.headers.items() if k.lower() not in skip}
        with httpx.Client(timeout=120) as client:
            resp = client.request(method, self.upstream + path, headers=headers)
        body = resp.content
        h.send_response(resp.status_code)
        drop = {"connection", "transfer-encoding", "content-encoding", "content-length"}
        for key, value in resp.headers.multi_items():
            if key.lower() not in drop:
                h.send_header(key, value)
        length = resp.headers.get("content-length") if method == "HEAD" else None
        h.send_header("Content-Length", length or str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def close(self) -> None:
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()


class ReferrersProxy:
    """A plain-HTTP proxy that gives a registry without one (Debian's docker-registry 2.8)
    the OCI referrers API: a manifest PUT with a ``subject`` is answered with the
    ``OCI-Subject`` header and listed under ``GET /v2/<name>/referrers/<digest>``;
    everything else is forwarded as it is. ``fallback_reads`` counts GETs of
    ``sha256-<hex>`` tags (which a client of the API should not need)."""

    def __init__(self, upstream: str) -> None:
        import hashlib
        import http.server
        import json
        import re
        import threading

        self.upstream = upstream.rstrip("/")
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.fallback_reads = 0
        proxy = self
        referrers_path = re.compile(r"^/v2/(.+)/referrers/(sha256:[0-9a-f]{64})(\?.*)?$")
        manifest_path = re.compile(r"^/v2/(.+)/manifests/([^/?]+)$")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                drop = {"connection", "transfer-encoding", "content-encoding", "content-length"}
                for key, value in headers:
                    if key.lower() not in drop:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes = b"") -> httpx.Response:
                skip = {"host", "connection", "accept-encoding", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                with httpx.Client(timeout=120) as client:
                    return client.request(
                        self.command, proxy.upstream + self.path, headers=headers, content=body
                    )

            def do_GET(self) -> None:
                m = referrers_path.match(self.path)
                if m:
                    wanted = ""
                    if m.group(3) and "artifactType=" in m.group(3):
                        wanted = httpx.URL(self.path).params.get("artifactType", "")
                    found = [
                        d
                        for d in proxy.referrers.get((m.group(1), m.group(2)), [])
                        if not wanted or d.get("artifactType") == wanted
                    ]
                    doc = {
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": found,
                    }
                    body = json.dumps(doc).encode()
                    ctype = "application/vnd.oci.image.index.v1+json"
                    self._send(200, [("Content-Type", ctype)], body)
                    return
                m = manifest_path.match(self.path)
                if m and m.group(2).startswith("sha256-"):
                    proxy.fallback_reads += 1
                resp = self._forward()
                self._send(resp.status_code, list(resp.headers.multi_items()), resp.content)

            def do_HEAD(self) -> None:
                resp = self._forward()
                self._send(resp.status_code, list(resp.headers.multi_items()), b"")

            def do_PUT(self) -> None:
                body = self._body()
                resp = self._forward(body)
                headers = list(resp.headers.multi_items())
                m = manifest_path.match(self.path.split("?", 1)[0])
                if m and resp.status_code in (200, 201):
                    try:
                        doc = json.loads(body)
                    except ValueError:
                        doc = {}
                    subject = doc.get("subject") if isinstance(doc, dict) else None
                    if isinstance(subject, dict) and "digest" in subject:
                        digest = "sha256:" + hashlib.sha256(body).hexdigest()
                        proxy.referrers.setdefault((m.group(1), subject["digest"]), []).append(
                            {
                                "mediaType": doc.get("mediaType", ""),
                                "digest": digest,
                                "size": len(body),
                                "artifactType": doc.get("artifactType", ""),
                            }
                        )
                        headers.append(("OCI-Subject", subject["digest"]))
                self._send(resp.status_code, headers, resp.content)

            def do_POST(self) -> None:
                resp = self._forward(self._body())
                self._send(resp.status_code, list(resp.headers.multi_items()), resp.content)

            do_PATCH = do_POST

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- containerd and ctr-remote (the reference eStargz implementation) ------------------------
def _stop_and_unmount(proc: subprocess.Popen[bytes], root: Path) -> None:
    """Stop a daemon, then lazily unmount whatever it left mounted under ``root``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    unmount_under(root)


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount everything mounted at or below ``root`` (deepest first), so that
    removing ``root`` cannot reach into a bind mount or a FUSE filesystem."""
    top = str(root.resolve())
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    targets = sorted((m for m in mounts if m == top or m.startswith(top + "/")), reverse=True)
    for target in targets:
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    return targets


@dataclass
class Containerd:
    """A private containerd (own root, state and socket) for ``ctr``/``ctr-remote``."""

    root: Path
    address: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    sock_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctr(self, *args: str, timeout: float = 600) -> str:
        """Run ``ctr-remote`` against this containerd; raise with its output on failure."""
        cmd = ["ctr-remote", "--address", self.address, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}{res.stdout}"
            )
        return res.stdout

    def stop(self) -> None:
        """Stop containerd and remove the mounts its snapshotter left under its root."""
        _stop_and_unmount(self.proc, self.root)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def start_containerd(root: Path, *, snapshotter_plugins: str = "") -> Containerd:
    """Start containerd with everything under ``root`` (socket in a short directory, since
    unix socket paths are limited to 107 bytes). CRI and snapshotters that need special
    filesystems are disabled; ``snapshotter_plugins`` is extra TOML (proxy plugins)."""
    import tempfile

    if shutil.which("containerd") is None or shutil.which("ctr-remote") is None:
        raise RuntimeError("containerd and ctr-remote are needed (scripts/test installs them)")
    root.mkdir(parents=True, exist_ok=True)
    short_dir = "/run" if os.access("/run", os.W_OK) else None
    sock_dir = Path(tempfile.mkdtemp(prefix="wsctd-", dir=short_dir))
    address = str(sock_dir / "containerd.sock")
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
        ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",'
        ' "io.containerd.snapshotter.v1.devmapper"]\n'
        f'[grpc]\n  address = "{address}"\n'
        f'[ttrpc]\n  address = "{address}.ttrpc"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root / "opt"}"\n'
        + snapshotter_plugins
    )
    log_path = root / "containerd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    ctd = Containerd(root, address, proc, log_path, sock_dir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited ({proc.returncode}):\n{ctd.log()}")
        probe = subprocess.run(
            ["ctr-remote", "--address", address, "version"], capture_output=True, timeout=10
        )
        if probe.returncode == 0:
            return ctd
        time.sleep(0.1)
    ctd.stop()
    raise RuntimeError(f"containerd did not come up:\n{ctd.log()}")


REFERENCE_TOOLS = Path(__file__).resolve().parent / "integration" / "estargz_ref"


def build_reference_tool(name: str) -> Path | None:
    """Build one of the Go programs in ``tests/integration/estargz_ref`` against the
    reference eStargz library (Debian's golang-github-containerd-stargz-snapshotter-dev),
    cached by source hash; None when Go or the library is not installed."""
    import hashlib

    gopath = Path("/usr/share/gocode")
    if (
        shutil.which("go") is None
        or not (gopath / "src/github.com/containerd/stargz-snapshotter/estargz").is_dir()
    ):
        return None
    src = REFERENCE_TOOLS / name
    digest = hashlib.sha256((src / "main.go").read_bytes()).hexdigest()[:16]
    out = CACHE / "go" / f"{name}-{digest}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(gopath), GOFLAGS="")
    env.setdefault("GOCACHE", str(CACHE / "go" / "build-cache"))
    tmp = out.with_suffix(f".{os.getpid()}")
    res = subprocess.run(
        ["go", "build", "-o", str(tmp), "."], cwd=src, env=env, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise RuntimeError(f"building {name} failed:\n{res.stderr}")
    tmp.rename(out)
    return out


@dataclass
class StargzSnapshotter:
    """The reference lazy-pulling snapshotter, serving containerd as proxy plugin "stargz"."""

    root: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def plugin_toml(self) -> str:
        """The containerd config fragment that registers this snapshotter."""
        return (
            "[proxy_plugins]\n  [proxy_plugins.stargz]\n"
            f'    type = "snapshot"\n    address = "{self.socket}"\n'
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fuse_mounts(self) -> list[Path]:
        """The layer filesystems it has mounted (one FUSE mount per eStargz layer)."""
        root = str(self.root.resolve())
        with open("/proc/self/mountinfo") as f:
            fields = [line.split() for line in f]
        return [
            Path(parts[4])
            for parts in fields
            if parts[4].startswith(root + "/") and parts[parts.index("-") + 1].startswith("fuse")
        ]

    def stop(self) -> None:
        _stop_and_unmount(self.proc, self.root)
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)


def start_stargz_snapshotter(root: Path) -> StargzSnapshotter | None:
    """Start the reference snapshotter with its state under ``root`` (start it before
    containerd, then pass ``plugin_toml()`` to :func:`start_containerd`); None when it
    cannot be built here."""
    import tempfile

    binary = build_reference_tool("snapshotter")
    if binary is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    short_dir = "/run" if os.access("/run", os.W_OK) else None
    socket = os.path.join(tempfile.mkdtemp(prefix="wsstargz-", dir=short_dir), "stargz.sock")
    log_path = root / "snapshotter.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(binary), str(root), socket],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    snap = StargzSnapshotter(root, socket, proc, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stargz snapshotter exited ({proc.returncode}):\n{snap.log()}")
        if os.path.exists(socket):
            return snap
        time.sleep(0.05)
    snap.stop()
    raise RuntimeError(f"stargz snapshotter did not come up:\n{snap.log()}")
