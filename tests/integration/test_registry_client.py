"""RegistryClient against the reference registry (Debian's docker-registry).

Manifests (OCI, Docker v2, indexes), HEAD, ranges, digest verification, Basic and Bearer
authentication, Docker config credentials, redirects, retries. Where the registry cannot
misbehave on demand, a small HTTP server sits in front of it (``Proxy``) and does: tamper
with bytes, refuse multi-range requests, redirect to a "CDN", drop connections, answer 503.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import imagetools
from tests.imagetools import TokenServer
from warmstart.images.access import RegistryCredential
from warmstart.images.errors import (
    AuthError,
    DigestMismatch,
    ImageAccessDenied,
    ImageNotFound,
    RegistryError,
)
from warmstart.images.reference import Reference
from warmstart.images.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
)

pytestmark = [pytest.mark.integration]

NO_CONFIG = Path("/nonexistent/docker-config.json")


def make_client(**kw: Any) -> RegistryClient:
    kw.setdefault("docker_config", NO_CONFIG)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 10.0)
    return RegistryClient(**kw)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


skopeo_copy = imagetools.copy_image


@pytest.fixture(scope="module")
def small_image(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A two-layer OCI image of a few small files."""
    return imagetools.build_image(
        tmp_path_factory.mktemp("small-image"),
        [
            {"etc/hello": "hello\n"},
            {"app/run.py": "print('run')\n", "app/data.bin": os.urandom(3000)},
        ],
        ref=f"{registry.host}/small:1",
        cmd=["run"],
    )


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    c = make_client()
    yield c
    c.close()


def raw_get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, timeout=10, **kw)


# -- a programmable server in front of the registry ---------------------------------------
Handler = Callable[["_ProxyHandler"], bool]


class Proxy:
    """Forwards to ``upstream``; ``handle`` may answer a request itself (return True),
    ``tamper(path, body)`` may change what is forwarded back."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.handle: Handler | None = None
        self.tamper: Callable[[str, bytes], bytes] | None = None
        self.strip_digest_header = False
        self.lock = threading.Lock()
        self.http = httpx.Client(timeout=30)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def ranged(self) -> list[str]:
        return [h["range"] for m, p, h in self.requests if "range" in h]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.http.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    @property
    def proxy(self) -> Proxy:
        return self.server.proxy  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        proxy = self.proxy
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self.rfile.read(int(headers.get("content-length") or 0))
        with proxy.lock:
            proxy.requests.append((self.command, self.path, headers))
        if proxy.handle is not None and proxy.handle(self):
            return
        forward = {k: v for k, v in headers.items() if k not in ("host", "connection")}
        try:
            resp = proxy.http.request(
                self.command, proxy.upstream + self.path, headers=forward, content=body or None
            )
        except httpx.HTTPError as exc:  # the registry itself misbehaved: say so, stay up
            self.reply(502, str(exc).encode())
            return
        data = resp.content
        if proxy.tamper is not None:
            data = proxy.tamper(self.path, data)
        out = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date")
        }
        if proxy.strip_digest_header:
            out.pop("docker-content-digest", None)
        if self.command == "HEAD":
            self.send_response(resp.status_code)
            for k, v in out.items():
                self.send_header(k, v)
            self.send_header("Content-Length", resp.headers.get("content-length", "0"))
            self.end_headers()
            return
        self.reply(resp.status_code, data, out)


@pytest.fixture
def proxy(registry: Any) -> Iterator[Proxy]:
    p = Proxy(registry.url)
    yield p
    p.close()


# -- manifests -----------------------------------------------------------------------------
def test_resolve_oci_image(client: RegistryClient, registry: Any, python_image: str) -> None:
    ref = Reference.parse(python_image)
    image = client.resolve(ref)
    served = raw_get(f"{registry.url}/v2/python/manifests/3.11", headers={"Accept": OCI_MANIFEST})
    assert image.media_type == OCI_MANIFEST
    assert image.raw == served.content
    assert image.digest == sha(served.content) == served.headers["docker-content-digest"]
    assert image.ref == ref.with_digest(image.digest)
    assert len(image.layers) == 2
    assert image.config.media_type == OCI_CONFIG
    assert image.config_json["config"]["Cmd"] == ["app.handler"]
    assert image.config_json["architecture"] == "amd64"
    assert len(image.diff_ids) == 2
    # by digest gives the same manifest, verified against the digest itself
    assert client.resolve(image.ref).raw == image.raw


def test_resolve_docker_v2_manifest(
    client: RegistryClient, registry: Any, small_image: str
) -> None:
    v2 = f"{registry.host}/small-v2:1"
    skopeo_copy(small_image, v2, "--format", "v2s2")
    image = client.resolve(Reference.parse(v2))
    assert image.media_type == DOCKER_MANIFEST
    assert json.loads(image.raw)["mediaType"] == DOCKER_MANIFEST
    assert {layer.media_type for layer in image.layers} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    data = client.get_blob(image.ref, image.layers[0].digest)
    assert sha(data) == image.layers[0].digest


def _push_platform_variant(
    client: RegistryClient, repo_ref: Reference, arch: str
) -> dict[str, Any]:
    """A manifest for another architecture (same layers, different config) → descriptor."""
    base = client.resolve(repo_ref)
    config = dict(base.config_json, architecture=arch)
    config_raw = json.dumps(config).encode()
    client.push_blob(repo_ref, config_raw)
    manifest = json.loads(base.raw)
    manifest["config"] = {
        "mediaType": OCI_CONFIG,
        "digest": sha(config_raw),
        "size": len(config_raw),
    }
    raw = json.dumps(manifest).encode()
    digest = client.push_manifest(repo_ref.with_tag(f"only-{arch}"), raw, OCI_MANIFEST)
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(raw),
        "platform": {"os": "linux", "architecture": arch},
    }


def test_index_selects_linux_amd64(client: RegistryClient, registry: Any, small_image: str) -> None:
    ref = Reference.parse(small_image)
    amd64 = client.resolve(ref)
    arm64 = _push_platform_variant(client, ref, "arm64")
    ppc = _push_platform_variant(client, ref, "ppc64le")
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            ppc,
            arm64,
            {
                "mediaType": OCI_MANIFEST,
                "digest": amd64.digest,
                "size": len(amd64.raw),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    raw = json.dumps(index).encode()
    index_digest = client.push_manifest(ref.with_tag("multi"), raw, OCI_INDEX)
    assert (
        raw_get(f"{registry.url}/v2/small/manifests/multi", headers={"Accept": OCI_INDEX}).content
        == raw
    )

    chosen = client.resolve(ref.with_tag("multi"))
    assert chosen.digest == amd64.digest
    assert chosen.config_json["architecture"] == "amd64"
    other = client.resolve(ref.with_tag("multi"), platform="linux/arm64")
    assert other.digest == arm64["digest"]
    assert other.config_json["architecture"] == "arm64"
    by_index_digest = client.resolve(Reference.parse(f"{registry.host}/small@{index_digest}"))
    assert by_index_digest.digest == amd64.digest
    with pytest.raises(ImageNotFound, match="linux/s390x"):
        client.resolve(ref.with_tag("multi"), platform="linux/s390x")


def test_docker_manifest_list(client: RegistryClient, registry: Any, small_image: str) -> None:
    v2 = Reference.parse(f"{registry.host}/small-list:v2")
    skopeo_copy(small_image, str(v2), "--format", "v2s2")
    image = client.resolve(v2)
    listing = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {
                "mediaType": DOCKER_MANIFEST,
                "digest": image.digest,
                "size": len(image.raw),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    client.push_manifest(v2.with_tag("list"), json.dumps(listing).encode(), DOCKER_LIST)
    assert client.resolve(v2.with_tag("list")).digest == image.digest


def test_not_found(client: RegistryClient, registry: Any, small_image: str) -> None:
    ref = Reference.parse(small_image)
    with pytest.raises(ImageNotFound, match="MANIFEST_UNKNOWN"):
        client.resolve(ref.with_tag("no-such-tag"))
    with pytest.raises(ImageNotFound):
        client.resolve(Reference.parse(f"{registry.host}/no-such-repo:1"))
    with pytest.raises(ImageNotFound):
        client.blob_size(ref, "sha256:" + "0" * 64)
    with pytest.raises(ImageNotFound):
        client.get_blob(ref, "sha256:" + "0" * 64)


# -- blobs ---------------------------------------------------------------------------------
def test_head_and_fetch_blob(client: RegistryClient, small_image: str, tmp_path: Path) -> None:
    ref = Reference.parse(small_image)
    image = client.resolve(ref)
    layer = image.layers[1]
    assert client.blob_size(ref, layer.digest) == layer.size
    seen: list[int] = []
    dest = tmp_path / "blob"
    client.fetch_blob(ref, layer.digest, dest, seen.append)
    assert sha(dest.read_bytes()) == layer.digest
    assert seen[-1] == layer.size and seen == sorted(seen)
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


def test_ranges_single_and_multi(registry: Any, python_image: str, proxy: Proxy) -> None:
    c = make_client()
    ref = Reference.parse(python_image)
    layer = c.resolve(ref).layers[0]
    full = raw_get(f"{registry.url}/v2/python/blobs/{layer.digest}").content
    via = Reference.parse(python_image.replace(registry.host, proxy.host))
    pc = make_client()
    # one range
    assert pc.fetch_ranges(via, layer.digest, [(100, 5000)]) == [full[100:5000]]
    assert proxy.ranged() == ["bytes=100-4999"]
    # several: out of order, overlapping, adjacent, empty, at the very end
    ranges = [
        (layer.size - 10, layer.size),
        (0, 512),
        (400, 1000),
        (1000, 1200),
        (70_000, 70_001),
        (5, 5),
        (1_000_000, 1_300_000),
    ]
    proxy.requests.clear()
    got = pc.fetch_ranges(via, layer.digest, ranges)
    assert got == [full[s:e] for s, e in ranges]
    assert proxy.ranged() == [
        f"bytes=0-1199,70000-70000,1000000-1299999,{layer.size - 10}-{layer.size - 1}"
    ]
    with pytest.raises(RegistryError, match="not satisfiable"):
        c.fetch_ranges(ref, layer.digest, [(layer.size + 10, layer.size + 20)])
    c.close()
    pc.close()


@pytest.mark.parametrize("answer", [400, 416, 200])
def test_ranges_fall_back_to_one_request_each(
    registry: Any, python_image: str, proxy: Proxy, answer: int
) -> None:
    ref = Reference.parse(python_image)
    c = make_client()
    layer = c.resolve(ref).layers[0]
    full = raw_get(f"{registry.url}/v2/python/blobs/{layer.digest}").content

    def refuse_multi(h: _ProxyHandler) -> bool:
        rng = h.headers.get("Range", "")
        if "," not in rng:
            return False
        if answer == 200:  # a server that ignores Range sends the whole blob
            h.reply(200, full, {"Content-Type": "application/octet-stream"})
        else:
            h.reply(answer, b"no multi-range here")
        return True

    proxy.handle = refuse_multi
    via = Reference.parse(python_image.replace(registry.host, proxy.host))
    ranges = [(10, 20), (5000, 6000), (40_000, 40_100)]
    got = c.fetch_ranges(via, layer.digest, ranges)
    assert got == [full[s:e] for s, e in ranges]
    assert proxy.ranged() == ["bytes=10-19,5000-5999,40000-40099"] + [
        f"bytes={s}-{e - 1}" for s, e in ranges
    ]
    c.close()


def test_single_range_ignored_by_the_server(registry: Any, python_image: str, proxy: Proxy) -> None:
    ref = Reference.parse(python_image)
    c = make_client()
    layer = c.resolve(ref).layers[0]
    full = raw_get(f"{registry.url}/v2/python/blobs/{layer.digest}").content

    def ignore_range(h: _ProxyHandler) -> bool:
        if "/blobs/" not in h.path:
            return False
        h.reply(200, full, {"Content-Type": "application/octet-stream"})
        return True

    proxy.handle = ignore_range
    via = Reference.parse(python_image.replace(registry.host, proxy.host))
    assert c.fetch_ranges(via, layer.digest, [(3000, 3100)]) == [full[3000:3100]]
    c.close()


# -- digest verification -----------------------------------------------------------------
def _registry_blob_file(registry: Any, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return registry.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_corrupt_blob_in_registry_storage(
    client: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    ref = Reference.parse(f"{registry.host}/tamper-{uuid.uuid4().hex[:8]}:1")
    data = os.urandom(200_000)
    desc = client.push_blob(ref, data)
    assert desc.digest == sha(data)
    stored = _registry_blob_file(registry, desc.digest)
    damaged = bytearray(stored.read_bytes())
    damaged[123_456] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    dest = tmp_path / "blob"
    with pytest.raises(DigestMismatch, match=desc.digest):
        client.fetch_blob(ref, desc.digest, dest)
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial file
    with pytest.raises(DigestMismatch):
        client.get_blob(ref, desc.digest)
    stored.write_bytes(data)
    assert client.get_blob(ref, desc.digest) == data


def test_tampered_manifests_and_configs_are_refused(
    registry: Any, small_image: str, proxy: Proxy
) -> None:
    c = make_client()
    ref = Reference.parse(small_image)
    good = c.resolve(ref)
    via = Reference.parse(small_image.replace(registry.host, proxy.host))

    def manifest_tamper(path: str, body: bytes) -> bytes:
        return (
            body.replace(b'"schemaVersion":2', b'"schemaVersion": 2')
            if "/manifests/" in path
            else body
        )

    proxy.tamper = manifest_tamper
    with pytest.raises(DigestMismatch, match="registry says"):
        c.resolve(via)  # by tag: checked against Docker-Content-Digest
    with pytest.raises(DigestMismatch, match="hashes to"):
        c.resolve(via.with_digest(good.digest))  # by digest: checked against the digest
    proxy.strip_digest_header = True
    with pytest.raises(DigestMismatch):
        c.resolve(via.with_digest(good.digest))

    def config_tamper(path: str, body: bytes) -> bytes:
        return body.replace(b'"run"', b'"pwn"') if good.config.digest in path else body

    proxy.strip_digest_header = False
    proxy.tamper = config_tamper
    with pytest.raises(DigestMismatch, match=good.config.digest):
        c.resolve(via)

    def layer_tamper(path: str, body: bytes) -> bytes:
        if good.layers[1].digest in path and body:
            return body[:-1] + bytes([body[-1] ^ 1])
        return body

    proxy.tamper = layer_tamper
    with pytest.raises(DigestMismatch):
        c.get_blob(via, good.layers[1].digest)
    c.close()


# -- authentication ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory, small_image: str
) -> Iterator[tuple[Any, str]]:
    import bcrypt

    root = tmp_path_factory.mktemp("basic-registry")
    lines = [
        f"{user}:{bcrypt.hashpw(password, bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, password in (("alice", b"s3cret"), ("bob", b"hunter2"))
    ]
    (root / "htpasswd").write_text("".join(lines))
    reg = imagetools.start_registry(
        root / "reg",
        auth_yaml=f"  htpasswd:\n    realm: warmstart-test\n    path: {root / 'htpasswd'}\n",
    )
    ref = f"{reg.host}/small:1"
    skopeo_copy(small_image, ref, "--dest-creds", "alice:s3cret")
    yield reg, ref
    reg.stop()


def test_basic_auth(basic_registry: tuple[Any, str], tmp_path: Path) -> None:
    reg, ref_text = basic_registry
    ref = Reference.parse(ref_text)
    with make_client() as anonymous, pytest.raises(AuthError, match="username and password"):
        anonymous.resolve(ref)
    wrong = make_client(credentials={reg.host: ("alice", "wrong")})
    with wrong, pytest.raises(AuthError, match="refused"):
        wrong.resolve(ref)
    with make_client(credentials={reg.host: ("alice", "s3cret")}) as good:
        image = good.resolve(ref)
        assert good.get_blob(ref, image.layers[0].digest)
        assert good.blob_size(ref, image.layers[0].digest) == image.layers[0].size
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}})
    )
    with make_client(docker_config=config) as from_file:
        assert from_file.resolve(ref).digest == image.digest


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, small_image: str
) -> Iterator[tuple[Any, str, TokenServer]]:
    """Alice may pull and push everything; bob only his own repositories (bobs/...)."""
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root, {"alice": ("s3cret", ("*",)), "bob": ("hunter2", ("bobs/*",))})
    reg = imagetools.start_registry(root / "reg", auth_yaml=tokens.auth_yaml())
    ref = f"{reg.host}/small:1"
    skopeo_copy(small_image, ref, "--dest-creds", "alice:s3cret")
    skopeo_copy(small_image, f"{reg.host}/bobs/small:1", "--dest-creds", "alice:s3cret")
    yield reg, ref, tokens
    reg.stop()
    tokens.close()


def test_bearer_token_auth(token_registry: tuple[Any, str, TokenServer]) -> None:
    reg, ref_text, tokens = token_registry
    ref = Reference.parse(ref_text)
    tokens.requests.clear()
    with make_client(credentials={reg.host: ("alice", "s3cret")}) as c:
        image = c.resolve(ref)
        for layer in image.layers:
            assert sha(c.get_blob(ref, layer.digest)) == layer.digest
        c.resolve(ref)
        # one token for the repository's pull scope, reused by every request after
        assert [r.scopes for r in tokens.requests] == [("repository:small:pull",)]
        assert tokens.requests[0].service == "warmstart-test-registry"
        pushed = c.push_blob(ref.with_tag("x"), b"pushed with a push-scoped token")
        assert c.get_blob(ref, pushed.digest) == b"pushed with a push-scoped token"
        assert ("repository:small:pull,push",) in [r.scopes for r in tokens.requests]
    with make_client() as anonymous, pytest.raises(AuthError, match="refused"):
        anonymous.resolve(ref)
    wrong = make_client(credentials={reg.host: ("alice", "nope")})
    with wrong, pytest.raises(AuthError, match="token server refused our credentials"):
        wrong.resolve(ref)


def install_helper(
    bin_dir: Path, name: str, user: str, secret: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """``docker-credential-<name>`` on PATH answering ``user``/``secret`` for any server;
    it logs each server it is asked for to the returned file."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / f"{name}.log"
    exe = bin_dir / f"docker-credential-{name}"
    answer = json.dumps({"Username": user, "Secret": secret})
    exe.write_text(f"#!/bin/sh\nread -r server\necho \"$server\" >> {log}\necho '{answer}'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_basic_auth_from_a_credential_helper(
    basic_registry: tuple[Any, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, ref_text = basic_registry
    log = install_helper(tmp_path / "bin", "teststore", "alice", "s3cret", monkeypatch)
    config = tmp_path / "config.json"
    # As ``docker login`` leaves it with a store: an empty entry, the login in the store.
    config.write_text(json.dumps({"auths": {reg.host: {}}, "credsStore": "teststore"}))
    with make_client(docker_config=config) as c:
        c.resolve(Reference.parse(ref_text))
        c.resolve(Reference.parse(ref_text))
    assert log.read_text().split() == [reg.host]  # asked once, for the registry's host
    wrong = install_helper(tmp_path / "bin2", "wrongstore", "alice", "nope", monkeypatch)
    config.write_text(json.dumps({"credHelpers": {reg.host: "wrongstore"}}))
    with make_client(docker_config=config) as c, pytest.raises(AuthError, match="refused"):
        c.resolve(Reference.parse(ref_text))
    assert wrong.read_text().split()[0] == reg.host


def test_identity_token_from_a_credential_helper(
    token_registry: tuple[Any, str, TokenServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper answering ``<token>`` gives an identity token: exchanged at the token
    server with the refresh-token grant, never sent to the registry as a password."""
    reg, ref_text, tokens = token_registry
    ref = Reference.parse(ref_text)
    refresh = tokens.refresh_token("alice")
    install_helper(tmp_path / "bin", "idtok", "<token>", refresh, monkeypatch)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {reg.host: "idtok"}}))
    tokens.requests.clear()
    with make_client(docker_config=config) as c:
        image = c.resolve(ref)
        assert sha(c.get_blob(ref, image.layers[0].digest)) == image.layers[0].digest
    assert [(r.user, r.scopes, r.refused) for r in tokens.requests] == [
        ("alice", ("repository:small:pull",), False)
    ]
    install_helper(tmp_path / "bin2", "staletok", "<token>", "revoked", monkeypatch)
    config.write_text(json.dumps({"credHelpers": {reg.host: "staletok"}}))
    with make_client(docker_config=config) as c, pytest.raises(AuthError, match="identity token"):
        c.resolve(ref)


# -- a deployer's access, checked with their credentials only -----------------------------
ALICE = RegistryCredential.basic("alice", "s3cret")
BOB = RegistryCredential.basic("bob", "hunter2")


def _token_for(tokens: TokenServer, user: str, password: str, scope: str) -> str:
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    resp = raw_get(
        tokens.realm,
        params={"scope": scope, "service": "warmstart-test-registry"},
        headers={"Authorization": f"Basic {basic}"},
    )
    resp.raise_for_status()
    token: str = resp.json()["token"]
    return token


def test_check_pull_with_basic_auth(basic_registry: tuple[Any, str]) -> None:
    reg, ref_text = basic_registry
    ref = Reference.parse(ref_text)
    # The node's own credentials (alice's) never stand in for the deployer's.
    with make_client(credentials={reg.host: ("alice", "s3cret")}) as node:
        node.resolve(ref)  # the node has learnt that the host asks for Basic
        node.check_pull(ref, ALICE)
        node.check_pull(ref, BOB)  # htpasswd has no per-repository rules: any user pulls
        refused = [
            None,
            RegistryCredential.basic("bob", "wrong"),
            RegistryCredential.basic("mallory", "s3cret"),
            RegistryCredential.bearer("not-a-token"),
        ]
        for credential in refused:
            with pytest.raises(ImageAccessDenied, match=r"refused|no anonymous"):
                node.check_pull(ref, credential)
        with pytest.raises(ImageNotFound):
            node.check_pull(ref.with_tag("no-such-tag"), ALICE)
    # A client that never spoke to the registry meets the challenge first; it keeps
    # nothing of the deployer's: its own requests stay anonymous.
    with make_client() as fresh:
        fresh.check_pull(ref, BOB)
        with pytest.raises(ImageAccessDenied, match="no anonymous pulls"):
            fresh.check_pull(ref, None)
        with pytest.raises(AuthError, match="username and password"):
            fresh.resolve(ref)


def test_check_pull_with_token_auth(token_registry: tuple[Any, str, TokenServer]) -> None:
    """Alice may pull small, bob may not (his grant is bobs/*): the token server's scopes
    decide, with the credentials of whoever deploys, never the node's."""
    reg, ref_text, tokens = token_registry
    ref = Reference.parse(ref_text)
    bobs = Reference.parse(f"{reg.host}/bobs/small:1")
    with make_client(credentials={reg.host: ("alice", "s3cret")}) as node:
        node.resolve(ref)
        tokens.requests.clear()
        node.check_pull(ref, ALICE)
        node.check_pull(bobs, BOB)
        with pytest.raises(ImageAccessDenied, match="refused the credentials given for small"):
            node.check_pull(ref, BOB)
        with pytest.raises(ImageAccessDenied, match="refused anonymous access"):
            node.check_pull(ref, None)
        with pytest.raises(ImageAccessDenied, match="token server refused the credentials"):
            node.check_pull(ref, RegistryCredential.basic("bob", "wrong"))
        assert [r.user for r in tokens.requests] == ["alice", "bob", "bob", None, "bob"]
        assert [r.scopes for r in tokens.requests][:2] == [
            ("repository:small:pull",),
            ("repository:bobs/small:pull",),
        ]
        # A registry token of the deployer's own goes to the registry as it is.
        tokens.requests.clear()
        alice_token = _token_for(tokens, "alice", "s3cret", "repository:small:pull")
        node.check_pull(ref, RegistryCredential.bearer(alice_token))
        bob_token = _token_for(tokens, "bob", "hunter2", "repository:small:pull")
        with pytest.raises(ImageAccessDenied):
            node.check_pull(ref, RegistryCredential.bearer(bob_token))
        assert len(tokens.requests) == 2  # the two _token_for calls: checks asked nothing
    with make_client() as fresh:
        fresh.check_pull(ref, ALICE)
        with pytest.raises(AuthError, match="refused"):
            fresh.resolve(ref)  # alice's token served her check only


def test_check_pull_sends_no_credentials_to_a_plain_http_realm(
    registry: Any, small_image: str, proxy: Proxy
) -> None:
    def challenge(h: _ProxyHandler) -> bool:
        realm = 'Bearer realm="http://tokens.example.invalid/token",service="elsewhere"'
        h.reply(401, b"", {"WWW-Authenticate": realm})
        return True

    proxy.handle = challenge
    ref = Reference.parse(small_image.replace(registry.host, proxy.host))
    with make_client() as c, pytest.raises(RegistryError, match="plain HTTP"):
        c.check_pull(ref, ALICE)


def test_redirects_never_carry_credentials_to_another_host(
    registry: Any, small_image: str, proxy: Proxy
) -> None:
    """The proxy stands for an authenticated registry that sends blob downloads to a CDN
    on another host (and one blob to a path on its own host, where credentials stay)."""
    cdn = Proxy(registry.url)
    good = base64.b64encode(b"bob:pw").decode()

    def registry_with_cdn(h: _ProxyHandler) -> bool:
        if h.headers.get("Authorization") != f"Basic {good}":
            h.reply(401, b"", {"WWW-Authenticate": 'Basic realm="cdn-test"'})
            return True
        if "/blobs/" in h.path and not h.path.startswith("/same-host"):
            if "config" in h.path:
                return False
            digest = h.path.rsplit("/", 1)[1]
            if digest.endswith("0"):
                target = f"/same-host{h.path}"
            else:
                target = f"http://{cdn.host}{h.path}?signature=abc"
            h.reply(307, b"", {"Location": target})
            return True
        if h.path.startswith("/same-host"):
            h.path = h.path[len("/same-host") :]
        return False

    proxy.handle = registry_with_cdn
    try:
        ref = Reference.parse(small_image.replace(registry.host, proxy.host))
        with make_client(credentials={proxy.host: ("bob", "pw")}) as c:
            image = c.resolve(ref)
            digests = [image.config.digest] + [layer.digest for layer in image.layers]
            for digest in digests:
                assert sha(c.get_blob(ref, digest)) == digest
        assert cdn.requests, "nothing was redirected to the CDN"
        assert all("authorization" not in headers for _, _, headers in cdn.requests)
        assert all(path.endswith("?signature=abc") for _, path, _ in cdn.requests)
    finally:
        cdn.close()


# -- failures and retries ------------------------------------------------------------------
@pytest.fixture
def own_registry(tmp_path: Path, small_image: str) -> Iterator[tuple[Any, str]]:
    reg = imagetools.start_registry(tmp_path / "reg")
    ref = f"{reg.host}/small:1"
    skopeo_copy(small_image, ref)
    yield reg, ref
    reg.stop()


def test_dead_registry_gives_a_clear_error(
    own_registry: tuple[Any, str], caplog: pytest.LogCaptureFixture
) -> None:
    reg, ref_text = own_registry
    reg.stop()
    caplog.set_level(logging.WARNING, "warmstart.images.registry")
    with make_client(retries=3) as c, pytest.raises(RegistryError) as info:
        c.resolve(Reference.parse(ref_text))
    message = str(info.value)
    assert reg.host in message and "4 attempts" in message and "ConnectError" in message
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3


def test_retries_until_the_registry_is_back(own_registry: tuple[Any, str]) -> None:
    reg, ref_text = own_registry
    reg.stop()
    retried = threading.Event()

    class OnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retry" in record.getMessage():
                retried.set()

    def restart_after_a_retry() -> None:
        if retried.wait(60):
            reg.restart()

    logger = logging.getLogger("warmstart.images.registry")
    handler = OnRetry(logging.WARNING)
    logger.addHandler(handler)
    restarter = threading.Thread(target=restart_after_a_retry)
    restarter.start()
    try:
        with make_client(retries=12, backoff=0.05, max_backoff=0.5) as c:
            image = c.resolve(Reference.parse(ref_text))
            assert image.layers
        assert retried.is_set()  # it did fail first: the registry came back under it
    finally:
        logger.removeHandler(handler)
        retried.set()
        restarter.join()


def test_retries_on_server_errors(registry: Any, small_image: str, proxy: Proxy) -> None:
    failures = {"left": 2}

    def unavailable(h: _ProxyHandler) -> bool:
        if failures["left"] > 0:
            failures["left"] -= 1
            h.reply(503, b"busy", {"Retry-After": "0"})
            return True
        return False

    proxy.handle = unavailable
    ref = Reference.parse(small_image.replace(registry.host, proxy.host))
    with make_client(retries=3) as c:
        assert c.resolve(ref).layers
    assert failures["left"] == 0
    failures["left"] = 100
    with make_client(retries=1) as c, pytest.raises(RegistryError, match="HTTP 503"):
        c.resolve(ref)


def test_dropped_download_is_resumed(
    registry: Any, python_image: str, proxy: Proxy, tmp_path: Path
) -> None:
    c = make_client()
    layer = c.resolve(Reference.parse(python_image)).layers[0]
    full = raw_get(f"{registry.url}/v2/python/blobs/{layer.digest}").content
    cut = {"done": False}

    def drop_once(h: _ProxyHandler) -> bool:
        if layer.digest not in h.path or cut["done"] or h.headers.get("Range"):
            return False
        cut["done"] = True
        h.send_response(200)
        h.send_header("Content-Length", str(len(full)))
        h.end_headers()
        h.wfile.write(full[: len(full) // 3])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)
        return True

    proxy.handle = drop_once
    via = Reference.parse(python_image.replace(registry.host, proxy.host))
    c.fetch_blob(via, layer.digest, tmp_path / "blob")
    assert sha((tmp_path / "blob").read_bytes()) == layer.digest
    resumed = proxy.ranged()
    assert len(resumed) == 1 and resumed[0].startswith("bytes=") and resumed[0].endswith("-")
    assert 0 < int(resumed[0][6:-1]) <= len(full) // 3
    c.close()


def test_push_blob_and_manifest(client: RegistryClient, registry: Any, tmp_path: Path) -> None:
    ref = Reference.parse(f"{registry.host}/pushed-{uuid.uuid4().hex[:8]}:v1")
    layer_file = tmp_path / "layer.tar"
    layer_file.write_bytes(os.urandom(3 << 20))
    layer = client.push_blob(ref, layer_file)
    assert layer.digest == sha(layer_file.read_bytes()) and layer.size == 3 << 20
    assert client.push_blob(ref, layer_file) == layer  # already there: not uploaded again
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }
    ).encode()
    cfg = client.push_blob(ref, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer.digest,
                    "size": layer.size,
                }
            ],
        }
    ).encode()
    digest = client.push_manifest(ref, manifest, OCI_MANIFEST)
    assert digest == sha(manifest)
    served = raw_get(
        f"{registry.url}/v2/{ref.repository}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert served.content == manifest
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True,
        check=True,
    ).stdout
    assert out == manifest
