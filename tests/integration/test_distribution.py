"""Peer-to-peer image layers across a cluster: etcd and three nodes in network namespaces
pull one image from the real registry (Debian's docker-registry) at the same time.

Each blob is fetched from the registry once; the others get its pieces from peers,
verified; a peer that serves wrong bytes is dropped; a peer killed mid-transfer costs a
retry, not a failed pull.  Registry bytes are counted from its own access log."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import imagetools
from tests.clustertools import needs_local_cluster
from tests.conftest import free_port, needs_root
from warmstart.cluster.etcd import AetcdEtcd
from warmstart.cluster.local import LocalCluster

pytestmark = [pytest.mark.integration, needs_root, needs_local_cluster]

API = "/2015-03-31/functions"
ACCESS = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d{3}) (\d+)')
HANDLER = "def handler(event, context):\n    return {'image': True}\n"


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def blob_bytes(log: str) -> dict[str, int]:
    """Bytes the registry wrote per blob digest (GET requests, any status)."""
    out: dict[str, int] = {}
    for path, _, written in ACCESS.findall(log):
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            out[digest] = out.get(digest, 0) + int(written)
    return out


@pytest.fixture(scope="module")
def p2p_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registry on every address (nodes reach it at their bridge's address) holding a
    Python image with a 12 MiB random layer, and a 3-node cluster allowed to use it."""
    subnet, gateway = "10.77.250.0/24", "10.77.250.1"
    work = tmp_path_factory.mktemp("p2p")
    port = free_port()
    reg = imagetools.start_registry(work / "registry", port=port, address="0.0.0.0", log_level="info")
    host = f"{gateway}:{port}"
    big = os.urandom(12 << 20)  # three 4 MiB pieces that do not compress
    ref_local = f"127.0.0.1:{port}/p2p/app:1"
    imagetools.build_image(
        work / "build",
        [{"var/task/app.py": HANDLER}, {"var/task/blob.bin": big}],
        ref=ref_local,
        base=imagetools.debian_layout(),
        cmd=["app.handler"],
        workingdir="/var/task",
    )
    cluster = LocalCluster(work / "cluster")
    try:
        cluster.up(
            3,
            subnet=subnet,
            serve_args=("--insecure-registry", host, "--image-pull", "full", "--no-zygotes"),
        )
        yield {"cluster": cluster, "registry": reg, "ref": f"{host}/p2p/app:1", "big": len(big)}
    finally:
        cluster.down()
        reg.stop()


def create_image_function(url: str, name: str, ref: str) -> None:
    resp = httpx.post(
        f"{url}{API}",
        json={
            "FunctionName": name,
            "PackageType": "Image",
            "Code": {"ImageUri": ref},
            "Role": "arn:aws:iam::000000000000:role/x",
            "Timeout": 30,
        },
        timeout=120,
    )
    assert resp.status_code == 201, resp.text


def test_one_pull_from_the_registry_per_blob_the_rest_from_peers(p2p_setup: dict[str, Any]) -> None:
    cluster: LocalCluster = p2p_setup["cluster"]
    reg = p2p_setup["registry"]
    mark = len(reg.log())
    # Every node learns of the function through etcd and mounts its image at once.
    create_image_function(cluster.nodes[0].url, "img", p2p_setup["ref"])
    for node in cluster.nodes:
        wait_until(
            lambda node=node: (
                httpx.post(
                    f"{node.url}{API}/img/invocations",
                    json={},
                    headers={"X-Warmstart-Forwarded": "test"},
                    timeout=120,
                ).status_code
                == 200
            ),
            f"{node.name} to run the image",
            300,
        )
    per_blob = blob_bytes(reg.log()[mark:])
    manifest = httpx.get(
        f"http://127.0.0.1:{reg.host.rsplit(':', 1)[1]}/v2/p2p/app/manifests/1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    for layer in manifest["layers"]:
        # At most one node went back to source for each layer (and its Range retries).
        assert per_blob.get(layer["digest"], 0) <= int(layer["size"] * 1.1), (
            layer["digest"],
            per_blob,
        )
    total = sum(int(layer["size"]) for layer in manifest["layers"])
    layer_bytes = sum(per_blob.get(layer["digest"], 0) for layer in manifest["layers"])
    assert layer_bytes <= total * 1.1, f"{layer_bytes} bytes of layers for a {total}-byte image"
    # The nodes' own count agrees: pieces came from peers.
    states = httpx.get(f"{cluster.nodes[0].url}/cluster/nodes").json()["nodes"]
    from_peers = sum(n["state"].get("p2p", {}).get("pieces_from_peers", 0) for n in states)
    assert from_peers > 0


def test_a_peer_serving_wrong_bytes_is_dropped(p2p_setup: dict[str, Any], tmp_path: Path) -> None:
    """A node whose stored blob was corrupted serves wrong pieces: the node fetching
    from it drops it and gets the piece elsewhere; the pull succeeds, verified."""
    cluster: LocalCluster = p2p_setup["cluster"]
    holders = list(cluster.nodes)
    # After the first test every node holds every blob: corrupt node1's copies.
    p2p_dir = cluster.nodes[0].data_dir / "images" / "p2p"
    corrupted = 0
    for blob in p2p_dir.iterdir():
        if len(blob.name) == 64 and blob.stat().st_size > (1 << 20):
            with open(blob, "r+b") as f:
                f.seek(100)
                f.write(b"\0tampered\0")
            corrupted += 1
    assert corrupted
    # node3 forgets the image (its store and blobs) and pulls it again.
    node3 = holders[2]
    cluster.stop_node(node3.name)
    shutil.rmtree(node3.data_dir / "images", ignore_errors=True)
    cluster.start_node(node3.name)
    resp = wait_until(
        lambda: (
            (
                r := httpx.post(
                    f"{node3.url}{API}/img/invocations",
                    json={},
                    headers={"X-Warmstart-Forwarded": "test"},
                    timeout=120,
                )
            ).status_code
            == 200
            and r
        ),
        "node3 to run the image again",
        300,
    )
    assert resp.json() == {"image": True}
    log = (cluster.dir / f"{node3.name}.log").read_text()
    assert "served a wrong piece" in log and "node1" in log


def test_a_peer_killed_mid_transfer_costs_a_retry_not_the_pull(
    p2p_setup: dict[str, Any], tmp_path: Path
) -> None:
    """node3 pulls a 24 MiB layer from node1, the only node that has it, over a link
    throttled to 40 Mbit/s; node1 is killed half way: node3 finishes from the registry."""
    cluster: LocalCluster = p2p_setup["cluster"]
    reg = p2p_setup["registry"]
    node1, node2, node3 = cluster.nodes
    port = reg.host.rsplit(":", 1)[1]
    big = os.urandom(24 << 20)  # six 4 MiB pieces
    imagetools.build_image(
        tmp_path / "build",
        [{"var/task/app.py": HANDLER}, {"var/task/big.bin": big}],
        ref=f"127.0.0.1:{port}/p2p/big:1",
        base=imagetools.debian_layout(),
        cmd=["app.handler"],
        workingdir="/var/task",
    )
    big_digest = (
        "sha256:"
        + __import__("hashlib")
        .sha256(
            httpx.get(
                f"http://127.0.0.1:{port}/v2/p2p/big/blobs/"
                + httpx.get(
                    f"http://127.0.0.1:{port}/v2/p2p/big/manifests/1",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                ).json()["layers"][-1]["digest"]
            ).content
        )
        .hexdigest()
    )
    hex_ = big_digest[7:]
    # Only node1 runs the new function at first: it pulls the image (from the registry).
    cluster.stop_node(node2.name)
    cluster.stop_node(node3.name)
    create_image_function(node1.url, "big", p2p_setup["ref"].replace("/p2p/app:1", "/p2p/big:1"))
    run_here = {"X-Warmstart-Forwarded": "test"}
    assert (
        httpx.post(f"{node1.url}{API}/big/invocations", json={}, headers=run_here, timeout=300)
    ).status_code == 200
    cluster.start_node(node3.name)
    # node1 sends slowly from now on.
    tc = cluster.run_in(
        node1.name,
        "tc",
        "qdisc",
        "add",
        "dev",
        "eth0",
        "root",
        "tbf",
        "rate",
        "40mbit",
        "burst",
        "64kb",
        "latency",
        "500ms",
    )
    assert tc.returncode == 0, tc.stderr

    async def held_by_node3() -> int:
        store = AetcdEtcd([cluster.etcd_url], "/warmstart/")
        try:
            kv = await store.get(f"blobs/{hex_}/holders/{node3.name}")
            return int(kv.value) if kv is not None else 0
        finally:
            await store.close()

    result: list[httpx.Response] = []
    pull = threading.Thread(
        target=lambda: result.append(
            httpx.post(f"{node3.url}{API}/big/invocations", json={}, headers=run_here, timeout=300)
        )
    )
    pull.start()
    held = wait_until(lambda: asyncio.run(held_by_node3()), "node3 to get a first piece", 120)
    cluster.kill_node(node1.name)
    assert 0 < held < 6, f"node3 held {held} of 6 pieces when node1 died"
    pull.join(300)
    assert result and result[0].status_code == 200, result and result[0].text
    log = (cluster.dir / f"{node3.name}.log").read_text()
    assert "from the registry" in log
    # The node comes back for the other tests.
    cluster.start_node(node1.name)
    cluster.start_node(node2.name)
