#!/usr/bin/env python3
"""Soak benchmark: a long run of mixed load on one node, checking every answer and the
worker's resources.

One ``warmstart serve`` (a free loopback port; its data dir in a temporary directory under
``--dir``, /var/tmp by default: the machine's own disk, not a tmpfs that would charge the
data to memory) gets, for ``--minutes`` (default 30; ``--quick`` 3):

- **synchronous invocations** at a steady rate (``--rate``, default 20/s), open loop: the
  i-th call is sent at ``start + i / rate`` from a thread pool, whatever happened to the
  ones before, through the Lambda API (``POST /2015-03-31/functions/F/invocations``,
  httpx). They go round ``echo`` (returns its code's version), ``greet`` (returns an
  environment variable) and ``pkg`` (imports ``six``, installed at deploy from the
  node's package index; left out, and said so, if that deploy fails);
- **Event invocations** (``X-Amz-Invocation-Type: Event``, ``--event-rate``, default 2/s)
  of ``evt``; the 202's request id is the event's, and ``GET /events/<id>`` is polled
  until the event has run, its result checked;
- a **job** every ``--job-every`` seconds (default 300, the first after 60 s): ``POST
  /jobs?function=batch`` with 200 JSON lines, followed (``GET /jobs/<id>``) until done,
  every result checked (``GET /jobs/<id>/results``);
- an **operation** every ``--ops-every`` seconds (default 20), in turn: UpdateFunctionCode
  of ``echo`` (a new version), an instance kill, UpdateFunctionConfiguration of ``greet``
  (a new value of its variable), a kill, a deploy (CreateFunction of ``dyn-K``, every
  other one with a requirements.txt, three calls, DeleteFunction of ``dyn-(K-2)``), a
  kill. A **kill** picks an idle instance of a synchronous function from ``GET
  /instances``, SIGKILLs its processes (only pids in this server's cgroups) and calls
  that function once straight away.

Every answer is classified:

- **ok**: the status and the result the handler returns (for ``echo``/``greet`` a version
  between the last update completed when the call was sent and the last one begun when
  it returned: an update is in force once its API call has returned);
- **explained**: an error whose cause the soak can name: ``429 TooManyRequestsException``
  with a ``Reason``; ``Runtime.ExitError`` from a function one of whose instances the soak
  killed (each kill explains at most one such error, within 300 s);
- **unexplained**: everything else: a 5xx, any other error type (the soak's requests are
  all valid, so a 4xx is a fault too), a timeout (30 s) or a connection error, a result
  that is not what the handler returns, an Event or job item not done within 300 s.

Every ``--sample-every`` seconds (default 5) it samples the worker process (``VmRSS`` and
``Threads`` from ``/proc/<pid>/status``, the entries of ``/proc/<pid>/fd``), the spawner
(its child; RSS and fds), the worker's children, the processes in this server's cgroups,
the zygotes (``GET /zygotes``), idle instances (``GET /healthz``), the SQLite files
(``state.db`` with its WAL) and the function logs.

**The resource criterion.** The first ``W`` = max(3 min, 10% of the run) are warm-up
(capped at a third of the run, for short runs). Over the steady part after it, the median
of the samples in its first ``w`` minutes is compared with the median of those in its last
``w`` (``w`` = min(3 min, a quarter of the steady part)): change = last / first - 1. Goal:
|change| <= 10% for the worker's RSS, open fds and threads. The other series are reported
with the same figures (and a least-squares slope per hour) but have no goal: SQLite grows
with every Event and job item it keeps, logs with every call.

The worker's fds are also reported less ``FDS_PER_INSTANCE`` (4) for each live instance
(``GET /node``), with the same goal: the raw count follows how many instances the load
keeps alive, the rest shows a leak.

Targets: 0 unexplained answers; worker RSS, fds (raw and beyond its instances) and
threads flat within 10%. Prints a
Markdown table; ``--json OUT`` writes every sample and every request's outcome and latency.
Exit status: 0 every target met, 1 one missed, 2 an error (the server died, say). The
server is stopped (SIGTERM) and the temporary directory removed at the end, even on error.
Only 127.0.0.1 is contacted (and, for ``pkg``, whatever package index the node uses).

    bash scripts/bench soak [--minutes 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchError,
    Server,
    cgroup_digest,
    fmt_ms,
    lambda_client,
    log,
    machine_info,
    make_zip,
    percentile,
    stop_servers,
    target_lines,
)

ECHO_PY = 'V = {v}\n\n\ndef handler(event, context):\n    return {{"fn": "echo", "n": event["n"], "v": V}}\n'
GREET_PY = """\
import os


def handler(event, context):
    return {"fn": "greet", "n": event["n"], "g": os.environ.get("GREETING")}
"""
PKG_PY = """\
import six


def handler(event, context):
    return {"fn": "pkg", "n": event["n"], "six": six.__version__}
"""
# evt, batch and the dyn-K functions: the name, the number and its square.
SQUARE_PY = """\
import os


def handler(event, context):
    n = event["n"]
    return {"fn": os.environ["AWS_LAMBDA_FUNCTION_NAME"], "n": n, "sq": n * n}
"""
SQUARE_SIX_PY = "import six  # noqa: F401\n" + SQUARE_PY
REQUIREMENTS = "six\n"

SYNC_CYCLE = ("echo", "greet", "echo", "pkg", "greet")  # the order calls go round
KILL_TARGETS = ("echo", "greet", "pkg")
OPS = ("update-code", "kill", "update-config", "kill", "deploy", "kill")
JOB_ITEMS = 200
DONE_WITHIN_S = 300.0  # an Event or a job item not done by then is a fault
KILL_EXPLAINS_S = 300.0
CLIENT_TIMEOUT_S = 30.0
FLAT_WITHIN = 0.10
# The worker holds this many descriptors for each live instance (its socket, the output
# memfd, the exit-status pipe, the freezer's file): its fds follow how many instances the
# load keeps, which is not a leak; what is left beyond them should stay flat.
FDS_PER_INSTANCE = 4
GOAL_SERIES = ("worker_rss_kb", "worker_fds", "worker_fds_beyond", "worker_threads")
SERIES = (
    ("worker_rss_kb", "worker RSS", "kB"),
    ("worker_fds", "worker open fds", ""),
    ("worker_fds_beyond", f"worker fds beyond {FDS_PER_INSTANCE} per live instance", ""),
    ("worker_threads", "worker threads", ""),
    ("spawner_rss_kb", "spawner RSS", "kB"),
    ("spawner_fds", "spawner open fds", ""),
    ("worker_children", "worker's child processes", ""),
    ("sandbox_procs", "processes in the server's cgroups", ""),
    ("zygotes", "zygotes", ""),
    ("idle_instances", "idle instances", ""),
    ("instances", "live instances (GET /node)", ""),
    ("sqlite_bytes", "SQLite (state.db + WAL)", "B"),
    ("logs_bytes", "function logs", "B"),
)
KINDS = (
    ("sync", "sync invocations (RequestResponse)"),
    ("after-kill", "the call right after a kill"),
    ("event", "Event invocations (result via /events/<id>)"),
    ("job-item", "job items (POST /jobs)"),
    ("deploy", "CreateFunction (dyn-K)"),
    ("new-call", "calls of a function just created"),
    ("delete", "DeleteFunction (dyn-K-2)"),
    ("update-code", "UpdateFunctionCode"),
    ("update-config", "UpdateFunctionConfiguration"),
)


class Outcome(enum.Enum):
    OK = "ok"
    EXPLAINED = "explained"
    UNEXPLAINED = "unexplained"


@dataclass(frozen=True)
class Record:
    kind: str
    fn: str
    t: float  # seconds since the start of the load, when the answer came
    latency_ms: float | None
    outcome: Outcome
    detail: str = ""


@dataclass
class Versions:
    """A function's versions: ``done`` the last update whose API call returned, ``begun``
    the last one started; a call sent at ``done`` = d and answered at ``begun`` = b may see
    any version in [d, b]."""

    done: int = 0
    begun: int = 0


@dataclass
class Kills:
    """Instance kills not yet matched with the Runtime.ExitError they may cause."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, list[float]] = field(default_factory=dict)

    def add(self, fn: str, t: float) -> None:
        with self.lock:
            self.pending.setdefault(fn, []).append(t)

    def consume(self, fn: str, t: float) -> float | None:
        """The latest kill of an instance of ``fn`` (before ``t``, within KILL_EXPLAINS_S)
        that explains an error at ``t``; each kill explains one error."""
        with self.lock:
            kills = self.pending.get(fn, [])
            for i in reversed(range(len(kills))):  # the latest kill first
                if kills[i] <= t <= kills[i] + KILL_EXPLAINS_S:
                    return kills.pop(i)
        return None


class Soak:
    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        import httpx

        self.server = server
        self.args = args
        self.http = httpx.Client(
            base_url=server.url,
            timeout=httpx.Timeout(CLIENT_TIMEOUT_S, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        self.lam = lambda_client(server.url)
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self.samples: list[dict[str, Any]] = []
        self.kills = Kills()
        self.kill_log: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []
        self.versions = {"echo": Versions(), "greet": Versions()}
        self.sync_functions = ["echo", "greet", "pkg"]
        self.notes: list[str] = []
        self.rng = random.Random(args.seed)
        self.digest = cgroup_digest(server.data_dir)
        self.errors: list[BaseException] = []

    # -- bookkeeping -----------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(
        self, kind: str, fn: str, latency_ms: float | None, outcome: Outcome, detail: str = ""
    ) -> None:
        rec = Record(kind, fn, round(self.now(), 3), latency_ms, outcome, detail)
        with self.lock:
            self.records.append(rec)
        if outcome is Outcome.UNEXPLAINED:
            log(f"UNEXPLAINED {kind} {fn}: {detail}")

    # -- set-up ----------------------------------------------------------------------------
    def create(self, name: str, files: dict[str, str], **extra: Any) -> None:
        self.lam.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Handler="handler.handler",
            Role="arn:aws:iam::000000000000:role/soak",
            Code={"ZipFile": make_zip(files)},
            MemorySize=128,
            Timeout=10,
            **extra,
        )

    def deploy_all(self) -> None:
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        self.create("echo", {"handler.py": ECHO_PY.format(v=0)})
        self.create(
            "greet", {"handler.py": GREET_PY}, Environment={"Variables": {"GREETING": "g0"}}
        )
        self.create("evt", {"handler.py": SQUARE_PY})
        self.create("batch", {"handler.py": SQUARE_PY})
        try:
            self.create("pkg", {"handler.py": PKG_PY, "requirements.txt": REQUIREMENTS})
        except ClientError as exc:
            note = f"pkg (requirements.txt: six) left out: its deploy failed: {exc}"
            log(note)
            self.notes.append(note)
            self.sync_functions.remove("pkg")

    # -- what a function returns -----------------------------------------------------------
    def expected(self, fn: str, n: int, body: Any, lo: int, hi: int) -> bool:
        if not isinstance(body, dict) or body.get("fn") != fn or body.get("n") != n:
            return False
        if fn == "echo":
            v = body.get("v")
            return isinstance(v, int) and lo <= v <= hi
        if fn == "greet":
            g = body.get("g")
            return isinstance(g, str) and g in {f"g{k}" for k in range(lo, hi + 1)}
        if fn == "pkg":
            return isinstance(body.get("six"), str) and bool(body["six"])
        return bool(body.get("sq") == n * n)

    def window(self, fn: str) -> tuple[int, int]:
        v = self.versions.get(fn)
        with self.lock:
            return (v.done, v.begun) if v else (0, 0)

    def classify(self, fn: str, n: int, resp: Any, lo: int, t_answer: float) -> tuple[Outcome, str]:
        """An invocation's answer (an httpx response) as ok, explained or unexplained."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        status = resp.status_code
        if status == 200:
            ferr = resp.headers.get("x-amz-function-error")
            if ferr is None:
                _, hi = self.window(fn)
                if self.expected(fn, n, body, lo, hi):
                    return Outcome.OK, ""
                return Outcome.UNEXPLAINED, f"wrong result {resp.text[:300]!r}"
            etype = body.get("errorType") if isinstance(body, dict) else None
            msg = body.get("errorMessage", "") if isinstance(body, dict) else resp.text
            if etype == "Runtime.ExitError":
                tk = self.kills.consume(fn, t_answer)
                if tk is not None:
                    return (
                        Outcome.EXPLAINED,
                        f"Runtime.ExitError: an instance of {fn} was killed ({t_answer - tk:.1f} s before)",
                    )
            return Outcome.UNEXPLAINED, f"{ferr} {etype}: {str(msg)[:300]}"
        etype = resp.headers.get("x-amzn-errortype", "")
        reason = body.get("Reason") if isinstance(body, dict) else None
        if status == 429 and etype == "TooManyRequestsException" and reason:
            return Outcome.EXPLAINED, f"429 TooManyRequestsException ({reason})"
        return (
            Outcome.UNEXPLAINED,
            f"HTTP {status} {etype or '(no error type)'}: {resp.text[:300]!r}",
        )

    def invoke(self, kind: str, fn: str, n: int, t_sched: float | None = None) -> None:
        """One synchronous call, classified and recorded; latency from ``t_sched`` (the
        scheduled send time of open-loop calls) or from the send."""
        import httpx

        lo, _ = self.window(fn)
        t_send = time.monotonic()
        start = t_send if t_sched is None else t_sched
        try:
            resp = self.http.post(
                f"/2015-03-31/functions/{fn}/invocations", content=json.dumps({"n": n})
            )
        except httpx.TimeoutException as exc:
            self.record(kind, fn, None, Outcome.UNEXPLAINED, f"timeout: {type(exc).__name__}")
            return
        except httpx.HTTPError as exc:
            self.record(kind, fn, None, Outcome.UNEXPLAINED, f"{type(exc).__name__}: {exc}")
            return
        t_answer = time.monotonic()
        outcome, detail = self.classify(fn, n, resp, lo, t_answer - self.t0)
        self.record(kind, fn, (t_answer - start) * 1000, outcome, detail)

    # -- the drivers (one thread each) -------------------------------------------------------
    def sync_driver(self) -> None:
        rate = self.args.rate
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="soak-sync") as pool:
            i = 0
            start = time.monotonic()
            while True:
                t_sched = start + i / rate
                delay = t_sched - time.monotonic()
                if self.stop.wait(max(0.0, delay)):
                    break
                fns = [f for f in SYNC_CYCLE if f in self.sync_functions]
                pool.submit(self.invoke, "sync", fns[i % len(fns)], i, t_sched)
                i += 1

    def event_driver(self) -> None:
        import httpx

        pending: dict[str, tuple[int, float]] = {}  # event id -> (n, sent at)
        interval = 1.0 / self.args.event_rate
        next_send = time.monotonic()
        next_check = next_send + 1.0
        n = 0
        draining_until: float | None = None
        while True:
            now = time.monotonic()
            if draining_until is None and self.stop.is_set():
                draining_until = now + DONE_WITHIN_S
            if draining_until is not None and (not pending or now > draining_until):
                break
            if draining_until is None and now >= next_send:
                next_send += interval
                try:
                    resp = self.http.post(
                        "/2015-03-31/functions/evt/invocations",
                        content=json.dumps({"n": n}),
                        headers={"X-Amz-Invocation-Type": "Event"},
                    )
                except httpx.HTTPError as exc:
                    self.record(
                        "event", "evt", None, Outcome.UNEXPLAINED, f"{type(exc).__name__}: {exc}"
                    )
                else:
                    rid = resp.headers.get("x-amzn-requestid")
                    if resp.status_code == 202 and rid:
                        pending[rid] = (n, now)
                    else:
                        outcome, detail = self.classify("evt", n, resp, 0, self.now())
                        if resp.status_code == 202:
                            outcome, detail = Outcome.UNEXPLAINED, "202 without a request id"
                        self.record("event", "evt", None, outcome, detail)
                n += 1
            if now >= next_check:
                next_check = now + 1.0
                self.check_events(pending)
            self.stop.wait(max(0.0, min(next_send, next_check) - time.monotonic()))
        for rid, (n, sent) in pending.items():
            self.record(
                "event",
                "evt",
                None,
                Outcome.UNEXPLAINED,
                f"event {rid} (n={n}) not done {time.monotonic() - sent:.0f} s after it was sent",
            )

    def check_events(self, pending: dict[str, tuple[int, float]]) -> None:
        import httpx

        now = time.monotonic()
        for rid, (n, sent) in list(pending.items()):
            if now - sent < 0.5:
                continue
            try:
                resp = self.http.get(f"/events/{rid}")
                ev = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                pending.pop(rid)
                self.record("event", "evt", None, Outcome.UNEXPLAINED, f"GET /events/{rid}: {exc}")
                continue
            if resp.status_code != 200:
                pending.pop(rid)
                self.record(
                    "event",
                    "evt",
                    None,
                    Outcome.UNEXPLAINED,
                    f"GET /events/{rid}: HTTP {resp.status_code} {resp.text[:200]!r}",
                )
                continue
            status = ev.get("status")
            if status == "pending":
                if now - sent > DONE_WITHIN_S:
                    pending.pop(rid)
                    self.record(
                        "event",
                        "evt",
                        None,
                        Outcome.UNEXPLAINED,
                        f"event {rid} still pending after {now - sent:.0f} s",
                    )
                continue
            pending.pop(rid)
            ms = (time.monotonic() - sent) * 1000
            if status == "succeeded" and self.expected("evt", n, ev.get("result"), 0, 0):
                self.record("event", "evt", ms, Outcome.OK)
            else:
                self.record(
                    "event",
                    "evt",
                    ms,
                    Outcome.UNEXPLAINED,
                    f"event {rid}: {status} after {ev.get('attempts')} attempts: {str(ev.get('result'))[:300]}",
                )

    def job_driver(self) -> None:
        next_job = self.args.first_job
        k = 0
        while not self.stop.wait(max(0.0, next_job - self.now())):
            if self.args.minutes * 60 - self.now() < 60:
                break  # not enough time left to see it through
            self.run_job(k)
            k += 1
            next_job += self.args.job_every

    def run_job(self, k: int) -> None:
        import httpx

        lines = "".join(json.dumps({"n": k * JOB_ITEMS + i}) + "\n" for i in range(JOB_ITEMS))
        job: dict[str, Any] = {"k": k, "t_submit": round(self.now(), 3)}
        self.jobs.append(job)
        sent = time.monotonic()
        try:
            resp = self.http.post(
                "/jobs",
                params={"function": "batch"},
                content=lines,
                headers={"Content-Type": "application/x-ndjson"},
            )
            if resp.status_code != 202:
                raise BenchError(f"POST /jobs: HTTP {resp.status_code} {resp.text[:300]!r}")
            job_id = resp.json()["JobId"]
            job["id"] = job_id
            while True:
                st = self.http.get(f"/jobs/{job_id}").json()
                if st.get("status") == "completed":
                    break
                if time.monotonic() - sent > DONE_WITHIN_S:
                    raise BenchError(f"job {job_id} not done after {DONE_WITHIN_S:.0f} s: {st}")
                time.sleep(1.0)  # polling a job's progress, as `warmstart job submit --wait` does
            job["done_s"] = round(time.monotonic() - sent, 3)
            results = self.http.get(f"/jobs/{job_id}/results").json()["results"]
        except (BenchError, httpx.HTTPError, ValueError, KeyError) as exc:
            job["error"] = str(exc)
            self.record("job-item", "batch", None, Outcome.UNEXPLAINED, f"job {k}: {exc}")
            return
        ms = job["done_s"] * 1000
        seen = set()
        for item in results:
            i = item.get("index")
            seen.add(i)
            n = k * JOB_ITEMS + (i if isinstance(i, int) else -1)
            if item.get("status") == "succeeded" and self.expected(
                "batch", n, item.get("result"), 0, 0
            ):
                self.record("job-item", "batch", ms, Outcome.OK)
            else:
                self.record(
                    "job-item",
                    "batch",
                    ms,
                    Outcome.UNEXPLAINED,
                    f"job {k} item {i}: {str(item)[:300]}",
                )
        for i in sorted(set(range(JOB_ITEMS)) - seen):
            self.record(
                "job-item", "batch", None, Outcome.UNEXPLAINED, f"job {k} item {i}: no result"
            )
        log(f"job {k}: {JOB_ITEMS} items done in {job['done_s']:.1f} s")

    def ops_driver(self) -> None:
        k = 0
        while not self.stop.wait(self.args.ops_every):
            op = OPS[k % len(OPS)]
            try:
                if op == "update-code":
                    self.update("echo")
                elif op == "update-config":
                    self.update("greet")
                elif op == "deploy":
                    self.deploy(k // len(OPS))
                else:
                    self.kill()
            except Exception as exc:
                self.record(op, "-", None, Outcome.UNEXPLAINED, f"{type(exc).__name__}: {exc}")
            k += 1

    def api_call(self, kind: str, fn: str, call: Any) -> bool:
        """A control-plane call through boto3, recorded; True if it succeeded."""
        from botocore.exceptions import BotoCoreError, ClientError

        t = time.monotonic()
        try:
            call()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            reason = exc.response.get("Reason")
            if status == 429 and reason:
                self.record(kind, fn, None, Outcome.EXPLAINED, f"429 ({reason})")
            else:
                self.record(
                    kind,
                    fn,
                    None,
                    Outcome.UNEXPLAINED,
                    f"HTTP {status} {err.get('Code')}: {err.get('Message')}",
                )
            return False
        except BotoCoreError as exc:  # no answer: a connection error, a timeout
            self.record(kind, fn, None, Outcome.UNEXPLAINED, f"{type(exc).__name__}: {exc}")
            return False
        self.record(kind, fn, (time.monotonic() - t) * 1000, Outcome.OK)
        return True

    def update(self, fn: str) -> None:
        v = self.versions[fn]
        with self.lock:
            v.begun += 1
            k = v.begun
        if fn == "echo":
            ok = self.api_call(
                "update-code",
                fn,
                lambda: self.lam.update_function_code(
                    FunctionName=fn, ZipFile=make_zip({"handler.py": ECHO_PY.format(v=k)})
                ),
            )
        else:
            ok = self.api_call(
                "update-config",
                fn,
                lambda: self.lam.update_function_configuration(
                    FunctionName=fn, Environment={"Variables": {"GREETING": f"g{k}"}}
                ),
            )
        if ok:
            with self.lock:
                v.done = k

    def deploy(self, k: int) -> None:
        name = f"dyn-{k}"
        files = {"handler.py": SQUARE_PY}
        if k % 2 and "pkg" in self.sync_functions:
            files = {"handler.py": SQUARE_SIX_PY, "requirements.txt": REQUIREMENTS}
        t = time.monotonic()
        if not self.api_call("deploy", name, lambda: self.create(name, files)):
            return
        for n in range(3):
            self.invoke("new-call", name, n)
        if k >= 2:
            old = f"dyn-{k - 2}"
            self.api_call("delete", old, lambda: self.lam.delete_function(FunctionName=old))
        log(f"deployed {name} and called it 3 times ({time.monotonic() - t:.1f} s)")

    def our_pid(self, pid: int) -> bool:
        """``pid`` is in one of this server's cgroups (never kill anything else)."""
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        return f"/warmstart/{self.digest}/" in text or f"/warmstart-be/{self.digest}/" in text

    def kill(self) -> None:
        resp = self.http.get("/instances")
        idle = [
            i for i in resp.json()["instances"] if i["function"] in KILL_TARGETS and i.get("pids")
        ]
        entry: dict[str, Any] = {"t": round(self.now(), 3)}
        self.kill_log.append(entry)
        if not idle:
            entry["skipped"] = "no idle instance"
            return
        victim = self.rng.choice(idle)
        pids = [p for p in victim["pids"] if self.our_pid(p)]
        entry.update(function=victim["function"], state=victim["state"], pids=pids)
        if not pids:
            entry["skipped"] = "its processes were gone"
            return
        fn = victim["function"]
        self.kills.add(fn, self.now())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        before = len(self.records)
        self.invoke("after-kill", fn, -1 - len(self.kill_log))
        with self.lock:
            after = [r for r in self.records[before:] if r.kind == "after-kill"]
        entry["next_call"] = after[-1].outcome.value if after else "?"
        entry["next_call_detail"] = after[-1].detail if after else ""

    def sampler(self) -> None:
        while True:
            try:
                self.samples.append(self.sample())
            except Exception as exc:
                self.errors.append(exc)
                self.stop.set()
                return
            if self.stop.wait(self.args.sample_every):
                self.samples.append(self.sample())
                return

    def sample(self) -> dict[str, Any]:
        proc = self.server.proc
        if proc is None or proc.poll() is not None:
            raise BenchError(
                f"the server exited ({proc.returncode if proc else '?'}):\n{self.server.log_tail()}"
            )
        pid = proc.pid
        status = proc_status(pid)
        children = child_pids(pid)
        spawner = next((c for c in children if b"warmstart.sandbox.spawner" in cmdline(c)), None)
        sp = proc_status(spawner) if spawner else {}
        zyg = self.http.get("/zygotes").json()
        health = self.http.get("/healthz").json()
        live = int(sum(self.http.get("/node").json().get("instances", {}).values()))
        fds = fd_count(pid)
        data = self.server.data_dir
        return {
            "t": round(self.now(), 3),
            "worker_rss_kb": status.get("VmRSS", 0),
            "worker_threads": status.get("Threads", 0),
            "worker_fds": fds,
            "worker_fds_beyond": fds - FDS_PER_INSTANCE * live,
            "instances": live,
            "spawner_rss_kb": sp.get("VmRSS", 0),
            "spawner_fds": fd_count(spawner) if spawner else 0,
            "worker_children": len(children),
            "sandbox_procs": len(cgroup_procs(self.digest)),
            "zygotes": len(zyg.get("zygotes", [])),
            "idle_instances": health.get("idle_instances", 0),
            "sqlite_bytes": sum(f.stat().st_size for f in data.glob("state.db*") if f.is_file()),
            "logs_bytes": sum(f.stat().st_size for f in (data / "logs").glob("*") if f.is_file()),
        }

    def run(self) -> None:
        threads = [
            threading.Thread(target=self.sampler, name="soak-sampler"),
            threading.Thread(target=self.sync_driver, name="soak-sync"),
            threading.Thread(target=self.event_driver, name="soak-event"),
            threading.Thread(target=self.job_driver, name="soak-jobs"),
            threading.Thread(target=self.ops_driver, name="soak-ops"),
        ]
        for t in threads:
            t.start()
        end = self.t0 + self.args.minutes * 60
        last_report = time.monotonic()
        try:
            while not self.stop.wait(min(5.0, max(0.0, end - time.monotonic()))):
                if time.monotonic() >= end:
                    break
                if time.monotonic() - last_report >= 60:
                    last_report = time.monotonic()
                    self.progress()
        finally:
            self.stop.set()
            for t in threads:
                t.join()
            self.http.close()
        if self.errors:
            raise BenchError(f"sampling failed: {self.errors[0]}")

    def progress(self) -> None:
        with self.lock:
            counts = Counter(r.outcome for r in self.records)
        s = self.samples[-1] if self.samples else {}
        log(
            f"{self.now() / 60:.1f} min: {counts[Outcome.OK]} ok, {counts[Outcome.EXPLAINED]} explained, "
            f"{counts[Outcome.UNEXPLAINED]} unexplained; worker RSS {s.get('worker_rss_kb', 0) / 1024:.1f} MB, "
            f"{s.get('worker_fds')} fds, {s.get('worker_threads')} threads"
        )


# -- /proc -----------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/<pid>/status."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def child_pids(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cgroup_procs(digest: str) -> set[int]:
    """Every process in this server's cgroups (LS and BE subtrees, any controller)."""
    root = Path("/sys/fs/cgroup")
    pids: set[int] = set()
    for top in ("warmstart", "warmstart-be"):
        for base in [root / top / digest, *root.glob(f"*/{top}/{digest}")]:
            for procs in base.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
    return pids


# -- the analysis ----------------------------------------------------------------------------
def phases(minutes: float) -> tuple[float, float]:
    """(warm-up, window) in seconds: see the module docstring."""
    run = minutes * 60
    warmup = min(max(180.0, 0.1 * run), run / 3)
    window = min(180.0, (run - warmup) / 4)
    return warmup, window


def analyse(samples: list[dict[str, Any]], key: str, minutes: float) -> dict[str, Any] | None:
    warmup, window = phases(minutes)
    steady = [s for s in samples if s["t"] >= warmup]
    if len(steady) < 4:
        return None
    t_first, t_last = steady[0]["t"], steady[-1]["t"]
    first = [s[key] for s in steady if s["t"] <= t_first + window]
    last = [s[key] for s in steady if s["t"] >= t_last - window]
    m0, m1 = statistics.median(first), statistics.median(last)
    values = [s[key] for s in steady]
    change = (m1 / m0 - 1) if m0 else (0.0 if m1 == m0 else float("inf"))
    slope = 0.0
    if len({s["t"] for s in steady}) > 1 and len(set(values)) > 1:
        slope = statistics.linear_regression([s["t"] for s in steady], values).slope
    return {
        "start": steady[0][key],
        "end": steady[-1][key],
        "min": min(values),
        "max": max(values),
        "first_median": m0,
        "last_median": m1,
        "change": change,
        "slope_per_hour": slope * 3600,
        "within": abs(change) <= FLAT_WITHIN,
    }


def fmt_value(v: float, unit: str, sign: str = "") -> str:
    if unit == "kB":
        return f"{v / 1024:{sign}.1f} MB"
    if unit == "B":
        return f"{v / 1e6:{sign}.2f} MB" if abs(v) >= 1e5 else f"{v / 1e3:{sign}.1f} kB"
    return f"{v:{sign}.1f}" if sign or v != int(v) else f"{v:.0f}"


def summarise(records: list[Record]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, _label in KINDS:
        recs = [r for r in records if r.kind == kind]
        lat = [r.latency_ms for r in recs if r.latency_ms is not None and r.outcome is Outcome.OK]
        out[kind] = {
            "count": len(recs),
            **{o.value: sum(1 for r in recs if r.outcome is o) for o in Outcome},
            "p50_ms": percentile(lat, 50) if lat else None,
            "p99_ms": percentile(lat, 99) if lat else None,
        }
    return out


def report(res: dict[str, Any]) -> str:
    m, cfg = res["machine"], res["config"]
    warmup, window = phases(cfg["minutes"])
    out = [
        f"warmstart {m.get('revision', '?')} on {m.get('cpu', '?')}, {m['cpus']} CPUs, kernel "
        f"{m['kernel']}, cgroup {m['cgroup']}, Python {m['python']}; {res['date']}",
        f"{cfg['minutes']:g} min: sync {cfg['rate']:g}/s over {', '.join(res['sync_functions'])}; "
        f"Event {cfg['event_rate']:g}/s; a job of {JOB_ITEMS} items every {cfg['job_every']:g} s; "
        f"an operation every {cfg['ops_every']:g} s ({', '.join(OPS)})",
        "",
        "| requests | count | ok | explained | unexplained | p50 | p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summ = res.get("requests", {})
    for kind, label in KINDS:
        s = summ.get(kind)
        if not s:
            continue
        out.append(
            f"| {label} | {s['count']} | {s['ok']} | {s['explained']} | {s['unexplained']} | "
            f"{fmt_ms(s['p50_ms'])} | {fmt_ms(s['p99_ms'])} |"
        )
    kills = res.get("kills", [])
    done = [k for k in kills if "skipped" not in k]
    out += [
        "",
        "Latency: sync from the scheduled send (open loop); Event from the send to the poll "
        "that saw the result (polled each second); job items: the job's time to completion; "
        "operations: the API call.",
        f"Instance kills: {len(done)} ({len(kills) - len(done)} skipped: no idle instance); "
        f"the next call: {dict(Counter(k.get('next_call') for k in done))}.",
    ]
    explained = Counter(r["detail"].split(" (")[0] for r in res.get("explained", []))
    if explained:
        out.append(f"Explained errors: {dict(explained)}.")
    unexplained = res.get("unexplained", [])
    if unexplained:
        out.append(f"Unexplained ({len(unexplained)}), the first ones:")
        out += [f"- {u['t']:.1f} s {u['kind']} {u['fn']}: {u['detail']}" for u in unexplained[:10]]
    out += [
        "",
        f"| resource (after {warmup / 60:.1f} min warm-up) | start | end | min | max | "
        f"median, first {window / 60:.1f} min | median, last {window / 60:.1f} min | change | "
        "slope per hour | goal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key, label, unit in SERIES:
        a = res.get("resources", {}).get(key)
        if a is None:
            continue
        goal = ("met" if a["within"] else "MISSED") if key in GOAL_SERIES else "-"
        out.append(
            f"| {label} | {fmt_value(a['start'], unit)} | {fmt_value(a['end'], unit)} | "
            f"{fmt_value(a['min'], unit)} | {fmt_value(a['max'], unit)} | "
            f"{fmt_value(a['first_median'], unit)} | {fmt_value(a['last_median'], unit)} | "
            f"{a['change'] * 100:+.1f}% | {fmt_value(a['slope_per_hour'], unit, '+')} | {goal} |"
        )
    out += [
        "",
        f"change = median of the last {window / 60:.1f} min / median of the first "
        f"{window / 60:.1f} min after warm-up - 1; goal |change| <= {FLAT_WITHIN:.0%} for the "
        "worker's RSS, fds and threads.",
    ]
    if res.get("server_log_problems"):
        out.append(f"Server log: {len(res['server_log_problems'])} warning/error lines, e.g.:")
        out += [f"    {line[:200]}" for line in res["server_log_problems"][:5]]
    out += [f"Note: {n}" for n in res.get("notes", [])]
    out += ["", "Targets:", *target_lines(res["targets"])]
    return "\n".join(out)


def targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    t: list[tuple[str, bool | None, str]] = []
    summ = res.get("requests")
    if summ:
        n = sum(s["unexplained"] for s in summ.values())
        total = sum(s["count"] for s in summ.values())
        t.append(("0 unexplained answers", n == 0, f"{n} of {total}"))
    for key in GOAL_SERIES:
        a = res.get("resources", {}).get(key)
        label = dict((k, lbl) for k, lbl, _u in SERIES)[key]
        t.append(
            (
                f"{label} flat within {FLAT_WITHIN:.0%} after warm-up",
                None if a is None else a["within"],
                "-" if a is None else f"{a['change'] * 100:+.1f}%",
            )
        )
    return t


def server_log_problems(server: Server) -> list[str]:
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln]


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak a warmstart node with mixed load (sync, Event, jobs, deploys, "
        "updates, instance kills), checking every answer and the worker's resources. Needs root.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            targets: 0 unexplained answers; worker RSS, open fds and threads flat within 10%
            after warm-up (median of the first minutes vs the last). Exit status: 0 ok,
            1 a target was missed, 2 error."""),
    )
    p.add_argument("--minutes", type=float, default=None, help="length of the load (default 30)")
    p.add_argument("--quick", action="store_true", help="a 3-minute run")
    p.add_argument(
        "--rate", type=float, default=20.0, help="sync invocations/s (default %(default)s)"
    )
    p.add_argument(
        "--event-rate", type=float, default=2.0, help="Event invocations/s (default %(default)s)"
    )
    p.add_argument(
        "--job-every", type=float, default=300.0, help="seconds between jobs (default %(default)s)"
    )
    p.add_argument(
        "--first-job",
        type=float,
        default=60.0,
        help="the first job after S s (default %(default)s)",
    )
    p.add_argument(
        "--ops-every",
        type=float,
        default=20.0,
        help="seconds between operations: updates, deploys, kills (default %(default)s)",
    )
    p.add_argument(
        "--sample-every",
        type=float,
        default=5.0,
        help="resource samples (default every %(default)s s)",
    )
    p.add_argument("--seed", type=int, default=1, help="which instances get killed")
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the temporary data dir goes (default %(default)s: the machine's disk)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for warmstart serve (repeatable)",
    )
    p.add_argument("--json", metavar="OUT", type=Path, help="also write all results as JSON to OUT")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.minutes is None:
        args.minutes = 3.0 if args.quick else 30.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("soak: needs root on Linux (the sandboxes do)", file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    res: dict[str, Any] = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "config": {
            "minutes": args.minutes,
            "rate": args.rate,
            "event_rate": args.event_rate,
            "job_every": args.job_every,
            "ops_every": args.ops_every,
            "sample_every": args.sample_every,
            "server_args": args.server_arg,
            "job_items": JOB_ITEMS,
        },
    }
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="warmstart-soak-", dir=args.dir))
    servers: list[Server] = []
    status = 0
    soak: Soak | None = None
    try:
        server = Server(workdir, "soak", list(args.server_arg))
        servers.append(server)
        server.data_dir.mkdir()
        server.start()
        soak = Soak(server, args)
        log("deploying echo, greet, evt, batch and pkg (requirements.txt: six)")
        soak.deploy_all()
        log(f"load for {args.minutes:g} min")
        soak.t0 = time.monotonic()
        soak.run()
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt as exc:
        print(f"soak: interrupted ({exc})", file=sys.stderr)
        status = 2
        if soak is not None:
            soak.stop.set()
    finally:
        if servers:
            res["server_log_problems"] = server_log_problems(servers[0])
        stop_servers(servers, "soak")
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if soak is not None:
        records = soak.records
        res["sync_functions"] = soak.sync_functions
        res["requests"] = summarise(records)
        res["explained"] = [
            {"t": r.t, "kind": r.kind, "fn": r.fn, "detail": r.detail}
            for r in records
            if r.outcome is Outcome.EXPLAINED
        ]
        res["unexplained"] = [
            {"t": r.t, "kind": r.kind, "fn": r.fn, "detail": r.detail}
            for r in records
            if r.outcome is Outcome.UNEXPLAINED
        ]
        res["resources"] = {
            key: a for key, _l, _u in SERIES if (a := analyse(soak.samples, key, args.minutes))
        }
        res["kills"] = soak.kill_log
        res["jobs"] = soak.jobs
        res["notes"] = soak.notes
        res["samples"] = soak.samples
        res["records"] = [
            [
                r.kind,
                r.fn,
                r.t,
                None if r.latency_ms is None else round(r.latency_ms, 3),
                r.outcome.value,
            ]
            for r in records
        ]
    res["targets"] = targets(res)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if status == 0 and any(ok is False for _n, ok, _d in res["targets"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
