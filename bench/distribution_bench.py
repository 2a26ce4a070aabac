#!/usr/bin/env python3
"""Image distribution benchmark: a fleet starting one image at once, with and without P2P.

Needs root.  The image is image_bench's (Debian bookworm + python3 + numpy, pandas, scipy
and two handlers; ~130 MB compressed), in Debian's docker-registry listening on every
address (the nodes, each in its own network namespace, reach it at their bridge's
address).  For N = 3 and 5 nodes (``--nodes``) and each mode:

* **full pull, P2P** (default): every node learns of a new image function through etcd
  and pulls the image at once; one node per layer goes to the registry, the others take
  pieces from peers;
* **full pull, no P2P** (``--no-p2p``): every node pulls from the registry itself;
* **lazy (eStargz), P2P and no P2P**: the image converted by ``warmstart image convert``;
  nodes mount it lazily; chunks come from peers before the registry;
* a **single node** pulling alone (the time a node takes with the registry to itself).

Timed: from CreateFunction until every node has run the function (each node is made to
run it itself).  Registry egress: bytes the registry wrote for blob requests, from its
own access log.  Goal: registry egress with P2P <= 1.1x one copy of the image (full
pulls), against about Nx without.

Prints a Markdown table (``--json OUT`` for the raw numbers).  Exit status: 0 every goal
met, 1 one missed, 2 an error.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchError, free_port, log, machine_info
from image_bench import build
from tests import imagetools

from warmstart.cluster.local import LocalCluster, missing_prerequisites

WARMSTART = [sys.executable, "-m", "warmstart.cli.main"]
API = "/2015-03-31/functions"
ACCESS = re.compile(r'"GET (\S+) HTTP/[\d.]+" \d{3} (\d+)')
SUBNET, GATEWAY = "10.77.240.0/24", "10.77.240.1"


def registry_blob_bytes(reg: imagetools.Registry, offset: int) -> int:
    text = reg.log_path.read_bytes()[offset:].decode(errors="replace")
    return sum(int(n) for path, n in ACCESS.findall(text) if "/blobs/" in path)


def scenario(
    work: Path,
    reg: imagetools.Registry,
    ref: str,
    nodes: int,
    *,
    lazy: bool,
    p2p: bool,
) -> dict[str, Any]:
    name = f"{nodes}n-{'lazy' if lazy else 'full'}-{'p2p' if p2p else 'nop2p'}"
    cluster_dir = work / name
    shutil.rmtree(cluster_dir, ignore_errors=True)
    cluster = LocalCluster(cluster_dir)
    args = ["--insecure-registry", ref.split("/", 1)[0], "--image-pull", "lazy" if lazy else "full"]
    if not p2p:
        args.append("--no-p2p")
    try:
        cluster.up(nodes, subnet=SUBNET, serve_args=args)
        offset = reg.log_path.stat().st_size
        t0 = time.monotonic()
        resp = httpx.post(
            f"{cluster.nodes[0].url}{API}",
            json={
                "FunctionName": "app",
                "PackageType": "Image",
                "Code": {"ImageUri": ref},
                "Role": "arn:aws:iam::000000000000:role/x",
                "Timeout": 120,
                "MemorySize": 512,
            },
            timeout=300,
        )
        if resp.status_code != 201:
            raise BenchError(f"{name}: CreateFunction: HTTP {resp.status_code}: {resp.text}")
        ready: dict[str, float] = {}
        deadline = t0 + 600
        while len(ready) < nodes:
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: nodes not ready after 600 s: {sorted(ready)}")
            for node in cluster.nodes:
                if node.name in ready:
                    continue
                try:
                    r = httpx.post(
                        f"{node.url}{API}/app/invocations",
                        json={},
                        headers={"X-Warmstart-Forwarded": "bench"},
                        timeout=300,
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    ready[node.name] = time.monotonic() - t0
            time.sleep(0.1)
        seconds = max(ready.values())
        written = registry_blob_bytes(reg, offset)
        log(f"{name}: every node ready in {seconds:.2f} s; registry wrote {written / 1e6:.1f} MB")
        return {"nodes": nodes, "lazy": lazy, "p2p": p2p, "seconds": seconds, "bytes": written}
    finally:
        cluster.down()


def preheat(work: Path, reg: imagetools.Registry, ref: str, nodes: int) -> dict[str, Any]:
    """``POST /images/preheat`` of the image onto every node (P2P on): time until the job
    succeeded, and the registry's egress."""
    name = f"{nodes}n-preheat"
    cluster_dir = work / name
    shutil.rmtree(cluster_dir, ignore_errors=True)
    cluster = LocalCluster(cluster_dir)
    try:
        cluster.up(nodes, subnet=SUBNET, serve_args=["--insecure-registry", ref.split("/", 1)[0]])
        offset = reg.log_path.stat().st_size
        t0 = time.monotonic()
        resp = httpx.post(f"{cluster.nodes[0].url}/images/preheat", json={"image": ref}, timeout=60)
        if resp.status_code != 202:
            raise BenchError(f"{name}: POST /images/preheat: HTTP {resp.status_code}: {resp.text}")
        job_id = resp.json()["id"]
        while True:
            job = httpx.get(f"{cluster.nodes[0].url}/images/preheat/{job_id}", timeout=60).json()
            if job["phase"] != "Running":
                break
            if time.monotonic() - t0 > 600:
                raise BenchError(f"{name}: the preheat job did not end in 600 s")
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        if job["phase"] != "Succeeded":
            raise BenchError(f"{name}: preheat {job['phase']}: {job.get('failedNodes')}")
        written = registry_blob_bytes(reg, offset)
        log(f"{name}: preheated in {seconds:.2f} s; registry wrote {written / 1e6:.1f} MB")
        return {"nodes": nodes, "seconds": seconds, "bytes": written}
    finally:
        cluster.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nodes", default="3,5", help="fleet sizes, comma-separated (default %(default)s)"
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "distribution",
        help="work directory on this machine's disk (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="3 nodes only, full pulls only")
    p.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    args = p.parse_args(argv)
    missing = missing_prerequisites()
    if missing:
        print(f"distribution_bench: {missing}", file=sys.stderr)
        return 2
    sizes = [3] if args.quick else [int(n) for n in args.nodes.split(",")]
    work = args.dir
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    reg = imagetools.start_registry(
        work / "registry", port=port, address="0.0.0.0", log_level="info"
    )
    results: dict[str, Any] = {"machine": machine_info(), "scenarios": []}
    try:
        built, image_bytes = build(reg, work)
        local_ref = built.replace("0.0.0.0:", "127.0.0.1:", 1)  # the registry listens everywhere
        repo_tag = local_ref.split("/", 1)[1]
        full_ref = f"{GATEWAY}:{port}/{repo_tag}"
        lazy_local = local_ref.replace(":gzip", ":esgz")
        if not args.quick:
            log("converting the image to eStargz")
            res = subprocess.run(
                [*WARMSTART, "image", "convert", local_ref, lazy_local],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                raise BenchError(f"warmstart image convert failed: {res.stderr}")
        lazy_ref = f"{GATEWAY}:{port}/{lazy_local.split('/', 1)[1]}"
        results["image_bytes"] = image_bytes
        log(f"image {full_ref}: {image_bytes / 1e6:.1f} MB compressed")
        runs = [scenario(work, reg, full_ref, 1, lazy=False, p2p=False)]
        for n in sizes:
            runs.append(scenario(work, reg, full_ref, n, lazy=False, p2p=True))
            runs.append(scenario(work, reg, full_ref, n, lazy=False, p2p=False))
            if not args.quick:
                runs.append(scenario(work, reg, lazy_ref, n, lazy=True, p2p=True))
                runs.append(scenario(work, reg, lazy_ref, n, lazy=True, p2p=False))
        results["scenarios"] = runs
        results["preheat"] = heats = [preheat(work, reg, full_ref, n) for n in sizes]
    except BenchError as exc:
        print(f"distribution_bench: {exc}", file=sys.stderr)
        return 2
    finally:
        reg.stop()
    alone = runs[0]["seconds"]
    lines = [
        f"image: {image_bytes / 1e6:.1f} MB compressed; one node pulling it alone: {alone:.2f} s",
        "",
        "| nodes | start | P2P | every node ready | vs one node alone | registry egress | copies of the image |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in runs[1:]:
        lines.append(
            f"| {r['nodes']} | {'lazy' if r['lazy'] else 'full pull'} | {'yes' if r['p2p'] else 'no'} "
            f"| {r['seconds']:.2f} s | {r['seconds'] / alone:.2f}x | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['bytes'] / image_bytes:.2f} |"
        )
    lines += [
        "",
        "| nodes | preheat (`POST /images/preheat`, P2P) | registry egress | copies |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for h in heats:
        lines.append(
            f"| {h['nodes']} | {h['seconds']:.2f} s | {h['bytes'] / 1e6:.1f} MB "
            f"| {h['bytes'] / image_bytes:.2f} |"
        )
    goals = [r["bytes"] <= 1.1 * image_bytes for r in runs[1:] if r["p2p"] and not r["lazy"]]
    lines += [
        "",
        f"- [{'PASS' if all(goals) else 'FAIL'}] full pulls with P2P: registry egress <= 1.1x one copy",
    ]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(goals) else 1


if __name__ == "__main__":
    sys.exit(main())
