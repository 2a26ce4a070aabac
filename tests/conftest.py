"""Shared test tooling: what a test needs from its environment (skipped locally, an error
in CI), polling instead of sleeping, a real ``warmstart serve`` on loopback, boto3 clients,
zip builders, the registry and the images every image test shares, and a temp dir that
holds nothing big once a test has passed.

Environment checks
------------------
A test that needs something from the machine (root, a tool on PATH, a cgroup controller,
FUSE) says so with :func:`needs` (a mark) or :func:`require` (a call, for fixtures and
conditions only known at run time).  When the thing is missing the test is skipped with
the reason -- unless ``WARMSTART_TEST_STRICT`` is set (``scripts/test`` sets it), where it
fails with that reason: CI must not pass by skipping what it could not run.
"""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings

from tests.clustertools import local_cluster_factory  # noqa: F401 (a fixture)
from tests.imagetools import unmount_under

pytest_plugins = ["pytester"]

# -- property-based tests (tests/fuzz) -------------------------------------------------------
# "ci" (the default) keeps the whole fuzz suite to well under a minute on two cores; "soak"
# digs deeper for a local run: HYPOTHESIS_PROFILE=soak pytest tests/fuzz.  No deadline: the
# machine is shared and an example's time says nothing about its correctness.
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "soak",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CGROUP_V1 = Path("/sys/fs/cgroup")

T = TypeVar("T")


# -- what a test needs from the machine ------------------------------------------------------
STRICT_ENV = "WARMSTART_TEST_STRICT"


def strict() -> bool:
    """True where a missing prerequisite is an error (CI), not a reason to skip."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def require(available: object, reason: str) -> None:
    """Go on if ``available`` is true; otherwise skip with ``reason``, or fail with it when
    ``WARMSTART_TEST_STRICT`` is set."""
    if available:
        return
    if strict():
        pytest.fail(f"{reason} ({STRICT_ENV} is set: this must not be skipped)", pytrace=False)
    pytest.skip(reason)


def needs(available: object, reason: str) -> pytest.MarkDecorator:
    """A mark for :func:`require`, checked before the test's fixtures are set up."""
    return pytest.mark.needs(bool(available), reason=reason)


def missing_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def require_tools(*names: str) -> None:
    missing = missing_tools(*names)
    require(not missing, f"{' and '.join(missing)} not installed (scripts/test installs it)")


def needs_tools(*names: str) -> pytest.MarkDecorator:
    missing = missing_tools(*names)
    return needs(not missing, f"{' and '.join(missing)} not installed (scripts/test installs it)")


def has_cgroup_v1(*files: str) -> bool:
    """True if every ``controller/file`` exists in the cgroup v1 hierarchy."""
    return all((CGROUP_V1 / f).exists() for f in files)


needs_root = needs(IS_ROOT, "needs root (namespaces, cgroups)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(available, reason): skip (or fail under WARMSTART_TEST_STRICT) unless available",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        require(mark.args[0], mark.kwargs["reason"])


# -- waiting for something to happen ---------------------------------------------------------
def wait_until(
    predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail with
    ``what`` (and the last value seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (got {value!r})")
        time.sleep(interval)


# -- a temp dir that holds nothing big -------------------------------------------------------
def remove_tree(root: Path) -> None:
    """Unmount what is below ``root``, then delete it."""
    if root.exists():
        unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _nothing_mounted_in_tmp_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before pytest deletes a passed test's ``tmp_path`` (``tmp_path_retention_policy``
    is "failed"), detach whatever a test or a killed server left mounted there."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    path: Path = request.getfixturevalue("tmp_path")
    yield
    unmount_under(path)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """The same for the whole base temp dir, which pytest removes when every test passed."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is not None and Path(basetemp).is_dir():
        unmount_under(Path(basetemp))


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

    require_tools("docker-registry", "umoci", "skopeo")
    root = tmp_path_factory.mktemp("registry")
    reg = imagetools.start_registry(root)
    yield reg
    reg.stop()
    remove_tree(root)


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
        [{"var/task/app.py": handler}],
        base=imagetools.debian_layout(),
        ref=f"{registry.host}/python:3.11",
        cmd=["app.handler"],
        workingdir="/var/task",
        env=["PATH=/usr/local/bin:/usr/bin:/bin"],
    )


@pytest.fixture(scope="session")
def ctr_remote_python_image(
    registry: Any, python_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """``python_image`` converted to eStargz by the reference implementation
    (``ctr-remote image convert --estargz --oci`` in a private containerd), pushed to
    ``registry``.  Converted once: the lazy-mount and the interop tests both read it.
    Compression level 1 instead of 9: the same format, a third less time."""
    from tests import imagetools

    require_tools("containerd", "ctr-remote")
    root = tmp_path_factory.mktemp("containerd-convert")
    ctd = imagetools.start_containerd(root)
    try:
        dst = f"{registry.host}/python:ref-esgz"
        ctd.ctr("content", "fetch", "--plain-http", python_image)
        ctd.ctr(
            "image",
            "convert",
            "--estargz",
            "--estargz-compression-level",
            "1",
            "--oci",
            python_image,
            dst,
        )
        ctd.ctr("image", "push", "--plain-http", dst)
    finally:
        ctd.stop()
        remove_tree(root)
    return dst
