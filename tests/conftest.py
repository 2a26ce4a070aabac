"""Shared fixtures: a real ``warmstart serve`` on loopback, boto3 clients, zip builders."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.clustertools import local_cluster_factory  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (namespaces, cgroups)")


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def lambda_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "lambda",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            config=Config(retries={"max_attempts": 0}, read_timeout=120),
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(data_dir: Path, log_path: Path, *extra: str) -> Server:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "warmstart.cli.main",
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "info",
        *extra,
    ]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    server = Server(url, data_dir, proc, log_path, args)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"warmstart serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"warmstart serve did not come up:\n{server.log()}")


def cgroup_dirs(data_dir: Path) -> list[str]:
    """Our cgroup directories for this data dir (the latency-sensitive subtree and the
    best-effort one), across every v1 controller."""
    import hashlib

    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
    found = []
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        for top in ("warmstart", "warmstart-be"):
            d = ctrl / top / digest
            if d.is_dir():
                found.append(str(d))
    return found


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def factory(*extra: str, data_dir: Path | None = None) -> Server:
        d = data_dir or tmp_path / "data"
        s = start_server(d, tmp_path / "server.log", *extra)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def server(server_factory: Any) -> Server:
    s: Server = server_factory()
    return s


@pytest.fixture
def lam(server: Server) -> Any:
    return server.lambda_client()


def deploy(
    lam: Any,
    name: str,
    files: dict[str, str | bytes],
    handler: str = "handler.handler",
    **kwargs: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = lam.create_function(
        FunctionName=name,
        Runtime="python3.11",
        Role="arn:aws:iam::000000000000:role/test",
        Handler=handler,
        Code={"ZipFile": make_zip(files)},
        **kwargs,
    )
    return out


# -- container images ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The reference OCI registry (Debian's docker-registry) on loopback, no auth."""
    from tests import imagetools

    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (scripts/test installs it)")
    reg = imagetools.start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def python_image(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Debian bookworm + python3 image with a handler in /var/task, pushed to ``registry``.

    Two layers: the Debian root, then /var/task/app.py. CMD is ["app.handler"].
    """
    from tests import imagetools

    handler = (
        "import sys\n"
        "def handler(event, context):\n"
        "    return {'python': sys.executable, 'event': event}\n"
    )
    return imagetools.build_image(
        tmp_path_factory.mktemp("python-image"),
        [imagetools.base_rootfs(), {"var/task/app.py": handler}],
        ref=f"{registry.host}/python:3.11",
        cmd=["app.handler"],
        workingdir="/var/task",
        env=["PATH=/usr/local/bin:/usr/bin:/bin"],
    )
