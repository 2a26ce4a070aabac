#!/usr/bin/env python3
"""Core benchmark: warmstart vs. a runc baseline, measured in the same run on this machine.

What it does (needs root on Linux, like the sandboxes themselves):

1. Starts ``warmstart serve`` on a free loopback port with a temporary data dir and waits
   for ``GET /healthz``.
2. Deploys ``hello`` (``def handler(event, context): return {"hello": ...}``) and N copies
   of it (``cold0..``) through boto3's Lambda client.
3. Cold starts: the first invocation of each ``coldI`` (``POST /run/coldI``) over one
   keep-alive loopback connection with a minimal raw-socket HTTP client; every response
   must say ``X-Warmstart-Start: cold``.
4. Warm latency: sequential invocations of ``hello`` (``X-Warmstart-Start: warm``).
5. Throughput: warm invocations/s with several keep-alive connections, driven by ``wrk``
   (a separate process; a Python load generator in a subprocess if wrk is missing).
6. Frozen warm: a second server with ``--freeze-after-ms 0``, so every warm invocation
   thaws a frozen instance (and freezes it again before the response goes out).
7. Baseline: ``runc run`` of an OCI bundle whose rootfs offers the same files as the
   sandbox (read-only binds of /usr, /etc, the Python prefix, the runtime and the code at
   /var/task; bin/lib/lib64/sbin symlinks; tmpfs /tmp; proc; pid/ipc/uts/mount/network
   namespaces; 128 MB memory limit; uid 65534), running the same runtime in its
   ``--oneshot`` mode.  ``runc run`` of ``/bin/true`` is measured for reference.

It prints a markdown table and the targets (warm p50 <= 1.5 ms, cold p50 <= runc p50,
>= 1000 warm invocations/s), and with ``--json OUT`` writes every number to OUT.  Servers
are stopped (SIGTERM) and temporary directories removed at the end, even on error.

    sudo .venv/bin/python bench/core_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import py_compile
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SRC = REPO / "src" / "warmstart" / "runtime"
RUNTIME_FILES = ("bootstrap.py", "protocol.py")
HELLO_PY = 'def handler(event, context):\n    return {"hello": event.get("name", "world")}\n'
EVENT = {"name": "bench"}
EVENT_BYTES = json.dumps(EVENT).encode()
EXPECTED = {"hello": "bench"}
RUNC_EVENT = {"name": "x"}
SANDBOX_UID = 65534  # warmstart's default sandbox user (nobody)
MEMORY_MB = 128

TARGET_WARM_P50_MS = 1.5
TARGET_THROUGHPUT = 1000.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# -- statistics ------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) -- with 40 samples p99 is the maximum."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))  # ceil(q/100*n) - 1
    return s[k]


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(samples_ms),
        "p50_ms": percentile(samples_ms, 50),
        "p90_ms": percentile(samples_ms, 90),
        "p99_ms": percentile(samples_ms, 99),
        "min_ms": min(samples_ms) if samples_ms else float("nan"),
        "max_ms": max(samples_ms) if samples_ms else float("nan"),
        "mean_ms": statistics.fmean(samples_ms) if samples_ms else float("nan"),
    }


# -- a minimal keep-alive HTTP/1.1 client (the timed path) --------------------------------------
class RawHTTP:
    """One keep-alive connection; pre-encoded requests; just enough response parsing.

    Kept deliberately small so that the client adds a few tens of microseconds at most:
    one sendall, recv until the header block and Content-Length bytes are in.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def request_bytes(self, method: str, path: str, body: bytes = b"") -> bytes:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def roundtrip(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(raw)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("server closed the connection")
            buf += chunk
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" not in headers:
            raise BenchError(f"response without Content-Length: {headers}")
        length = int(headers["content-length"])
        start = end + 4
        while len(buf) - start < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("server closed the connection mid-body")
            buf += chunk
        body = buf[start : start + length]
        self.buf = buf[start + length :]
        return status, headers, body


def timed_call(conn: RawHTTP, raw: bytes) -> tuple[float, int, dict[str, str], bytes]:
    t0 = time.perf_counter_ns()
    status, headers, body = conn.roundtrip(raw)
    return (time.perf_counter_ns() - t0) / 1e6, status, headers, body


def check_invocation(
    status: int, headers: dict[str, str], body: bytes, want_start: str, what: str
) -> None:
    if status != 200:
        raise BenchError(f"{what}: HTTP {status}: {body[:500]!r}")
    got = headers.get("x-warmstart-start")
    if got != want_start:
        raise BenchError(f"{what}: X-Warmstart-Start is {got!r}, expected {want_start!r}")
    if json.loads(body) != EXPECTED:
        raise BenchError(f"{what}: unexpected result {body[:500]!r}")


# -- the warmstart server --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cgroup_digest(data_dir: Path) -> str:
    """The cgroup subtree a server uses for a data dir (SandboxManager.cgroup_parent)."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


class Server:
    def __init__(self, workdir: Path, name: str, extra_args: list[str]) -> None:
        self.data_dir = workdir / f"data-{name}"
        self.log_path = workdir / f"server-{name}.log"
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "warmstart.cli.main",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "warning",
            *self.extra_args,
        ]
        log(f"starting server {self.name}: {' '.join(cmd[1:])}")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.data_dir.parent),
        )
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                health = self.get_json("/healthz")
                if health.get("status") == "ok":
                    break
            except (OSError, BenchError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(
                    f"server {self.name} not healthy after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0
        self.health = health
        log(
            f"server {self.name} up in {self.startup_s:.2f}s at {self.url} "
            f"(cgroups warmstart/{cgroup_digest(self.data_dir)}): {health}"
        )
        if health.get("isolation") != "linux":
            raise BenchError(
                f"server {self.name} runs with isolation={health.get('isolation')!r}, "
                "not linux sandboxes: run the benchmark as root on Linux with cgroups"
            )

    def get(self, path: str) -> tuple[int, bytes]:
        conn = RawHTTP("127.0.0.1", self.port)
        try:
            status, _headers, body = conn.roundtrip(conn.request_bytes("GET", path))
            return status, body
        finally:
            conn.close()

    def get_json(self, path: str) -> dict[str, Any]:
        status, body = self.get(path)
        if status != 200:
            raise BenchError(f"GET {path}: HTTP {status}")
        result: dict[str, Any] = json.loads(body)
        return result

    def metric(self, name: str) -> float | None:
        """One unlabelled gauge/counter from /metrics."""
        status, body = self.get("/metrics")
        if status != 200:
            return None
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            log(f"stopping server {self.name} (SIGTERM to pid {proc.pid})")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"server {self.name} ignored SIGTERM for {timeout}s: SIGKILL")
                proc.kill()
                proc.wait()
        self._log_file.close()
        # The server removes its cgroup subtree on a clean shutdown; say so if it did not.
        rel = f"warmstart/{cgroup_digest(self.data_dir)}"
        root = Path("/sys/fs/cgroup")
        leftovers = [p for p in [root / rel, *root.glob(f"*/{rel}")] if p.is_dir()]
        if leftovers:
            log(f"WARNING: server {self.name} left cgroups behind: {[str(p) for p in leftovers]}")


def hello_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("hello.py", date_time=(2024, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        z.writestr(info, HELLO_PY)
    return buf.getvalue()


def lambda_client(url: str) -> Any:
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=60),
    )


def deploy(client: Any, names: list[str]) -> float:
    code = hello_zip()
    t0 = time.perf_counter()
    for name in names:
        out = client.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Handler="hello.handler",
            Role="arn:aws:iam::000000000000:role/bench",
            Code={"ZipFile": code},
            MemorySize=MEMORY_MB,
            Timeout=10,
        )
        if out.get("FunctionName") != name:
            raise BenchError(f"create_function({name}) returned {out}")
    return (time.perf_counter() - t0) / max(1, len(names)) * 1000


# -- warmstart measurements -------------------------------------------------------------------
def measure_cold(server: Server, names: list[str], gap_s: float) -> dict[str, Any]:
    conn = RawHTTP("127.0.0.1", server.port)
    samples: list[float] = []
    internal: list[float] = []
    try:
        for name in names:
            raw = conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
            ms, status, headers, body = timed_call(conn, raw)
            check_invocation(status, headers, body, "cold", f"first invocation of {name}")
            samples.append(ms)
            internal.append(float(headers.get("x-warmstart-duration-ms", "nan")))
            time.sleep(gap_s)  # let the previous instance settle (it is frozen after 100 ms idle)
    finally:
        conn.close()
    return {**summary(samples), "samples_ms": samples, "server_internal": summary(internal)}


def measure_warm(server: Server, name: str, n: int, warmup: int) -> dict[str, Any]:
    conn = RawHTTP("127.0.0.1", server.port)
    raw = conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
    samples: list[float] = []
    internal: list[float] = []
    try:
        for i in range(warmup + n):
            ms, status, headers, body = timed_call(conn, raw)
            if i == 0 and headers.get("x-warmstart-start") == "cold":
                check_invocation(status, headers, body, "cold", f"first invocation of {name}")
                continue
            check_invocation(status, headers, body, "warm", f"invocation {i} of {name}")
            if i >= warmup:
                samples.append(ms)
                internal.append(float(headers.get("x-warmstart-duration-ms", "nan")))
        # Reference: the HTTP stack alone (no sandbox) on the same connection.
        hraw = conn.request_bytes("GET", "/healthz")
        http_only = []
        for i in range(min(n, 500) + 20):
            ms, status, _h, _b = timed_call(conn, hraw)
            if status != 200:
                raise BenchError(f"GET /healthz: HTTP {status}")
            if i >= 20:
                http_only.append(ms)
    finally:
        conn.close()
    return {
        **summary(samples),
        "server_internal": summary(internal),
        "healthz": summary(http_only),
        "samples_ms": [round(x, 4) for x in samples],
    }


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = '__BODY__'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; notwarm = 0; bad = 0 end
function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
  else
    local s = headers["x-warmstart-start"] or headers["X-Warmstart-Start"]
    if s == "warm" then ok = ok + 1 else notwarm = notwarm + 1 end
  end
end
function done(summary, latency, requests)
  local o, n, b = 0, 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok"); n = n + t:get("notwarm"); b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format("WSBENCH %d %d %d %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, o, n, b,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    url: str, path: str, connections: int, threads: int, duration_s: float, lua: Path
) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url + path,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WSBENCH ")), None)
    if out.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    f = [int(x) for x in line.split()[1:]]
    requests, duration_us, ok, notwarm, bad = f[:5]
    errors = dict(zip(("connect", "read", "write", "status", "timeout"), f[5:10], strict=True))
    return {
        "tool": "wrk",
        "connections": connections,
        "threads": threads,
        "requests": requests,
        "duration_s": duration_us / 1e6,
        "warm_ok": ok,
        "not_warm": notwarm,
        "non_200": bad,
        "errors": errors,
        "rps": requests / (duration_us / 1e6),
        "warm_rps": ok / (duration_us / 1e6),
        "latency_p50_ms": f[10] / 1000,
        "latency_p99_ms": f[11] / 1000,
    }


def loadgen_worker(port: int, path: str, connections: int, duration_s: float) -> None:
    """Fallback load generator (no wrk): asyncio keep-alive clients, run in a subprocess."""
    import asyncio

    req = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(EVENT_BYTES)}\r\n\r\n"
    ).encode() + EVENT_BYTES
    counts = {"requests": 0, "warm_ok": 0, "not_warm": 0, "non_200": 0}
    lat: list[float] = []

    async def one(deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                hdrs = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                await reader.readexactly(int(hdrs.get("content-length", "0")))
                lat.append((time.perf_counter() - t0) * 1000)
                counts["requests"] += 1
                if lines[0].split(" ")[1] != "200":
                    counts["non_200"] += 1
                elif hdrs.get("x-warmstart-start") == "warm":
                    counts["warm_ok"] += 1
                else:
                    counts["not_warm"] += 1
        finally:
            writer.close()

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(one(t0 + duration_s) for _ in range(connections)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    print(
        json.dumps(
            {
                **counts,
                "duration_s": elapsed,
                "latency_p50_ms": percentile(lat, 50),
                "latency_p99_ms": percentile(lat, 99),
            }
        )
    )


def run_python_loadgen(port: int, path: str, connections: int, duration_s: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--loadgen-worker",
        json.dumps([port, path, connections, duration_s]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    if out.returncode != 0:
        raise BenchError(f"load generator failed: {out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "tool": "python-asyncio",
        "connections": connections,
        **r,
        "rps": r["requests"] / r["duration_s"],
        "warm_rps": r["warm_ok"] / r["duration_s"],
    }


def measure_throughput(
    server: Server,
    name: str,
    connections: int,
    threads: int,
    duration_s: float,
    warmup_s: float,
    workdir: Path,
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    path = f"/run/{name}"
    if wrk:
        lua = workdir / "post.lua"
        lua.write_text(WRK_LUA.replace("__BODY__", EVENT_BYTES.decode()))

        def run(d: float) -> dict[str, Any]:
            return run_wrk(server.url, path, connections, threads, d, lua)
    else:
        log("wrk not found (apt-get install -y wrk): using the slower Python load generator")

        def run(d: float) -> dict[str, Any]:
            return run_python_loadgen(server.port, path, connections, d)

    # The warm-up starts one instance per connection (those are cold starts); the measured
    # run should then be all warm.
    warm = run(warmup_s)
    log(f"throughput warm-up: {warm['requests']} requests, {warm['not_warm']} not warm")
    result = run(duration_s)
    result["warmup"] = {k: warm[k] for k in ("requests", "warm_ok", "not_warm", "non_200")}
    if result["non_200"] or result.get("errors", {}).get("timeout"):
        log(f"WARNING: throughput run had failures: {result}")
    return result


# -- the runc baseline ------------------------------------------------------------------------
def runtime_python() -> str:
    """The interpreter warmstart execs in its sandboxes (SandboxManager: _runtime_python)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


class RuncBaseline:
    def __init__(self, workdir: Path, runc: str) -> None:
        self.runc = runc
        self.dir = workdir / "runc"
        self.state = self.dir / "state"  # a private --root: our containers only
        self.rootfs = self.dir / "rootfs"
        self.runtime_dir = self.dir / "runtime"
        self.code_dir = self.dir / "task"
        self.python = runtime_python()
        self.created: set[str] = set()
        self.extra_binds: list[str] = []  # /lib etc. on hosts without merged /usr

    def _base_cmd(self) -> list[str]:
        return [self.runc, "--root", str(self.state)]

    def prepare(self) -> None:
        for d in (self.state, self.rootfs, self.runtime_dir, self.code_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.rootfs.chmod(0o755)
        # The same files the sandbox sees: the runtime (byte-compiled, as the server does)...
        for name in RUNTIME_FILES:
            shutil.copyfile(RUNTIME_SRC / name, self.runtime_dir / name)
            py_compile.compile(str(self.runtime_dir / name), doraise=True)
        # ... and the function's code, byte-compiled like a deployed bundle.
        (self.code_dir / "hello.py").write_text(HELLO_PY)
        py_compile.compile(str(self.code_dir / "hello.py"), doraise=True)
        for root in (self.runtime_dir, self.code_dir):
            for p in [root, *root.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        for top in ("bin", "lib", "lib64", "sbin", "lib32", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                (self.rootfs / top).symlink_to(os.readlink(host))
            elif host.is_dir():
                # Not a merged-/usr host: bind the directory like warmstart does.
                self.extra_binds.append(str(host))
        self.spec_template = self._default_spec()

    def _default_spec(self) -> dict[str, Any]:
        tmp = self.dir / "spec"
        tmp.mkdir(exist_ok=True)
        subprocess.run([self.runc, "spec", "--bundle", str(tmp)], check=True, capture_output=True)
        spec: dict[str, Any] = json.loads((tmp / "config.json").read_text())
        shutil.rmtree(tmp)
        return spec

    def bundle(self, name: str, args: list[str]) -> Path:
        spec = json.loads(json.dumps(self.spec_template))
        proc = spec["process"]
        proc["terminal"] = False
        proc["args"] = args
        proc["cwd"] = "/var/task"
        proc["user"] = {"uid": SANDBOX_UID, "gid": SANDBOX_UID}
        proc["env"] = [
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "LANG=C.UTF-8",
            "TZ=:UTC",
            "HOME=/tmp",
            "_HANDLER=hello.handler",
            "LAMBDA_TASK_ROOT=/var/task",
            "LAMBDA_RUNTIME_DIR=/var/runtime",
        ]
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["hostname"] = "warmstart"
        binds = [("/usr", "/usr"), ("/etc", "/etc")]
        binds += [(p, p) for p in self.extra_binds]
        prefix = os.path.realpath(sys.base_prefix)
        if not prefix.startswith("/usr/"):
            binds.append((prefix, prefix))
        binds += [(str(self.runtime_dir), "/var/runtime"), (str(self.code_dir), "/var/task")]
        mounts = [m for m in spec["mounts"] if m["destination"] != "/tmp"]
        mounts.append(
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", "size=512m"],
            }
        )
        for src, dst in binds:
            mounts.append(
                {"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"]}
            )
        spec["mounts"] = mounts
        linux = spec.setdefault("linux", {})
        linux["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]
        res = linux.setdefault("resources", {})
        res["memory"] = {"limit": MEMORY_MB << 20}
        res["pids"] = {"limit": 256}
        bundle = self.dir / f"bundle-{name}"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(spec, indent=2))
        return bundle

    def run_once(self, bundle: Path) -> tuple[float, subprocess.CompletedProcess[bytes]]:
        cid = f"wsbench-{uuid.uuid4().hex[:12]}"
        self.created.add(cid)
        cmd = [*self._base_cmd(), "run", "--bundle", str(bundle), cid]
        t0 = time.perf_counter_ns()
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        ms = (time.perf_counter_ns() - t0) / 1e6
        # `runc run` (not detached) deletes the container when it exits; make sure of it.
        subprocess.run([*self._base_cmd(), "delete", "-f", cid], capture_output=True)
        self.created.discard(cid)
        return ms, out

    def measure(self, bundle: Path, n: int, warmup: int, check: Any) -> dict[str, Any]:
        samples = []
        for i in range(warmup + n):
            ms, out = self.run_once(bundle)
            if out.returncode != 0:
                raise BenchError(
                    f"runc run failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
                )
            check(out.stdout)
            if i >= warmup:
                samples.append(ms)
        return {**summary(samples), "samples_ms": samples}

    def throughput(self, bundle: Path, concurrency: int, total: int, check: Any) -> dict[str, Any]:
        """``total`` runs, ``concurrency`` at a time: invocations/s when each one is a container."""
        from concurrent.futures import ThreadPoolExecutor

        def one(_i: int) -> float:
            ms, out = self.run_once(bundle)
            if out.returncode != 0:
                raise BenchError(
                    f"runc run failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
                )
            check(out.stdout)
            return ms

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            samples = list(pool.map(one, range(total)))
        elapsed = time.perf_counter() - t0
        return {
            "concurrency": concurrency,
            "runs": total,
            "duration_s": elapsed,
            "rps": total / elapsed,
            "latency": summary(samples),
        }

    def cleanup(self) -> None:
        for cid in list(self.created):
            subprocess.run([*self._base_cmd(), "delete", "-f", cid], capture_output=True)
        if self.state.is_dir():
            out = subprocess.run([*self._base_cmd(), "list", "-q"], capture_output=True, text=True)
            for cid in out.stdout.split():
                subprocess.run([*self._base_cmd(), "delete", "-f", cid], capture_output=True)


def check_oneshot(stdout: bytes) -> None:
    try:
        got = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"oneshot printed {stdout[:500]!r}") from None
    if got != {"hello": RUNC_EVENT["name"]}:
        raise BenchError(f"oneshot returned {got!r}")


def measure_runc(
    workdir: Path, n: int, warmup: int, concurrency: int, total: int
) -> dict[str, Any]:
    runc = shutil.which("runc") or ("/usr/sbin/runc" if os.path.exists("/usr/sbin/runc") else None)
    if runc is None:
        raise BenchError("runc is not installed (apt-get install -y runc)")
    version = subprocess.run([runc, "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    base = RuncBaseline(workdir, runc)
    try:
        base.prepare()
        py = base.python
        event = json.dumps(RUNC_EVENT)
        oneshot = base.bundle(
            "oneshot", [py, "-E", "-s", "-S", "/var/runtime/bootstrap.py", "--oneshot", event]
        )
        # Same, but importing the runtime like the sandbox does (from its .pyc, not compiling
        # bootstrap.py as __main__): shows how much of the baseline is that compile.
        code = (
            "import sys; sys.path.insert(0, '/var/runtime'); import bootstrap; "
            f"sys.argv = ['bootstrap', '--oneshot', {event!r}]; bootstrap.main()"
        )
        imported = base.bundle("import", [py, "-E", "-s", "-S", "-c", code])
        true = base.bundle("true", ["/bin/true"])
        log(f"runc baseline ({version}): {n} x runc run of the oneshot runtime")
        r_oneshot = base.measure(oneshot, n, warmup, check_oneshot)
        log(f"runc baseline: {n} x runc run of the runtime imported from .pyc")
        r_import = base.measure(imported, n, warmup, check_oneshot)
        log(f"runc baseline: {n} x runc run of /bin/true")
        r_true = base.measure(true, n, warmup, lambda out: None)
        # The same oneshot without any container, for reference: the interpreter's own cost.
        env = {
            "_HANDLER": "hello.handler",
            "LAMBDA_TASK_ROOT": str(base.code_dir),
            "PATH": "/usr/bin:/bin",
        }
        bare = []
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            out = subprocess.run(
                [py, "-E", "-s", "-S", str(base.runtime_dir / "bootstrap.py"), "--oneshot", event],
                capture_output=True,
                env=env,
                cwd=str(base.code_dir),
                timeout=60,
            )
            ms = (time.perf_counter_ns() - t0) / 1e6
            if out.returncode != 0:
                raise BenchError(f"bare oneshot failed: {out.stderr!r}")
            check_oneshot(out.stdout)
            if i >= warmup:
                bare.append(ms)
        log(
            f"runc baseline: throughput, {total} x runc run of the oneshot runtime, {concurrency} at a time"
        )
        r_tput = base.throughput(oneshot, concurrency, total, check_oneshot)
        return {
            "runc_version": version,
            "oneshot": r_oneshot,
            "oneshot_import": r_import,
            "true": r_true,
            "bare_python_oneshot": summary(bare),
            "throughput": r_tput,
        }
    finally:
        base.cleanup()


# -- the report ------------------------------------------------------------------------------
def fmt_ms(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(res: dict[str, Any]) -> str:
    cold, warm, frozen, tput, runc = (
        res.get(k) for k in ("cold", "warm", "frozen_warm", "throughput", "runc")
    )
    rc = runc["oneshot"] if runc else None
    rows = [
        ("cold start p50", cold and cold["p50_ms"], rc and rc["p50_ms"], "ms"),
        ("cold start p99", cold and cold["p99_ms"], rc and rc["p99_ms"], "ms"),
        ("warm p50", warm and warm["p50_ms"], None, "ms"),
        ("warm p99", warm and warm["p99_ms"], None, "ms"),
        ("frozen-warm p50", frozen and frozen["p50_ms"], None, "ms"),
        ("frozen-warm p99", frozen and frozen["p99_ms"], None, "ms"),
        ("throughput (warm invocations/s)", tput and tput["warm_rps"], None, "rps"),
    ]
    m = res["machine"]
    out = [
        f"warmstart {m.get('revision', '?')} on {m.get('cpu', '?')}, {m['cpus']} CPUs, kernel {m['kernel']}, "
        f"cgroup {m['cgroup']}, Python {m['python']}",
        "",
        "| measure | warmstart | runc baseline | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, ws, base, unit in rows:
        if unit == "rps":
            base = runc["throughput"]["rps"] if runc and "throughput" in runc else None
            ws_s = "-" if ws is None else f"{ws:,.0f}/s"
            base_s = "-" if base is None else f"{base:,.1f}/s"
            out.append(f"| {label} | {ws_s} | {base_s} | {ratio(ws, base)} |")
        else:
            out.append(f"| {label} | {fmt_ms(ws)} | {fmt_ms(base)} | {ratio(ws, base)} |")
    out.append("")
    out.append(
        "ratio = warmstart / runc: lower is better for latencies, higher for throughput. The runc "
        "baseline runs a fresh container per invocation (every runc invocation is a cold start), so it "
        "has no warm rows; its throughput is concurrent `runc run`s with as many at a time as the "
        "warmstart run had connections."
    )
    # Details.
    out.append("")
    out.append("Details:")
    if cold:
        si = cold["server_internal"]
        # The untimed warm-up cold start of hello took one of the pooled cgroups.
        k = res["config"]["cgroup_pool"] - 1
        first, rest = cold["samples_ms"][:k], cold["samples_ms"][k:]
        out.append(
            f"- cold starts: n={cold['n']}, min {fmt_ms(cold['min_ms'])}, mean {fmt_ms(cold['mean_ms'])}, "
            f"max {fmt_ms(cold['max_ms'])}; worker-internal p50 {fmt_ms(si['p50_ms'])} "
            f"(X-Warmstart-Duration-Ms)"
        )
        if rest:
            out.append(
                f"- the first {k} cold starts (pre-created pooled cgroups with parked parents): p50 "
                f"{fmt_ms(percentile(first, 50))}; the {len(rest)} after the pool ran out: p50 "
                f"{fmt_ms(percentile(rest, 50))} (cgroups created and joined on the invocation path)"
            )
    if warm:
        out.append(
            f"- warm: n={warm['n']}, mean {fmt_ms(warm['mean_ms'])}, max {fmt_ms(warm['max_ms'])}; "
            f"worker-internal p50 {fmt_ms(warm['server_internal']['p50_ms'])}; "
            f"GET /healthz (HTTP stack only) p50 {fmt_ms(warm['healthz']['p50_ms'])}"
        )
    if frozen:
        out.append(
            f"- frozen warm: n={frozen['n']}, worker-internal p50 {fmt_ms(frozen['server_internal']['p50_ms'])}, "
            f"freezes counted by the server: {frozen.get('freezes_total')}"
        )
    if tput:
        out.append(
            f"- throughput: {tput['tool']}, {tput['connections']} connections, {tput['duration_s']:.1f} s, "
            f"{tput['requests']} requests ({tput['not_warm']} not warm, {tput['non_200']} non-200), "
            f"latency p50 {fmt_ms(tput['latency_p50_ms'])} p99 {fmt_ms(tput['latency_p99_ms'])}"
        )
    if runc:
        out.append(
            f"- runc ({runc['runc_version']}): oneshot via bootstrap.py p50 {fmt_ms(runc['oneshot']['p50_ms'])}; "
            f"importing bootstrap from .pyc p50 {fmt_ms(runc['oneshot_import']['p50_ms'])} "
            f"(p99 {fmt_ms(runc['oneshot_import']['p99_ms'])}); /bin/true p50 {fmt_ms(runc['true']['p50_ms'])} "
            f"(p99 {fmt_ms(runc['true']['p99_ms'])}); the same oneshot with no container p50 "
            f"{fmt_ms(runc['bare_python_oneshot']['p50_ms'])}"
        )
        rt = runc.get("throughput")
        if rt:
            out.append(
                f"- runc throughput: {rt['runs']} runs, {rt['concurrency']} at a time, {rt['duration_s']:.1f} s; "
                f"latency p50 {fmt_ms(rt['latency']['p50_ms'])} p99 {fmt_ms(rt['latency']['p99_ms'])}"
            )
    # Targets.
    out.append("")
    out.append("Targets:")
    for name, ok, detail in res["targets"]:
        out.append(f"- [{'PASS' if ok else 'FAIL' if ok is not None else 'n/a'}] {name}: {detail}")
    return "\n".join(out)


def targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    t: list[tuple[str, bool | None, str]] = []
    warm, cold, runc, tput = (
        res.get("warm"),
        res.get("cold"),
        res.get("runc"),
        res.get("throughput"),
    )
    if warm:
        t.append(
            (
                f"warm p50 <= {TARGET_WARM_P50_MS} ms",
                warm["p50_ms"] <= TARGET_WARM_P50_MS,
                fmt_ms(warm["p50_ms"]),
            )
        )
    if cold and runc:
        t.append(
            (
                "cold p50 <= runc p50",
                cold["p50_ms"] <= runc["oneshot"]["p50_ms"],
                f"{fmt_ms(cold['p50_ms'])} vs {fmt_ms(runc['oneshot']['p50_ms'])}",
            )
        )
    if tput:
        t.append(
            (
                f">= {TARGET_THROUGHPUT:.0f} warm invocations/s",
                tput["warm_rps"] >= TARGET_THROUGHPUT,
                f"{tput['warm_rps']:,.0f}/s",
            )
        )
    return t


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cgroup"] = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if rev:
            info["revision"] = rev + ("+dirty" if dirty else "")
    return info


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark warmstart (cold, warm, frozen-warm latency, throughput) against "
        "runc running the same runtime, in one run on this machine. Needs root.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            targets: warm p50 <= 1.5 ms; cold p50 <= runc p50; >= 1000 warm invocations/s.
            Only 127.0.0.1 is contacted. Exit status: 0 ok, 1 a target was missed, 2 error."""),
    )
    p.add_argument("--quick", action="store_true", help="smaller N everywhere (a ~15 s smoke run)")
    p.add_argument("--json", metavar="OUT", type=Path, help="also write all results as JSON to OUT")
    p.add_argument(
        "--cold", type=int, default=None, help="cold starts to time (default 40, quick 12)"
    )
    p.add_argument(
        "--warm",
        type=int,
        default=None,
        help="sequential warm invocations (default 2000, quick 300)",
    )
    p.add_argument(
        "--runc", type=int, default=None, help="runc runs per variant (default 40, quick 10)"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=16,
        help="keep-alive connections for the throughput run (default %(default)s)",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads; the machine has few cores to share (default %(default)s)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="throughput run seconds (default 10, quick 3)"
    )
    p.add_argument("--skip-runc", action="store_true", help="do not measure the runc baseline")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (for debugging)"
    )
    p.add_argument("--loadgen-worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loadgen_worker:
        port, path, conns, dur = json.loads(args.loadgen_worker)
        loadgen_worker(port, path, conns, dur)
        return 0
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("core_bench: needs root on Linux (sandboxes and runc both do)", file=sys.stderr)
        return 2
    n_cold = args.cold or (12 if args.quick else 40)
    n_warm = args.warm or (300 if args.quick else 2000)
    n_runc = args.runc or (10 if args.quick else 40)
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = 50
    res: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "cold": n_cold,
            "warm": n_warm,
            "warmup": warmup,
            "runc": n_runc,
            "connections": args.connections,
            "duration_s": duration,
            "quick": args.quick,
            "cgroup_pool": 8,
            "memory_mb": MEMORY_MB,
        },
    }

    # SIGTERM/SIGHUP -> KeyboardInterrupt, so the finally blocks below stop servers and clean up.
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    workdir = Path(tempfile.mkdtemp(prefix="warmstart-bench-"))
    servers: list[Server] = []
    status = 0
    try:
        # -- server A: default settings (freeze after 100 ms idle) ---------------------------
        a = Server(workdir, "default", [])
        servers.append(a)
        a.data_dir.mkdir()
        a.start()
        client = lambda_client(a.url)
        cold_names = [f"cold{i}" for i in range(n_cold)]
        log(f"deploying hello + {n_cold} cold functions via boto3")
        res["deploy_ms_per_function"] = deploy(client, ["hello", *cold_names])
        log(f"timing {n_cold} cold starts")
        # One untimed cold start first: the page cache and the server's first-use costs.
        conn = RawHTTP("127.0.0.1", a.port)
        _ms, st, hd, body = timed_call(conn, conn.request_bytes("POST", "/run/hello", EVENT_BYTES))
        conn.close()
        check_invocation(st, hd, body, "cold", "first invocation of hello")
        time.sleep(0.2)
        res["cold"] = measure_cold(a, cold_names, gap_s=0.15)
        log(f"cold p50 {fmt_ms(res['cold']['p50_ms'])} p99 {fmt_ms(res['cold']['p99_ms'])}")
        log(f"timing {n_warm} sequential warm invocations")
        res["warm"] = measure_warm(a, "hello", n_warm, warmup)
        log(f"warm p50 {fmt_ms(res['warm']['p50_ms'])} p99 {fmt_ms(res['warm']['p99_ms'])}")
        log(f"throughput: {args.connections} connections for {duration:.0f}s")
        res["throughput"] = measure_throughput(
            a,
            "hello",
            args.connections,
            args.wrk_threads,
            duration,
            warmup_s=2.0 if args.quick else 3.0,
            workdir=workdir,
        )
        log(f"throughput {res['throughput']['warm_rps']:,.0f} warm invocations/s")
        res["server_default_log_tail"] = a.log_tail(2000)
        a.stop()

        # -- server B: --freeze-after-ms 0 (every idle instance is frozen at once) ------------
        b = Server(workdir, "frozen", ["--freeze-after-ms", "0"])
        servers.append(b)
        b.data_dir.mkdir()
        b.start()
        deploy(lambda_client(b.url), ["hello"])
        log(f"timing {n_warm} sequential frozen-warm invocations")
        before = b.metric("warmstart_freezes_total") or 0.0
        res["frozen_warm"] = measure_warm(b, "hello", n_warm, warmup)
        after = b.metric("warmstart_freezes_total")
        res["frozen_warm"]["freezes_total"] = None if after is None else after - before
        if after is not None and after - before < n_warm:
            log(f"WARNING: only {after - before:.0f} freezes for {n_warm + warmup} invocations")
        log(
            f"frozen warm p50 {fmt_ms(res['frozen_warm']['p50_ms'])} p99 {fmt_ms(res['frozen_warm']['p99_ms'])}"
        )
        b.stop()

        # -- runc -------------------------------------------------------------------------
        if not args.skip_runc:
            res["runc"] = measure_runc(
                workdir,
                n_runc,
                warmup=3,
                concurrency=args.connections,
                total=(2 if args.quick else 4) * args.connections,
            )
            log(f"runc oneshot p50 {fmt_ms(res['runc']['oneshot']['p50_ms'])}")
    except BenchError as exc:
        print(f"core_bench: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt as exc:
        print(f"core_bench: interrupted ({exc})", file=sys.stderr)
        status = 2
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as exc:  # keep cleaning up
                print(f"core_bench: stopping server {s.name}: {exc}", file=sys.stderr)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    res["targets"] = targets(res)
    text = report(res)
    print(text)
    if args.json:
        res.pop("server_default_log_tail", None)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if status == 0 and any(ok is False for _n, ok, _d in res["targets"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
