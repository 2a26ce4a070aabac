"""The install cache with real packages from the index, installed inside sandboxes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Server, deploy, needs_root

pytestmark = [pytest.mark.integration, needs_root]

USES_REQUESTS = """
import requests, six
def handler(event, context):
    return {"requests": requests.__version__, "where": requests.__file__, "six": six.__version__}
"""


def _metric(server: Server, name: str) -> float:
    with server.http() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_requirements_are_installed_once_and_shared(server: Server, lam: Any) -> None:
    reqs = "requests>=2.30\nsix\n"
    errors: list[Exception] = []

    def create(name: str) -> None:
        try:
            deploy(
                server.lambda_client(),
                name,
                {"handler.py": USES_REQUESTS, "requirements.txt": reqs},
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(f"req{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # requests, urllib3, idna, charset-normalizer, certifi, six: one install each, not two.
    installs = _metric(server, "warmstart_package_installs_total")
    assert installs == 6

    bodies = []
    for name in ("req0", "req1"):
        resp = lam.invoke(FunctionName=name, Payload=b"{}")
        assert "FunctionError" not in resp, resp["Payload"].read()
        bodies.append(json.loads(resp["Payload"].read()))
    assert bodies[0]["where"] == bodies[1]["where"]
    assert bodies[0]["where"].startswith("/var/packages/requests-")
    pkg_dirs = [
        p for p in (server.data_dir / "packages").iterdir() if p.name.startswith("requests-")
    ]
    assert len(pkg_dirs) == 1
    assert (pkg_dirs[0].stat().st_mode & 0o222) == 0, "installed packages are read-only"

    # The sandbox cannot write into a package either.
    deploy(
        lam,
        "writer",
        {
            "handler.py": "import requests, os\ndef handler(e, c):\n"
            "    try:\n        open(os.path.dirname(requests.__file__) + '/x', 'w')\n"
            "    except OSError as exc:\n        return str(exc)\n    return 'wrote'\n",
            "requirements.txt": reqs,
        },
    )
    out = json.loads(lam.invoke(FunctionName="writer", Payload=b"{}")["Payload"].read())
    assert "Read-only file system" in out
    assert _metric(server, "warmstart_package_installs_total") == 6


def test_numpy_and_pandas(server: Server, lam: Any) -> None:
    code = (
        "import numpy, pandas\ndef handler(e, c):\n"
        "    df = pandas.DataFrame({'x': numpy.arange(4)})\n"
        "    return {'sum': int(df.x.sum()), 'np': numpy.__version__, 'pd': pandas.__version__}\n"
    )
    deploy(
        lam, "pd", {"handler.py": code, "requirements.txt": "pandas\n"}, MemorySize=512, Timeout=30
    )
    resp = lam.invoke(FunctionName="pd", Payload=b"{}")
    body = json.loads(resp["Payload"].read())
    assert "FunctionError" not in resp, body
    assert body["sum"] == 6


def test_unresolvable_and_conflicting_requirements(server: Server, lam: Any) -> None:
    for reqs in (
        f"warmstart-no-such-package-{uuid.uuid4().hex[:8]}==1.0\n",
        "six==1.16.0\nsix==1.17.0\n",
    ):
        with pytest.raises(ClientError) as err:
            deploy(lam, "bad", {"handler.py": USES_REQUESTS, "requirements.txt": reqs})
        assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
        assert "requirements" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError):
        lam.get_function(FunctionName="bad")
    leftovers = [
        p.name for p in (server.data_dir / "packages").iterdir() if p.name.startswith(".tmp-")
    ]
    assert leftovers == []


def _evil_sdist(directory: Path, marker: Path) -> None:
    """An sdist whose setup.py tries to write on the host and then fails."""
    setup = (
        f"from pathlib import Path\n"
        f"try:\n    Path({str(marker)!r}).write_text('escaped')\nexcept OSError:\n    pass\n"
        f"raise SystemExit('this package refuses to build')\n"
    )
    pkg_info = "Metadata-Version: 2.1\nName: warmstart-evil\nVersion: 1.0\n"
    path = directory / "warmstart_evil-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in (("setup.py", setup), ("PKG-INFO", pkg_info)):
            data = text.encode()
            info = tarfile.TarInfo(f"warmstart_evil-1.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_package_builds_run_in_a_sandbox(server_factory: Any, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    marker = tmp_path / f"escaped-{uuid.uuid4().hex}"
    _evil_sdist(wheels, marker)
    server = server_factory("--find-links", str(wheels))
    with pytest.raises(ClientError) as err:
        deploy(
            server.lambda_client(),
            "evil",
            {
                "handler.py": "def handler(e, c):\n    return 1\n",
                "requirements.txt": "warmstart-evil==1.0\n",
            },
        )
    assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
    assert not marker.exists(), "a setup.py wrote to the host"


def test_offline_wheelhouse(server_factory: Any, tmp_path: Path) -> None:
    wheels = tmp_path / "wheelhouse"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            "six==1.17.0",
        ],
        check=True,
    )
    server = server_factory("--offline", "--find-links", str(wheels))
    lam = server.lambda_client()
    deploy(
        lam,
        "off",
        {
            "handler.py": "import six\ndef handler(e, c):\n    return six.__version__\n",
            "requirements.txt": "six\n",
        },
    )
    assert json.loads(lam.invoke(FunctionName="off", Payload=b"{}")["Payload"].read()) == "1.17.0"
    with pytest.raises(ClientError):  # not in the wheelhouse, and the network is off limits
        deploy(lam, "off2", {"handler.py": "x = 1\n", "requirements.txt": "requests\n"})


# -- egress: what a requirements.txt may make the node fetch -----------------------------------
class Recorder(ThreadingHTTPServer):
    """A host-local HTTP server that records every request that reaches it."""

    hits: list[str]
    pages: dict[str, tuple[int, dict[str, str], bytes]]


class _Recording(BaseHTTPRequestHandler):
    server: Recorder

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        status, headers, body = self.server.pages.get(self.path, (404, {}, b"secret 404"))
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorders() -> Iterator[Callable[[], Recorder]]:
    started: list[Recorder] = []

    def start() -> Recorder:
        server = Recorder(("127.0.0.1", 0), _Recording)
        server.hits, server.pages = [], {}
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _deploy_error(lam: Any, reqs: str) -> str:
    with pytest.raises(ClientError) as err:
        deploy(lam, "egress", {"handler.py": "x = 1\n", "requirements.txt": reqs})
    assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
    message: str = err.value.response["Error"]["Message"]
    return message


def test_requirement_sources_are_refused_and_nothing_is_fetched(
    server: Server, lam: Any, recorders: Callable[[], Recorder]
) -> None:
    local = recorders()
    port = local.server_address[1]
    for reqs in (
        f"six\n--index-url http://127.0.0.1:{port}/\n",
        f"--extra-index-url http://localhost:{port}/simple\nsix\n",
        f"pkg @ http://127.0.0.1:{port}/pkg-1.0-py3-none-any.whl\n",
        f"http://127.0.0.1:{port}/pkg-1.0-py3-none-any.whl\n",
        f"-f http://127.0.0.1:{port}/\nsix\n",
    ):
        message = _deploy_error(lam, reqs)
        assert "requirements.txt line " in message and "--allow-requirement-sources" in message
    with pytest.raises(ClientError):
        lam.get_function(FunctionName="egress")
    assert local.hits == []


def _wheel_index(index: Recorder, files: Recorder) -> None:
    """An index that lists a file on another host-local port, and sends another project
    there by a redirect."""
    elsewhere = f"localhost:{files.server_address[1]}"
    index.pages["/simple/listed-elsewhere/"] = (
        200,
        {"Content-Type": "text/html"},
        f'<a href="http://{elsewhere}/listed_elsewhere-1.0-py3-none-any.whl">'
        "listed_elsewhere-1.0-py3-none-any.whl</a>".encode(),
    )
    index.pages["/simple/redirected/"] = (302, {"Location": f"http://{elsewhere}/simple/x/"}, b"")


def _probing_sdist(directory: Path, ports: list[int]) -> None:
    """An sdist whose setup.py reaches for host-local ports, directly and through the
    proxy it is given, says what it got, and fails."""
    setup = (
        "import socket, sys, urllib.request\n"
        f"for port in {ports!r}:\n"
        "    for host in ('127.0.0.1', 'localhost'):\n"
        "        try:\n"
        "            socket.create_connection((host, port), timeout=10).close()\n"
        "            print('probe: connected', host, port, file=sys.stderr)\n"
        "        except OSError as exc:\n"
        "            print('probe: no direct connection', exc, file=sys.stderr)\n"
        "        try:\n"
        "            urllib.request.urlopen(f'http://{host}:{port}/probe', timeout=10)\n"
        "            print('probe: fetched', host, port, file=sys.stderr)\n"
        "        except Exception as exc:\n"
        "            print('probe: not fetched', exc, file=sys.stderr)\n"
        "raise SystemExit('probe: done')\n"
    )
    pkg_info = "Metadata-Version: 2.1\nName: warmstart-probe\nVersion: 1.0\n"
    with tarfile.open(directory / "warmstart_probe-1.0.tar.gz", "w:gz") as tf:
        for name, text in (("setup.py", setup), ("PKG-INFO", pkg_info)):
            data = text.encode()
            info = tarfile.TarInfo(f"warmstart_probe-1.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_an_index_cannot_send_the_installer_to_host_local_ports(
    server_factory: Any, recorders: Callable[[], Recorder]
) -> None:
    index, files = recorders(), recorders()
    _wheel_index(index, files)
    server = server_factory("--index-url", f"http://127.0.0.1:{index.server_address[1]}/simple/")
    lam = server.lambda_client()
    for project in ("listed-elsewhere", "redirected"):
        message = _deploy_error(lam, f"{project}\n")
        assert message.startswith(f"requirements.txt: {project} could not be resolved from the")
        assert "secret" not in message and str(files.server_address[1]) not in message
    assert "/simple/listed-elsewhere/" in index.hits and "/simple/redirected/" in index.hits
    assert files.hits == []
    assert "refused a connection to localhost:" in server.log()


def test_the_installer_reaches_no_host_local_port_even_with_sources_allowed(
    server_factory: Any, tmp_path: Path, recorders: Callable[[], Recorder]
) -> None:
    local = recorders()
    port = local.server_address[1]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _probing_sdist(wheels, [port])
    server = server_factory("--allow-requirement-sources", "--find-links", str(wheels))
    lam = server.lambda_client()
    for reqs in (
        f"--index-url http://127.0.0.1:{port}/simple/\nsix\n",
        f"--extra-index-url http://localhost:{port}/simple/\nsix\n",
        f"--index-url http://[::ffff:127.0.0.1]:{port}/simple/\nsix\n",
        f"pkg @ http://localhost:{port}/pkg-1.0-py3-none-any.whl\n",
        "warmstart-probe==1.0\n",  # code that runs in the installer's sandbox
    ):
        message = _deploy_error(lam, reqs)
        assert "could not be resolved from the configured index" in message, message
        assert "secret" not in message and str(port) not in message
    assert local.hits == []
    log = server.log()
    assert f"refused a connection to localhost:{port}" in log
    probes = [line for line in log.splitlines() if "probe:" in line]
    assert any("no direct connection" in line for line in probes), log[-3000:]
    assert not any("probe: connected" in ln or "probe: fetched" in ln for ln in probes)
