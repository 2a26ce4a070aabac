"""``warmstart cluster up|down`` for real (as root): etcd from Debian and nodes started
with ``serve --cluster`` in network namespaces of their own, reachable from the host and
from each other; a node killed -9 and restarted on its data; nothing left after down.

Only single-node behaviour is asked of the nodes (/healthz, a function that survives a
restart): what cluster mode adds is tested with the cluster code."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.clustertools import ClusterFactory, leftovers, needs_local_cluster
from tests.conftest import make_zip
from warmstart.cluster.local import LocalCluster, LocalClusterError, cluster_id

pytestmark = [pytest.mark.integration]

CLI = [sys.executable, "-m", "warmstart.cli.main"]
# Run in a node's namespace: GET each URL, print {url: status or error}.
PROBE = """
import json, sys, httpx
out = {}
for url in sys.argv[1:]:
    try:
        out[url] = httpx.get(url, timeout=10, trust_env=False).status_code
    except httpx.HTTPError as exc:
        out[url] = type(exc).__name__
print(json.dumps(out))
"""


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10, trust_env=False)


def pid_of(cluster: LocalCluster, role: str) -> int:
    pid = {c.role: c.pid for c in cluster.status().components}[role]
    assert pid is not None, f"{role} does not run"
    return pid


def test_two_nodes_in_namespaces_etcd_on_the_bridge_then_nothing_left(
    local_cluster_factory: ClusterFactory,
) -> None:
    cluster = local_cluster_factory(2)
    node1, node2 = cluster.nodes
    assert get(f"{cluster.etcd_url}/health").json()["health"] == "true"
    for node in cluster.nodes:
        health = get(f"{node.url}/healthz")
        assert health.status_code == 200
        # The node sees the host's cgroups (entering only its network namespace keeps
        # them): it runs sandboxes with linux isolation, not bare processes.
        assert health.json()["isolation"] == "linux"
        # ... and it runs in its namespace.
        netns_inode = os.stat(f"/run/netns/{node.netns}").st_ino
        assert os.stat(f"/proc/{pid_of(cluster, node.name)}/ns/net").st_ino == netns_inode

    # From inside node1's namespace: etcd on the gateway, node2, and node1 itself.
    urls = [f"{cluster.etcd_url}/health", f"{node2.url}/healthz", f"{node1.url}/healthz"]
    probe = cluster.run_in(node1.name, sys.executable, "-c", PROBE, *urls)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == dict.fromkeys(urls, 200)
    # The namespace has only loopback and its end of the veth, with its address.
    addrs = cluster.run_in(node1.name, "ip", "-j", "-4", "addr", "show")
    assert {(a["ifname"], a["addr_info"][0]["local"]) for a in json.loads(addrs.stdout)} == {
        ("lo", "127.0.0.1"),
        ("eth0", node1.address),
    }

    # etcd stopped and started again on its data.
    cluster.stop_etcd()
    with pytest.raises(httpx.TransportError):
        get(f"{cluster.etcd_url}/health")
    cluster.start_etcd()
    assert get(f"{cluster.etcd_url}/health").json()["health"] == "true"

    # kill -9 node1, restart it on the same data directory: what it held is still there.
    code = make_zip({"h.py": "def handler(event, context):\n    return 1\n"})
    created = httpx.post(
        f"{node1.url}/2015-03-31/functions",
        json={
            "FunctionName": "kept",
            "Runtime": "python3.11",
            "Handler": "h.handler",
            "Role": "arn:aws:iam::000000000000:role/x",
            "Code": {"ZipFile": base64.b64encode(code).decode()},
        },
        timeout=60,
        trust_env=False,
    )
    assert created.status_code == 201, created.text
    old_pid = pid_of(cluster, node1.name)
    cluster.kill_node(node1.name)
    assert {c.role: c.pid for c in cluster.status().components}[node1.name] is None
    with pytest.raises(httpx.TransportError):
        get(f"{node1.url}/healthz")
    assert get(f"{node2.url}/healthz").status_code == 200
    cluster.start_node(node1.name)
    assert pid_of(cluster, node1.name) != old_pid
    assert get(f"{node1.url}/2015-03-31/functions/kept").status_code == 200
    assert node1.log.read_text().count(" serve --host ") == 2  # one log, both runs

    # Down from another process (as a user would), twice: the second finds nothing to do.
    for _ in range(2):
        down = subprocess.run(
            [*CLI, "cluster", "down", "--dir", str(cluster.dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stderr
    assert leftovers(cluster.dir, cluster.plan.id) == []
    status = subprocess.run(
        [*CLI, "cluster", "status", "--dir", str(cluster.dir)], capture_output=True, text=True
    )
    assert status.returncode == 1
    assert status.stdout.count("\tstopped\t") == 3  # etcd and both nodes
    # Data and logs stay until --purge.
    assert node1.data_dir.is_dir() and node1.log.exists()
    purge = subprocess.run(
        [*CLI, "cluster", "down", "--purge", "--dir", str(cluster.dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert purge.returncode == 0, purge.stderr
    assert not cluster.dir.exists()


def test_clusters_side_by_side_and_a_subnet_in_use_is_refused(
    local_cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    a = local_cluster_factory(1)
    b = local_cluster_factory(1)
    assert a.plan.subnet != b.plan.subnet and a.plan.id != b.plan.id
    for cluster in (a, b):
        assert get(f"{cluster.nodes[0].url}/healthz").status_code == 200
        assert get(f"{cluster.etcd_url}/health").status_code == 200

    other = LocalCluster(tmp_path / "other")
    with pytest.raises(LocalClusterError, match=f"subnet {a.plan.subnet} is in use"):
        other.up(1, subnet=a.plan.subnet)
    assert leftovers(other.dir, cluster_id(other.dir)) == []
    assert not other.dir.exists()


@needs_local_cluster
def test_a_node_that_cannot_start_fails_up_with_its_log_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path / "c")
    try:
        with pytest.raises(LocalClusterError) as caught:
            cluster.up(2, subnet=None, serve_args=["--no-such-option"])
        message = str(caught.value)
        assert "exited with status 2" in message
        assert "unrecognized arguments: --no-such-option" in message  # the log's tail
        state = json.loads((cluster.dir / "cluster.json").read_text())
        assert state["processes"] == []
        assert leftovers(cluster.dir, state["id"]) == []
        assert (cluster.dir / "node1.log").exists()  # the logs stay
    finally:
        cluster.down()
