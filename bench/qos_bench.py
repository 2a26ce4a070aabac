#!/usr/bin/env python3
"""QoS benchmark: latency-sensitive (LS) tails next to best-effort (BE) batch work.

Four scenarios in one run, each on a fresh ``warmstart serve`` (temporary data dir, free
loopback port), all driven the same way:

1. **LS alone** -- the reference.
2. **LS + BE, no differentiation** -- server ``--no-qos`` and the BE function deployed
   with the tag ``warmstart:qos=ls``: the batch items run as LS instances (normal CPU
   weight, LS limits).
3. **LS + BE, --no-qos** -- BE runs in its own subtree at the lowest CPU weight
   (``cpu.shares=2``) but no QoS loop admits or caps it (up to ``--be-concurrency``).
4. **LS + BE, QoS on** -- the default server: the QoS loop computes reclaimed capacity,
   admits BE within it and enforces the BE CPU limit as its ``be_cpu_policy`` says.

Optional scenarios (``--scenarios``) compare BE scheduling choices, each a server with QoS
on and a ``--qos-config``: ``qos-idle`` (BE also in the kernel's idle class, ``cpu.idle``),
``qos-quota`` (the limit as a CFS quota with a 20 ms period), ``qos-quota100`` (the same
with the kernel's 100 ms period) and ``qos-cpuset`` (whole cores).

The LS load: ``lsburn`` (a handler that busy-loops on ``time.perf_counter`` for ~2 ms and
returns how many loop iterations it managed) invoked (``POST /run/lsburn``) at a FIXED
rate, open loop, by a separate client process: several keep-alive connections, each with
its own timetable (send i at ``start + i / rate``, interleaved across connections, the way
wrk2 does it) and every latency measured from the *scheduled* send time, so a stalled
server cannot hide behind a waiting client (no coordinated omission).  The LS load runs
for the whole scenario: a warm-up (LS alone; instances started, pool sized), a ramp (the
BE job is submitted at its start, BE instances start and the QoS loop settles) and the
measurement window (``--duration``, default 20 s, --quick 6 s).  Only requests scheduled
inside the window count.

The BE load: one job (``POST /jobs``) over the function ``bework`` (MemorySize 512) with
several hundred items, two CPU items for each memory item: a CPU item burns ~0.5 s of CPU
(busy loop on ``time.process_time``), a memory item allocates and writes ~300 MB, then
sleeps 0.5 s.  BE throughput = items finished (``GET /jobs/<id>``: succeeded + failed)
per second over the window; the job is sized to outlast the window (checked).

Measured over the window as well: node CPU utilisation (``/proc/stat`` deltas), the CPU of
the server's ``ls/`` and ``be/`` cgroup subtrees (``cpuacct.usage`` deltas), the CPU of
the server process itself and of the client, and -- when the server has it -- ``GET
/node`` once a second (usage, reclaimed capacity, BE CPU limit, queue depth, evictions).

Diagnostics in the details: the client's send lateness (and p99 measured from the actual
send, which leaves the client's own scheduling out), how often the LS handler lost part of
its busy loop (its iteration count well below the median), the run-queue wait of the LS
instances and of the server process (``/proc/<tid>/schedstat``), CPU used by unrelated
processes (``other``; the benchmark first waits for a quiet machine), the BE slots the
server admitted, and the job's items by kind and status.  ``--repeat N`` runs N rounds of
all scenarios on fresh servers and pools the LS samples (p99 per round in the details):
single 20 s windows vary by +-10-20% in p99 on a small VM.

``--be-submit events --be-delay S`` sends the BE work as Event invocations S seconds *into*
the window, so the window sees them arrive (queued in SQLite, BE instances starting).
With ``--repeat``/``--rounds`` N > 1 each round's p99 is also divided by the same round's
LS alone; the target is judged on the median of those ratios (spread in the report).

``--scenario memory`` is a different run: one server per round (QoS on), LS = a handler
that allocates and writes 4 MB at 100 req/s, a window of LS alone, then Event invocations
that write a file to their /tmp once per instance (page cache charged to BE), allocate and
touch anonymous memory in bursts sized so BE at full concurrency holds ~0.9 x the reclaimed
memory ``/node`` reports, and read the file back; a second window measures LS next to
them.  Per round: LS p50/p99 alone and with BE, LS OOM kills (the kernel's counters in
every LS cgroup, and invocations that ended ``oom``), LS 429s, BE outcomes (completed,
failed, requeued by eviction, OOM kills), BE's peak memory and page cache against its cap,
node-wide direct reclaim stalls; medians over the rounds.  Targets: LS p99 <= 1.10x alone
(median of rounds), no LS OOM kill, no LS refusal, BE completes.  Three rounds by default,
about two minutes.

Targets (with QoS on): LS p99 <= 1.10x LS alone (aim 1.05x), and BE gets >= 60% of the CPU
that LS leaves idle: BE CPU / (capacity - LS CPU), with BE and LS CPU from ``/node``
(``usage.be_cpu`` / ``usage.ls_cpu`` averaged over the window) when available, otherwise
from the cgroups' cpuacct.  Prints a markdown table; ``--json OUT`` writes every number.
Servers are stopped (SIGTERM) and temporary directories removed at the end, even on error.
Only 127.0.0.1 is contacted.

    bash scripts/bench qos [--quick] [--duration S] [--json out.json]
    bash scripts/bench qos --scenario memory [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchError,
    RawHTTP,
    Server,
    cgroup_digest,
    fmt_ms,
    lambda_client,
    log,
    machine_info,
    make_zip,
    percentile,
    ratio,
    stop_servers,
    target_lines,
)

LS_FN = "lsburn"
BE_FN = "bework"
QOS_TAG = "warmstart:qos"

LS_PY = """\
import time


def handler(event, context):
    # Busy for ~ms milliseconds of wall-clock time; the iteration count says how much of
    # that time the handler actually had a CPU.
    end = time.perf_counter() + float(event.get("ms", 2.0)) / 1000.0
    n = 0
    while time.perf_counter() < end:
        n += 1
    return {"n": n}
"""

BE_PY = """\
import time


def handler(event, context):
    if event.get("kind") == "mem":
        mb = int(event.get("mb", 300))
        buf = bytearray(b"\\x01") * (mb << 20)  # malloc + memset: every page is touched
        time.sleep(float(event.get("sleep_s", 0.5)))
        size = len(buf)
        del buf
        return {"kind": "mem", "bytes": size}
    cpu_s = float(event.get("cpu_s", 0.5))
    t0 = time.process_time()
    n = 0
    while time.process_time() - t0 < cpu_s:
        n += 1
    return {"kind": "cpu", "n": n}
"""

TARGET_P99_RATIO = 1.10
AIM_P99_RATIO = 1.05
TARGET_BE_SHARE = 0.60

SCENARIOS: dict[str, dict[str, Any]] = {
    "alone": {"label": "LS alone", "args": [], "be": False, "be_tags": {}},
    "nodiff": {
        "label": "LS + BE, no differentiation (BE tagged ls, --no-qos)",
        "args": ["--no-qos"],
        "be": True,
        "be_tags": {QOS_TAG: "ls"},
    },
    "noqos": {
        "label": "LS + BE, --no-qos (low CPU weight only)",
        "args": ["--no-qos"],
        "be": True,
        "be_tags": {},
    },
    "qos": {"label": "LS + BE, QoS on", "args": [], "be": True, "be_tags": {}},
    "qos-quota": {
        "label": "LS + BE, QoS on, BE limit as a CFS quota (20 ms period)",
        "args": [],
        "be": True,
        "be_tags": {},
        "qos_config": {"be_cpu_policy": "quota", "be_cfs_period_us": 20_000},
    },
    "qos-quota100": {
        "label": "LS + BE, QoS on, BE limit as a CFS quota (100 ms period)",
        "args": [],
        "be": True,
        "be_tags": {},
        "qos_config": {"be_cpu_policy": "quota", "be_cfs_period_us": 100_000},
    },
    "qos-cpuset": {
        "label": "LS + BE, QoS on, BE limit as a cpuset",
        "args": [],
        "be": True,
        "be_tags": {},
        "qos_config": {"be_cpu_policy": "cpuset"},
    },
}
SCENARIOS["qos-idle"] = {
    "label": "LS + BE, QoS on, BE also in the idle class (cpu.idle)",
    "args": [],
    "be": True,
    "be_tags": {},
    "qos_config": {"be_sched_idle": True},
}
DEFAULT_SCENARIOS = ("alone", "nodiff", "noqos", "qos")


# -- system readings ---------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat (busy = total - idle - iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    total = sum(fields[:8])
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return total - idle, total


def subtree_rel(data_dir: Path, sub: str) -> str:
    """The server's ``ls`` or ``be`` cgroup subtree: BE lives in ``warmstart-be/<hash>`` (in
    ``warmstart/<hash>/be`` before it moved to the hierarchy's root)."""
    digest = cgroup_digest(data_dir)
    if sub == "be":
        root = Path("/sys/fs/cgroup")
        for rel in (f"warmstart-be/{digest}", f"warmstart/{digest}/be"):
            if any(d.is_dir() for d in (root / "cpuacct" / rel, root / "cpu" / rel, root / rel)):
                return rel
        return f"warmstart-be/{digest}"
    return f"warmstart/{digest}/{sub}"


def cpuacct_ns(data_dir: Path, sub: str) -> int | None:
    """cpuacct.usage (ns) of the server's ``sub`` subtree (v1), or cpu.stat usage_usec (v2)."""
    rel = subtree_rel(data_dir, sub)
    root = Path("/sys/fs/cgroup")
    for controller in ("cpuacct", "cpu,cpuacct", "cpu"):
        p = root / controller / rel / "cpuacct.usage"
        with contextlib.suppress(OSError, ValueError):
            return int(p.read_text())
    with contextlib.suppress(OSError, ValueError):
        for line in (root / rel / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) * 1000
    return None


def other_warmstart_ns(data_dir: Path) -> dict[str, int]:
    """cpuacct.usage of every other warmstart worker's subtree on this host (tests, other
    servers): their CPU during a window is interference."""
    ours = cgroup_digest(data_dir)
    out: dict[str, int] = {}
    for controller in ("cpuacct", "cpu,cpuacct"):
        if not (Path("/sys/fs/cgroup") / controller).is_dir():
            continue
        for top in ("warmstart", "warmstart-be"):
            base = Path("/sys/fs/cgroup") / controller / top
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if d.is_dir() and d.name != ours:
                    with contextlib.suppress(OSError, ValueError):
                        out[f"{top}/{d.name}"] = int((d / "cpuacct.usage").read_text())
        break
    return out


def subtree_tasks(data_dir: Path, sub: str) -> list[int]:
    """Thread ids in the server's ``sub`` cgroup subtree (cpuacct hierarchy)."""
    rel = subtree_rel(data_dir, sub)
    for controller in ("cpuacct", "cpu,cpuacct", "cpu"):
        base = Path("/sys/fs/cgroup") / controller / rel
        if base.is_dir():
            break
    else:
        base = Path("/sys/fs/cgroup") / rel
    tids: list[int] = []
    for dirpath, _dirs, files in os.walk(base):
        name = "tasks" if "tasks" in files else "cgroup.threads"
        with contextlib.suppress(OSError, ValueError):
            tids += [int(x) for x in Path(dirpath, name).read_text().split()]
    return tids


def run_delays(tids: list[int]) -> dict[int, tuple[int, int, int]]:
    """tid -> (ns on CPU, ns waiting on a run queue, timeslices) from /proc/<tid>/schedstat."""
    out = {}
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            a, b, c = (int(x) for x in Path(f"/proc/{tid}/schedstat").read_text().split()[:3])
            out[tid] = (a, b, c)
    return out


def delay_delta(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]]
) -> tuple[float, float, int]:
    """(CPU s, run-queue wait s, timeslices) accumulated by threads present in both."""
    cpu = wait = 0.0
    slices = 0
    for tid, (r1, d1, s1) in after.items():
        if tid in before:
            r0, d0, s0 = before[tid]
            cpu += (r1 - r0) / 1e9
            wait += (d1 - d0) / 1e9
            slices += s1 - s0
    return cpu, wait, slices


def process_threads(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(x) for x in os.listdir(f"/proc/{pid}/task")]
    return []


def renice(pid: int, nice: int) -> None:
    """Set the nice value of every thread of ``pid`` (a diagnostic: --renice)."""
    for tid in process_threads(pid):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of one process (its own threads, not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def all_process_cpu() -> dict[int, tuple[str, float, str, int]]:
    """pid -> (comm, utime + stime in s, cpuacct cgroup path, start time) for every process."""
    out: dict[int, tuple[str, float, str, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            rest = raw.rsplit(")", 1)[1].split()
            cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK
            cg = ""
            with open(f"/proc/{d}/cgroup") as f:
                for line in f:
                    parts = line.rstrip("\n").split(":", 2)
                    if len(parts) == 3 and (
                        "cpuacct" in parts[1].split(",") or (parts[0] == "0" and not cg)
                    ):
                        cg = parts[2]
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (comm, cpu, cg, int(rest[19]))
    return out


def foreign_cpu(
    before: dict[int, tuple[str, float, str, int]],
    after: dict[int, tuple[str, float, str, int]],
    ours: set[int],
    our_cgroups: tuple[str, ...],
    elapsed: float,
) -> tuple[float, list[tuple[str, int, float]]]:
    """CPU (cores) of processes that are neither the server, its sandboxes nor the client,
    and the top consumers among them (processes that exited during the window are missed)."""
    total = 0.0
    rows = []
    for pid, (comm, cpu1, cg, started) in after.items():
        if pid in ours or cg.startswith(our_cgroups):
            continue
        prev = before.get(pid)
        d = cpu1 - (prev[1] if prev and prev[3] == started else 0.0)
        if d <= 0:
            continue
        total += d
        rows.append((comm, pid, d / elapsed))
    rows.sort(key=lambda r: -r[2])
    return total / elapsed, rows[:5]


def server_supports(flag: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "warmstart.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return flag in out.stdout


# -- the open-loop LS client (runs in its own process) -----------------------------------------
def loadgen_worker(cfg: dict[str, Any]) -> None:
    """Fixed-rate open-loop client: ``connections`` threads, each with a keep-alive
    connection and its own slice of one timetable (request i is due at start + i/rate and
    goes out on connection i % connections).  A late connection sends at once; latency is
    always measured from the due time.  Writes [[due - start, latency_ms, status, start
    kind, iterations, send lateness_ms], ...] as JSON to cfg["out"]."""
    port, path = cfg["port"], cfg["path"]
    rate, conns, start, total_s = cfg["rate"], cfg["connections"], cfg["start"], cfg["total_s"]
    body = json.dumps(cfg["event"]).encode()
    n_total = int(total_s * rate)
    results: list[list[list[Any]]] = [[] for _ in range(conns)]
    errors: list[str] = []

    def run(k: int) -> None:
        conn = RawHTTP("127.0.0.1", port)
        raw = conn.request_bytes("POST", path, body)
        out = results[k]
        try:
            for i in range(k, n_total, conns):
                due = start + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                late = (time.monotonic() - due) * 1000
                try:
                    status, headers, resp = conn.roundtrip(raw)
                except (OSError, BenchError) as exc:
                    lat = (time.monotonic() - due) * 1000
                    errors.append(f"{type(exc).__name__}: {exc}")
                    out.append([due - start, lat, 0, "error", None, late])
                    with contextlib.suppress(OSError):
                        conn.close()
                    conn = RawHTTP("127.0.0.1", port)
                    continue
                lat = (time.monotonic() - due) * 1000
                n = None
                if status == 200:
                    with contextlib.suppress(ValueError, AttributeError):
                        n = json.loads(resp).get("n")
                out.append([due - start, lat, status, headers.get("x-warmstart-start"), n, late])
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = sorted((s for r in results for s in r), key=lambda s: s[0])
    cpu = os.times()
    with open(cfg["out"], "w") as f:
        json.dump(
            {
                "samples": samples,
                "errors": errors[:20],
                "n_errors": len(errors),
                "cpu_s": cpu.user + cpu.system,
            },
            f,
        )


class LoadGen:
    def __init__(self, workdir: Path, name: str, cfg: dict[str, Any]) -> None:
        self.out = workdir / f"loadgen-{name}.json"
        self.cfg = {**cfg, "out": str(self.out)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--loadgen-worker",
            json.dumps(self.cfg),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        try:
            _out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(
                f"the LS load generator did not finish within {timeout:.0f}s"
            ) from None
        if self.proc.returncode != 0:
            raise BenchError(
                f"the LS load generator failed: {err.decode(errors='replace')[-2000:]}"
            )
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_quiet(key: str, limit_cores: float = 0.15, timeout: float = 60.0) -> float:
    """Wait (up to ``timeout``) for a second in which the node uses < ``limit_cores``:
    other work on the machine would show up as noise in the scenario."""
    deadline = time.monotonic() + timeout
    while True:
        b0, _ = proc_stat()
        time.sleep(1.0)
        b1, _ = proc_stat()
        busy = (b1 - b0) / CLK_TCK / 1.0
        if busy < limit_cores or time.monotonic() > deadline:
            if busy >= limit_cores:
                log(f"WARNING: {key}: the machine is busy ({busy:.2f} cores) before the scenario")
            return busy
        log(f"{key}: the machine is busy ({busy:.2f} cores used by others): waiting")


# -- deploy and warm up ---------------------------------------------------------------------
def deploy(server: Server, be_tags: dict[str, str] | None) -> None:
    client = lambda_client(server.url)
    fns: list[tuple[str, str, int, dict[str, str]]] = [(LS_FN, LS_PY, 128, {})]
    if be_tags is not None:
        fns.append((BE_FN, BE_PY, 512, be_tags))
    for name, code, mem, tags in fns:
        kwargs: dict[str, Any] = {}
        if tags:
            kwargs["Tags"] = tags
        out = client.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Handler=f"{name}.handler",
            Role="arn:aws:iam::000000000000:role/bench",
            Code={"ZipFile": make_zip({f"{name}.py": code})},
            MemorySize=mem,
            Timeout=60,
            **kwargs,
        )
        if out.get("FunctionName") != name:
            raise BenchError(f"create_function({name}) returned {out}")


def warm_ls(server: Server, ls_ms: float, n: int = 30) -> float:
    """A few sequential invocations (the first one starts the instance); returns the mean
    iteration count of the warm ones."""
    conn = RawHTTP("127.0.0.1", server.port)
    raw = conn.request_bytes("POST", f"/run/{LS_FN}", json.dumps({"ms": ls_ms}).encode())
    iters = []
    try:
        for i in range(n):
            status, _headers, body = conn.roundtrip(raw)
            if status != 200:
                raise BenchError(f"{LS_FN} invocation {i}: HTTP {status}: {body[:300]!r}")
            if i >= 5:
                iters.append(json.loads(body)["n"])
    finally:
        conn.close()
    return statistics.fmean(iters)


def is_mem_item(i: int, mix: str) -> bool:
    return mix == "mem" or (mix == "2:1" and i % 3 == 2)


def be_inputs(
    n: int, cpu_s: float, mem_mb: int, sleep_s: float, mix: str = "2:1"
) -> list[dict[str, Any]]:
    """Two CPU items for each memory item, interleaved (mix "2:1"), or only one kind."""
    out = []
    for i in range(n):
        if is_mem_item(i, mix):
            out.append({"kind": "mem", "mb": mem_mb, "sleep_s": sleep_s})
        else:
            out.append({"kind": "cpu", "cpu_s": cpu_s})
    return out


def submit_job(server: Server, inputs: list[dict[str, Any]]) -> str:
    conn = RawHTTP("127.0.0.1", server.port)
    try:
        body = json.dumps({"function": BE_FN, "inputs": inputs}).encode()
        status, _h, resp = conn.roundtrip(conn.request_bytes("POST", "/jobs", body))
    finally:
        conn.close()
    if status != 202:
        raise BenchError(f"POST /jobs: HTTP {status}: {resp[:500]!r}")
    job: dict[str, Any] = json.loads(resp)
    if job.get("total") != len(inputs) or not job.get("JobId"):
        raise BenchError(f"POST /jobs returned {job}")
    return str(job["JobId"])


EVENTS = "events:"  # a "job id" standing for a batch of Event invocations


def submit_events(server: Server, inputs: list[dict[str, Any]]) -> str:
    """Each input as an Event invocation of the BE function, back to back over one
    keep-alive connection (as a client fanning work out does); a pseudo job id."""
    conn = RawHTTP("127.0.0.1", server.port)
    path = f"/2015-03-31/functions/{BE_FN}/invocations"
    try:
        for item in inputs:
            raw = conn.request_bytes("POST", path, json.dumps(item).encode())
            raw = raw.replace(b"\r\n\r\n", b"\r\nX-Amz-Invocation-Type: Event\r\n\r\n", 1)
            status, _h, resp = conn.roundtrip(raw)
            if status != 202:
                raise BenchError(f"Event invocation: HTTP {status}: {resp[:300]!r}")
    finally:
        conn.close()
    return f"{EVENTS}{len(inputs)}"


def submit_late(
    server: Server, inputs: list[dict[str, Any]], at: float, key: str, sent: threading.Event
) -> None:
    """Send ``inputs`` as Event invocations at monotonic time ``at``; set ``sent`` then."""
    time.sleep(max(0.0, at - time.monotonic()))
    t0 = time.monotonic()
    try:
        submit_events(server, inputs)
    except (OSError, BenchError) as exc:
        log(f"WARNING: {key}: sending the BE events failed: {exc}")
        return
    sent.set()
    log(f"{key}: {len(inputs)} BE Event invocations sent in {time.monotonic() - t0:.2f}s")


def job_progress(
    server: Server, job_id: str, sent: threading.Event | None = None
) -> dict[str, Any]:
    """Items done and pending; Event invocations not sent yet (``sent`` unset) are all
    pending."""
    if sent is not None and not sent.is_set():
        return {"done": 0, "pending": int(job_id[len(EVENTS) :])}
    if job_id.startswith(EVENTS):
        # Events have no job record: what is neither queued nor running is done.
        # (A running event is still pending in the queue: queue_depth counts it.)
        total = int(job_id[len(EVENTS) :])
        node = node_status(server) or {}
        pending = int(node.get("queue_depth") or 0)
        return {"done": max(0, total - pending), "pending": pending}
    j = server.get_json(f"/jobs/{job_id}")
    j["done"] = int(j.get("succeeded", 0)) + int(j.get("failed", 0))
    return j


def node_status(server: Server) -> dict[str, Any] | None:
    try:
        status, body = server.get("/node")
    except (OSError, BenchError):
        return None
    if status != 200:
        return None
    with contextlib.suppress(ValueError):
        d = json.loads(body)
        return d if isinstance(d, dict) else None
    return None


class Snapshot:
    def __init__(
        self, server: Server, job_id: str | None, sent: threading.Event | None = None
    ) -> None:
        self.t = time.monotonic()
        self.busy, self.total = proc_stat()
        self.ls_ns = cpuacct_ns(server.data_dir, "ls")
        self.be_ns = cpuacct_ns(server.data_dir, "be")
        self.server_cpu = process_cpu_s(server.proc.pid) if server.proc else None
        self.job = job_progress(server, job_id, sent) if job_id else None
        self.procs = all_process_cpu()
        self.other_ws = other_warmstart_ns(server.data_dir)
        self.ls_sched = run_delays(subtree_tasks(server.data_dir, "ls"))
        self.server_sched = run_delays(process_threads(server.proc.pid)) if server.proc else {}


def _num(d: Any, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.fmean(v) if v else None


# -- one scenario ---------------------------------------------------------------------------
def run_scenario(
    workdir: Path, key: str, args: argparse.Namespace, servers: list[Server], sc_key: str
) -> dict[str, Any]:
    sc = SCENARIOS[sc_key]
    quiet = wait_quiet(key)
    load_before = os.getloadavg()
    extra = list(sc["args"])
    if sc.get("qos_config"):
        config = workdir / f"{key}-qos.json"
        config.write_text(json.dumps(sc["qos_config"]))
        extra += ["--qos-config", str(config)]
    server = Server(workdir, key, [*extra, *args.server_arg])
    servers.append(server)
    server.data_dir.mkdir()
    server.start()
    if args.renice is not None and server.proc:
        renice(server.proc.pid, args.renice)
    deploy(server, sc["be_tags"] if sc["be"] else None)
    iters_alone = warm_ls(server, args.ls_ms)
    node0 = node_status(server)

    warm_s, ramp_s, dur = args.warmup, args.ramp, args.duration
    start = time.monotonic() + 1.0  # time for the client to start and connect
    lg = LoadGen(
        workdir,
        key,
        {
            "port": server.port,
            "path": f"/run/{LS_FN}",
            "event": {"ms": args.ls_ms},
            "rate": args.rate,
            "connections": args.connections,
            "start": start,
            "total_s": warm_s + ramp_s + dur,
        },
    )
    loadgens.append(lg)
    lg.start()
    if args.renice is not None and lg.proc:
        time.sleep(0.3)
        renice(lg.proc.pid, args.renice)
    job_id = None
    n_items = 0
    sent: threading.Event | None = None  # set once BE work sent inside the window is sent
    try:
        time.sleep(max(0.0, start + warm_s - time.monotonic()))
        w0 = start + warm_s + ramp_s
        if sc["be"]:
            n_items = args.be_items or int((ramp_s + dur + 15) * 10) + 100
            submit = submit_events if args.be_submit == "events" else submit_job
            inputs = be_inputs(n_items, args.be_cpu_s, args.be_mem_mb, args.be_sleep_s, args.be_mix)
            if args.be_delay is None:
                job_id = submit(server, inputs)
                log(f"{key}: BE work {job_id} with {n_items} items submitted")
            else:
                # Inside the window: sent from a thread while the window's readings go on.
                job_id = f"{EVENTS}{n_items}"
                sent = threading.Event()
                late = threading.Thread(
                    target=submit_late,
                    args=(server, inputs, w0 + args.be_delay, key, sent),
                    daemon=True,
                )
                late.start()
        time.sleep(max(0.0, w0 - time.monotonic()))
        a = Snapshot(server, job_id, sent)
        nodes: list[dict[str, Any]] = []
        progress: list[tuple[float, int]] = [(a.t - w0, a.job["done"])] if a.job else []
        w1 = w0 + dur
        # /node (and job progress) once a second through the window.
        while True:
            nxt = min(w1, time.monotonic() + 1.0)
            time.sleep(max(0.0, nxt - time.monotonic()))
            if time.monotonic() >= w1 - 0.05:
                break
            n = node_status(server)
            if n is not None:
                nodes.append(n)
            if job_id:
                done = job_progress(server, job_id, sent)["done"]
                progress.append((time.monotonic() - w0, done))
        b = Snapshot(server, job_id, sent)
        if b.job:
            progress.append((b.t - w0, b.job["done"]))
        n = node_status(server)
        if n is not None:
            nodes.append(n)
        lgres = lg.wait(timeout=60)
    finally:
        lg.kill()

    # -- LS latency: requests due inside the window -----------------------------------
    t0, t1 = w0 - start, w0 - start + dur
    win = [s for s in lgres["samples"] if t0 <= s[0] < t1]
    ok = [s for s in win if s[2] == 200]
    lat = [s[1] for s in ok]
    iters = [s[4] for s in ok if isinstance(s[4], (int, float))]
    lateness = [s[5] for s in win]
    from_send = [s[1] - s[5] for s in ok]
    kinds: dict[str, int] = {}
    for s in win:
        kinds[str(s[3])] = kinds.get(str(s[3]), 0) + 1
    elapsed = b.t - a.t
    cap = _num(node0, "capacity", "cpus") or float(os.cpu_count() or 1)

    ours = {os.getpid()}
    if server.proc:
        ours.add(server.proc.pid)
    if lg.proc:
        ours.add(lg.proc.pid)
    # The server's helpers (its spawner, zygotes) are its descendants.
    children: dict[int, list[int]] = {}
    for pid in b.procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
    stack = list(ours)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in ours:
                ours.add(c)
                stack.append(c)
    digest = cgroup_digest(server.data_dir)
    other_cores, other_top = foreign_cpu(
        a.procs, b.procs, ours, (f"/warmstart/{digest}", f"/warmstart-be/{digest}"), b.t - a.t
    )

    _ls_run, ls_wait, ls_slices = delay_delta(a.ls_sched, b.ls_sched)
    _sv_run, sv_wait, _sv_slices = delay_delta(a.server_sched, b.server_sched)
    # The server's main thread (tid = pid) runs the event loop that serves every request.
    main = server.proc.pid if server.proc else 0
    _m_run, main_wait, _m_slices = delay_delta(
        {k: v for k, v in a.server_sched.items() if k == main},
        {k: v for k, v in b.server_sched.items() if k == main},
    )

    def cores(x0: int | None, x1: int | None) -> float | None:
        return None if x0 is None or x1 is None else (x1 - x0) / 1e9 / elapsed

    res: dict[str, Any] = {
        "key": sc_key,
        "label": sc["label"],
        "server_args": sc["args"] + args.server_arg,
        "qos_config": sc.get("qos_config"),
        "be_tags": sc["be_tags"],
        "window_s": elapsed,
        "ls": {
            "scheduled": len(win),
            "ok": len(ok),
            "errors": len(win) - len(ok),
            "statuses": sorted({s[2] for s in win}),
            "start_kinds": kinds,
            "p50_ms": percentile(lat, 50),
            "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99),
            "p999_ms": percentile(lat, 99.9),
            "max_ms": max(lat) if lat else float("nan"),
            "mean_ms": statistics.fmean(lat) if lat else float("nan"),
            "achieved_rps": len(ok) / dur,
            "from_send_p99_ms": percentile(from_send, 99),
            # Requests that started an instance (fork, cold) wait for it: apart, the tail of
            # the warm ones and how slow the others were.
            "warm_p99_ms": percentile([s[1] for s in ok if s[3] == "warm"], 99),
            "started_ms": sorted(round(s[1], 1) for s in ok if s[3] != "warm"),
            "send_lateness_p50_ms": percentile(lateness, 50),
            "send_lateness_p99_ms": percentile(lateness, 99),
            "send_lateness_max_ms": max(lateness) if lateness else float("nan"),
            "iterations_mean": statistics.fmean(iters) if iters else None,
            **handler_preemption(iters),
            "iterations_alone_warmup": iters_alone,
            # The slowest requests: seconds into the window they were due, latency ms.
            "worst": [
                [round(x[0] - t0, 3), round(x[1], 2), x[3]]
                for x in sorted(ok, key=lambda x: -x[1])[:5]
            ],
            "client_errors": lgres.get("errors"),
            "client_cpu_s": lgres.get("cpu_s"),
        },
        "cpu": {
            "capacity_cores": cap,
            "node_util_pct": 100.0 * (b.busy - a.busy) / max(1, b.total - a.total),
            "node_busy_cores": (b.busy - a.busy) / CLK_TCK / elapsed,
            "ls_cgroup_cores": cores(a.ls_ns, b.ls_ns),
            "be_cgroup_cores": cores(a.be_ns, b.be_ns),
            "server_process_cores": (
                None
                if a.server_cpu is None or b.server_cpu is None
                else (b.server_cpu - a.server_cpu) / elapsed
            ),
            "ls_runqueue_wait_s": ls_wait,
            "ls_runqueue_wait_per_request_ms": ls_wait * 1000 / max(1, len(win)),
            "ls_timeslices": ls_slices,
            "server_runqueue_wait_s": sv_wait,
            "server_runqueue_wait_per_request_ms": sv_wait * 1000 / max(1, len(win)),
            "server_loop_runqueue_wait_per_request_ms": main_wait * 1000 / max(1, len(win)),
            "other_processes_cores": other_cores,
            "other_warmstart_cores": sum(
                b.other_ws[k] - a.other_ws[k] for k in b.other_ws if k in a.other_ws
            )
            / 1e9
            / elapsed,
            "other_warmstart_workers": sorted(set(a.other_ws) | set(b.other_ws)),
            "other_processes_top": other_top,
        },
        "node": None,
        "busy_before_cores": quiet,
        "loadavg_before": load_before,
    }
    if nodes:
        ev = [_num(x, "evictions") for x in nodes]
        evd = [x for x in ev if x is not None]
        res["node"] = {
            "samples": len(nodes),
            "qos": nodes[-1].get("qos"),
            "ls_cpu": _mean([_num(x, "usage", "ls_cpu") for x in nodes]),
            "be_cpu": _mean([_num(x, "usage", "be_cpu") for x in nodes]),
            "system_cpu": _mean([_num(x, "usage", "system_cpu") for x in nodes]),
            "node_cpu": _mean([_num(x, "usage", "node_cpu") for x in nodes]),
            "reclaimed_cpu_cores": _mean([_num(x, "reclaimed", "cpu_cores") for x in nodes]),
            "reclaimed_memory_bytes": _mean([_num(x, "reclaimed", "memory_bytes") for x in nodes]),
            "stale_samples": sum(1 for x in nodes if (x.get("reclaimed") or {}).get("stale")),
            "be_cpu_limit_cores": _mean([_num(x, "be_cpu_limit_cores") for x in nodes]),
            "be_cpu_limit_min": min(
                (v for v in (_num(x, "be_cpu_limit_cores") for x in nodes) if v is not None),
                default=None,
            ),
            "queue_depth_mean": _mean([_num(x, "queue_depth") for x in nodes]),
            "evictions_in_window": (evd[-1] - evd[0]) if len(evd) >= 2 else None,
            "evictions_total": evd[-1] if evd else None,
            "be_slots_mean": _mean([_num(x, "best_effort_slots") for x in nodes]),
            "be_running_mean": _mean([_num(x, "best_effort_running") for x in nodes]),
            "series": [
                {
                    "ls": _num(x, "usage", "ls_cpu"),
                    "be": _num(x, "usage", "be_cpu"),
                    "sys": _num(x, "usage", "system_cpu"),
                    "reclaimed": _num(x, "reclaimed", "cpu_cores"),
                    "limit": _num(x, "be_cpu_limit_cores"),
                    "slots": _num(x, "best_effort_slots"),
                    "running": _num(x, "best_effort_running"),
                    "evictions": _num(x, "evictions"),
                }
                for x in nodes
            ],
            "last": nodes[-1],
        }
    if job_id and a.job and b.job:
        done = b.job["done"] - a.job["done"]
        res["be"] = {
            "job_id": job_id,
            "items": n_items,
            "items_done_in_window": done,
            "items_per_s": done / elapsed,
            "failed_total": b.job.get("failed"),
            "succeeded_total": b.job.get("succeeded"),
            "pending_at_end": b.job.get("pending"),
            "status_at_end": b.job.get("status"),
            "progress": progress,
        }
        with contextlib.suppress(OSError, BenchError, ValueError):
            if job_id.startswith(EVENTS):
                raise BenchError("Event invocations have no job results")
            rows = server.get_json(f"/jobs/{job_id}/results").get("results", [])
            by_kind: dict[str, dict[str, int]] = {}
            for row in rows:
                kind = "mem" if is_mem_item(int(row.get("index", 0)), args.be_mix) else "cpu"
                st = str(row.get("status"))
                by_kind.setdefault(kind, {})[st] = by_kind.setdefault(kind, {}).get(st, 0) + 1
            res["be"]["items_by_kind_status"] = by_kind
            attempts = [int(r.get("attempts") or 0) for r in rows if r.get("status") != "pending"]
            res["be"]["retried_items"] = sum(1 for x in attempts if x > 1)
        if b.job.get("status") == "completed" or not b.job.get("pending"):
            log(f"WARNING: {key}: the BE job ran dry before the window ended ({b.job})")
            res["be"]["ran_dry"] = True
        if b.job.get("failed"):
            log(f"WARNING: {key}: {b.job['failed']} BE items failed")
    # BE CPU share of what LS leaves idle.
    node = res["node"] or {}
    cpu = res["cpu"]
    ls_cpu, ls_src = (
        (node["ls_cpu"], "/node")
        if node.get("ls_cpu") is not None
        else (cpu["ls_cgroup_cores"], "cpuacct")
    )
    be_cpu, be_src = (
        (node["be_cpu"], "/node")
        if node.get("be_cpu") is not None
        else (cpu["be_cgroup_cores"], "cpuacct")
    )
    if sc["be"] and not sc["be_tags"] and ls_cpu is not None and be_cpu is not None:
        idle = cap - ls_cpu
        cpu["be_share_of_ls_idle"] = be_cpu / idle if idle > 0 else None
        cpu["be_share_source"] = f"BE {be_src}, LS {ls_src}"
        cpu["be_share_ls_cpu"] = ls_cpu
        cpu["be_share_be_cpu"] = be_cpu
        if cpu["be_cgroup_cores"] is not None and cpu["ls_cgroup_cores"] is not None:
            idle2 = cap - cpu["ls_cgroup_cores"]
            cpu["be_share_cpuacct"] = cpu["be_cgroup_cores"] / idle2 if idle2 > 0 else None
    known = sum(
        x or 0.0
        for x in (
            cpu["ls_cgroup_cores"],
            cpu["be_cgroup_cores"],
            cpu["server_process_cores"],
            (lgres.get("cpu_s") or 0.0) / (warm_s + ramp_s + dur),
            cpu["other_processes_cores"],
        )
    )
    cpu["unaccounted_cores"] = cpu["node_busy_cores"] - known
    reasons = []
    if cpu["other_warmstart_workers"]:
        reasons.append(
            f"other warmstart workers on the host ({len(cpu['other_warmstart_workers'])}, "
            f"{cpu['other_warmstart_cores']:.2f} cores)"
        )
    if cpu["other_processes_cores"] > 0.10:
        reasons.append(f"other processes used {cpu['other_processes_cores']:.2f} cores")
    if cpu["unaccounted_cores"] > 0.25:
        reasons.append(f"{cpu['unaccounted_cores']:.2f} cores unaccounted for")
    res["interference"] = reasons
    if reasons:
        log(f"WARNING: {key}: the window was disturbed: {'; '.join(reasons)}")
    log(
        f"{key}: LS p50 {fmt_ms(res['ls']['p50_ms'])} p99 {fmt_ms(res['ls']['p99_ms'])} "
        f"p99.9 {fmt_ms(res['ls']['p999_ms'])} ({len(ok)}/{len(win)} ok); "
        f"BE {res.get('be', {}).get('items_per_s', 0):.2f} items/s; node CPU {cpu['node_util_pct']:.0f}%"
    )
    res["_lat"] = lat
    res["_iters"] = iters
    res["_from_send"] = from_send
    res["server_log_tail"] = server.log_tail(3000)
    server.stop()
    return res


loadgens: list[LoadGen] = []


def handler_preemption(iters: list[float]) -> dict[str, Any]:
    """How often the 2 ms busy loop lost the CPU: iterations well below the median mean the
    handler was descheduled for part of its run."""
    if not iters:
        return {"iterations_median": None, "preempted_20pct": None, "preempted_50pct": None}
    med = percentile(iters, 50)
    return {
        "iterations_median": med,
        "preempted_20pct": sum(1 for x in iters if x < 0.8 * med) / len(iters),
        "preempted_50pct": sum(1 for x in iters if x < 0.5 * med) / len(iters),
    }


def _merge(values: list[Any]) -> Any:
    """Numbers -> mean; dicts -> merged key by key; anything else -> the last value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return statistics.fmean(present)
    if all(isinstance(v, dict) for v in present):
        keys: list[str] = []
        for v in present:
            keys += [k for k in v if k not in keys]
        return {k: _merge([v.get(k) for v in present]) for k in keys}
    return present[-1]


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario over several rounds (fresh servers): LS percentiles from the pooled
    samples, sums for counts, means for rates and CPU."""
    if len(rounds) == 1:
        r = dict(rounds[0])
        r["rounds"] = [round_summary(rounds[0])]
        return r
    out: dict[str, Any] = _merge(
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in rounds]
    )
    lat = [x for r in rounds for x in r["_lat"]]
    iters = [x for r in rounds for x in r["_iters"]]
    ls = out["ls"]
    for k in ("scheduled", "ok", "errors"):
        ls[k] = sum(r["ls"][k] for r in rounds)
    ls["start_kinds"] = {}
    for r in rounds:
        for k, v in r["ls"]["start_kinds"].items():
            ls["start_kinds"][k] = ls["start_kinds"].get(k, 0) + v
    ls["statuses"] = sorted({x for r in rounds for x in r["ls"]["statuses"]})
    ls.update(
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        p999_ms=percentile(lat, 99.9),
        max_ms=max(lat) if lat else float("nan"),
        from_send_p99_ms=percentile([x for r in rounds for x in r["_from_send"]], 99),
        mean_ms=statistics.fmean(lat) if lat else float("nan"),
        iterations_mean=statistics.fmean(iters) if iters else None,
        send_lateness_max_ms=max(r["ls"]["send_lateness_max_ms"] for r in rounds),
        client_errors=[e for r in rounds for e in (r["ls"].get("client_errors") or [])][:20],
    )
    out["window_s"] = sum(r["window_s"] for r in rounds)
    if out.get("be"):
        be = out["be"]
        be["items_done_in_window"] = sum(r["be"]["items_done_in_window"] for r in rounds)
        be["failed_total"] = sum(r["be"].get("failed_total") or 0 for r in rounds)
        be["pending_at_end"] = sum(r["be"].get("pending_at_end") or 0 for r in rounds)
        be["retried_items"] = sum(r["be"].get("retried_items") or 0 for r in rounds)
        be["ran_dry"] = any(r["be"].get("ran_dry") for r in rounds)
        kinds: dict[str, dict[str, int]] = {}
        for r in rounds:
            for kind, sts in (r["be"].get("items_by_kind_status") or {}).items():
                for st, n in sts.items():
                    kinds.setdefault(kind, {})[st] = kinds.setdefault(kind, {}).get(st, 0) + n
        be["items_by_kind_status"] = kinds
        be["progress"] = [r["be"]["progress"] for r in rounds]
    if out.get("node"):
        out["node"]["series"] = [(r.get("node") or {}).get("series") for r in rounds]
        out["node"]["be_cpu_limit_min"] = min(
            (
                x
                for x in ((r.get("node") or {}).get("be_cpu_limit_min") for r in rounds)
                if x is not None
            ),
            default=None,
        )
        out["node"]["evictions_in_window"] = sum(
            (r.get("node") or {}).get("evictions_in_window") or 0 for r in rounds
        )
    out["cpu"]["other_processes_top"] = sorted(
        (t for r in rounds for t in r["cpu"]["other_processes_top"]), key=lambda t: -t[2]
    )
    out["rounds"] = [round_summary(r) for r in rounds]
    out["interference"] = [x for r in rounds for x in (r.get("interference") or [])]
    return out


def round_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "p50_ms": r["ls"]["p50_ms"],
        "p99_ms": r["ls"]["p99_ms"],
        "p999_ms": r["ls"]["p999_ms"],
        "worst": r["ls"].get("worst"),
        "warm_p99_ms": r["ls"].get("warm_p99_ms"),
        "started_ms": r["ls"].get("started_ms"),
        "be_items_per_s": (r.get("be") or {}).get("items_per_s"),
        "node_util_pct": r["cpu"]["node_util_pct"],
        "be_share_of_ls_idle": r["cpu"].get("be_share_of_ls_idle"),
        "interference": r.get("interference") or [],
    }


# -- the memory scenario (--scenario memory) -------------------------------------------------
#
# LS: ``lsmem`` touches 4 MB per call (a fresh allocation, every page written) at a fixed
# rate, open loop.  Each round is one server (QoS on): an LS-alone window, then BE Event
# invocations of ``bemem`` are sent and a second window measures LS next to them.  Each
# BE invocation allocates and touches anonymous memory in bursts (steps of ``step_mb``
# held until the burst is complete) and, between bursts, reads a file it wrote to its own
# /tmp (an ext4 on disk, so the file's pages are page cache charged to the BE instance).
# The bursts are sized from the reclaimed memory the server reports before the BE work
# starts: ``be concurrency x (anon + file) ~ reclaimed``, so BE's anonymous memory alone
# stays under the BE subtree's cap and its page cache is what has to give way.
LSMEM_FN = "lsmem"
BEMEM_FN = "bemem"

LSMEM_PY = """\
def handler(event, context):
    # malloc + memset: a fresh mapping (glibc mmaps blocks this large), every page written.
    buf = bytearray(b"\\x01") * (int(event.get("mb", 4)) << 20)
    return {"n": len(buf)}
"""

BEMEM_PY = """\
import os
import time

PATH = "/tmp/churn"
BLOCK = 8 << 20


def write_file(mb):
    # Once per instance: an instance serves many invocations, and the disk is slow.
    if os.path.exists(PATH) and os.path.getsize(PATH) == mb << 20:
        return 0
    block = b"\\x02" * BLOCK
    with open(PATH, "wb") as f:
        for _ in range((mb << 20) // BLOCK):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())  # clean pages: reclaim need not wait for writeback
    return mb


def read_file():
    buf = bytearray(BLOCK)
    n = 0
    with open(PATH, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def handler(event, context):
    anon = int(event["anon_mb"])
    step = int(event.get("step_mb", 128))
    written = write_file(int(event.get("file_mb", 0))) if event.get("file_mb") else 0
    read = touched = 0
    for _ in range(int(event.get("bursts", 2))):
        held = []
        while len(held) * step < anon:
            held.append(bytearray(b"\\x01") * (step << 20))
            touched += step
        if written or os.path.exists(PATH):
            for _ in range(int(event.get("reads", 1))):
                read += read_file()
        time.sleep(float(event.get("hold_s", 0.3)))
        del held
    return {"touched_mb": touched, "read_mb": read >> 20, "written_mb": written}
"""


def _cgroup_file_dirs(data_dir: Path, sub: str) -> list[Path]:
    """Every directory of the server's ``sub`` subtree in the memory hierarchy."""
    rel = subtree_rel(data_dir, sub)
    root = Path("/sys/fs/cgroup")
    base = root / "memory" / rel if (root / "memory").is_dir() else root / rel
    return [Path(d) for d, _dirs, _files in os.walk(base)]


def _keyed_file(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def subtree_oom_kills(data_dir: Path, sub: str) -> int:
    """OOM kills the kernel counted in the subtree: v1 ``memory.oom_control`` counts a kill
    only in the victim's own cgroup, so every descendant is summed (v2 ``memory.events``
    is hierarchical: the subtree's own file)."""
    dirs = _cgroup_file_dirs(data_dir, sub)
    if dirs and (dirs[0] / "memory.events").exists():
        return _keyed_file(dirs[0] / "memory.events").get("oom_kill", 0)
    return sum(_keyed_file(d / "memory.oom_control").get("oom_kill", 0) for d in dirs)


def subtree_memory(data_dir: Path, sub: str) -> dict[str, int]:
    """Usage, page cache, RSS, limit and limit hits of the subtree's top cgroup."""
    dirs = _cgroup_file_dirs(data_dir, sub)
    if not dirs:
        return {}
    d = dirs[0]
    stat = _keyed_file(d / "memory.stat")
    out = {
        "cache": stat.get("total_cache", stat.get("file", 0)),
        "rss": stat.get("total_rss", stat.get("anon", 0)),
    }
    for name, key in (
        ("memory.usage_in_bytes", "usage"),
        ("memory.current", "usage"),
        ("memory.limit_in_bytes", "limit"),
        ("memory.failcnt", "failcnt"),
    ):
        with contextlib.suppress(OSError, ValueError):
            out[key] = int((d / name).read_text().split()[0])
    return out


VMSTAT_KEYS = (
    "oom_kill",
    "allocstall_normal",
    "allocstall_movable",
    "pgscan_direct",
    "pgscan_kswapd",
    "pgsteal_direct",
    "pgsteal_kswapd",
    "pgmajfault",
)


def vmstat() -> dict[str, int]:
    v = _keyed_file(Path("/proc/vmstat"))
    return {k: v.get(k, 0) for k in VMSTAT_KEYS}


def ls_window_stats(samples: list[list[Any]], t0: float, t1: float) -> dict[str, Any]:
    win = [s for s in samples if t0 <= s[0] < t1]
    ok = [s[1] for s in win if s[2] == 200]
    statuses: dict[str, int] = {}
    for s in win:
        statuses[str(s[2])] = statuses.get(str(s[2]), 0) + 1
    return {
        "scheduled": len(win),
        "ok": len(ok),
        "statuses": statuses,
        "refused_429": statuses.get("429", 0),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "p999_ms": percentile(ok, 99.9),
        "max_ms": max(ok) if ok else float("nan"),
        "send_lateness_p99_ms": percentile([s[5] for s in win], 99),
    }


def metric_sum(server: Server, name: str, **labels: str) -> float:
    """The sum of a labelled counter's samples whose labels include ``labels``."""
    status, body = server.get("/metrics")
    if status != 200:
        return 0.0
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def submit_event_ids(server: Server, fn: str, inputs: list[dict[str, Any]]) -> list[str]:
    """Each input as an Event invocation of ``fn``; their event ids."""
    conn = RawHTTP("127.0.0.1", server.port)
    path = f"/2015-03-31/functions/{fn}/invocations"
    ids = []
    try:
        for item in inputs:
            raw = conn.request_bytes("POST", path, json.dumps(item).encode())
            raw = raw.replace(b"\r\n\r\n", b"\r\nX-Amz-Invocation-Type: Event\r\n\r\n", 1)
            status, headers, resp = conn.roundtrip(raw)
            if status != 202:
                raise BenchError(f"Event invocation: HTTP {status}: {resp[:300]!r}")
            ids.append(headers.get("x-amzn-requestid", ""))
    finally:
        conn.close()
    return ids


def wait_reclaimed(server: Server, timeout: float = 15.0) -> dict[str, Any]:
    """/node once the QoS loop has a fresh reading (reclaimed capacity not stale)."""
    deadline = time.monotonic() + timeout
    while True:
        n = node_status(server) or {}
        rec = n.get("reclaimed") or {}
        if rec.get("memory_bytes") and not rec.get("stale"):
            return n
        if time.monotonic() > deadline:
            raise BenchError(f"no reclaimed memory from /node after {timeout:.0f}s: {n}")
        time.sleep(0.25)


def timeline(samples: list[list[Any]], t0: float, t1: float) -> list[list[float]]:
    """[second, p99 ms, max ms, requests] for each second of [t0, t1)."""
    out = []
    for k in range(int(t1 - t0)):
        lat = [s[1] for s in samples if t0 + k <= s[0] < t0 + k + 1 and s[2] == 200]
        out.append([k, percentile(lat, 99), max(lat) if lat else float("nan"), len(lat)])
    return out


class CpuMark:
    """Node, BE-subtree and per-process CPU at one moment (for one window's CPU split)."""

    def __init__(self, server: Server) -> None:
        self.t = time.monotonic()
        self.busy, _ = proc_stat()
        self.be_ns = cpuacct_ns(server.data_dir, "be")
        self.ls_ns = cpuacct_ns(server.data_dir, "ls")
        self.procs = all_process_cpu()


def window_cpu(server: Server, lg: LoadGen, a: CpuMark, b: CpuMark) -> dict[str, Any]:
    """Cores used over [a, b): the node, LS and BE subtrees, and processes that are
    neither the server, its helpers and sandboxes nor the client (other people's work)."""
    elapsed = max(1e-6, b.t - a.t)
    ours = {os.getpid()}
    for proc in (server.proc, lg.proc):
        if proc is not None:
            ours.add(proc.pid)
    children: dict[int, list[int]] = {}
    for pid in b.procs:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
            children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(pid)
    stack = list(ours)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in ours:
                ours.add(c)
                stack.append(c)
    digest = cgroup_digest(server.data_dir)
    other, top = foreign_cpu(
        a.procs, b.procs, ours, (f"/warmstart/{digest}", f"/warmstart-be/{digest}"), elapsed
    )

    def cores(x0: int | None, x1: int | None) -> float | None:
        return None if x0 is None or x1 is None else (x1 - x0) / 1e9 / elapsed

    return {
        "node_busy_cores": (b.busy - a.busy) / CLK_TCK / elapsed,
        "ls_cores": cores(a.ls_ns, b.ls_ns),
        "be_cores": cores(a.be_ns, b.be_ns),
        "other_cores": other,
        "other_top": top[:3],
    }


def run_memory_round(
    workdir: Path, i: int, args: argparse.Namespace, servers: list[Server]
) -> dict[str, Any]:
    key = f"memory-{i}"
    quiet = wait_quiet(key, timeout=args.quiet_wait)
    be_slots = args.be_concurrency or 2 * (os.cpu_count() or 1)
    server = Server(workdir, key, ["--be-concurrency", str(be_slots), *args.server_arg])
    servers.append(server)
    server.data_dir.mkdir()
    shm_logs = None
    if args.logs_tmpfs:
        shm_logs = Path(tempfile.mkdtemp(prefix="warmstart-qosbench-logs-", dir="/dev/shm"))
        (server.data_dir / "logs").symlink_to(shm_logs)
    server.start()
    client = lambda_client(server.url)

    def create(name: str, code: str, memory_mb: int, **kw: Any) -> None:
        client.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Handler=f"{name}.handler",
            Role="arn:aws:iam::000000000000:role/bench",
            Code={"ZipFile": make_zip({f"{name}.py": code})},
            MemorySize=memory_mb,
            Timeout=120,
            **kw,
        )

    create(LSMEM_FN, LSMEM_PY, 128)
    conn = RawHTTP("127.0.0.1", server.port)
    raw = conn.request_bytes("POST", f"/run/{LSMEM_FN}", json.dumps({"mb": args.ls_mb}).encode())
    try:
        for _ in range(20):
            status, _h, body = conn.roundtrip(raw)
            if status != 200:
                raise BenchError(f"{LSMEM_FN}: HTTP {status}: {body[:300]!r}")
    finally:
        conn.close()
    node0 = wait_reclaimed(server)
    reclaimed_mb = int(node0["reclaimed"]["memory_bytes"]) >> 20
    file_mb = args.be_file_mb
    # BE at full concurrency, every instance at the top of a burst: ~fill x reclaimed.
    anon_mb = max(args.be_step_mb, int(args.be_fill * reclaimed_mb / be_slots) - file_mb)
    be_mem = anon_mb + file_mb + 256
    if be_mem > 10240:
        raise BenchError(f"BE MemorySize {be_mem} MB is above 10240: use a lower --be-fill")
    create(
        BEMEM_FN,
        BEMEM_PY,
        be_mem,
        EphemeralStorage={"Size": max(512, file_mb + 128)},
    )
    log(
        f"{key}: reclaimed memory {reclaimed_mb} MB, BE cap "
        f"{(node0.get('be_memory_cap_bytes') or 0) >> 20} MB; {args.be_events} BE events of "
        f"{args.be_bursts} x {anon_mb} MB anonymous + a {file_mb} MB file "
        f"(MemorySize {be_mem}), {be_slots} at once"
    )

    warm_s, dur, ramp_s = args.warmup, args.duration, args.ramp
    start = time.monotonic() + 1.0
    total_s = warm_s + dur + ramp_s + dur
    lg = LoadGen(
        workdir,
        key,
        {
            "port": server.port,
            "path": f"/run/{LSMEM_FN}",
            "event": {"mb": args.ls_mb},
            "rate": args.rate,
            "connections": args.connections,
            "start": start,
            "total_s": total_s,
        },
    )
    loadgens.append(lg)
    lg.start()
    a0 = start + warm_s
    b0 = a0 + dur + ramp_s
    b1 = b0 + dur
    series: list[dict[str, Any]] = []
    try:
        time.sleep(max(0.0, a0 - time.monotonic()))
        vm_a0, ls_oom_a0 = vmstat(), subtree_oom_kills(server.data_dir, "ls")
        cpu_a0 = CpuMark(server)
        time.sleep(max(0.0, a0 + dur - time.monotonic()))
        vm_a1 = vmstat()
        cpu_alone = window_cpu(server, lg, cpu_a0, CpuMark(server))
        be_oom0 = subtree_oom_kills(server.data_dir, "be")
        ls_oom0 = subtree_oom_kills(server.data_dir, "ls")
        be_mem0 = subtree_memory(server.data_dir, "be")
        ls_oom_metric0 = metric_sum(
            server, "warmstart_invocations_total", function=LSMEM_FN, outcome="oom"
        )
        inputs = [
            {
                "anon_mb": anon_mb,
                "step_mb": args.be_step_mb,
                "bursts": args.be_bursts,
                "file_mb": file_mb,
                "reads": 1,
                "hold_s": 0.3,
            }
            for _ in range(args.be_events)
        ]
        t_submit = time.monotonic()
        ids = submit_event_ids(server, BEMEM_FN, inputs)
        log(f"{key}: {len(ids)} BE events sent in {time.monotonic() - t_submit:.2f}s")
        time.sleep(max(0.0, b0 - time.monotonic()))
        vm_b0 = vmstat()
        cpu_b0 = CpuMark(server)
        while time.monotonic() < b1 - 0.1:
            n = node_status(server) or {}
            m = subtree_memory(server.data_dir, "be")
            series.append(
                {
                    "t": time.monotonic() - b0,
                    "be_usage": m.get("usage"),
                    "be_cache": m.get("cache"),
                    "be_rss": m.get("rss"),
                    "be_limit": m.get("limit"),
                    "be_cap": n.get("be_memory_cap_bytes"),
                    "reclaimed": (n.get("reclaimed") or {}).get("memory_bytes"),
                    "node_memory": (n.get("usage") or {}).get("node_memory"),
                    "running": n.get("best_effort_running"),
                    "queue": n.get("queue_depth"),
                }
            )
            time.sleep(max(0.0, min(0.5, b1 - time.monotonic())))
        vm_b1 = vmstat()
        cpu_with = window_cpu(server, lg, cpu_b0, CpuMark(server))
        lgres = lg.wait(timeout=60)
    finally:
        lg.kill()
    # Let BE finish (bounded): what is neither queued nor running is done.
    t_end = time.monotonic()
    deadline = t_end + args.be_drain
    while time.monotonic() < deadline:
        n = node_status(server) or {}
        if not n.get("queue_depth") and not n.get("best_effort_running"):
            break
        time.sleep(0.5)
    drain_s = time.monotonic() - t_end
    statuses: dict[str, int] = {}
    retried = 0
    for eid in ids:
        with contextlib.suppress(OSError, BenchError, ValueError):
            e = server.get_json(f"/events/{eid}")
            statuses[str(e.get("status"))] = statuses.get(str(e.get("status")), 0) + 1
            retried += 1 if int(e.get("attempts") or 0) > 1 else 0
    node1 = node_status(server) or {}
    be_oom = subtree_oom_kills(server.data_dir, "be") - be_oom0
    ls_oom = subtree_oom_kills(server.data_dir, "ls") - ls_oom0
    be_mem1 = subtree_memory(server.data_dir, "be")
    ls_oom_metric = (
        metric_sum(server, "warmstart_invocations_total", function=LSMEM_FN, outcome="oom")
        - ls_oom_metric0
    )
    # LS instances started (every invocation counts once, by how it started): an LS
    # instance that died (an OOM kill included) is replaced by a new start.
    ls_started = metric_sum(server, "warmstart_starts_total", function=LSMEM_FN) - metric_sum(
        server, "warmstart_starts_total", function=LSMEM_FN, kind="warm"
    )
    evicted_for_ls = server.metric("warmstart_be_evictions_for_ls_memory_total") or 0.0
    qos_evictions = int(node1.get("evictions") or 0)
    samples = lgres["samples"]
    alone = ls_window_stats(samples, a0 - start, a0 - start + dur)
    with_be = ls_window_stats(samples, b0 - start, b1 - start)
    whole = ls_window_stats(samples, 0.0, total_s)

    def delta(x1: dict[str, int], x0: dict[str, int]) -> dict[str, int]:
        return {k: x1[k] - x0.get(k, 0) for k in x1}

    done = statuses.get("succeeded", 0) + statuses.get("failed", 0)
    res: dict[str, Any] = {
        "round": i,
        "busy_before_cores": quiet,
        "loadavg": os.getloadavg(),
        "reclaimed_mb": reclaimed_mb,
        "be_cap_mb": (node0.get("be_memory_cap_bytes") or 0) >> 20,
        "be": {
            "events": len(ids),
            "anon_mb": anon_mb,
            "file_mb": file_mb,
            "memory_size_mb": be_mem,
            "statuses": statuses,
            "completed": statuses.get("succeeded", 0),
            "failed": statuses.get("failed", 0),
            "finished": done == len(ids) and not statuses.get("failed"),
            "retried_after_error": retried,
            "evicted_qos": qos_evictions,
            "evicted_for_ls_memory": int(evicted_for_ls),
            "requeued": qos_evictions + int(evicted_for_ls),
            "drain_s": drain_s,
            "oom_kills": be_oom,
            "peak_usage_mb": max((s["be_usage"] or 0 for s in series), default=0) >> 20,
            "peak_cache_mb": max((s["be_cache"] or 0 for s in series), default=0) >> 20,
            "peak_rss_mb": max((s["be_rss"] or 0 for s in series), default=0) >> 20,
            "min_cap_mb": min((s["be_cap"] or 0 for s in series if s["be_cap"]), default=0) >> 20,
            "limit_hits": be_mem1.get("failcnt", 0) - be_mem0.get("failcnt", 0),
        },
        "ls": {
            "alone": alone,
            "with_be": with_be,
            "p99_ratio": with_be["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else None,
            "p50_ratio": with_be["p50_ms"] / alone["p50_ms"] if alone["p50_ms"] else None,
            "refused_429": whole["refused_429"],
            "errors": whole["scheduled"] - whole["ok"],
            "oom_kills_kernel": ls_oom,
            "oom_invocations": int(ls_oom_metric),
            "instance_starts": ls_started,
            "oom_kills_before_window": ls_oom_a0,
        },
        "vmstat_alone": delta(vm_a1, vm_a0),
        "vmstat_with_be": delta(vm_b1, vm_b0),
        "series": series,
        "cpu_alone": cpu_alone,
        "cpu_with_be": cpu_with,
        "timeline_alone": timeline(samples, a0 - start, a0 - start + dur),
        "timeline_with_be": timeline(samples, b0 - start, b1 - start),
    }
    log(
        f"{key}: LS p50 {fmt_ms(alone['p50_ms'])} -> {fmt_ms(with_be['p50_ms'])}, p99 "
        f"{fmt_ms(alone['p99_ms'])} -> {fmt_ms(with_be['p99_ms'])} "
        f"({res['ls']['p99_ratio']:.2f}x); LS OOM {ls_oom}, 429 {whole['refused_429']}; BE "
        f"{statuses}, OOM {be_oom}, requeued {res['be']['requeued']}, peak "
        f"{res['be']['peak_usage_mb']} MB (cache {res['be']['peak_cache_mb']} MB), drain "
        f"{drain_s:.1f}s; other processes {cpu_alone['other_cores']:.2f} / "
        f"{cpu_with['other_cores']:.2f} cores, BE {cpu_with['be_cores'] or 0:.2f} cores"
    )
    res["server_log_tail"] = server.log_tail(2000)
    server.stop()
    if shm_logs is not None:
        shutil.rmtree(shm_logs, ignore_errors=True)
    return res


def spread(xs: list[float]) -> str:
    v = [x for x in xs if x is not None and x == x]
    if not v:
        return "-"
    return f"median {statistics.median(v):.2f}, {min(v):.2f} to {max(v):.2f}"


def memory_report(res: dict[str, Any]) -> str:
    m, c, rounds = res["machine"], res["config"], res["rounds"]
    out = [
        f"warmstart {m.get('revision', '?')} on {m.get('cpu', '?')}, {m['cpus']} CPUs, kernel "
        f"{m['kernel']}, cgroup {m['cgroup']}, Python {m['python']}",
        f"LS: a handler touching {c['ls_mb']} MB at {c['rate']:g} req/s open loop; windows of "
        f"{c['duration_s']:g} s, LS alone then LS + BE ({c['ramp_s']:g} s apart) on one server "
        f"per round. BE: {c['be_events']} Event invocations, {c['be_bursts']} bursts each of "
        f"anonymous memory (fill {c['be_fill']:g} of the reclaimed memory over the BE "
        f"concurrency) and a {c['be_file_mb']} MB file in /tmp read between bursts.",
        "Load average (1/5/15 min) at the start "
        + "/".join(f"{x:.2f}" for x in res["loadavg"]["start"])
        + ", at the end "
        + "/".join(f"{x:.2f}" for x in res["loadavg"].get("end", ()))
        + ".",
        "",
        "| round | LS p50 alone | LS p50 with BE | LS p99 alone | LS p99 with BE | p99 ratio | "
        "LS OOM kills | LS 429 | BE done / failed / sent | BE requeued | BE OOM kills | "
        "BE peak (cache) | BE cap | BE limit hits | direct reclaim stalls | BE drained |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | ---: | ---: |",
    ]
    for r in rounds:
        ls, be, vm = r["ls"], r["be"], r["vmstat_with_be"]
        stalls = vm.get("allocstall_normal", 0) + vm.get("allocstall_movable", 0)
        out.append(
            f"| {r['round'] + 1} | {fmt_ms(ls['alone']['p50_ms'])} | "
            f"{fmt_ms(ls['with_be']['p50_ms'])} | {fmt_ms(ls['alone']['p99_ms'])} | "
            f"{fmt_ms(ls['with_be']['p99_ms'])} | {f2(ls['p99_ratio'])}x | "
            f"{ls['oom_kills_kernel']} (+{ls['oom_invocations']} inv.) | {ls['refused_429']} | "
            f"{be['completed']} / {be['failed']} / {be['events']} | {be['requeued']} | "
            f"{be['oom_kills']} | {be['peak_usage_mb']} MB ({be['peak_cache_mb']} MB) | "
            f"{be['min_cap_mb']} MB | {be['limit_hits']} | {stalls} | "
            f"{'yes' if be['finished'] else 'NO'} ({be['drain_s']:.0f} s) |"
        )

    def col(f: Any) -> list[float]:
        return [f(r) for r in rounds]

    out += [
        "",
        "Over the rounds: LS p50 alone "
        + spread(col(lambda r: r["ls"]["alone"]["p50_ms"]))
        + " ms, with BE "
        + spread(col(lambda r: r["ls"]["with_be"]["p50_ms"]))
        + " ms; LS p99 alone "
        + spread(col(lambda r: r["ls"]["alone"]["p99_ms"]))
        + " ms, with BE "
        + spread(col(lambda r: r["ls"]["with_be"]["p99_ms"]))
        + " ms; p99 ratio "
        + spread(col(lambda r: r["ls"]["p99_ratio"]))
        + ".",
        "",
        "Targets:",
    ]
    out += target_lines(res["targets"])
    return "\n".join(out)


def memory_targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    rounds = res["rounds"]
    if not rounds:
        return [("memory scenario ran", False, "no round finished")]
    ratios = [r["ls"]["p99_ratio"] for r in rounds if r["ls"]["p99_ratio"] is not None]
    med = statistics.median(ratios) if ratios else float("nan")
    ls_oom = sum(r["ls"]["oom_kills_kernel"] + r["ls"]["oom_invocations"] for r in rounds)
    refused = sum(r["ls"]["refused_429"] for r in rounds)
    errors = sum(r["ls"]["errors"] for r in rounds)
    unfinished = [r["round"] + 1 for r in rounds if not r["be"]["finished"]]
    return [
        (
            f"LS p99 <= {TARGET_P99_RATIO:.2f}x alone (median of rounds)",
            med <= TARGET_P99_RATIO,
            f"{med:.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})",
        ),
        ("no LS OOM kill", ls_oom == 0, f"{ls_oom}"),
        (
            "no LS request refused or failed",
            refused + errors == 0,
            f"{refused} x 429, {errors} failed",
        ),
        (
            "BE completes",
            not unfinished,
            f"unfinished in rounds {unfinished}" if unfinished else "every round",
        ),
    ]


@contextlib.contextmanager
def _bench_run(workdir: Path, args: argparse.Namespace, servers: list[Server]) -> Any:
    """A benchmark run's body: yields ``[status]`` (2 if the body failed or was
    interrupted, said on stderr) and always stops the load generators and servers and
    removes ``workdir`` (unless ``--keep``)."""
    outcome = [0]
    try:
        yield outcome
    except BenchError as exc:
        print(f"qos_bench: {exc}", file=sys.stderr)
        outcome[0] = 2
    except KeyboardInterrupt as exc:
        print(f"qos_bench: interrupted ({exc})", file=sys.stderr)
        outcome[0] = 2
    finally:
        for lg in loadgens:
            lg.kill()
        stop_servers(servers, "qos_bench")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_memory(args: argparse.Namespace, res: dict[str, Any]) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="warmstart-qosbench-"))
    servers: list[Server] = []
    res["rounds"] = []
    with _bench_run(workdir, args, servers) as outcome:
        for i in range(args.repeat):
            log(f"memory round {i + 1}/{args.repeat}")
            res["rounds"].append(run_memory_round(workdir, i, args, servers))
    status = outcome[0]
    res["loadavg"]["end"] = os.getloadavg()
    res["targets"] = memory_targets(res)
    print(memory_report(res))
    if args.json:
        for r in res["rounds"]:
            r.pop("server_log_tail", None)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if status == 0 and any(ok is False for _n, ok, _d in res["targets"]):
        status = 1
    return status


# -- the report -------------------------------------------------------------------------------
def f2(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or v != v else fmt.format(v)


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    c = res["config"]
    sc = res["scenarios"]
    alone = sc.get("alone")
    out = [
        f"warmstart {m.get('revision', '?')} on {m.get('cpu', '?')}, {m['cpus']} CPUs, kernel "
        f"{m['kernel']}, cgroup {m['cgroup']}, Python {m['python']}",
        f"LS: {c['ls_ms']:g} ms busy loop at {c['rate']:g} req/s open loop over "
        f"{c['connections']} keep-alive connections; window {c['duration_s']:g} s after "
        f"{c['warmup_s']:g} s LS warm-up + {c['ramp_s']:g} s BE ramp. BE: job of CPU items "
        f"({c['be_cpu_s']:g} s CPU) and memory items ({c['be_mem_mb']} MB + {c['be_sleep_s']:g} s "
        f"sleep), mix {c.get('be_mix', '2:1')}, MemorySize 512, sent as "
        f"{'Event invocations' if c.get('be_submit') == 'events' else 'one job'}"
        + (
            f", {c['be_delay']:g} s into the window."
            if c.get("be_delay") is not None
            else " at the start of the ramp."
        ),
        "Load average (1/5/15 min) at the start "
        + "/".join(f"{x:.2f}" for x in res["loadavg"]["start"])
        + ", at the end "
        + "/".join(f"{x:.2f}" for x in res["loadavg"].get("end", ()))
        + ".",
        "",
        "| scenario | LS p50 | LS p99 | LS p99.9 | p99 vs alone | p99 vs alone per round | "
        "BE items/s | node CPU % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in SCENARIOS:
        r = sc.get(key)
        if r is None:
            if key in res.get("skipped", {}):
                out.append(
                    f"| {SCENARIOS[key]['label']} | skipped: {res['skipped'][key]} | | | | | | |"
                )
            continue
        ls = r["ls"]
        be = r.get("be")
        mark = " (DISTURBED)" if r.get("interference") else ""
        out.append(
            f"| {r['label']}{mark} | {fmt_ms(ls['p50_ms'])} | {fmt_ms(ls['p99_ms'])} | "
            f"{fmt_ms(ls['p999_ms'])} | "
            f"{ratio(ls['p99_ms'], alone['ls']['p99_ms']) if alone else '-'} | "
            f"{spread(round_ratios(sc, key)) if len(r.get('rounds') or []) > 1 else '-'} | "
            f"{f2(be['items_per_s']) if be else '-'} | {r['cpu']['node_util_pct']:.0f}% |"
        )
    if any(r.get("interference") for r in sc.values()):
        out += [
            "",
            "DISTURBED: other work ran on this host during some windows (see the details); "
            "rerun on a quiet machine before trusting those rows.",
        ]
    out += [
        "",
        "CPU over the window, in cores (cgroup cpuacct; /node averages in brackets where the "
        "server has it):",
        "",
        "| scenario | LS subtree | BE subtree | server process | client | other | node busy | "
        "BE limit | BE share of LS idle | evictions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in SCENARIOS:
        r = sc.get(key)
        if r is None:
            continue
        cpu, node = r["cpu"], r.get("node") or {}

        def both(cg: float | None, nd: float | None) -> str:
            s = f2(cg)
            return s + (f" [{nd:.2f}]" if nd is not None else "")

        client = r["ls"].get("client_cpu_s")
        total_s = c["warmup_s"] + c["ramp_s"] + c["duration_s"]
        out.append(
            f"| {r['label']} | {both(cpu['ls_cgroup_cores'], node.get('ls_cpu'))} | "
            f"{both(cpu['be_cgroup_cores'], node.get('be_cpu'))} | "
            f"{f2(cpu['server_process_cores'])} | {f2(client / total_s if client else None)} | "
            f"{f2(cpu.get('other_processes_cores'))} | {f2(cpu['node_busy_cores'])} | "
            f"{f2(node.get('be_cpu_limit_cores'))} | "
            f"{f2(cpu.get('be_share_of_ls_idle'), '{:.0%}')} | "
            f"{f2(node.get('evictions_in_window'), '{:.0f}')} |"
        )
    out += ["", "Details:"]
    for key in SCENARIOS:
        r = sc.get(key)
        if r is None:
            continue
        ls, be = r["ls"], r.get("be")
        it = ls.get("iterations_mean")
        line = (
            f"- {r['label']}: {ls['ok']}/{ls['scheduled']} LS requests ok "
            f"({ls['achieved_rps']:.0f}/s), started as {ls['start_kinds']}, mean "
            f"{fmt_ms(ls['mean_ms'])}, max {fmt_ms(ls['max_ms'])}, client send lateness p99 "
            f"{fmt_ms(ls['send_lateness_p99_ms'])} (p99 measured from the actual send "
            f"{fmt_ms(ls['from_send_p99_ms'])})"
        )
        worst = [x.get("worst") for x in r.get("rounds") or [] if x.get("worst")]
        if worst:
            line += "; slowest requests (s into the window: ms) per round " + "; ".join(
                ", ".join(f"{w[0]:.2f}: {w[1]:.1f}" for w in ws[:3]) for ws in worst
            )
        started = [x for rr in r.get("rounds") or [] for x in rr.get("started_ms") or []]
        if started:
            line += (
                f"; {len(started)} requests started an instance (median "
                f"{statistics.median(started):.1f} ms, max {max(started):.1f} ms), p99 of the "
                "warm ones per round "
                + ", ".join(fmt_ms(x.get("warm_p99_ms")) for x in r.get("rounds") or [])
            )
        if len(r.get("rounds") or []) > 1:
            line += "; p99 per round " + ", ".join(fmt_ms(x["p99_ms"]) for x in r["rounds"])
            rr = round_ratios(sc, key)
            if rr and r is not alone:
                line += (
                    "; p99 / the same round's LS alone "
                    + ", ".join(f"{x:.2f}" for x in rr)
                    + f" ({spread(rr)})"
                )
        if it:
            line += f"; handler loop iterations per call {it:,.0f}"
            base = alone and alone["ls"].get("iterations_mean")
            if base and r is not alone:
                line += f" ({it / base:.0%} of LS alone's)"
            if ls.get("preempted_20pct") is not None:
                line += (
                    f", handler lost > 20% of its busy time in {ls['preempted_20pct']:.1%} of "
                    f"calls (> 50%: {ls['preempted_50pct']:.1%})"
                )
        if be:
            line += (
                f"; BE {be['items_done_in_window']} items in {r['window_s']:.1f} s, "
                f"{be['failed_total']} failed in total, {be['pending_at_end']} pending at the end"
            )
            if be.get("items_by_kind_status"):
                line += f" (whole job at the end, by kind: {be['items_by_kind_status']}"
                line += f", {be.get('retried_items', 0)} items took > 1 attempt)"
            if be.get("ran_dry"):
                line += " (JOB RAN DRY: throughput understated)"
        node = r.get("node")
        if node:
            line += (
                f"; /node: qos={node.get('qos')}, reclaimed CPU {f2(node.get('reclaimed_cpu_cores'))} "
                f"cores, BE limit min {f2(node.get('be_cpu_limit_min'))}, queue depth "
                f"{f2(node.get('queue_depth_mean'), '{:.0f}')}, BE slots {f2(node.get('be_slots_mean'), '{:.1f}')} "
                f"running {f2(node.get('be_running_mean'), '{:.1f}')} (means), stale samples "
                f"{f2(node.get('stale_samples'), '{:.0f}')}"
            )
        else:
            line += "; GET /node not available"
        line += (
            f"; run-queue wait per LS request: LS instances "
            f"{r['cpu']['ls_runqueue_wait_per_request_ms'] * 1000:.0f} us, server process "
            f"{r['cpu']['server_runqueue_wait_per_request_ms'] * 1000:.0f} us (its event-loop "
            f"thread {r['cpu'].get('server_loop_runqueue_wait_per_request_ms', 0) * 1000:.0f} us)"
            " (schedstat)"
        )
        oc = r["cpu"].get("other_processes_cores")
        if oc is not None and oc > 0.05:
            top = ", ".join(f"{c} ({p}) {x:.2f}" for c, p, x in r["cpu"]["other_processes_top"][:3])
            line += f"; OTHER PROCESSES used {oc:.2f} cores: {top}"
        if r.get("interference"):
            line += "; DISTURBED: " + "; ".join(r["interference"])
        if ls["errors"]:
            line += (
                f"; LS ERRORS: {ls['errors']} (statuses {ls['statuses']}, {ls['client_errors']})"
            )
        out.append(line)
    out += ["", "Targets:"]
    out += target_lines(res["targets"])
    return "\n".join(out)


def round_ratios(sc: dict[str, Any], key: str) -> list[float]:
    """LS p99 of scenario ``key`` in each round over LS alone's p99 in the same round."""
    alone, other = sc.get("alone"), sc.get(key)
    if not alone or not other:
        return []
    return [
        b["p99_ms"] / a["p99_ms"]
        for a, b in zip(alone.get("rounds") or [], other.get("rounds") or [], strict=False)
        if a["p99_ms"] and a["p99_ms"] == a["p99_ms"]
    ]


def targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    t: list[tuple[str, bool | None, str]] = []
    sc = res["scenarios"]
    alone, qos = sc.get("alone"), sc.get("qos")
    disturbed = [x["label"] for x in (alone, qos) if x and x.get("interference")]
    if disturbed:
        t.append(
            (
                f"QoS on: LS p99 <= {TARGET_P99_RATIO:.2f}x alone",
                None,
                f"not judged: other work disturbed {', '.join(disturbed)}",
            )
        )
    elif alone and qos:
        r = qos["ls"]["p99_ms"] / alone["ls"]["p99_ms"]
        detail = f"{fmt_ms(qos['ls']['p99_ms'])} vs {fmt_ms(alone['ls']['p99_ms'])} = {r:.2f}x"
        rr = round_ratios(sc, "qos")
        if len(rr) > 1:
            # Several rounds: judged on the median of the per-round ratios (each against
            # the same round's LS alone), the pooled ratio alongside.
            r = statistics.median(rr)
            detail = (
                f"median of {len(rr)} rounds {r:.2f}x ({', '.join(f'{x:.2f}' for x in rr)}); "
                f"pooled {detail}"
            )
        t.append(
            (f"QoS on: LS p99 <= {TARGET_P99_RATIO:.2f}x alone", r <= TARGET_P99_RATIO, detail)
        )
        t.append(
            (f"QoS on: LS p99 <= {AIM_P99_RATIO:.2f}x alone (aim)", r <= AIM_P99_RATIO, detail)
        )
    else:
        t.append((f"QoS on: LS p99 <= {TARGET_P99_RATIO:.2f}x alone", None, "not measured"))
    if qos:
        e = qos["ls"]["errors"]
        t.append(("QoS on: every LS request succeeded", e == 0, f"{e} failed"))
        share = qos["cpu"].get("be_share_of_ls_idle")
        if share is None:
            t.append(
                (
                    f"QoS on: BE gets >= {TARGET_BE_SHARE:.0%} of the CPU LS leaves idle",
                    None,
                    "BE/LS CPU not measurable",
                )
            )
        else:
            cpu = qos["cpu"]
            t.append(
                (
                    f"QoS on: BE gets >= {TARGET_BE_SHARE:.0%} of the CPU LS leaves idle",
                    share >= TARGET_BE_SHARE,
                    f"{share:.0%} = BE {cpu['be_share_be_cpu']:.2f} / ({cpu['capacity_cores']:g} - "
                    f"LS {cpu['be_share_ls_cpu']:.2f}) cores ({cpu['be_share_source']})"
                    + (
                        f"; from cpuacct: {cpu['be_share_cpuacct']:.0%}"
                        if cpu.get("be_share_cpuacct") is not None
                        else ""
                    ),
                )
            )
        if qos.get("be", {}).get("ran_dry"):
            t.append(("QoS on: the BE job outlasted the window", False, "it ran dry"))
    return t


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark LS latency and BE throughput with QoS off and on: four "
        "scenarios (LS alone; LS + BE with no differentiation; LS + BE with --no-qos; LS + BE "
        "with QoS on), each on a fresh warmstart server. Needs root.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            targets (QoS on): LS p99 <= 1.10x alone (aim 1.05x); BE CPU >= 60% of
            (capacity - LS CPU). Only 127.0.0.1 is contacted.
            Exit status: 0 ok, 1 a target was missed, 2 error."""),
    )
    p.add_argument(
        "--scenario",
        choices=("cpu", "memory"),
        default="cpu",
        help="cpu (default): the CPU scenarios of --scenarios; memory: LS touching memory "
        "alone and next to BE memory bursts and page-cache churn, one server per round",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="6 s windows and shorter warm-ups (a ~1.5 min smoke run)",
    )
    p.add_argument("--json", metavar="OUT", type=Path, help="also write all results as JSON to OUT")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measurement window per scenario, seconds (default 20, quick 6)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="LS-alone warm-up before the BE job, seconds (default 4, quick 2)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="seconds between the BE job and the window (default 5, quick 3)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="LS requests per second (default 200: about half a core here; memory: 100)",
    )
    p.add_argument(
        "--ls-ms",
        type=float,
        default=2.0,
        help="LS handler busy time per call, ms (default %(default)s)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="LS client keep-alive connections (default %(default)s)",
    )
    p.add_argument(
        "--be-items",
        type=int,
        default=None,
        help="BE job size (default: enough to outlast the window)",
    )
    p.add_argument("--be-cpu-s", type=float, default=0.5, help="CPU per CPU item (default 0.5)")
    p.add_argument("--be-mem-mb", type=int, default=300, help="MB per memory item (default 300)")
    p.add_argument(
        "--be-sleep-s",
        type=float,
        default=0.5,
        help="sleep after a memory item's allocation (default 0.5)",
    )
    p.add_argument(
        "--be-submit",
        choices=("job", "events"),
        default="job",
        help="BE work as one job (default), or as that many Event invocations sent back to back",
    )
    p.add_argument(
        "--be-delay",
        type=float,
        default=None,
        metavar="S",
        help="send the BE work (as Event invocations) S seconds into the measurement "
        "window instead of before it; the ramp then defaults to 0",
    )
    p.add_argument(
        "--be-mix",
        choices=("2:1", "cpu", "mem"),
        default="2:1",
        help="BE items: 2 CPU per memory item (default), or only one kind",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default %(default)s)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for every warmstart serve (repeatable)",
    )
    p.add_argument(
        "--repeat",
        "--rounds",
        dest="repeat",
        type=int,
        default=None,
        help="rounds of all scenarios, each on fresh servers; LS percentiles come from "
        "the pooled samples, p99 ratios per round are summarised by their median and spread "
        "(default 1; memory: 3)",
    )
    mem = p.add_argument_group("memory scenario")
    mem.add_argument("--ls-mb", type=int, default=4, help="MB the LS handler touches (default 4)")
    mem.add_argument(
        "--be-events", type=int, default=8, help="BE Event invocations per round (default 8)"
    )
    mem.add_argument(
        "--be-bursts", type=int, default=1, help="memory bursts per BE invocation (default 1)"
    )
    mem.add_argument(
        "--be-fill",
        type=float,
        default=0.9,
        help="BE at full concurrency, at the top of a burst, holds this share of the "
        "reclaimed memory, anonymous memory and file pages together (default 0.9)",
    )
    mem.add_argument(
        "--be-file-mb",
        type=int,
        default=384,
        help="the file each BE instance writes once to its /tmp and reads between bursts "
        "(default 384)",
    )
    mem.add_argument(
        "--be-step-mb", type=int, default=128, help="allocation step of a burst (default 128)"
    )
    mem.add_argument(
        "--be-concurrency",
        type=int,
        default=None,
        help="the server's --be-concurrency (default: its own, 2 per CPU)",
    )
    mem.add_argument(
        "--be-drain",
        type=float,
        default=40.0,
        help="seconds BE may take to finish after the last window (default 40)",
    )
    mem.add_argument(
        "--logs-tmpfs",
        action="store_true",
        help="diagnostic: the server's function logs (written on its event loop) on a tmpfs",
    )
    mem.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="memory: wait at most this long for a quiet machine before a round (default 20)",
    )
    p.add_argument(
        "--renice",
        type=int,
        default=None,
        metavar="N",
        help="diagnostic: run the server process (not its sandboxes) and the LS client at "
        "nice N, e.g. -10",
    )
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=0,
        metavar="N",
        help="run a scenario whose window other work disturbed again, up to N times "
        "(on a shared machine; default %(default)s)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--loadgen-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scenario == "memory":
        args.duration = args.duration or (5.0 if args.quick else 10.0)
        args.warmup = args.warmup or 2.0
        args.ramp = args.ramp if args.ramp is not None else 2.0
        args.rate = args.rate or 100.0
        args.repeat = args.repeat or (1 if args.quick else 3)
    args.rate = args.rate or 200.0
    args.repeat = args.repeat or 1
    if args.duration is None:
        args.duration = 6.0 if args.quick else 20.0
    if args.warmup is None:
        args.warmup = 2.0 if args.quick else 4.0
    if args.be_delay is not None:
        if args.be_submit != "events":
            p.error("--be-delay sends the BE work as Event invocations: add --be-submit events")
        if args.ramp is None:
            args.ramp = 0.0
    if args.ramp is None:
        args.ramp = 3.0 if args.quick else 5.0
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    bad = [k for k in keys if k not in SCENARIOS]
    if bad:
        p.error(f"unknown scenarios {bad}; choose from {list(SCENARIOS)}")
    args.scenario_keys = keys
    return args


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loadgen_worker:
        loadgen_worker(json.loads(args.loadgen_worker))
        return 0
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("qos_bench: needs root on Linux (sandboxes and cgroups do)", file=sys.stderr)
        return 2
    if args.scenario == "memory":
        config = {
            k: getattr(args, k)
            for k in (
                "duration",
                "warmup",
                "ramp",
                "rate",
                "connections",
                "ls_mb",
                "be_events",
                "be_bursts",
                "be_fill",
                "be_file_mb",
                "be_step_mb",
                "be_concurrency",
                "be_drain",
                "repeat",
            )
        }
        config.update(duration_s=args.duration, warmup_s=args.warmup, ramp_s=args.ramp)
        config["server_args"] = args.server_arg
        mres: dict[str, Any] = {
            "machine": machine_info(),
            "config": config,
            "loadavg": {"start": os.getloadavg()},
        }
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupted)
        return run_memory(args, mres)
    res: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "ramp_s": args.ramp,
            "rate": args.rate,
            "ls_ms": args.ls_ms,
            "connections": args.connections,
            "be_cpu_s": args.be_cpu_s,
            "be_mem_mb": args.be_mem_mb,
            "be_sleep_s": args.be_sleep_s,
            "be_mix": args.be_mix,
            "be_submit": args.be_submit,
            "be_delay": args.be_delay,
            "quick": args.quick,
            "repeat": args.repeat,
            "renice": args.renice,
            "retry_disturbed": args.retry_disturbed,
            "server_args": args.server_arg,
        },
        "scenarios": {},
        "skipped": {},
        "loadavg": {"start": os.getloadavg()},
    }

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)

    has_no_qos = server_supports("--no-qos")
    if not has_no_qos:
        log("WARNING: this warmstart has no `serve --no-qos`: the --no-qos scenarios are skipped")
    workdir = Path(tempfile.mkdtemp(prefix="warmstart-qosbench-"))
    servers: list[Server] = []
    with _bench_run(workdir, args, servers) as outcome:
        rounds: dict[str, list[dict[str, Any]]] = {}
        for i in range(args.repeat):
            for key in args.scenario_keys:
                if "--no-qos" in SCENARIOS[key]["args"] and not has_no_qos:
                    res["skipped"][key] = "no --no-qos in this warmstart"
                    continue
                log(f"round {i + 1}/{args.repeat}, scenario {key}: {SCENARIOS[key]['label']}")
                name = f"{key}-{i}" if args.repeat > 1 else key
                r = run_scenario(workdir, name, args, servers, sc_key=key)
                for attempt in range(1, args.retry_disturbed + 1):
                    if not r.get("interference"):
                        break
                    log(f"{name}: disturbed window, running it again ({attempt})")
                    r = run_scenario(workdir, f"{name}-r{attempt}", args, servers, sc_key=key)
                rounds.setdefault(key, []).append(r)
                res["scenarios"][key] = aggregate(rounds[key])
    status = outcome[0]

    res["loadavg"]["end"] = os.getloadavg()
    res["targets"] = targets(res)
    print(report(res))
    if args.json:
        for r in res["scenarios"].values():
            r.pop("server_log_tail", None)
            r.pop("_lat", None)
            r.pop("_iters", None)
            r.pop("_from_send", None)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if status == 0 and any(ok is False for _n, ok, _d in res["targets"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
