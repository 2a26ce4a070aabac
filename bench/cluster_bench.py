#!/usr/bin/env python3
"""Cluster benchmark: what being a cluster costs and buys, measured in one run.

Needs root (network namespaces, sandboxes).  It starts etcd and three ``warmstart serve
--cluster`` nodes on this machine, each in its own network namespace
(``warmstart.cluster.local``), with their data on this machine's disk (``--dir``,
default ``bench/results/cluster``), deploys a small handler through node1 and then:

1. **Forwarding.**  The function is made warm on node2 only.  The same warm invocation is
   timed sent straight to node2 (the baseline) and sent to node1, which forwards it to
   node2 in one hop.  Sequential calls on one keep-alive connection, interleaved in
   ``--repeat`` rounds of ``--calls`` each: p50/p99 per round, medians of rounds.
   Goal: forwarded p50 <= direct p50 + 0.3 ms.
2. **Throughput.**  Warm invocations per second with ``--connections`` concurrent
   keep-alive connections for ``--seconds``: all of them through node1 (which runs what it
   can and forwards the rest), then spread over the three nodes (each running its own
   calls).  All nodes share this machine's CPUs, so spreading cannot add cores here: the
   figure shows what routing costs, not what more machines would add.
3. **Failover.**  Event invocations of a handler that sleeps are queued until node3 runs
   some; node3 is killed (SIGKILL).  Timed: from the kill until every item node3 held
   is running on another node (its claim re-taken), and until all complete.
4. **etcd writes per invocation.**  etcd's revision counts every write; during a run of
   warm synchronous invocations the writes that are not the nodes' own state publishing
   (``nodes/`` keys, once a second per node) are counted.  Goal: 0 on the warm path.

Prints a Markdown table (and ``--json OUT``); exit status 0 when every goal is met, 1 when
one is missed, 2 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    BenchError,
    RawHTTP,
    fmt_ms,
    log,
    machine_info,
    make_zip,
    percentile,
    target_lines,
    timed_call,
)

HELLO = """
def handler(event, context):
    return {"ok": True, "n": event.get("n")}
"""
SLEEPER = """
import time
def handler(event, context):
    time.sleep(event.get("sleep", 1))
    return {"slept": event.get("sleep", 1)}
"""
API = "/2015-03-31/functions"


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    host, _, port = rest.partition(":")
    return host, int(port)


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    import httpx

    resp = httpx.post(url, json=body, headers=headers or {}, timeout=120)
    if resp.status_code >= 300:
        raise BenchError(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else None


def _create(url: str, name: str, code: str, **config: Any) -> None:
    import base64

    body = {
        "FunctionName": name,
        "Runtime": "python3.11",
        "Handler": "handler.handler",
        "Role": "arn:aws:iam::000000000000:role/x",
        "Code": {"ZipFile": base64.b64encode(make_zip({"handler.py": code})).decode()},
        **config,
    }
    _post_json(f"{url}{API}", body)


def _nodes(url: str) -> dict[str, Any]:
    import httpx

    data = httpx.get(f"{url}/cluster/nodes", timeout=10).json()
    return {n["name"]: n for n in data["nodes"]}


def _wait(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- 1. forwarding ---------------------------------------------------------------------------
def forwarding(direct_url: str, via_url: str, calls: int, rounds: int) -> dict[str, Any]:
    body = json.dumps({"n": 1}).encode()
    conns = {
        "direct": RawHTTP(*_host_port(direct_url)),
        "forwarded": RawHTTP(*_host_port(via_url)),
    }
    raw = {k: c.request_bytes("POST", "/run/hello", body) for k, c in conns.items()}
    rounds_out: dict[str, list[dict[str, float]]] = {"direct": [], "forwarded": []}
    for kind, conn in conns.items():  # warm-up: connections, caches, the forward pool
        for _ in range(200):
            timed_call(conn, raw[kind])
    for r in range(rounds):
        for kind in ("direct", "forwarded") if r % 2 == 0 else ("forwarded", "direct"):
            conn = conns[kind]
            samples = []
            nodes = set()
            for _ in range(calls):
                ms, status, headers, _ = timed_call(conn, raw[kind])
                if status != 200:
                    raise BenchError(f"{kind}: HTTP {status}")
                samples.append(ms)
                nodes.add(headers.get("x-warmstart-node", "?"))
            expected = {"direct": "node2", "forwarded": "node2"}[kind]
            if nodes != {expected}:
                raise BenchError(
                    f"{kind} round {r + 1} ran on {sorted(nodes)}, not only on {expected}: "
                    "the measurement would not be of a forwarded call"
                )
            rounds_out[kind].append(
                {"p50": percentile(samples, 50), "p99": percentile(samples, 99)}
            )
            log(
                f"forwarding round {r + 1} {kind}: p50 {fmt_ms(percentile(samples, 50))} "
                f"p99 {fmt_ms(percentile(samples, 99))} (ran on {', '.join(sorted(nodes))})"
            )
    for c in conns.values():
        c.close()
    out: dict[str, Any] = {}
    for kind, rs in rounds_out.items():
        out[kind] = {
            "p50_ms": statistics.median(x["p50"] for x in rs),
            "p99_ms": statistics.median(x["p99"] for x in rs),
            "p50_spread_ms": [min(x["p50"] for x in rs), max(x["p50"] for x in rs)],
        }
    return out


# -- 2. throughput ---------------------------------------------------------------------------
def throughput(urls: list[str], connections: int, seconds: float) -> float:
    """Warm calls per second, ``connections`` threads each with a keep-alive connection,
    spread round-robin over ``urls``."""
    body = json.dumps({"n": 1}).encode()
    stop = time.monotonic() + seconds
    counts = [0] * connections
    errors: list[str] = []

    def worker(i: int) -> None:
        conn = RawHTTP(*_host_port(urls[i % len(urls)]))
        raw = conn.request_bytes("POST", "/run/hello", body)
        try:
            while time.monotonic() < stop:
                status, _, _ = conn.roundtrip(raw)
                if status != 200:
                    errors.append(f"HTTP {status}")
                    return
                counts[i] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise BenchError(f"throughput run failed: {errors[:3]}")
    return sum(counts) / elapsed


# -- 3. failover -----------------------------------------------------------------------------
async def _claims(etcd_url: str, prefix: str) -> dict[str, str]:
    from warmstart.cluster.etcd import AetcdEtcd

    store = AetcdEtcd([etcd_url], prefix)
    try:
        kvs, _ = await store.range("claims/")
        return {kv.key[len("claims/") :]: kv.value.decode().split(":")[0] for kv in kvs}
    finally:
        await store.close()


def failover(cluster: Any, events: int) -> dict[str, Any]:
    n1, n3 = cluster.nodes[0], cluster.nodes[2]
    _create(n1.url, "sleeper", SLEEPER, Timeout=60)
    _wait(lambda: all(_function_known(n.url, "sleeper") for n in cluster.nodes), "the function")
    for i in range(events):
        _post_json(
            f"{n1.url}{API}/sleeper/invocations",
            {"sleep": 4, "i": i},
            {"X-Amz-Invocation-Type": "Event"},
        )
    prefix = "/warmstart/"
    held = _wait(
        lambda: [
            e
            for e, node in asyncio.run(_claims(cluster.etcd_url, prefix)).items()
            if node == n3.name
        ],
        "node3 to run queued work",
        60,
    )
    log(f"failover: node3 runs {len(held)} item(s); killing it")
    killed = time.monotonic()
    cluster.kill_node(n3.name)

    def retaken() -> bool:
        claims = asyncio.run(_claims(cluster.etcd_url, prefix))
        return all(claims.get(e) not in (None, n3.name) for e in held) or all(
            _event_done(n1.url, e) for e in held
        )

    _wait(retaken, "node3's work to run elsewhere", 120)
    running_elsewhere = time.monotonic() - killed
    _wait(lambda: all(_event_done(n1.url, e) for e in held), "node3's work to finish", 120)
    done = time.monotonic() - killed
    return {"items": len(held), "rerun_after_s": running_elsewhere, "completed_after_s": done}


def _function_known(url: str, name: str) -> bool:
    import httpx

    return httpx.get(f"{url}{API}/{name}", timeout=10).status_code == 200


def _event_done(url: str, event_id: str) -> bool:
    import httpx

    resp = httpx.get(f"{url}/events/{event_id}", timeout=10)
    return resp.status_code == 200 and resp.json().get("status") == "succeeded"


# -- 4. etcd writes --------------------------------------------------------------------------
async def _count_writes(etcd_url: str, run: Any) -> dict[str, int]:
    from warmstart.cluster.etcd import AetcdEtcd

    store = AetcdEtcd([etcd_url], "/warmstart/")
    counts: dict[str, int] = {}
    try:
        _, revision = await store.range("nodes/")

        async def watch() -> None:
            async for event in store.watch("", revision + 1):
                kind = event.key.split("/", 1)[0]
                counts[kind] = counts.get(kind, 0) + 1

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(run)
        await asyncio.sleep(0.5)
        task.cancel()
    finally:
        await store.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=REPO / "bench" / "results" / "cluster",
        help="cluster directory on this machine's disk (default %(default)s)",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=2000,
        help="sequential calls per forwarding round (default %(default)s)",
    )
    p.add_argument("--repeat", type=int, default=5, help="forwarding rounds (default %(default)s)")
    p.add_argument(
        "--connections",
        type=int,
        default=16,
        help="concurrent connections for throughput (default %(default)s)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="seconds per throughput run (default %(default)s)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=12,
        help="Event invocations queued for the failover (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 200 calls, 2 rounds, 3 s")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.repeat, args.seconds, args.events = 200, 2, 3.0, 6
    from warmstart.cluster.local import LocalCluster, missing_prerequisites

    missing = missing_prerequisites()
    if missing:
        print(f"cluster_bench: {missing}", file=sys.stderr)
        return 2
    if args.dir.exists():
        LocalCluster(args.dir).down(purge=True)
        shutil.rmtree(args.dir, ignore_errors=True)
    cluster = LocalCluster(args.dir)
    results: dict[str, Any] = {"machine": machine_info()}
    try:
        log("starting etcd and 3 nodes")
        cluster.up(3, subnet=None)
        n1, n2 = cluster.nodes[0], cluster.nodes[1]
        _wait(lambda: len(_nodes(n1.url)) == 3, "three nodes")
        _create(n1.url, "hello", HELLO)
        _wait(lambda: all(_function_known(n.url, "hello") for n in cluster.nodes), "the function")
        # Warm on node2 only (a forwarded header makes node2 run it itself).
        _post_json(f"{n2.url}/run/hello", {"n": 0}, {"X-Warmstart-Forwarded": "bench"})
        _wait(
            lambda: _nodes(n1.url)[n2.name]["state"]["functions"].get("hello", {}).get("idle"),
            "node2's warm instance to be published",
        )
        results["forwarding"] = forwarding(n2.url, n1.url, args.calls, args.repeat)
        # Every node warm, then throughput through one node and spread.
        for node in cluster.nodes:
            _post_json(f"{node.url}/run/hello", {"n": 0}, {"X-Warmstart-Forwarded": "bench"})
        time.sleep(1.5)
        one = throughput([n1.url], args.connections, args.seconds)
        log(f"throughput through node1: {one:.0f}/s")
        spread = throughput([n.url for n in cluster.nodes], args.connections, args.seconds)
        log(f"throughput spread over 3 nodes: {spread:.0f}/s")
        results["throughput"] = {"one_node_per_s": one, "spread_per_s": spread}
        writes_calls = 500
        conn = RawHTTP(*_host_port(n1.url))
        raw = conn.request_bytes("POST", "/run/hello", b'{"n": 1}')

        def warm_run() -> None:
            for _ in range(writes_calls):
                conn.roundtrip(raw)

        counts = asyncio.run(_count_writes(cluster.etcd_url, warm_run))
        conn.close()
        other = sum(n for k, n in counts.items() if k != "nodes")
        results["etcd_writes"] = {
            "calls": writes_calls,
            "by_prefix": counts,
            "per_call": other / writes_calls,
        }
        log(f"etcd writes during {writes_calls} warm calls: {counts}")
        results["failover"] = failover(cluster, args.events)
    except BenchError as exc:
        print(f"cluster_bench: {exc}", file=sys.stderr)
        return 2
    finally:
        cluster.down()
    fwd = results["forwarding"]
    added = fwd["forwarded"]["p50_ms"] - fwd["direct"]["p50_ms"]
    lines = [
        "| measure | direct (node2) | forwarded (node1 -> node2) | difference |",
        "| --- | ---: | ---: | ---: |",
        f"| warm p50 | {fmt_ms(fwd['direct']['p50_ms'])} | {fmt_ms(fwd['forwarded']['p50_ms'])} | +{added:.3f} ms |",
        f"| warm p99 | {fmt_ms(fwd['direct']['p99_ms'])} | {fmt_ms(fwd['forwarded']['p99_ms'])} | +{fwd['forwarded']['p99_ms'] - fwd['direct']['p99_ms']:.3f} ms |",
        "",
        f"| throughput (warm, {args.connections} connections) | invocations/s |",
        "| --- | ---: |",
        f"| all through node1 | {results['throughput']['one_node_per_s']:.0f} |",
        f"| spread over 3 nodes (one machine) | {results['throughput']['spread_per_s']:.0f} |",
        "",
        "| failover (kill -9 of a node running Event work) | seconds |",
        "| --- | ---: |",
        f"| its {results['failover']['items']} item(s) running on another node | {results['failover']['rerun_after_s']:.1f} s |",
        f"| ... and completed | {results['failover']['completed_after_s']:.1f} s |",
        "",
        f"etcd writes per warm synchronous invocation (besides state publishing): {results['etcd_writes']['per_call']:.3f} ({results['etcd_writes']['by_prefix']})",
    ]
    targets = [
        ("forwarded warm p50 <= direct + 0.3 ms", added <= 0.3, f"+{added:.3f} ms"),
        (
            "no etcd write on the warm synchronous path",
            results["etcd_writes"]["per_call"] == 0,
            f"{results['etcd_writes']['per_call']:.3f} per call",
        ),
    ]
    print("\n".join([*lines, "", *target_lines(targets)]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(ok for _, ok, _ in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
