"""Helpers shared by the benchmarks in bench/ (run through ``bash scripts/bench NAME``).

The timed HTTP path (a minimal keep-alive client), a ``warmstart serve`` process on a
loopback port, boto3's Lambda client pointed at it, nearest-rank statistics, and the runc
baseline: an OCI bundle whose rootfs offers the same files as a warmstart sandbox.
Standard library only, except boto3 (imported when a client is made).
"""

from __future__ import annotations

import contextlib
import fcntl
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
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNTIME_SRC = REPO / "src" / "warmstart" / "runtime"
RUNTIME_FILES = ("bootstrap.py", "protocol.py")
SANDBOX_UID = 65534  # warmstart's default sandbox user (nobody)


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
        root = Path("/sys/fs/cgroup")
        leftovers = [
            p
            for top in ("warmstart", "warmstart-be")
            for rel in [f"{top}/{cgroup_digest(self.data_dir)}"]
            for p in [root / rel, *root.glob(f"*/{rel}")]
            if p.is_dir()
        ]
        if leftovers:
            log(f"WARNING: server {self.name} left cgroups behind: {[str(p) for p in leftovers]}")
        remove_run_state(self.data_dir)


def remove_run_state(data_dir: Path, lock_dir: Path = Path("/run/warmstart")) -> None:
    """Remove what a stopped worker leaves in /run/warmstart for its data dir (its lock
    file and its empty root mountpoint): the server does not, and a benchmark's data dirs
    are temporary.  Only when the lock is free, i.e. no worker uses that data dir."""
    digest = cgroup_digest(data_dir)
    lock = lock_dir / f"{digest}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a worker still holds it
    try:
        with contextlib.suppress(OSError):
            (lock_dir / "roots" / digest).rmdir()  # only if empty
        with contextlib.suppress(OSError):
            lock.unlink()
    finally:
        os.close(fd)


def make_zip(files: dict[str, str]) -> bytes:
    """A deployment package: the files, world-readable, with a fixed timestamp."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, text)
    return buf.getvalue()


def lambda_client(url: str) -> Any:
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:
        raise BenchError(
            f"{exc}: run the benchmarks through 'bash scripts/bench NAME', which installs "
            "what they need"
        ) from exc

    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=60),
    )


# -- the runc baseline ------------------------------------------------------------------------
def runtime_python() -> str:
    """The interpreter warmstart execs in its sandboxes (SandboxManager: _runtime_python)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


def find_runc() -> str | None:
    return shutil.which("runc") or ("/usr/sbin/runc" if os.path.exists("/usr/sbin/runc") else None)


class RuncBaseline:
    """``runc run`` of bundles whose rootfs offers the same files as a warmstart sandbox.

    ``files`` is the function's code (written to /var/task and byte-compiled, like a
    deployed bundle), ``handler`` its _HANDLER, ``memory_mb`` the memory limit;
    ``extra_binds`` are further read-only binds (host dir, container path) -- an installed
    package at /var/packages/<dir>, say -- and ``extra_env`` further KEY=VALUE entries.
    """

    def __init__(
        self,
        workdir: Path,
        runc: str,
        *,
        name: str = "runc",
        files: dict[str, str] | None = None,
        handler: str = "hello.handler",
        memory_mb: int = 128,
        extra_binds: list[tuple[str, str]] | None = None,
        extra_env: list[str] | None = None,
    ) -> None:
        self.runc = runc
        self.dir = workdir / name
        self.files = files or {}
        self.handler = handler
        self.memory_mb = memory_mb
        self.ro_binds = list(extra_binds or [])
        self.extra_env = list(extra_env or [])
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
        for fname, text in self.files.items():
            (self.code_dir / fname).write_text(text)
            if fname.endswith(".py"):
                py_compile.compile(str(self.code_dir / fname), doraise=True)
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
            f"_HANDLER={self.handler}",
            "LAMBDA_TASK_ROOT=/var/task",
            "LAMBDA_RUNTIME_DIR=/var/runtime",
            *self.extra_env,
        ]
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["hostname"] = "warmstart"
        binds = [("/usr", "/usr"), ("/etc", "/etc")]
        binds += [(p, p) for p in self.extra_binds]
        prefix = os.path.realpath(sys.base_prefix)
        if not prefix.startswith("/usr/"):
            binds.append((prefix, prefix))
        binds += [(str(self.runtime_dir), "/var/runtime"), (str(self.code_dir), "/var/task")]
        binds += self.ro_binds
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
        res["memory"] = {"limit": self.memory_mb << 20}
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


# -- the report ------------------------------------------------------------------------------
def fmt_ms(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.2f}x"


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


def target_lines(targets: list[tuple[str, bool | None, str]]) -> list[str]:
    """The report's target checklist: PASS, FAIL or n/a per target."""
    return [
        f"- [{'PASS' if ok else 'FAIL' if ok is not None else 'n/a'}] {name}: {detail}"
        for name, ok, detail in targets
    ]


def stop_servers(servers: list[Server], prog: str) -> None:
    """Stop every server, reporting (not raising) failures: cleanup must go on."""
    for s in servers:
        try:
            s.stop()
        except Exception as exc:
            print(f"{prog}: stopping server {s.name}: {exc}", file=sys.stderr)
