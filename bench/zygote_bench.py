#!/usr/bin/env python3
"""Zygote benchmark: cold starts of a pandas function forked from a zygote, against a fresh
interpreter in a sandbox and against ``runc run``, all measured in the same run on this machine.

What it does (needs root on Linux, like the sandboxes themselves):

1. Sandbox creations per second, with the library in this process (no HTTP): a
   ``SandboxManager`` and ``ZygoteLauncher`` on a private data dir, a zygote with no packages,
   then create -> read the runtime's ``ready`` frame -> destroy (in the background, as the
   worker does; the clock stops when the last sandbox is gone), in a loop, for a few
   seconds with 1 and with 4 asyncio tasks; the same with fresh sandboxes
   (``SandboxManager.create``) as the baseline.  Only sandboxes that said ``ready`` count.
2. Server (a): ``warmstart serve --freeze-after-ms 0`` (the defaults for when zygotes
   are built).  The burst first: B functions (default 15) whose handler does ``import
   numpy, pandas`` at module level (requirements.txt ``pandas``, MemorySize 512, Timeout
   60; different functions, the same requirements) are deployed -- the first installs
   pandas from the package index through the server -- and then invoked once each, back
   to back over one keep-alive loopback connection (``POST /run/<fn>``, the minimal
   client of core_bench), with no pause, as a CI pipeline or a fan-out does.  How each
   started (``X-Warmstart-Start`` and whether pandas was pre-imported) is recorded, and a
   thread polling ``GET /zygotes`` notes when the pandas zygote is alive, after the
   first deploy and from the first invocation.  Those functions are deleted.  Then the
   paused case: the first invocation of each of N more functions with the same code,
   0.2 s between them, the zygote long built; each must say ``fork`` and report pandas
   pre-imported.  Those are deleted and N more are timed back to back, for the details.
   Then K more functions are invoked once each and left alive (frozen at once): the RSS,
   PSS and USS of each instance process (``ws-instance`` in the server's cgroups) come
   from /proc/<pid>/smaps_rollup, the zygote's own from ``GET /zygotes``.
3. Server (b): ``warmstart serve --no-zygotes --freeze-after-ms 0``: the same N first
   invocations (``X-Warmstart-Start: cold``, a fresh interpreter importing pandas) and
   the same K frozen instances (runtime process ``python3.11``, plus the sandbox's pid 1
   ``ws-init``).
4. runc: ``runc run`` of the runtime's ``--oneshot`` mode on the rootfs layout of
   core_bench, plus server (a)'s installed package directories bound read-only at
   /var/packages/<dir> and WARMSTART_PATH naming them; N runs, 512 MB memory limit.

Each timed series but the burst follows one untimed warm-up of the same kind (page
cache, first-use costs); its time is in the details.  Prints markdown tables and the
targets, as ratios with baselines measured in the same run (this machine's absolute
times swing 2.5x from day to day): first invocations forked from a zygote >= 60x faster
than a fresh interpreter importing the same packages, paused and in the burst; the burst
p50 within 1.1x of the paused p50; the pandas zygote alive <= 2 s after the first pandas
function was deployed, so every burst invocation after the first forks from it; >= 6x
the sandbox creations/s of fresh sandboxes.  ``--json OUT`` writes every number to OUT.
Servers are stopped (SIGTERM) and temporary directories removed at the end, even on
error.

    bash scripts/bench zygote [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchError,
    RawHTTP,
    RuncBaseline,
    Server,
    cgroup_digest,
    find_runc,
    fmt_ms,
    lambda_client,
    log,
    machine_info,
    make_zip,
    percentile,
    remove_run_state,
    summary,
    target_lines,
    timed_call,
)

HANDLER_PY = """\
import sys

PRELOADED = "pandas" in sys.modules  # imported by a zygote before this module ran?

import numpy, pandas


def handler(event, context):
    s = pandas.Series(numpy.arange(int(event.get("n", 10))))
    return {"sum": int(s.sum()), "preloaded": PRELOADED}
"""
REQUIREMENTS = "pandas\n"
EVENT = {"n": 10}
EVENT_BYTES = json.dumps(EVENT).encode()
EXPECTED_SUM = 45
MEMORY_MB = 512
TIMEOUT_S = 60

# Section 2 (library): the smallest handler, 128 MB sandboxes.
TINY_PY = "def handler(event, context):\n    return 1\n"

# Targets are ratios against baselines measured in the same run (this machine's absolute
# times swing 2.5x from day to day); the absolute p50 is shown for reference only.
TARGET_SPEEDUP = 60.0  # fresh interpreter p50 / zygote p50, paused and burst alike
TARGET_BURST_OVER_PAUSED = 1.1  # burst p50 / paused p50
TARGET_ZYGOTE_READY_S = 2.0  # a new package set's zygote alive after its first deploy
TARGET_CREATIONS_X = 6.0  # sandbox creations/s via a zygote / fresh sandboxes
REFERENCE_ZYGOTE_P50_MS = 10.0  # on a quiet day


# -- the HTTP side -------------------------------------------------------------------------
# The harsh case: a function whose package set (numpy alone) is new to the server,
# invoked the moment its deploy returns.
NUMPY_PY = """\
import sys

PRELOADED = "numpy" in sys.modules

import numpy


def handler(event, context):
    return {"sum": int(numpy.arange(int(event.get("n", 10))).sum()), "preloaded": PRELOADED}
"""


def deploy(
    client: Any, names: list[str], handler: str = HANDLER_PY, requirements: str = REQUIREMENTS
) -> list[float]:
    """create_function for each name; returns each call's seconds (the first installs pandas)."""
    code = make_zip({"handler.py": handler, "requirements.txt": requirements})
    took = []
    for name in names:
        t0 = time.perf_counter()
        out = client.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Handler="handler.handler",
            Role="arn:aws:iam::000000000000:role/bench",
            Code={"ZipFile": code},
            MemorySize=MEMORY_MB,
            Timeout=TIMEOUT_S,
        )
        took.append(time.perf_counter() - t0)
        if out.get("FunctionName") != name:
            raise BenchError(f"create_function({name}) returned {out}")
    return took


def connect(server: Server) -> RawHTTP:
    conn = RawHTTP("127.0.0.1", server.port)
    conn.sock.settimeout(TIMEOUT_S + 30)  # never hang the benchmark on a stuck server
    return conn


def check(
    status: int,
    headers: dict[str, str],
    body: bytes,
    start: str | None,
    preloaded: bool | None,
    what: str,
) -> bool:
    """Raise unless the invocation succeeded as expected; returns whether pandas had been
    imported before the handler's module ran (``preloaded`` None: either is fine)."""
    if status != 200:
        raise BenchError(f"{what}: HTTP {status}: {body[:500]!r}")
    got = headers.get("x-warmstart-start")
    if start is not None and got != start:
        raise BenchError(f"{what}: X-Warmstart-Start is {got!r}, expected {start!r}")
    result = json.loads(body)
    if preloaded is None and isinstance(result, dict):
        preloaded = bool(result.get("preloaded"))
    if result != {"sum": EXPECTED_SUM, "preloaded": preloaded}:
        raise BenchError(
            f"{what}: unexpected result {result!r} (X-Warmstart-Start {got!r}); expected "
            f"sum {EXPECTED_SUM} with pandas {'already' if preloaded else 'not yet'} imported"
        )
    return bool(preloaded)


def invoke(
    server: Server, name: str, start: str | None, preloaded: bool
) -> tuple[float, dict[str, str]]:
    conn = connect(server)
    try:
        ms, status, headers, body = timed_call(
            conn, conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
        )
    finally:
        conn.close()
    check(status, headers, body, start, preloaded, f"invocation of {name}")
    return ms, headers


def measure_first_invocations(
    server: Server,
    names: list[str],
    start: str | None,
    preloaded: bool | None,
    gap_s: float,
) -> dict[str, Any]:
    """The first invocation of each function, timed over one keep-alive connection
    (``start`` / ``preloaded`` None: record how each one started rather than insist)."""
    conn = connect(server)
    samples: list[float] = []
    internal: list[float] = []
    starts: list[str] = []
    sent: list[float] = []
    try:
        for name in names:
            raw = conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
            sent.append(time.monotonic())
            ms, status, headers, body = timed_call(conn, raw)
            pre = check(status, headers, body, start, preloaded, f"first invocation of {name}")
            samples.append(ms)
            internal.append(float(headers.get("x-warmstart-duration-ms", "nan")))
            kind = headers.get("x-warmstart-start", "?")
            starts.append(f"{kind}+pandas" if pre else kind)
            if gap_s:
                time.sleep(gap_s)  # let the previous instance settle (freeze, cgroup refill)
    finally:
        conn.close()
    return {
        **summary(samples),
        "samples_ms": [round(x, 3) for x in samples],
        "server_internal": summary(internal),
        "starts": starts,
        "sent_at": sent,
    }


class ZygoteWatch:
    """Polls ``GET /zygotes`` on a thread (every 20 ms) and notes when a live zygote
    with pandas first appears, to time how soon after demand it is there."""

    def __init__(self, server: Server) -> None:
        import threading

        self.server = server
        self.seen_at: float | None = None
        self.info: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zygote-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                for z in self.server.get_json("/zygotes").get("zygotes", []):
                    names = {p.split("==")[0].lower() for p in z.get("packages", [])}
                    if "pandas" in names and z.get("alive"):
                        self.seen_at = time.monotonic()
                        self.info = dict(z)
                        return
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_for_pandas_zygote(server: Server, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        zs = server.get_json("/zygotes").get("zygotes", [])
        for z in zs:
            names = {p.split("==")[0].lower() for p in z.get("packages", [])}
            if "pandas" in names and z.get("alive"):
                return dict(z)
        if time.monotonic() > deadline:
            raise BenchError(
                f"no live pandas zygote after {timeout:.0f}s: {zs}\n{server.log_tail()}"
            )
        time.sleep(0.1)


# -- memory ----------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS in bytes (the same reading the server reports in /zygotes)."""
    from warmstart.sandbox.memory import memory_of

    use = memory_of(pid)
    return None if use is None else {"rss": use.rss, "pss": use.pss, "uss": use.uss}


def parent_pid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def cgroup_charge(pid: int) -> int | None:
    """memory.usage_in_bytes of the pid's memory cgroup (v1) or memory.current (v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            f = Path("/sys/fs/cgroup/memory" + path) / "memory.usage_in_bytes"
        elif ctrls == "" and _id == "0" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            f = Path("/sys/fs/cgroup" + path) / "memory.current"
        else:
            continue
        with contextlib.suppress(OSError, ValueError):
            return int(f.read_text())
    return None


def server_pids(server: Server, comm: str) -> dict[int, str]:
    """Host pids in the server's pooled cgroups whose /proc/<pid>/comm is ``comm``."""
    root = Path("/sys/fs/cgroup/memory/warmstart") / cgroup_digest(server.data_dir)
    if not root.is_dir():  # cgroup v2: one tree
        root = Path("/sys/fs/cgroup/warmstart") / cgroup_digest(server.data_dir)
    out: dict[int, str] = {}
    for procs in root.rglob("cgroup.procs"):  # pooled cgroups sit under ls/ (cg*)
        if not procs.parent.name.startswith("cg"):
            continue
        with contextlib.suppress(OSError):
            for tok in procs.read_text().split():
                pid = int(tok)
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                        out[pid] = procs.parent.name
    return out


def wait_frozen(server: Server, functions: set[str], timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        insts = [
            i for i in server.get_json("/instances")["instances"] if i["function"] in functions
        ]
        if len(insts) >= len(functions) and all(i["state"] == "frozen" for i in insts):
            return insts
        if time.monotonic() > deadline:
            raise BenchError(f"instances of {sorted(functions)} not all frozen: {insts}")
        time.sleep(0.05)


def memory_summary(rows: list[dict[str, int | None]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("rss", "pss", "uss", "cgroup"):
        vals: list[float] = [float(v) for r in rows if (v := r.get(key)) is not None]
        out[key] = percentile(vals, 50) if vals else None
    return out


def measure_memory(
    server: Server, names: list[str], start: str, preloaded: bool, comms: list[str]
) -> dict[str, Any]:
    """Invoke each function once (a new instance each), wait until all are frozen, then read
    every new instance process's smaps_rollup.  ``comms[0]`` is the runtime's process name;
    any others (the fresh sandbox's ws-init) are reported beside it."""
    before = {c: set(server_pids(server, c)) for c in comms}
    for name in names:
        invoke(server, name, start, preloaded)
    insts = wait_frozen(server, set(names))
    time.sleep(0.2)
    res: dict[str, Any] = {"instances": insts}
    for comm in comms:
        new = sorted(set(server_pids(server, comm)) - before[comm])
        if len(new) != len(names):
            raise BenchError(
                f"expected {len(names)} new {comm!r} processes in the server's cgroups, found {new}"
            )
        rows = []
        for pid in new:
            use = smaps_rollup(pid)
            if use is None:
                raise BenchError(f"cannot read /proc/{pid}/smaps_rollup")
            rows.append({"pid": pid, **use, "cgroup": cgroup_charge(pid)})
        res[comm] = {"per_process": rows, "median": memory_summary(rows)}
    return res


# -- section 2: sandbox creations per second, with the library --------------------------------
async def _read_frame(sock: Any, timeout: float = 10.0) -> dict[str, Any]:
    from warmstart.runtime.protocol import HEADER

    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await loop.sock_recv(sock, n - len(buf))
            if not chunk:
                raise EOFError("the runtime closed its socket")
            buf += chunk
        return buf

    async with asyncio.timeout(timeout):
        a, b, c = HEADER.unpack(await exactly(HEADER.size))
        body = await exactly(a + b + c)
    meta: dict[str, Any] = json.loads(body[:a])
    return meta


async def _churn(
    m: Any, create: Any, spec: Any, duration: float, concurrency: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ready = 0
    failed: list[str] = []
    lat: list[float] = []
    phases: dict[str, list[float]] = {"create": [], "ready": [], "destroy": []}
    deadline = loop.time() + duration

    async def one() -> None:
        nonlocal ready
        while loop.time() < deadline and len(failed) < 20:
            t0 = time.perf_counter()
            try:
                sb = await create(spec)
            except Exception as exc:
                failed.append(f"create: {exc}")
                continue
            t1 = time.perf_counter()
            try:
                meta = await _read_frame(sb.sock)
                if meta.get("type") == "ready":
                    ready += 1
                    t2 = time.perf_counter()
                    lat.append((t2 - t0) * 1000)
                    phases["create"].append((t1 - t0) * 1000)
                    phases["ready"].append((t2 - t1) * 1000)
                else:
                    failed.append(f"frame {meta}")
            except (EOFError, TimeoutError, OSError, ValueError) as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
            finally:
                # As the worker does: destroy in the background (kill, wait for the
                # cgroup to empty, recycle it), a bounded number at a time.
                fut = asyncio.ensure_future(destroy(sb))
                pending.add(fut)
                fut.add_done_callback(pending.discard)
                if len(pending) > 8:
                    _done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    pending: set[asyncio.Future[None]] = set()

    async def destroy(sb: Any) -> None:
        t3 = time.perf_counter()
        try:
            await m.destroy(sb)
        finally:
            phases["destroy"].append((time.perf_counter() - t3) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    while pending:  # the rate counts until every sandbox is gone again
        await asyncio.wait(list(pending))
    elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "ready": ready,
        "failed": len(failed),
        "failures": failed[:5],
        "duration_s": elapsed,
        "per_s": ready / elapsed,
        "create_to_ready": summary(lat),
        # create = the fork()/create() call; ready = from its return to the "ready" frame;
        # destroy = m.destroy() in the background (kill, wait for the cgroup to empty,
        # recycle it); the rate's clock runs until the last one finished
        "phases_p50_ms": {k: percentile(v, 50) for k, v in phases.items()},
    }


async def library_rates(workdir: Path, duration: float, concurrencies: list[int]) -> dict[str, Any]:
    from warmstart.lifecycle import Supervisor
    from warmstart.sandbox import Isolation, SandboxManager, SandboxSpec
    from warmstart.zygote.launcher import ZygoteLauncher

    code = workdir / "lib-code"
    code.mkdir()
    (code / "handler.py").write_text(TINY_PY)
    code.chmod(0o755)
    (code / "handler.py").chmod(0o644)
    spec = SandboxSpec(
        code, env={"_HANDLER": "handler.handler", "LAMBDA_TASK_ROOT": "/var/task"}, memory_mb=128
    )
    m = SandboxManager(workdir / "data-lib", isolation=Isolation.LINUX)
    tasks = Supervisor("bench zygotes")
    zs = ZygoteLauncher(m, tasks)
    zygote = None
    out: dict[str, Any] = {"zygote": {}, "fresh": {}}
    try:
        await m.start()
        await tasks.start()
        t0 = time.perf_counter()
        zygote = await zs.start((), [])
        out["zygote_start_ms"] = (time.perf_counter() - t0) * 1000
        z = zygote

        async def fork(s: Any) -> Any:
            return await zs.fork(z, s)

        for kind, create in (("zygote", fork), ("fresh", m.create)):
            await _churn(m, create, spec, 0.3, 1)  # warm-up
            for c in concurrencies:
                r = await _churn(m, create, spec, duration, c)
                out[kind][str(c)] = r
                log(
                    f"library {kind}: concurrency {c}: {r['per_s']:.0f} sandboxes/s "
                    f"({r['ready']} ready, {r['failed']} failed), create->ready p50 "
                    f"{fmt_ms(r['create_to_ready']['p50_ms'])}"
                )
                if r["failed"]:
                    log(f"WARNING: failures: {r['failures']}")
    finally:
        await tasks.close()
        if zygote is not None:
            await zs.stop(zygote)
        await m.close()
        remove_run_state(m.data_dir)
    return out


# -- runc ------------------------------------------------------------------------------------
def measure_runc(workdir: Path, package_dirs: list[Path], n: int, warmup: int) -> dict[str, Any]:
    runc = find_runc()
    if runc is None:
        raise BenchError("runc is not installed (apt-get install -y runc)")
    version = subprocess.run([runc, "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    binds = [(str(d), f"/var/packages/{d.name}") for d in package_dirs]
    base = RuncBaseline(
        workdir,
        runc,
        name="runc-pandas",
        files={"handler.py": HANDLER_PY},
        handler="handler.handler",
        memory_mb=MEMORY_MB,
        extra_binds=binds,
        extra_env=["WARMSTART_PATH=" + ":".join(dst for _, dst in binds)],
    )
    try:
        base.prepare()
        event = json.dumps(EVENT)
        # The runtime imported from its .pyc, as in the sandbox, in its --oneshot mode.
        code = (
            "import sys; sys.path.insert(0, '/var/runtime'); import bootstrap; "
            f"sys.argv = ['bootstrap', '--oneshot', {event!r}]; bootstrap.main()"
        )
        bundle = base.bundle("oneshot", [base.python, "-E", "-s", "-S", "-c", code])

        def check_out(stdout: bytes) -> None:
            try:
                got = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise BenchError(f"oneshot printed {stdout[:500]!r}") from None
            if got != {"sum": EXPECTED_SUM, "preloaded": False}:
                raise BenchError(f"oneshot returned {got!r}")

        log(f"runc ({version}): {warmup} + {n} x runc run of the pandas handler (oneshot)")
        warm_ms, out = base.run_once(bundle)
        if out.returncode != 0:
            raise BenchError(
                f"runc run failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
            )
        check_out(out.stdout)
        r = base.measure(bundle, n, warmup - 1, check_out)
        r["samples_ms"] = [round(x, 3) for x in r["samples_ms"]]
        return {
            "runc_version": version,
            "warmup_ms": warm_ms,
            "package_dirs": [d.name for d in package_dirs],
            **r,
        }
    finally:
        base.cleanup()


# -- the report ------------------------------------------------------------------------------
def fmt_x(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "-"
    return f"{a / b:.1f}x"


def mib(v: float | None) -> str:
    return "-" if v is None else f"{v / (1 << 20):.1f} MiB"


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    cfg = res["config"]
    zy, fr, rc = res.get("zygote_cold"), res.get("fresh_cold"), res.get("runc")
    bu = res.get("burst")
    out = [
        f"warmstart {m.get('revision', '?')} on {m.get('cpu', '?')}, {m['cpus']} CPUs, kernel "
        f"{m['kernel']}, cgroup {m['cgroup']}, Python {m['python']}; pandas "
        f"{res.get('pandas_version', '?')}",
        "",
        f"### Cold start of `import numpy, pandas` (first invocation, end to end; paused: "
        f"N={cfg['n']}, {cfg['gap_s']:g} s apart, the zygote long built; burst: "
        f"{cfg.get('burst', '?')} functions deployed, then invoked back to back at once)",
        "",
        "| measure | zygote, paused | zygote, burst after deploy | fresh interpreter "
        "(--no-zygotes) | runc run (oneshot) | fresh / paused | fresh / burst "
        "| burst / paused | runc / paused |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for q in ("p50", "p99"):
        k = f"{q}_ms"
        a, d, b, c = (x[k] if x else None for x in (zy, bu, fr, rc))
        out.append(
            f"| cold start {q} | {fmt_ms(a)} | {fmt_ms(d)} | {fmt_ms(b)} | {fmt_ms(c)} "
            f"| {fmt_x(b, a)} | {fmt_x(b, d)} | {fmt_x(d, a)} | {fmt_x(c, a)} |"
        )
    if bu:
        out += [
            "",
            f"Burst: deployed in {res.get('deploy_s', {}).get('first_a', float('nan')):.1f} s "
            f"(the first, installing pandas) + {bu['deploy_rest_s']:.1f} s (the rest); the "
            f"pandas zygote alive {bu['zygote_after_deploy_s']:.2f} s after the first deploy "
            f"({bu['zygote_after_first_invoke_s']:+.2f} s from the first invocation); each "
            "invocation in order: "
            + ", ".join(
                f"{fmt_ms(ms)} ({kind})"
                for ms, kind in zip(bu["samples_ms"], bu["starts"], strict=True)
            ),
        ]
    dti = res.get("deploy_then_invoke")
    if dti:
        out += [
            "",
            "Deploy, then invoke at once (a numpy-only function, a package set new to the "
            "server; its zygote is built from the deploy on): "
            + ", ".join(
                f"{name} {fmt_ms(ms)} ({kind}, deployed in {d:.2f} s)"
                for name, ms, kind, d in zip(
                    ("first", "second"),
                    dti["samples_ms"],
                    dti["starts"],
                    dti["deploy_s"],
                    strict=True,
                )
            ),
        ]
    lib = res.get("library")
    if lib:
        out += [
            "",
            f"### Sandbox creations per second (library, create -> ready -> destroy, "
            f"{cfg['rate_seconds']:g} s each)",
            "",
            "| concurrency | via zygote (fork) | fresh sandbox (create) | zygote / fresh "
            "| create->ready p50, zygote | create->ready p50, fresh |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in cfg["concurrency"]:
            z, f = lib["zygote"].get(str(c)), lib["fresh"].get(str(c))
            out.append(
                f"| {c} | {z['per_s']:,.0f}/s | {f['per_s']:,.0f}/s | {fmt_x(z['per_s'], f['per_s'])} "
                f"| {fmt_ms(z['create_to_ready']['p50_ms'])} "
                f"| {fmt_ms(f['create_to_ready']['p50_ms'])} |"
            )
    zm, fm = res.get("zygote_memory"), res.get("fresh_memory")
    if zm or fm:
        out += [
            "",
            f"### Memory per frozen pandas instance (K={cfg['k']} alive at once, medians)",
            "",
            "| process | RSS | PSS | USS | its memory cgroup's charge |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        if zm:
            med = zm["ws-instance"]["median"]
            out.append(
                f"| forked instance (`ws-instance`) | {mib(med['rss'])} | {mib(med['pss'])} "
                f"| {mib(med['uss'])} | {mib(med['cgroup'])} |"
            )
            zmem = (zm.get("zygote") or {}).get("memory") or {}
            out.append(
                f"| its pandas zygote (`GET /zygotes`, {zm['zygote'].get('instances')} instances "
                f"alive) | {mib(zmem.get('rss'))} | {mib(zmem.get('pss'))} "
                f"| {mib(zmem.get('uss'))} | {mib(zm.get('zygote_cgroup'))} |"
            )
        if fm:
            med = fm["python3.11"]["median"]
            out.append(
                f"| fresh instance runtime (`python3.11`) | {mib(med['rss'])} | {mib(med['pss'])} "
                f"| {mib(med['uss'])} | {mib(med['cgroup'])} |"
            )
            med = fm["ws-init"]["median"]
            out.append(
                f"| fresh instance's pid 1 (`ws-init`, same cgroup) | {mib(med['rss'])} "
                f"| {mib(med['pss'])} | {mib(med['uss'])} | (above) |"
            )
    out += ["", "Details:"]
    if zy:
        out.append(
            f"- via zygote: n={zy['n']}, min {fmt_ms(zy['min_ms'])}, mean {fmt_ms(zy['mean_ms'])}, "
            f"max {fmt_ms(zy['max_ms'])}; worker-internal p50 "
            f"{fmt_ms(zy['server_internal']['p50_ms'])} (X-Warmstart-Duration-Ms); untimed warm-up "
            f"fork {fmt_ms(res.get('zygote_warmup_ms'))}; the pandas zygote was alive "
            f"{res.get('zygote_ready_s', float('nan')):.1f} s after the first deploy "
            f"(imported {res.get('zygote_info', {}).get('imported')}, skipped "
            f"{res.get('zygote_info', {}).get('skipped')})"
        )
    zb = res.get("zygote_cold_b2b")
    if zb:
        out.append(
            f"- via zygote, back to back (no gap between first invocations; not the table's "
            f"{cfg['gap_s']:g} s): n={zb['n']}, p50 {fmt_ms(zb['p50_ms'])}, p99 "
            f"{fmt_ms(zb['p99_ms'])}, worker-internal p50 {fmt_ms(zb['server_internal']['p50_ms'])}"
        )
    if fr:
        out.append(
            f"- fresh interpreter: n={fr['n']}, min {fmt_ms(fr['min_ms'])}, mean "
            f"{fmt_ms(fr['mean_ms'])}, max {fmt_ms(fr['max_ms'])}; worker-internal p50 "
            f"{fmt_ms(fr['server_internal']['p50_ms'])}; untimed warm-up {fmt_ms(res.get('fresh_warmup_ms'))}"
        )
    if rc:
        out.append(
            f"- runc ({rc['runc_version']}): n={rc['n']}, min {fmt_ms(rc['min_ms'])}, mean "
            f"{fmt_ms(rc['mean_ms'])}, max {fmt_ms(rc['max_ms'])}; untimed warm-up "
            f"{fmt_ms(rc['warmup_ms'])}; packages bound at /var/packages: {', '.join(rc['package_dirs'])}"
        )
    if res.get("deploy_s"):
        d = res["deploy_s"]
        out.append(
            f"- deploy (create_function, resolve + install in the server's sandbox): first "
            f"(installs pandas from PyPI) {d['first_a']:.1f} s on server (a), {d['first_b']:.1f} s on "
            f"server (b); later ones p50 {percentile(d['rest'], 50):.2f} s (resolve only)"
        )
    if lib:
        out.append(
            f"- library: the zygote (no packages) started in {fmt_ms(lib.get('zygote_start_ms'))}; "
            f"failures: zygote {sum(r['failed'] for r in lib['zygote'].values())}, fresh "
            f"{sum(r['failed'] for r in lib['fresh'].values())}; p50 per phase (fork or create "
            "call / to the ready frame / destroy): "
            + "; ".join(
                f"{kind} c={c}: "
                + " / ".join(
                    fmt_ms(r["phases_p50_ms"][ph]) for ph in ("create", "ready", "destroy")
                )
                for kind in ("zygote", "fresh")
                for c, r in lib[kind].items()
            )
        )
    if zm:
        tot = zm.get("family_pss")
        out.append(
            f"- zygote family: zygote PSS + PSS of its {zm['family_instances']} live instances = "
            f"{mib(tot)}, {mib(tot / max(1, zm['family_instances']) if tot else None)} "
            f"per instance"
        )
    if fm:
        out.append(
            "- fresh instance = ws-init + python3.11 in one pooled cgroup; the cgroup charge "
            "column is that whole cgroup"
        )
    out += ["", "Targets:"]
    out += target_lines(res["targets"])
    return "\n".join(out)


def targets(res: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    t: list[tuple[str, bool | None, str]] = []
    zy, fr, lib = res.get("zygote_cold"), res.get("fresh_cold"), res.get("library")
    bu = res.get("burst")
    if zy and fr:
        x = fr["p50_ms"] / zy["p50_ms"]
        t.append(
            (
                f"paused: >= {TARGET_SPEEDUP:.0f}x faster than the fresh interpreter (p50)",
                x >= TARGET_SPEEDUP,
                f"{x:.1f}x ({fmt_ms(fr['p50_ms'])} / {fmt_ms(zy['p50_ms'])})",
            )
        )
    if bu and fr:
        x = fr["p50_ms"] / bu["p50_ms"]
        t.append(
            (
                f"burst: >= {TARGET_SPEEDUP:.0f}x faster than the fresh interpreter (p50)",
                x >= TARGET_SPEEDUP,
                f"{x:.1f}x ({fmt_ms(fr['p50_ms'])} / {fmt_ms(bu['p50_ms'])})",
            )
        )
    if bu and zy:
        x = bu["p50_ms"] / zy["p50_ms"]
        t.append(
            (
                f"burst p50 within {TARGET_BURST_OVER_PAUSED:g}x of the paused p50",
                x <= TARGET_BURST_OVER_PAUSED,
                f"{x:.2f}x ({fmt_ms(bu['p50_ms'])} / {fmt_ms(zy['p50_ms'])})",
            )
        )
    if bu:
        ready = bu["zygote_after_deploy_s"]
        t.append(
            (
                f"the pandas zygote alive <= {TARGET_ZYGOTE_READY_S:g} s after the first "
                "pandas function was deployed",
                ready <= TARGET_ZYGOTE_READY_S,
                f"{ready:.2f} s ({bu['zygote_after_first_invoke_s']:+.2f} s from the first "
                "invocation)",
            )
        )
        later = bu["starts"][1:]
        t.append(
            (
                "burst: every invocation after the first forked from the pandas zygote",
                all(k == "fork+pandas" for k in later),
                f"{sum(1 for k in later if k == 'fork+pandas')} of {len(later)}",
            )
        )
    if lib and lib["zygote"] and lib["fresh"]:
        best_z = max(r["per_s"] for r in lib["zygote"].values())
        best_f = max(r["per_s"] for r in lib["fresh"].values())
        per_c = ", ".join(
            f"c={c}: {fmt_x(r['per_s'], lib['fresh'][c]['per_s'])}"
            for c, r in lib["zygote"].items()
            if c in lib["fresh"]
        )
        t.append(
            (
                f">= {TARGET_CREATIONS_X:g}x the sandbox creations/s of fresh sandboxes (best "
                "of each)",
                best_z / best_f >= TARGET_CREATIONS_X,
                f"{best_z / best_f:.1f}x ({best_z:,.0f}/s / {best_f:,.0f}/s; {per_c})",
            )
        )
    if zy:
        t.append(
            (
                f"reference only (absolute, depends on the day): zygote cold p50 <= "
                f"{REFERENCE_ZYGOTE_P50_MS:.0f} ms on a quiet day",
                None,
                fmt_ms(zy["p50_ms"]),
            )
        )
    return t


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark zygote cold starts of a pandas function against a fresh "
        "interpreter (--no-zygotes) and runc, sandbox creations/s, and memory per frozen "
        "instance, in one run on this machine. Needs root; installs pandas from PyPI through "
        "the server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            targets (ratios with baselines measured in the same run): first invocations
            forked from a zygote >= 60x faster than a fresh interpreter importing the same
            packages, paused and in a burst right after deploy; the burst p50 within 1.1x of
            the paused p50; the new package set's zygote alive <= 2 s after its first deploy,
            so every burst invocation after the first forks from it; >= 6x the sandbox
            creations/s of fresh sandboxes. Only 127.0.0.1 (and the package index, by the
            server's installer) is contacted. Exit status: 0 ok, 1 a target was missed,
            2 error."""),
    )
    p.add_argument("--quick", action="store_true", help="N=6 and shorter rate runs (~1 min)")
    p.add_argument("--json", metavar="OUT", type=Path, help="also write all results as JSON to OUT")
    p.add_argument("-n", type=int, default=None, help="cold starts per path (default 20, quick 6)")
    p.add_argument(
        "-k", type=int, default=8, help="frozen instances for the memory numbers (default 8)"
    )
    p.add_argument(
        "--burst",
        type=int,
        default=15,
        help="functions deployed and then invoked back to back in the burst (default 15)",
    )
    p.add_argument(
        "--rate-seconds",
        type=float,
        default=None,
        help="seconds per sandbox-creation run (default 3, quick 1.5)",
    )
    p.add_argument("--skip-runc", action="store_true", help="do not measure the runc baseline")
    p.add_argument("--skip-library", action="store_true", help="do not measure creations/s")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (for debugging)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("zygote_bench: needs root on Linux (sandboxes and runc both do)", file=sys.stderr)
        return 2
    n = args.n or (6 if args.quick else 20)
    k = args.k
    rate_s = args.rate_seconds or (1.5 if args.quick else 3.0)
    gap_s = 0.2
    res: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "n": n,
            "k": k,
            "rate_seconds": rate_s,
            "concurrency": [1, 4],
            "quick": args.quick,
            "memory_mb": MEMORY_MB,
            "gap_s": gap_s,
            "burst": args.burst,
            "handler": HANDLER_PY,
        },
    }

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    workdir = Path(tempfile.mkdtemp(prefix="warmstart-zygote-bench-"))
    servers: list[Server] = []
    status = 0
    t_start = time.perf_counter()
    try:
        # -- 1. sandbox creations/s with the library (no server running) ---------------------
        if not args.skip_library:
            log(f"library: sandbox creations/s, {rate_s:.1f} s per run, concurrency 1 and 4")
            res["library"] = asyncio.run(library_rates(workdir, rate_s, [1, 4]))

        deploy_s: dict[str, Any] = {"rest": []}
        # -- 2. server (a): zygotes ---------------------------------------------------------
        # The server's defaults for zygotes (when and how many to build), freezing at once.
        a = Server(workdir, "zygote", ["--freeze-after-ms", "0"])
        servers.append(a)
        a.data_dir.mkdir()
        a.start()
        client = lambda_client(a.url)
        # -- 2a. the burst: B new functions with a package set new to the server, deployed
        # and then invoked once each, back to back, as a CI pipeline or a fan-out does.
        burst_names = [f"burst{i}" for i in range(args.burst)]
        log(
            f"server (a): burst: deploying {len(burst_names)} pandas functions (the first "
            "installs pandas from PyPI)"
        )
        took = deploy(client, burst_names[:1])
        t_first_deploy = time.monotonic()
        watch = ZygoteWatch(a)
        deploy_s["first_a"] = took[0]
        deploy_s["rest"] += deploy(client, burst_names[1:])
        t_deployed = time.monotonic()
        log(
            f"first deploy {took[0]:.1f} s, the rest {t_deployed - t_first_deploy:.1f} s; "
            f"invoking each once, back to back"
        )
        bu = measure_first_invocations(a, burst_names, None, None, 0.0)
        t_first_invoke = bu["sent_at"][0]
        bu["deploy_rest_s"] = t_deployed - t_first_deploy
        watch_deadline = time.monotonic() + 300
        while watch.seen_at is None and time.monotonic() < watch_deadline:
            time.sleep(0.05)
        watch.stop()
        if watch.seen_at is None or watch.info is None:
            raise BenchError(f"no live pandas zygote 300 s after the burst\n{a.log_tail()}")
        zinfo = watch.info
        # When the zygote was there, after the first deploy returned (deploy-time builds)
        # and after the first invocation was sent (demand-time builds): the later of the
        # two demands is the one that counts.
        bu["zygote_after_deploy_s"] = watch.seen_at - t_first_deploy
        bu["zygote_after_first_invoke_s"] = watch.seen_at - t_first_invoke
        bu["forked_with_pandas"] = sum(1 for k in bu["starts"] if k == "fork+pandas")
        res["burst"] = bu
        log(
            f"burst: p50 {fmt_ms(bu['p50_ms'])} max {fmt_ms(bu['max_ms'])}; starts "
            f"{bu['starts']}; pandas zygote alive {bu['zygote_after_deploy_s']:.2f} s after the "
            f"first deploy, {bu['zygote_after_first_invoke_s']:+.2f} s from the first invocation"
        )
        for name in burst_names:  # their memory reservations go
            client.delete_function(FunctionName=name)
        res["zygote_ready_s"] = bu["zygote_after_deploy_s"]
        zy_names = [f"zy{i}" for i in range(n)]
        b2b_names = [f"zyb{i}" for i in range(n)]
        mem_names = [f"zymem{i}" for i in range(k)]
        log(f"deploying {2 * n + k + 1} more functions with the same code")
        deploy_s["rest"] += deploy(client, ["zy-warm", *zy_names, *b2b_names, *mem_names])
        zinfo = wait_for_pandas_zygote(a, timeout=60)
        res["zygote_info"] = {
            key: zinfo.get(key) for key in ("packages", "imported", "skipped", "pid", "memory")
        }
        res["pandas_version"] = next(
            (p.split("==")[1] for p in zinfo["packages"] if p.startswith("pandas==")), "?"
        )
        log(f"pandas zygote alive (pid {zinfo['pid']}, imported {zinfo['imported']})")
        time.sleep(0.5)
        res["zygote_warmup_ms"], _ = invoke(a, "zy-warm", "fork", True)
        time.sleep(gap_s)
        log(f"timing {n} first invocations forked from the pandas zygote")
        res["zygote_cold"] = measure_first_invocations(a, zy_names, "fork", True, gap_s)
        zc = res["zygote_cold"]
        log(f"via zygote: p50 {fmt_ms(zc['p50_ms'])} p99 {fmt_ms(zc['p99_ms'])}")
        # The same, back to back (no gap): shows what the gap costs -- on cgroup v1, moving
        # the forked child into its cgroup right after another move skips a wait for an RCU
        # grace period.  The timed functions go first, to free their memory reservations.
        for name in zy_names:
            client.delete_function(FunctionName=name)
        time.sleep(1.0)
        log(f"timing {n} first invocations forked from the pandas zygote, back to back")
        res["zygote_cold_b2b"] = measure_first_invocations(a, b2b_names, "fork", True, 0.0)
        zb = res["zygote_cold_b2b"]
        log(f"via zygote, back to back: p50 {fmt_ms(zb['p50_ms'])} p99 {fmt_ms(zb['p99_ms'])}")
        time.sleep(1.0)
        # -- 2c. the harsh case: deploy, then invoke at once, a new package set (numpy).
        log("deploy -> invoke at once: a numpy-only function (a package set new here)")
        harsh: dict[str, Any] = {"samples_ms": [], "starts": [], "deploy_s": []}
        for name in ("np-first", "np-second"):
            harsh["deploy_s"] += deploy(client, [name], NUMPY_PY, "numpy\n")
            conn = connect(a)
            try:
                ms, status, headers, body = timed_call(
                    conn, conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
                )
            finally:
                conn.close()
            pre = check(status, headers, body, None, None, f"first invocation of {name}")
            harsh["samples_ms"].append(ms)
            kind = headers.get("x-warmstart-start", "?")
            harsh["starts"].append(f"{kind}+numpy" if pre else kind)
        res["deploy_then_invoke"] = harsh
        log(
            "deploy -> invoke: "
            + ", ".join(
                f"{fmt_ms(x)} ({k})"
                for x, k in zip(harsh["samples_ms"], harsh["starts"], strict=True)
            )
        )
        time.sleep(0.5)
        log(f"memory: {k} forked instances, frozen")
        zm = measure_memory(a, mem_names, "fork", True, ["ws-instance"])
        zs = a.get_json("/zygotes")["zygotes"]
        z = next(z for z in zs if z.get("pid") == zinfo["pid"])
        zm["zygote"] = {
            key: z.get(key) for key in ("pid", "instances", "forks", "memory", "frozen")
        }
        zm["zygote_cgroup"] = cgroup_charge(z["pid"])
        not_ours = [p for p in zm["ws-instance"]["per_process"] if parent_pid(p["pid"]) != z["pid"]]
        if not_ours:
            raise BenchError(f"instances not forked from the pandas zygote: {not_ours}")
        # Everything forked from the zygote that is alive now: the family's total PSS (the
        # seed instance was forked from the root zygote and imported pandas itself: not it).
        kids = [p for p in server_pids(a, "ws-instance") if parent_pid(p) == z["pid"]]
        fam = sum((smaps_rollup(p) or {}).get("pss", 0) for p in kids)
        zm["family_pss"] = fam + ((z.get("memory") or {}).get("pss") or 0)
        zm["family_instances"] = len(kids)
        res["zygote_memory"] = zm
        log(
            f"forked instance median PSS {mib(zm['ws-instance']['median']['pss'])}, "
            f"USS {mib(zm['ws-instance']['median']['uss'])}; zygote {z.get('memory')}"
        )
        package_dirs = sorted(
            d
            for d in (a.data_dir / "packages").iterdir()
            if d.is_dir() and not d.name.startswith(".")
        )
        a.stop()

        # -- 3. server (b): no zygotes --------------------------------------------------------
        b = Server(workdir, "fresh", ["--no-zygotes", "--freeze-after-ms", "0"])
        servers.append(b)
        b.data_dir.mkdir()
        b.start()
        client = lambda_client(b.url)
        fr_names = [f"fr{i}" for i in range(n)]
        frmem_names = [f"frmem{i}" for i in range(k)]
        log("server (b): deploying (installs pandas again into its own data dir)")
        took = deploy(client, ["fr-warm"])
        deploy_s["first_b"] = took[0]
        deploy_s["rest"] += deploy(client, [*fr_names, *frmem_names])
        res["deploy_s"] = deploy_s
        res["fresh_warmup_ms"], _ = invoke(b, "fr-warm", "cold", False)
        time.sleep(gap_s)
        log(f"timing {n} first invocations in a fresh interpreter")
        res["fresh_cold"] = measure_first_invocations(b, fr_names, "cold", False, gap_s)
        fc = res["fresh_cold"]
        log(f"fresh: p50 {fmt_ms(fc['p50_ms'])} p99 {fmt_ms(fc['p99_ms'])}")
        log(f"memory: {k} fresh instances, frozen")
        res["fresh_memory"] = measure_memory(
            b, frmem_names, "cold", False, ["python3.11", "ws-init"]
        )
        b.stop()

        # -- 4. runc ------------------------------------------------------------------------
        if not args.skip_runc:
            res["runc"] = measure_runc(workdir, package_dirs, n, warmup=1)
            log(f"runc: p50 {fmt_ms(res['runc']['p50_ms'])} p99 {fmt_ms(res['runc']['p99_ms'])}")
    except BenchError as exc:
        print(f"zygote_bench: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt as exc:
        print(f"zygote_bench: interrupted ({exc})", file=sys.stderr)
        status = 2
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"zygote_bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 2
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as exc:  # keep cleaning up
                print(f"zygote_bench: stopping server {s.name}: {exc}", file=sys.stderr)
            if status:
                tail = s.log_tail(1500)
                if tail.strip():
                    print(f"--- server {s.name} log tail ---\n{tail}", file=sys.stderr)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    res["elapsed_s"] = time.perf_counter() - t_start
    res["targets"] = targets(res)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if status == 0 and any(ok is False for _n, ok, _d in res["targets"]):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
