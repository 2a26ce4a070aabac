#!/usr/bin/env python3
"""Core benchmark: warmstart vs. a runc baseline, measured in the same run on this machine.

What it does (needs root on Linux, like the sandboxes themselves):

1. Starts ``warmstart serve`` on a free loopback port with a temporary data dir and waits
   for ``GET /healthz``.
2. Deploys ``hello`` (``def handler(event, context): return {"hello": ...}``) and N copies
   of it (``cold0..``) through boto3's Lambda client.
3. Cold starts: the first invocation of each ``coldI`` (``POST /run/coldI``) over one
   keep-alive loopback connection with a minimal raw-socket HTTP client, 0.15 s apart;
   every response must say ``X-Warmstart-Start: fork`` (forked from the root zygote, the
   default) or ``cold`` (a fresh interpreter, as with ``--no-zygotes``); the mix is
   reported.  Then the same for N more functions (``burstI``) back to back, with no pause:
   what a deploy pipeline or a fan-out does, and what drains any stock the node keeps
   ready (pooled cgroups, /tmp filesystems).
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

    bash scripts/bench core [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
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
    find_runc,
    fmt_ms,
    lambda_client,
    log,
    machine_info,
    make_zip,
    percentile,
    ratio,
    stop_servers,
    summary,
    target_lines,
    timed_call,
)

HELLO_PY = 'def handler(event, context):\n    return {"hello": event.get("name", "world")}\n'
EVENT = {"name": "bench"}
EVENT_BYTES = json.dumps(EVENT).encode()
EXPECTED = {"hello": "bench"}
RUNC_EVENT = {"name": "x"}
MEMORY_MB = 128
# A first invocation starts a new instance: "fork" from the root zygote (the default since
# zygotes), or "cold" in a fresh interpreter (--no-zygotes, or after a zygote failure).
COLD_KINDS = ("cold", "fork")

TARGET_WARM_P50_MS = 1.5
TARGET_THROUGHPUT = 1000.0


def check_invocation(
    status: int, headers: dict[str, str], body: bytes, want_start: str | tuple[str, ...], what: str
) -> None:
    if status != 200:
        raise BenchError(f"{what}: HTTP {status}: {body[:500]!r}")
    got = headers.get("x-warmstart-start")
    want = (want_start,) if isinstance(want_start, str) else want_start
    if got not in want:
        raise BenchError(f"{what}: X-Warmstart-Start is {got!r}, expected {' or '.join(want)}")
    if json.loads(body) != EXPECTED:
        raise BenchError(f"{what}: unexpected result {body[:500]!r}")


# -- the warmstart server --------------------------------------------------------------------
def hello_zip() -> bytes:
    return make_zip({"hello.py": HELLO_PY})


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
    kinds: dict[str, int] = {}
    try:
        for name in names:
            raw = conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
            ms, status, headers, body = timed_call(conn, raw)
            check_invocation(status, headers, body, COLD_KINDS, f"first invocation of {name}")
            kinds[headers["x-warmstart-start"]] = kinds.get(headers["x-warmstart-start"], 0) + 1
            samples.append(ms)
            internal.append(float(headers.get("x-warmstart-duration-ms", "nan")))
            time.sleep(gap_s)  # let the previous instance settle (it is frozen after 100 ms idle)
    finally:
        conn.close()
    return {
        **summary(samples),
        "samples_ms": samples,
        "server_internal": summary(internal),
        "start_kinds": kinds,
    }


def measure_warm(server: Server, name: str, n: int, warmup: int) -> dict[str, Any]:
    conn = RawHTTP("127.0.0.1", server.port)
    raw = conn.request_bytes("POST", f"/run/{name}", EVENT_BYTES)
    samples: list[float] = []
    internal: list[float] = []
    try:
        for i in range(warmup + n):
            ms, status, headers, body = timed_call(conn, raw)
            if i == 0 and headers.get("x-warmstart-start") in COLD_KINDS:
                check_invocation(status, headers, body, COLD_KINDS, f"first invocation of {name}")
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
    runc = find_runc()
    if runc is None:
        raise BenchError("runc is not installed (apt-get install -y runc)")
    version = subprocess.run([runc, "--version"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    base = RuncBaseline(
        workdir, runc, files={"hello.py": HELLO_PY}, handler="hello.handler", memory_mb=MEMORY_MB
    )
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
def report(res: dict[str, Any]) -> str:
    cold, fresh, warm, frozen, tput, runc = (
        res.get(k) for k in ("cold", "cold_fresh", "warm", "frozen_warm", "throughput", "runc")
    )
    rc = runc["oneshot"] if runc else None
    burst = res.get("cold_burst")
    rows = [
        ("cold start p50, fresh interpreter", fresh and fresh["p50_ms"], rc and rc["p50_ms"], "ms"),
        ("cold start p99, fresh interpreter", fresh and fresh["p99_ms"], rc and rc["p99_ms"], "ms"),
        (
            "cold start p50, forked from a zygote",
            cold and cold["p50_ms"],
            rc and rc["p50_ms"],
            "ms",
        ),
        (
            "cold start p99, forked from a zygote",
            cold and cold["p99_ms"],
            rc and rc["p99_ms"],
            "ms",
        ),
        (
            "cold start p50, forked, back to back",
            burst and burst["p50_ms"],
            rc and rc["p50_ms"],
            "ms",
        ),
        (
            "cold start p99, forked, back to back",
            burst and burst["p99_ms"],
            rc and rc["p99_ms"],
            "ms",
        ),
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
            f"(X-Warmstart-Duration-Ms); started as {cold.get('start_kinds')} "
            f"(X-Warmstart-Start: fork = forked from the root zygote)"
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
    out += target_lines(res["targets"])
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
    fresh = res.get("cold_fresh")
    for label, c in (("fresh interpreter", fresh), ("forked", cold)):
        if c and runc:
            t.append(
                (
                    f"cold p50 ({label}) <= runc p50",
                    c["p50_ms"] <= runc["oneshot"]["p50_ms"],
                    f"{fmt_ms(c['p50_ms'])} vs {fmt_ms(runc['oneshot']['p50_ms'])}",
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
        burst_names = [f"burst{i}" for i in range(n_cold)]
        log(f"deploying hello + {2 * n_cold} cold functions via boto3")
        res["deploy_ms_per_function"] = deploy(client, ["hello", *cold_names, *burst_names])
        log(f"timing {n_cold} cold starts")
        # One untimed cold start first: the page cache and the server's first-use costs.
        conn = RawHTTP("127.0.0.1", a.port)
        _ms, st, hd, body = timed_call(conn, conn.request_bytes("POST", "/run/hello", EVENT_BYTES))
        conn.close()
        check_invocation(st, hd, body, COLD_KINDS, "first invocation of hello")
        time.sleep(0.2)
        res["cold"] = measure_cold(a, cold_names, gap_s=0.15)
        log(f"cold p50 {fmt_ms(res['cold']['p50_ms'])} p99 {fmt_ms(res['cold']['p99_ms'])}")
        time.sleep(1.0)  # whatever the node keeps ready is restocked
        res["cold_burst"] = measure_cold(a, burst_names, gap_s=0.0)
        log(
            f"back-to-back cold p50 {fmt_ms(res['cold_burst']['p50_ms'])} "
            f"p99 {fmt_ms(res['cold_burst']['p99_ms'])}"
        )
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

        # -- server B: no zygotes, --freeze-after-ms 0 (idle instances frozen at once) -----
        b = Server(workdir, "frozen", ["--freeze-after-ms", "0", "--no-zygotes"])
        servers.append(b)
        b.data_dir.mkdir()
        b.start()
        deploy(lambda_client(b.url), ["hello", *cold_names])
        log(f"timing {n_cold} cold starts in fresh interpreters (--no-zygotes)")
        conn = RawHTTP("127.0.0.1", b.port)
        _ms, st, hd, body = timed_call(conn, conn.request_bytes("POST", "/run/hello", EVENT_BYTES))
        conn.close()
        check_invocation(st, hd, body, ("cold",), "first invocation of hello")
        time.sleep(0.2)
        res["cold_fresh"] = measure_cold(b, cold_names, gap_s=0.15)
        log(f"fresh cold p50 {fmt_ms(res['cold_fresh']['p50_ms'])}")
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
        stop_servers(servers, "core_bench")
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
