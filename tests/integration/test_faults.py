"""Fault injection against a real ``warmstart serve``: what a broken handler, a hostile
handler, a bad upload or a crashed platform process does to the node.

Every test talks to the server over HTTP on 127.0.0.1 (boto3's ``lambda`` client, or
httpx for the native ``/run/<fn>`` endpoint) and needs root for the sandboxes.  Nothing
here asserts on wall-clock durations; waits for asynchronous facts (a process exiting)
poll with a generous deadline.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import (
    Server,
    cgroup_dirs,
    deploy,
    make_zip,
    needs_root,
    remove_tree,
    start_server,
    wait_until,
)

KINDS = {"forked": (), "fresh": ("--no-zygotes",)}


@pytest.fixture(params=list(KINDS))
def server(request: pytest.FixtureRequest, server_factory: Any) -> Server:
    """Every fault is checked on both kinds of instance: forked from a zygote, and a fresh
    interpreter in a fresh sandbox."""
    s: Server = server_factory(*KINDS[request.param])
    return s


@pytest.fixture(scope="module", params=list(KINDS))
def shared_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server of each kind for the many cases of one fault (bad bundles, init
    errors): each case deploys under a name of its own, and none breaks the node."""
    root = tmp_path_factory.mktemp(f"faults-{request.param}")
    s = start_server(root / "data", root / "server.log", *KINDS[request.param])
    yield s
    s.stop()
    remove_tree(root)


@pytest.fixture
def lam(server: Server) -> Any:
    return server.lambda_client()


pytestmark = [pytest.mark.integration, needs_root]


# -- helpers -----------------------------------------------------------------------------


def invoke(
    lam: Any, name: str, event: Any = None, *, raw: bytes | None = None
) -> tuple[dict[str, Any], Any, str | None]:
    """RequestResponse invoke: (raw boto3 response, decoded payload, X-Warmstart-Start)."""
    payload = raw if raw is not None else json.dumps({} if event is None else event).encode()
    resp = lam.invoke(FunctionName=name, Payload=payload)
    body = json.loads(resp["Payload"].read() or b"null")
    start = resp["ResponseMetadata"]["HTTPHeaders"].get("x-warmstart-start")
    return resp, body, start


def assert_ok(resp: dict[str, Any], body: Any) -> None:
    assert resp["StatusCode"] == 200
    assert "FunctionError" not in resp, body


def client_error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str]:
    r = exc.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"]


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid apart from a reused one)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(raw.rsplit(")", 1)[1].split()[19])


def proc_state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int, started: int | None) -> bool:
    """Whether *that* process (pid + start time) still exists and is not a zombie."""
    if proc_start_time(pid) != started:
        return False
    return proc_state(pid) not in (None, "Z", "X")


def ppid(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(raw.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        parent = ppid(pid)
        if parent is None:
            return False
        pid, seen = parent, seen + 1
    return pid == ancestor


def cgroup_pids(data_dir: Path) -> set[int]:
    """Every process in our cgroup subtree, across controllers."""
    pids: set[int] = set()
    for d in cgroup_dirs(data_dir):
        for procs in Path(d).rglob("cgroup.procs"):
            with contextlib.suppress(FileNotFoundError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def sandbox_pids(data_dir: Path) -> dict[int, int | None]:
    """Instance processes: in our cgroups and in a sandbox's pid namespace (pid 1 and
    below), zygotes left out, with their start times."""
    ours = os.readlink("/proc/self/ns/pid")
    out: dict[int, int | None] = {}
    for pid in cgroup_pids(data_dir):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith(("ws-zygote", "ws-spare")):
                continue  # zygotes and their spare children live on by design
            if os.readlink(f"/proc/{pid}/ns/pid") != ours:
                out[pid] = proc_start_time(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def spawner_pid(server: Server) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"warmstart.sandbox.spawner" in cmdline and ppid(int(entry.name)) == server.proc.pid:
            return int(entry.name)
    raise AssertionError("no spawner process under the server")


def healthy(server: Server, lam: Any) -> None:
    """The node still answers and still runs functions."""
    with server.http() as http:
        assert http.get("/healthz").status_code == 200
    name = f"canary{time.monotonic_ns() % 10**9}"
    deploy(lam, name, {"handler.py": "def handler(event, context):\n    return {'ok': event}\n"})
    resp, body, _ = invoke(lam, name, {"x": 1})
    assert_ok(resp, body)
    assert body == {"ok": {"x": 1}}
    assert server.proc.poll() is None


# A handler that identifies its instance: a random id fixed at import, and a call count.
COUNTER = """\
import os, random, time

INSTANCE = random.getrandbits(64)
CALLS = 0

def handler(event, context):
    global CALLS
    CALLS += 1
    if event.get("fail"):
        raise ValueError("boom: " + str(event["fail"]))
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"instance": INSTANCE, "calls": CALLS}
"""


# -- 1. the handler raises --------------------------------------------------------------


def test_handler_exception_is_a_lambda_error_and_the_instance_is_reused(
    server: Server, lam: Any
) -> None:
    deploy(lam, "raiser", {"handler.py": COUNTER})
    resp, first, start = invoke(lam, "raiser")
    assert_ok(resp, first)
    assert start in ("cold", "fork")  # a new instance

    resp, err, start = invoke(lam, "raiser", {"fail": "on purpose"})
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    assert start == "warm"
    assert err["errorType"] == "ValueError"
    assert err["errorMessage"] == "boom: on purpose"
    assert isinstance(err["stackTrace"], list) and err["stackTrace"]
    assert any("handler.py" in line and "raise ValueError" in line for line in err["stackTrace"])
    # The runtime's own frames are not shown to the user.
    assert not any("bootstrap.py" in line for line in err["stackTrace"])

    with server.http() as http:
        r = http.post("/run/raiser", content=b"{}")
    assert r.status_code == 200
    assert r.headers["X-Warmstart-Start"] == "warm"
    assert r.json() == {"instance": first["instance"], "calls": 3}


# -- 2. timeout --------------------------------------------------------------------------


def test_timeout_kills_the_instance_and_the_next_call_starts_fresh(
    server: Server, lam: Any
) -> None:
    deploy(lam, "sleeper", {"handler.py": COUNTER}, Timeout=1)
    resp, first, _ = invoke(lam, "sleeper")
    assert_ok(resp, first)
    before = sandbox_pids(server.data_dir)
    assert before, "the warm instance should be running in a sandbox"

    resp, err, _ = invoke(lam, "sleeper", {"sleep": 5})
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    assert err["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in err["errorMessage"]
    # The timed-out instance is killed, not left sleeping in the background.
    wait_until(
        lambda: not any(is_alive(p, t) for p, t in before.items()),
        what="the timed-out sandbox to be killed",
    )

    with server.http() as http:
        r = http.post("/run/sleeper", content=b"{}")
    assert r.status_code == 200
    assert r.headers["X-Warmstart-Start"] in ("cold", "fork")  # a new instance
    assert r.json()["instance"] != first["instance"]
    assert r.json()["calls"] == 1


# -- 3. memory over the limit ------------------------------------------------------------


def test_out_of_memory_is_reported_and_the_node_stays_healthy(server: Server, lam: Any) -> None:
    hog = """\
def handler(event, context):
    chunks = []
    for _ in range(event["mb"]):
        b = bytearray(1 << 20)
        for i in range(0, len(b), 4096):
            b[i] = 1
        chunks.append(b)
    return {"allocated_mb": len(chunks)}
"""
    deploy(lam, "hog", {"handler.py": hog}, MemorySize=128, Timeout=30)
    resp, err, _ = invoke(lam, "hog", {"mb": 300})
    assert resp["StatusCode"] == 200
    assert resp.get("FunctionError") == "Unhandled", err
    assert err["errorType"] == "Runtime.OutOfMemory" or "memory" in err["errorMessage"].lower(), err
    assert "128 MB" in err["errorMessage"]
    healthy(server, lam)
    # The function itself recovers: the next call gets a fresh instance.
    resp, body, start = invoke(lam, "hog", {"mb": 16})
    assert_ok(resp, body)
    assert body == {"allocated_mb": 16}
    assert start in ("cold", "fork")  # a new instance


# -- 4. fork bomb --------------------------------------------------------------------------


def test_fork_bomb_is_stopped_by_the_pids_limit(server: Server, lam: Any) -> None:
    bomb = """\
import os, time

def handler(event, context):
    forked, error = 0, None
    for _ in range(100000):
        try:
            pid = os.fork()
        except OSError as exc:
            error = {"type": type(exc).__name__, "errno": exc.errno}
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    return {"forked": forked, "error": error}
"""
    deploy(lam, "bomb", {"handler.py": bomb}, MemorySize=512, Timeout=30)
    resp, body, _ = invoke(lam, "bomb")
    assert resp["StatusCode"] == 200
    if "FunctionError" not in resp:
        import errno

        assert body["error"] == {"type": "BlockingIOError", "errno": errno.EAGAIN}, body
        assert 0 < body["forked"] < 256
    # The host can still fork, and the server still runs other functions.
    assert subprocess.run(["true"], check=False).returncode == 0
    healthy(server, lam)


# -- 5. read-only file system ------------------------------------------------------------


def test_writes_outside_tmp_fail_with_erofs(server: Server, lam: Any) -> None:
    writer = """\
import errno, os

def attempt(path, mode):
    try:
        with open(path, mode) as f:
            f.write("x")
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno)) + ": " + (exc.strerror or "")
    return "ok"

def handler(event, context):
    out = {p: attempt(p, "w") for p in event["create"]}
    out.update({p: attempt(p, "a") for p in event["append"]})
    for d in event["mkdir"]:
        try:
            os.mkdir(d)
            out[d] = "ok"
        except OSError as exc:
            out[d] = errno.errorcode.get(exc.errno, str(exc.errno)) + ": " + (exc.strerror or "")
    out["tmp_read_back"] = open("/tmp/probe.txt").read() if out.get("/tmp/probe.txt") == "ok" else None
    return out
"""
    deploy(lam, "writer", {"handler.py": writer})
    event = {
        "create": [
            "/evil.txt",
            "/var/task/evil.py",
            "/etc/evil.conf",
            "/usr/evil",
            "/tmp/probe.txt",
        ],
        "append": ["/var/task/handler.py", "/etc/passwd"],
        "mkdir": ["/newdir", "/var/task/newdir", "/etc/newdir", "/tmp/newdir"],
    }
    resp, body, _ = invoke(lam, "writer", event)
    assert_ok(resp, body)
    for path in [
        "/evil.txt",
        "/var/task/evil.py",
        "/etc/evil.conf",
        "/usr/evil",
        "/newdir",
        "/var/task/newdir",
        "/etc/newdir",
    ]:
        assert body[path] == "EROFS: Read-only file system", (path, body[path])
    # Opening an existing root-owned 0644 file for writing: the kernel checks the file's
    # permission bits (may_open) before the mount's read-only flag, so uid 65534 may see
    # EACCES first.  Either way the write is refused.
    for path in ["/var/task/handler.py", "/etc/passwd"]:
        assert body[path] in ("EROFS: Read-only file system", "EACCES: Permission denied"), (
            path,
            body[path],
        )
    assert body["/tmp/newdir"] == "ok"
    assert body["/tmp/probe.txt"] == "ok"
    assert body["tmp_read_back"] == "x"


# -- 6. host files and processes are not visible ------------------------------------------

PREFIX = Path(os.path.realpath(sys.base_prefix))


def test_host_files_and_processes_are_invisible(server: Server, lam: Any) -> None:
    peek = """\
import os

def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None

def handler(event, context):
    numeric = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {
        "exists": {p: os.path.exists(p) for p in event["paths"]},
        "listings": {p: listing(p) for p in event["dirs"]},
        "proc": numeric,
        "host_pids_visible": [p for p in event["host_pids"] if os.path.exists("/proc/%d" % p)],
        "pid": os.getpid(),
        "uid": os.getuid(),
        "hostname": os.uname().nodename,
    }
"""
    deploy(lam, "peek", {"handler.py": peek})
    data_dir = str(server.data_dir.resolve())
    event = {
        "paths": [
            data_dir,
            data_dir + "/state.db",
            str(Path(data_dir) / "code"),
            str(Path(__file__).resolve()),
            "/work/main",
            "/root/.bashrc",
            "/var/lib",
            "/var/log",
            "/var/run",
            "/run",
            "/sys/fs/cgroup",
            "/home/cloudsdk",
        ],
        "dirs": [
            "/root",
            "/home",
            "/work",
            "/opt",
            "/srv",
            "/mnt",
            *(str(a) for a in PREFIX.parents if str(a) not in ("/", "/usr")),
        ],
        "host_pids": [server.proc.pid, os.getpid(), spawner_pid(server)],
    }
    resp, body, _ = invoke(lam, "peek", event)
    assert_ok(resp, body)
    assert not any(body["exists"].values()), body["exists"]
    # Absent or empty -- except for the directories leading to the Python prefix, which
    # is bound read-only at its host path (e.g. /root/.pyenv/versions/3.11.7): those may
    # hold the next path component and nothing else (no ~/.bashrc, no other versions).
    for d, entries in body["listings"].items():
        below = (
            PREFIX.relative_to(d).parts if PREFIX.is_relative_to(d) and Path(d) != PREFIX else ()
        )
        assert set(entries or []) <= set(below[:1]), (d, entries)
    assert body["host_pids_visible"] == []
    # A fresh sandbox runs the runtime as pid 2 under its init; a forked one as pid 1.
    assert body["pid"] in (1, 2)
    assert 1 in body["proc"] and body["pid"] in body["proc"]
    assert len(body["proc"]) <= 4, body["proc"]
    assert max(body["proc"]) < 100, body["proc"]
    assert body["uid"] == 65534
    assert body["hostname"] == "warmstart"


# -- 7. network -----------------------------------------------------------------------------

NET = """\
import errno, socket

def handler(event, context):
    ifaces = sorted(name for _, name in socket.if_nameindex())
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", event["port"]))
        s.sendall(b"hello from the sandbox")
        result = "connected"
    except OSError as exc:
        result = errno.errorcode.get(exc.errno, str(exc)) if exc.errno else type(exc).__name__
    finally:
        s.close()
    return {"ifaces": ifaces, "connect": result}
"""


def test_network_is_loopback_only_unless_tagged_host(server: Server, lam: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(10)
        port = listener.getsockname()[1]

        deploy(lam, "isolated", {"handler.py": NET})
        resp, body, _ = invoke(lam, "isolated", {"port": port})
        assert_ok(resp, body)
        assert body["ifaces"] == ["lo"]
        assert body["connect"] in ("ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH"), body

        deploy(lam, "hostnet", {"handler.py": NET}, Tags={"warmstart:network": "host"})
        resp, body, _ = invoke(lam, "hostnet", {"port": port})
        assert_ok(resp, body)
        assert body["connect"] == "connected", body
        assert "lo" in body["ifaces"]
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while chunk := conn.recv(1024):
                data += chunk
        assert data == b"hello from the sandbox"


# -- 8. bad code bundles ------------------------------------------------------------------


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("handler.py", "def handler(e, c):\n    return 1\n")
        info = zipfile.ZipInfo("passwd")
        info.create_system = 3  # unix, so external_attr carries the mode
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


NOT_A_ZIP = "Could not unzip uploaded file"
UNSAFE = "unsafe path"


BAD_ZIPS = {
    "random-bytes": (os.urandom(4096), NOT_A_ZIP),
    "empty": (b"", NOT_A_ZIP),
    "truncated-zip": (make_zip({"handler.py": "x = 1\n" * 100})[:-30], NOT_A_ZIP),
    "dot-dot": (make_zip({"handler.py": "x = 1\n", "../evil.py": "x = 1\n"}), UNSAFE),
    "deep-dot-dot": (make_zip({"handler.py": "x = 1\n", "pkg/../../evil.py": "x = 1\n"}), UNSAFE),
    "absolute": (make_zip({"handler.py": "x = 1\n", "/tmp/evil.py": "x = 1\n"}), UNSAFE),
    "backslash-dot-dot": (make_zip({"handler.py": "x = 1\n", "..\\evil.py": "x = 1\n"}), UNSAFE),
    "symlink": (_symlink_zip(), "symbolic link"),
}


@pytest.mark.parametrize("label", list(BAD_ZIPS))
def test_bad_zip_is_rejected_with_400(shared_server: Server, label: str) -> None:
    server, lam = shared_server, shared_server.lambda_client()
    code, message = BAD_ZIPS[label]
    name = f"bad-{label}"
    with pytest.raises(ClientError) as exc:
        lam.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Role="arn:aws:iam::0:role/x",
            Handler="handler.handler",
            Code={"ZipFile": code},
        )
    assert client_error(exc) == (400, "InvalidParameterValueException"), exc.value.response
    assert message in exc.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as exc:
        lam.get_function(FunctionName=name)
    assert client_error(exc) == (404, "ResourceNotFoundException")
    # Nothing was written outside (or left inside) the code store.
    assert not list(server.data_dir.rglob("evil.py"))
    assert not list(server.data_dir.rglob(".tmp-*"))
    if label == "absolute":
        assert not Path("/tmp/evil.py").exists()


def test_bad_zip_on_update_is_rejected_with_400(server: Server, lam: Any) -> None:
    deploy(lam, "updated", {"handler.py": COUNTER})
    for code in (os.urandom(512), make_zip({"../evil.py": "x = 1\n"}), _symlink_zip()):
        with pytest.raises(ClientError) as exc:
            lam.update_function_code(FunctionName="updated", ZipFile=code)
        assert client_error(exc) == (400, "InvalidParameterValueException"), exc.value.response
    # The deployed code is untouched.
    resp, body, _ = invoke(lam, "updated")
    assert_ok(resp, body)
    assert body["calls"] == 1


# -- 9. init errors ------------------------------------------------------------------------


INIT_ERRORS = {  # label: (files, error type); the handler is always handler.handler
    "missing-module": ({"other.py": "x = 1\n"}, "Runtime.ImportModuleError"),
    "missing-function": (
        {"handler.py": "def other(e, c):\n    return 1\n"},
        "Runtime.HandlerNotFound",
    ),
    "syntax-error": (
        {"handler.py": "def handler(e, c)\n    return 1\n"},
        "Runtime.UserCodeSyntaxError",
    ),
    "import-raises": (
        {"handler.py": "raise RuntimeError('no config')\ndef handler(e, c):\n    return 1\n"},
        "Runtime.ImportModuleError",
    ),
    "missing-dependency": (
        {"handler.py": "import no_such_dependency\ndef handler(e, c):\n    return 1\n"},
        "Runtime.ImportModuleError",
    ),
}


@pytest.mark.parametrize("label", list(INIT_ERRORS))
def test_init_errors_have_lambda_error_types(shared_server: Server, label: str) -> None:
    server, lam = shared_server, shared_server.lambda_client()
    files, error_type = INIT_ERRORS[label]
    name = f"init-{label}"
    deploy(lam, name, files, handler="handler.handler")
    for _ in range(2):  # a failed init leaves nothing behind that breaks the next try
        resp, err, _ = invoke(lam, name)
        assert resp["StatusCode"] == 200
        assert resp["FunctionError"] == "Unhandled"
        assert err["errorType"] == error_type, err
        assert err["errorMessage"]
    with server.http() as http:
        r = http.post(f"/run/{name}", content=b"{}")
    assert r.status_code == 502
    assert r.json()["errorType"] == error_type


DIES_BEFORE_READY = {  # label: (handler module, words the error message must carry)
    "os-exit": ("import os\nos._exit(3)\n", "Runtime exited with error: exit status 3"),
    "sys-exit": ("import sys\nsys.exit(4)\n", "Runtime exited with error: exit status 4"),
    "segfault": (  # a signal the kernel delivers even to pid 1 of a namespace
        "import ctypes\nctypes.string_at(0)\n",
        "Runtime exited with error: signal: segmentation fault",
    ),
    "says-why": (
        "import os, sys\nsys.stderr.write('cannot reach the config store\\n')\n"
        "sys.stderr.flush()\nos._exit(1)\n",
        "cannot reach the config store",
    ),
}


@pytest.mark.parametrize("label", list(DIES_BEFORE_READY))
def test_a_runtime_that_dies_before_ready_says_why(shared_server: Server, label: str) -> None:
    """The error names how the runtime ended and what it wrote last, and the function's
    log keeps its output; nothing waits for the init timeout."""
    server, lam = shared_server, shared_server.lambda_client()
    module, words = DIES_BEFORE_READY[label]
    name = f"dies-{label}"
    deploy(lam, name, {"handler.py": module + "def handler(e, c):\n    return 1\n"})
    resp = lam.invoke(FunctionName=name, Payload=b"{}", LogType="Tail")
    err = json.loads(resp["Payload"].read())
    assert resp["FunctionError"] == "Unhandled"
    assert err["errorType"] == "Runtime.ExitError", err
    assert words in err["errorMessage"], err
    if label == "says-why":
        import base64

        assert "cannot reach the config store" in base64.b64decode(resp["LogResult"]).decode()
        with server.http() as http:
            log = http.get(f"/functions/{name}/logs").text
        assert "cannot reach the config store" in log


# A handler that names its process (its comm) after the event's "name", says so on stderr,
# then waits for whatever the event asks: to be killed, or to exit with a status.
DIES_MID_INVOCATION = """\
import ctypes, os, sys, time

def handler(event, context):
    ctypes.CDLL(None).prctl(15, event["name"].encode(), 0, 0, 0)  # PR_SET_NAME
    sys.stderr.write("working on " + event["name"] + "\\n")
    sys.stderr.flush()
    if "exit" in event:
        os._exit(event["exit"])
    time.sleep(60)
    return "not killed"
"""


def _pid_named(data_dir: Path, comm: str) -> int | None:
    for pid in cgroup_pids(data_dir):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return pid
    return None


def _invoke_tail(lam: Any, name: str, event: Any) -> tuple[dict[str, Any], Any, str]:
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), LogType="Tail")
    return resp, json.loads(resp["Payload"].read()), base64.b64decode(resp["LogResult"]).decode()


def test_a_busy_instance_killed_says_signal_killed(server: Server, lam: Any) -> None:
    """An operator's SIGKILL of a runtime mid-invocation: Runtime.ExitError naming the
    signal as Lambda does, the runtime's last output in the log, a fresh instance next."""
    deploy(lam, "busy-victim", {"handler.py": DIES_MID_INVOCATION}, Timeout=60)
    comm = f"victim{time.monotonic_ns() % 10**6}"
    result: list[tuple[dict[str, Any], Any, str]] = []
    caller = threading.Thread(
        target=lambda: result.append(_invoke_tail(lam, "busy-victim", {"name": comm}))
    )
    caller.start()
    try:
        pid = wait_until(lambda: _pid_named(server.data_dir, comm), "the handler to run")
        os.kill(pid, signal.SIGKILL)
    finally:
        caller.join(60)
    ((resp, err, log_tail),) = result
    assert resp["FunctionError"] == "Unhandled"
    assert err["errorType"] == "Runtime.ExitError", err
    assert "Error: Runtime exited with error: signal: killed" in err["errorMessage"], err
    assert err["errorMessage"].startswith(f"RequestId: {resp['ResponseMetadata']['RequestId']}")
    assert f"working on {comm}" in log_tail
    assert "Runtime exited with error: signal: killed" in log_tail
    resp, body, start = invoke(lam, "busy-victim", {"name": "survivor", "exit": 0})
    assert resp["FunctionError"] == "Unhandled"  # os._exit(0) mid-invocation is a death too
    assert body["errorMessage"].endswith("Runtime exited with error: exit status 0"), body
    assert start in ("cold", "fork")  # the killed instance was not reused


def test_a_runtime_that_exits_mid_invocation_says_its_status(server: Server, lam: Any) -> None:
    deploy(lam, "exits-7", {"handler.py": DIES_MID_INVOCATION})
    resp, err, log_tail = _invoke_tail(lam, "exits-7", {"name": "exiter", "exit": 7})
    assert resp["FunctionError"] == "Unhandled"
    assert err["errorType"] == "Runtime.ExitError", err
    assert "Error: Runtime exited with error: exit status 7" in err["errorMessage"], err
    assert "working on exiter" in log_tail
    with server.http() as http:
        assert "working on exiter" in http.get("/functions/exits-7/logs").text
    healthy(server, lam)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_frozen_instance_killed_while_idle_is_replaced_unseen(
    server_factory: Any, kind: str
) -> None:
    """SIGKILL of a frozen idle instance's processes: the next call learns it when the
    request cannot reach the runtime (the socket is closed, or the runtime's end closes
    with the request unread), so the handler cannot have run, and a new instance takes
    the call: no error."""
    server = server_factory("--freeze-after-ms", "0", *KINDS[kind])
    lam = server.lambda_client()
    deploy(lam, "frozen-victim", {"handler.py": COUNTER})
    for round_ in range(3):
        resp, body, _ = invoke(lam, "frozen-victim")
        assert_ok(resp, body)
        with server.http() as http:
            (idle,) = wait_until(
                lambda: [
                    i
                    for i in http.get("/instances").json()["instances"]
                    if i["state"] == "frozen"
                ],
                "the instance to freeze",
            )
        for pid in idle["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        resp, body, start = invoke(lam, "frozen-victim")
        assert_ok(resp, body)
        assert body["calls"] == 1, (round_, body)  # a new instance
        assert start in ("cold", "fork")


# -- 10. the worker is SIGKILLed with idle (frozen) instances --------------------------------


def _freezer_state(pid: int) -> str | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "freezer" in ctrls.split(","):
            return (
                Path("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state")
                .read_text()
                .strip()
            )
    return None


def test_worker_sigkill_then_restart_on_the_same_data_dir(
    server_factory: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = server_factory("--freeze-after-ms", "0", data_dir=data_dir)
    lam = first.lambda_client()
    deploy(lam, "alpha", {"handler.py": COUNTER})
    deploy(lam, "beta", {"handler.py": COUNTER}, MemorySize=256)
    ids = {}
    for name in ("alpha", "beta"):
        resp, body, _ = invoke(lam, name)
        assert_ok(resp, body)
        ids[name] = body["instance"]
    # Idle instances are frozen at once.
    with first.http() as http:
        states = {i["function"]: i["state"] for i in http.get("/instances").json()["instances"]}
    assert states == {"alpha": "frozen", "beta": "frozen"}

    old_spawner = spawner_pid(first)
    old = {pid: proc_start_time(pid) for pid in cgroup_pids(data_dir) | {old_spawner}}
    sandboxed = list(sandbox_pids(data_dir))
    assert sandboxed, "expected the idle instances' processes in our cgroups"
    assert any(_freezer_state(p) == "FROZEN" for p in sandboxed)

    first.stop(signal.SIGKILL)
    assert first.proc.returncode == -signal.SIGKILL

    second = server_factory(data_dir=data_dir)
    lam = second.lambda_client()
    names = sorted(f["FunctionName"] for f in lam.list_functions()["Functions"])
    assert names == ["alpha", "beta"]

    # Start-up reaping killed whatever the first run left (frozen instances included).
    wait_until(lambda: not any(is_alive(p, t) for p, t in old.items()), what="old processes to go")

    for name in ("alpha", "beta"):
        resp, body, start = invoke(lam, name)
        assert_ok(resp, body)
        assert start in ("cold", "fork")  # a new instance
        assert body["instance"] != ids[name] and body["calls"] == 1

    # The cgroups hold only the new server's processes.
    members = cgroup_pids(data_dir)
    assert members, "the new server's sandboxes should be in our cgroups"
    strangers = [
        p for p in members if proc_state(p) is not None and not descends_from(p, second.proc.pid)
    ]
    assert strangers == [], strangers
    assert not set(members) & {p for p, t in old.items() if is_alive(p, t)}

    # Sandbox mounts live in private mount namespaces: the host never sees them.
    resolved = str(data_dir.resolve())
    assert not [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if resolved in ln]
    assert not [ln for ln in Path("/proc/1/mounts").read_text().splitlines() if resolved in ln]

    second.stop()
    assert second.proc.returncode in (0, -signal.SIGTERM), second.log()[-3000:]
    assert cgroup_dirs(data_dir) == []
    assert not any(is_alive(p, proc_start_time(p)) for p in members)


def test_worker_sigkill_takes_busy_sandboxes_with_it(server_factory: Any, tmp_path: Path) -> None:
    """A busy sandbox's pid 1 sees the worker's end of the socket hang up and takes its
    namespace down (frozen ones are the guardian's: see below)."""
    import threading

    data_dir = tmp_path / "data"
    first = server_factory(data_dir=data_dir)
    lam = first.lambda_client()
    deploy(lam, "spin", {"handler.py": COUNTER}, Timeout=600)
    resp, body, _ = invoke(lam, "spin")
    assert_ok(resp, body)
    with first.http() as http:

        def idle() -> list[str]:
            return [i["function"] for i in http.get("/instances").json()["instances"]]

        assert idle() == ["spin"]

        def long_call() -> None:
            with contextlib.suppress(Exception):  # the server is killed under it
                first.lambda_client().invoke(FunctionName="spin", Payload=b'{"sleep": 600}')

        caller = threading.Thread(target=long_call, daemon=True)
        caller.start()
        wait_until(lambda: idle() == [], what="the instance to be busy")
    busy = sandbox_pids(data_dir)
    assert busy
    try:
        first.stop(signal.SIGKILL)
        wait_until(
            lambda: not any(is_alive(p, t) for p, t in busy.items()),
            timeout=5,
            what="the busy sandbox to die with its worker",
        )
    finally:
        caller.join(timeout=30)
        # Clean up whatever outlived it: start-up reaping on the same data dir, then stop.
        second = server_factory(data_dir=data_dir)
        second.stop()
        assert not any(is_alive(p, t) for p, t in busy.items())
        assert cgroup_dirs(data_dir) == []


def descendants(ancestor: int) -> dict[int, int | None]:
    """Every process below ``ancestor``, with its start time."""
    out: dict[int, int | None] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != ancestor:
            pid = int(entry.name)
            if descends_from(pid, ancestor):
                out[pid] = proc_start_time(pid)
    return out


def guardian_pid(server: Server) -> int:
    for pid in descendants(server.proc.pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"warmstart.sandbox.guardian" in cmdline and ppid(pid) == server.proc.pid:
                return pid
    raise AssertionError("no guardian process under the server")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.parametrize("kind", list(KINDS))
def test_worker_sigkill_takes_every_sandbox_with_it_frozen_ones_included(
    kind: str, server_factory: Any, tmp_path: Path
) -> None:
    """kill -9 of the worker alone, no restart: frozen instances, a busy one, the zygotes,
    the spawner and every other helper go, the cgroups are removed, and the guardian says
    what it killed and exits."""
    import threading

    data_dir = tmp_path / "data"
    server = server_factory("--freeze-after-ms", "0", *KINDS[kind], data_dir=data_dir)
    lam = server.lambda_client()
    deploy(lam, "alpha", {"handler.py": COUNTER})
    deploy(lam, "beta", {"handler.py": COUNTER}, MemorySize=256)
    deploy(lam, "spin", {"handler.py": COUNTER}, Timeout=600)
    for name in ("alpha", "beta", "spin"):
        resp, body, _ = invoke(lam, name)
        assert_ok(resp, body)

    def states() -> dict[str, str]:
        with server.http() as http:
            listed = http.get("/instances").json()["instances"]
        return {i["function"]: i["state"] for i in listed}

    wait_until(
        lambda: states() == {"alpha": "frozen", "beta": "frozen", "spin": "frozen"},
        what="the idle instances to be frozen",
    )

    def long_call() -> None:
        with contextlib.suppress(Exception):  # the server is killed under it
            server.lambda_client().invoke(FunctionName="spin", Payload=b'{"sleep": 600}')

    caller = threading.Thread(target=long_call, daemon=True)
    caller.start()
    wait_until(lambda: "spin" not in states(), what="the instance to be busy")

    guard = guardian_pid(server)
    guard_started = proc_start_time(guard)
    # Neither Ctrl-C in the worker's terminal nor a signal to its process group reaches it.
    assert os.getsid(guard) != os.getsid(server.proc.pid)
    assert os.getpgid(guard) != os.getpgid(server.proc.pid)
    before = {
        **descendants(server.proc.pid),
        **{p: proc_start_time(p) for p in cgroup_pids(data_dir)},
    }
    before.pop(guard)
    frozen = [p for p in sandbox_pids(data_dir) if _freezer_state(p) == "FROZEN"]
    assert len(frozen) >= 2, frozen
    comms = {_comm(p) for p in before}
    assert "ws-spawner" in comms
    if kind == "forked":
        assert "ws-zygote" in comms

    server.stop(signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL
    try:
        wait_until(
            lambda: [p for p, t in before.items() if is_alive(p, t)] == [],
            what="every process of the killed worker to go",
        )
        wait_until(lambda: cgroup_dirs(data_dir) == [], what="the cgroups to be removed")
        wait_until(lambda: not is_alive(guard, guard_started), what="the guardian to exit")
        assert f"guardian: worker pid {server.proc.pid} is gone; killed" in server.log()
    finally:
        caller.join(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_clean_shutdown_stands_the_guardian_down(
    sig: int, server_factory: Any, tmp_path: Path
) -> None:
    """SIGTERM, or Ctrl-C's SIGINT: the worker cleans up itself and the guardian exits
    without a sweep."""
    data_dir = tmp_path / "data"
    server = server_factory("--freeze-after-ms", "0", data_dir=data_dir)
    lam = server.lambda_client()
    deploy(lam, "alpha", {"handler.py": COUNTER})
    resp, body, _ = invoke(lam, "alpha")
    assert_ok(resp, body)
    guard = guardian_pid(server)
    guard_started = proc_start_time(guard)
    members = {p: proc_start_time(p) for p in cgroup_pids(data_dir)}
    assert members

    server.stop(sig)
    assert server.proc.returncode in (0, -sig, 128 + sig), server.log()[-3000:]
    wait_until(lambda: not is_alive(guard, guard_started), what="the guardian to exit")
    assert not any(is_alive(p, t) for p, t in members.items())
    assert cgroup_dirs(data_dir) == []
    assert "guardian: worker pid" not in server.log()


# -- 11. the spawner is SIGKILLed -----------------------------------------------------------


def test_spawner_sigkill_is_survived(server: Server, lam: Any) -> None:
    deploy(lam, "before", {"handler.py": COUNTER})
    resp, body, _ = invoke(lam, "before")
    assert_ok(resp, body)

    pid = spawner_pid(server)
    started = proc_start_time(pid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(pid, started), what="the spawner to die")

    deploy(lam, "after", {"handler.py": COUNTER})
    resp, body, start = invoke(lam, "after")
    assert_ok(resp, body)
    assert start in ("cold", "fork")  # a new instance
    new = spawner_pid(server)
    assert new != pid
    healthy(server, lam)
    # A spawner crash is invisible to callers of functions that were already warm.
    resp, body, _ = invoke(lam, "before")
    assert_ok(resp, body)


# -- 12. invalid JSON payload -------------------------------------------------------------------


def test_invalid_json_payload_is_400(server: Server, lam: Any) -> None:
    deploy(lam, "echo", {"handler.py": COUNTER})
    for raw in (b"{not json", b"\xff\xfe", b'{"a": 1'):
        with pytest.raises(ClientError) as exc:
            lam.invoke(FunctionName="echo", Payload=raw)
        assert client_error(exc) == (400, "InvalidRequestContentException"), exc.value.response
    with server.http() as http:
        r = http.post("/run/echo", content=b"{not json")
    assert r.status_code == 400
    assert r.headers["x-amzn-ErrorType"] == "InvalidRequestContentException"
    # The instance that parsed the bad payloads is still fine (nothing ran the handler).
    resp, body, start = invoke(lam, "echo")
    assert_ok(resp, body)
    assert start == "warm"
    assert body["calls"] == 1
