"""The install cache with real packages from the index, installed inside sandboxes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import uuid
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
