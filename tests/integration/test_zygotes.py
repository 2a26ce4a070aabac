"""Zygotes: forked instances are isolated exactly like fresh ones, share pre-imported
packages, and survive zygote failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, deploy, needs_root

pytestmark = [pytest.mark.integration, needs_root]

PROBE = """
import os, sys
PRELOADED = sorted(m for m in ("numpy", "pandas") if m in sys.modules)  # before our imports
def handler(event, context):
    status = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"):
            status[key] = value.split()
    return {"pid": os.getpid(), "root": sorted(os.listdir("/")), "task": sorted(os.listdir("/var/task")),
            "proc": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "status": status, "preloaded": PRELOADED}
"""

PANDAS = """
import sys
PRELOADED = "pandas" in sys.modules  # already imported by the zygote?
import pandas
def handler(event, context):
    return {"preloaded": PRELOADED, "sum": int(pandas.Series([1, 2, 3]).sum())}
"""


def _deploy_pandas(lam: Any, name: str) -> None:
    deploy(
        lam,
        name,
        {"handler.py": PANDAS, "requirements.txt": "pandas\n"},
        MemorySize=512,
        Timeout=60,
    )


def _wait_for_zygotes(server: Server, pred: Any, timeout: float = 120) -> list[dict[str, Any]]:
    """Poll GET /zygotes until ``pred(zygotes)`` holds."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while True:
            zs: list[dict[str, Any]] = http.get("/zygotes").json()["zygotes"]
            if pred(zs):
                return zs
            assert time.monotonic() < deadline, zs
            time.sleep(0.2)


def _alive_with(zygotes: list[dict[str, Any]], package: str) -> list[dict[str, Any]]:
    """The live zygotes whose packages include ``package``."""
    return [
        z
        for z in zygotes
        if z.get("alive") and any(p.startswith(package + "==") for p in z["packages"])
    ]


def _run(server: Server, name: str) -> tuple[str, Any]:
    with server.http() as http:
        r = http.post(f"/run/{name}", content=b"{}")
    assert r.status_code == 200, r.text
    return r.headers["X-Warmstart-Start"], r.json()


def _instance_pids(server: Server) -> list[int]:
    """Host pids of the instances in our cgroups (not zygotes)."""
    from tests.conftest import cgroup_dirs

    pids: set[int] = set()
    for d in cgroup_dirs(server.data_dir):
        if "/memory/" not in d:
            continue
        for procs in Path(d).rglob("cgroup.procs"):
            pids.update(int(x) for x in procs.read_text().split())
    out = []
    for pid in pids:
        try:
            if (
                Path(f"/proc/{pid}/comm").read_text().strip() == "python3.11"
                or Path(f"/proc/{pid}/comm").read_text().strip() == "ws-instance"
            ):
                out.append(pid)
        except OSError:
            pass
    return out


def test_forked_instances_are_isolated(server: Server, lam: Any) -> None:
    deploy(lam, "a", {"handler.py": PROBE, "secret_a.txt": "A"})
    deploy(lam, "b", {"handler.py": PROBE, "secret_b.txt": "B"})
    start_a, a = _run(server, "a")
    start_b, b = _run(server, "b")
    assert (start_a, start_b) == ("fork", "fork")
    # Each sees only its own code, its own pid namespace, no host processes.
    assert "secret_a.txt" in a["task"] and "secret_b.txt" not in a["task"]
    assert "secret_b.txt" in b["task"] and "secret_a.txt" not in b["task"]
    assert a["pid"] == 1 and a["proc"] == [1]
    assert "work" not in a["root"] and "home" not in a["root"]
    # Unprivileged for good: uid 65534, no capabilities at all, no_new_privs, seccomp.
    assert a["status"]["Uid"] == ["65534"] * 4
    assert a["status"]["CapEff"] == ["0000000000000000"]
    assert a["status"]["CapPrm"] == ["0000000000000000"]
    assert a["status"]["CapBnd"] == ["0000000000000000"]
    assert a["status"]["NoNewPrivs"] == ["1"]
    assert a["status"]["Seccomp"] == ["2"]

    # From the host: each instance sits in its own pooled cgroup with its own limits, and
    # in namespaces of its own (not the host's, not the zygote's, not each other's).
    with server.http() as http:
        zygotes = http.get("/zygotes").json()["zygotes"]
    zygote_pid = zygotes[0]["pid"]
    pids = _instance_pids(server)
    assert len(pids) == 2
    for ns in ("pid", "mnt", "net", "uts", "ipc", "user"):
        links = {os.readlink(f"/proc/{p}/ns/{ns}") for p in pids}
        host = os.readlink(f"/proc/self/ns/{ns}")
        assert host not in links, ns
        if ns != "user":  # instances share the zygote's user namespace
            assert len(links) == 2, ns
            assert os.readlink(f"/proc/{zygote_pid}/ns/{ns}") not in links, ns
    cgroups = set()
    for p in pids:
        line = next(
            ln for ln in Path(f"/proc/{p}/cgroup").read_text().splitlines() if ":memory:" in ln
        )
        cgroups.add(line.split(":", 2)[2])
        limit = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2]) / "memory.limit_in_bytes"
        assert int(limit.read_text()) == 128 << 20
    assert len(cgroups) == 2
    # On the host the instance runs as the sandbox uid, not as root.
    for p in pids:
        uid_line = next(
            ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("Uid:")
        )
        assert uid_line.split()[1:] == ["65534"] * 4


def test_pandas_zygote_grows_from_demand(server_factory: Any) -> None:
    server: Server = server_factory("--zygote-after", "1", "--no-zygote-at-deploy")
    lam = server.lambda_client()
    _deploy_pandas(lam, "pd1")
    _deploy_pandas(lam, "pd2")
    start, first = _run(server, "pd1")
    assert first["sum"] == 6
    # The first cold start asked for a pandas zygote; it is built in the background.
    pandas_z = _alive_with(
        _wait_for_zygotes(server, lambda zs: _alive_with(zs, "pandas")), "pandas"
    )
    assert "pandas" in pandas_z[0]["imported"] and "numpy" in pandas_z[0]["imported"]
    start, second = _run(server, "pd2")
    assert start == "fork"
    assert second == {"preloaded": True, "sum": 6}
    # Copy-on-write: the forked instance costs a fraction of its zygote.
    with server.http() as http:
        z = next(z for z in http.get("/zygotes").json()["zygotes"] if z["packages"])
    assert z["instances"] == 1
    assert z["memory"]["pss"] > 0


def test_a_pandas_zygote_is_built_at_deploy(server: Server, lam: Any) -> None:
    """Deploying is enough: the package set's zygote is built before any invocation, and
    the very first one forks from it with pandas already imported."""
    _deploy_pandas(lam, "pd1")
    pandas_z = _alive_with(
        _wait_for_zygotes(server, lambda zs: _alive_with(zs, "pandas")), "pandas"
    )
    assert pandas_z[0]["forks"] == 0 and "pandas" in pandas_z[0]["imported"]
    start, body = _run(server, "pd1")
    assert start == "fork" and body == {"preloaded": True, "sum": 6}
    with server.http() as http:
        assert http.get("/zygotes").json()["built_at_deploy"] == 1


def test_a_killed_zygote_is_replaced_and_the_call_succeeds(server: Server, lam: Any) -> None:
    deploy(lam, "k1", {"handler.py": PROBE})
    deploy(lam, "k2", {"handler.py": PROBE})
    assert _run(server, "k1")[0] == "fork"
    with server.http() as http:
        zygote_pid = http.get("/zygotes").json()["zygotes"][0]["pid"]
    os.kill(zygote_pid, signal.SIGKILL)
    start, body = _run(server, "k2")  # still served: forked from a new zygote, or fresh
    assert start in ("fork", "cold")
    assert body["pid"] in (1, 2)
    deadline = time.monotonic() + 30
    with server.http() as http:
        while True:
            zs = http.get("/zygotes").json()["zygotes"]
            if zs and zs[0].get("alive") and zs[0]["pid"] != zygote_pid:
                break
            assert time.monotonic() < deadline, zs
            time.sleep(0.1)
    deploy(lam, "k3", {"handler.py": PROBE})
    assert _run(server, "k3")[0] == "fork"


def test_instances_without_zygotes_start_cold(server_factory: Any) -> None:
    server: Server = server_factory("--no-zygotes")
    deploy(server.lambda_client(), "plain", {"handler.py": PROBE})
    start, body = _run(server, "plain")
    assert start == "cold" and body["pid"] == 2
    with server.http() as http:
        assert http.get("/zygotes").json() == {"enabled": False, "zygotes": []}


def test_zygote_probe_leaves_out_packages_that_start_threads(
    server_factory: Any, tmp_path: Path
) -> None:
    """A package whose import starts a thread is not pre-imported (fork would lose it)."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "threadpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            "threadpkg/__init__.py",
            "import threading, time\n"
            "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
        )
        zf.writestr(
            "threadpkg-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: threadpkg\nVersion: 1.0\n",
        )
        zf.writestr(
            "threadpkg-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("threadpkg-1.0.dist-info/RECORD", "")
    server: Server = server_factory("--zygote-after", "1", "--find-links", str(wheels))
    lam = server.lambda_client()
    code = "import threadpkg, threading\ndef handler(e, c):\n    return threading.active_count()\n"
    deploy(lam, "t1", {"handler.py": code, "requirements.txt": "threadpkg==1.0\n"})
    assert json.loads(lam.invoke(FunctionName="t1", Payload=b"{}")["Payload"].read()) >= 2
    zs = _alive_with(
        _wait_for_zygotes(server, lambda zs: _alive_with(zs, "threadpkg")), "threadpkg"
    )
    assert zs[0]["imported"] == []
    assert "threadpkg" in zs[0]["skipped"] and "threads" in zs[0]["skipped"]["threadpkg"]
    deploy(lam, "t2", {"handler.py": code, "requirements.txt": "threadpkg==1.0\n"})
    # The instance imports it itself, and its thread is there.
    resp = lam.invoke(FunctionName="t2", Payload=b"{}")
    assert json.loads(resp["Payload"].read()) >= 2


def test_zygotes_form_a_tree(server_factory: Any) -> None:
    """A pandas zygote is forked from the numpy zygote: it inherits numpy, imports the rest."""
    server: Server = server_factory("--zygote-after", "1")
    lam = server.lambda_client()

    np_code = "import numpy\ndef handler(e, c):\n    return int(numpy.arange(3).sum())\n"
    deploy(lam, "np1", {"handler.py": np_code, "requirements.txt": "numpy\n"}, MemorySize=256)
    assert _run(server, "np1")[1] == 3

    only_numpy = [
        z
        for z in _wait_for_zygotes(server, lambda zs: _alive_with(zs, "numpy"))
        if len(z["packages"]) == 1
    ]
    numpy_z = _alive_with(only_numpy, "numpy")[0]
    assert numpy_z["depth"] == 1 and "numpy" in numpy_z["imported"]

    _deploy_pandas(lam, "pd1")
    assert _run(server, "pd1")[1]["sum"] == 6
    pandas_z = _alive_with(
        _wait_for_zygotes(server, lambda zs: _alive_with(zs, "pandas")), "pandas"
    )[0]
    assert pandas_z["depth"] == 2
    assert "pandas" in pandas_z["imported"] and "numpy" not in pandas_z["imported"]  # inherited
    _deploy_pandas(lam, "pd2")
    start, body = _run(server, "pd2")
    assert start == "fork" and body == {"preloaded": True, "sum": 6}
