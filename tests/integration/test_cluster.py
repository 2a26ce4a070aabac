"""Cluster mode end to end: a real etcd (Debian's) and three ``warmstart serve --cluster``
nodes, each in its own network namespace (``tests/clustertools.py``).

One function registry for all nodes, placement and one-hop forwarding, Event work and
jobs that survive a node's kill -9, code bundles that survive a node's loss, etcd going
away and coming back, a node rejoining, a forwarded call whose node dies mid-request."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import make_zip, needs_root
from warmstart.cluster.local import LocalCluster

pytestmark = [pytest.mark.integration, needs_root]

HELLO = """
import os
def handler(event, context):
    return {"hello": event.get("name"), "node": os.environ.get("AWS_LAMBDA_FUNCTION_NAME")}
"""
SLEEPER = """
import time
def handler(event, context):
    time.sleep(event.get("sleep", 1))
    return {"slept": event.get("sleep", 1), "i": event.get("i")}
"""
API = "/2015-03-31/functions"
FORWARDED = {"X-Warmstart-Forwarded": "test"}  # makes a node run the call itself


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def create(url: str, name: str, code: str, **config: Any) -> dict[str, Any]:
    body = {
        "FunctionName": name,
        "Runtime": "python3.11",
        "Handler": "handler.handler",
        "Role": "arn:aws:iam::000000000000:role/x",
        "Code": {"ZipFile": base64.b64encode(make_zip({"handler.py": code})).decode()},
        **config,
    }
    resp = httpx.post(f"{url}{API}", json=body, timeout=120)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def invoke(url: str, name: str, event: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{url}{API}/{name}/invocations", json=event, headers=headers, timeout=120)


def nodes_state(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/cluster/nodes", timeout=10).json()
    return {n["name"]: n for n in data["nodes"]}


def bundle_holders(url: str) -> list[str]:
    """The nodes that published holding a code bundle (each test deploys one)."""
    return sorted(name for name, n in nodes_state(url).items() if n["state"].get("code"))


@pytest.fixture
def cluster(local_cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster_factory(3)


def test_one_registry_and_placement_across_nodes(cluster: LocalCluster) -> None:
    n1, n2, n3 = cluster.nodes
    # Every node lists every node.
    for node in cluster.nodes:
        wait_until(lambda node=node: len(nodes_state(node.url)) == 3, "three live nodes")
    create(n1.url, "hello", HELLO)
    # Created through node1, visible through the others at once (their catalog watch).
    for node in (n2, n3):
        got = wait_until(
            lambda node=node: httpx.get(f"{node.url}{API}/hello").status_code == 200,
            f"{node.name} to see the function",
        )
        assert got
    # The code is on two nodes.
    holders = wait_until(
        lambda: (
            [
                name
                for name, n in nodes_state(n1.url).items()
                if len(n["state"].get("code", [])) == 1
            ]
            if sum(len(n["state"].get("code", [])) for n in nodes_state(n1.url).values()) == 2
            else None
        ),
        "the bundle on two nodes",
    )
    assert len(holders) == 2 and n1.name in holders
    # An invocation through node3 runs somewhere and says where.
    first = invoke(n3.url, "hello", {"name": "a"})
    assert first.status_code == 200, first.text
    assert first.json()["hello"] == "a"
    warm_node = first.headers["x-warmstart-node"]
    assert warm_node in {n.name for n in cluster.nodes}
    # Once that node has published its idle instance, every node routes the function to it.
    wait_until(
        lambda: nodes_state(n1.url)[warm_node]["state"]["functions"].get("hello", {}).get("idle"),
        "the warm instance to be published",
    )
    for node in cluster.nodes:
        resp = invoke(node.url, "hello", {"name": node.name})
        assert resp.status_code == 200 and resp.json()["hello"] == node.name
        assert resp.headers["x-warmstart-node"] == warm_node
        assert resp.headers["x-warmstart-start"] == "warm"
        assert float(resp.headers["x-warmstart-duration-ms"]) > 0
    # Deleted through another node: gone everywhere.
    assert httpx.delete(f"{n2.url}{API}/hello").status_code == 204
    for node in cluster.nodes:
        wait_until(
            lambda node=node: httpx.get(f"{node.url}{API}/hello").status_code == 404,
            f"{node.name} to forget the function",
        )


def test_reserved_concurrency_is_cluster_wide(cluster: LocalCluster) -> None:
    n1, n2, n3 = cluster.nodes
    create(n1.url, "slow", SLEEPER, Timeout=30)
    assert (
        httpx.put(
            f"{n1.url}/2017-10-31/functions/slow/concurrency",
            json={"ReservedConcurrentExecutions": 2},
        ).status_code
        == 200
    )
    for node in cluster.nodes:  # every node has the new revision
        wait_until(
            lambda node=node: httpx.get(f"{node.url}{API}/slow").json().get("Concurrency"),
            "the limit everywhere",
        )
    results: list[httpx.Response] = []

    def call(url: str) -> None:
        results.append(invoke(url, "slow", {"sleep": 3}))

    threads = [threading.Thread(target=call, args=(n.url,)) for n in (n1, n2, n3, n1, n2, n3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    throttled = [r for r in results if r.status_code == 429]
    # At most two ran at once across the cluster; the others waited or were throttled,
    # and nothing failed otherwise.
    assert len(ok) + len(throttled) == 6, [r.text for r in results]
    assert ok


def test_event_work_and_jobs_survive_a_killed_node(cluster: LocalCluster) -> None:
    n1, n2, n3 = cluster.nodes
    create(n1.url, "slow", SLEEPER, Timeout=60)
    for node in cluster.nodes:
        wait_until(
            lambda node=node: httpx.get(f"{node.url}{API}/slow").status_code == 200, "function"
        )
    job = httpx.post(
        f"{n1.url}/jobs",
        json={"function": "slow", "inputs": [{"sleep": 2, "i": i} for i in range(8)]},
        timeout=30,
    ).json()
    events = [
        invoke(n2.url, "slow", {"sleep": 2, "i": 100 + i}, **{"X-Amz-Invocation-Type": "Event"})
        for i in range(4)
    ]
    assert all(e.status_code == 202 for e in events)
    # Wait until node3 runs some of that work, then kill -9 it.
    wait_until(
        lambda: nodes_state(n1.url)[n3.name]["state"].get("best_effort_running", 0) > 0,
        "node3 to run best-effort work",
    )
    cluster.kill_node(n3.name)
    wait_until(lambda: n3.name not in nodes_state(n1.url), "node3's lease to lapse", 30)
    # Every item completes on the nodes left (job status through another node).
    done = wait_until(
        lambda: (
            (j := httpx.get(f"{n2.url}/jobs/{job['JobId']}").json())["status"] == "completed" and j
        ),
        "the job to complete",
        120,
    )
    assert done["succeeded"] == 8 and done["failed"] == 0
    results = httpx.get(f"{n1.url}/jobs/{job['JobId']}/results").json()["results"]
    assert [r["result"]["i"] for r in results] == list(range(8))
    # The Event invocations too: the queue drains.
    wait_until(
        lambda: httpx.get(f"{n1.url}/node").json()["queue_depth"] == 0, "the queue to drain", 120
    )


def test_a_bundle_survives_losing_a_node_and_is_fetched_by_digest(cluster: LocalCluster) -> None:
    n1 = cluster.nodes[0]
    create(n1.url, "hello", HELLO)
    holders = wait_until(lambda: h if len(h := bundle_holders(n1.url)) == 2 else None, "two copies")
    other = next(n for n in cluster.nodes if n.name not in holders)
    # The deploying node dies; a node without the bundle runs the function (forced here
    # with the forwarded header): it fetches the bundle from the surviving copy.
    cluster.kill_node(n1.name)
    resp = invoke(other.url, "hello", {"name": "kept"}, **FORWARDED)
    assert resp.status_code == 200, resp.text
    assert resp.json()["hello"] == "kept"
    assert resp.headers["x-warmstart-node"] == other.name


def test_losing_etcd_degrades_a_node_and_etcd_coming_back_heals_it(cluster: LocalCluster) -> None:
    n1, n2, _ = cluster.nodes
    create(n1.url, "hello", HELLO)
    wait_until(lambda: httpx.get(f"{n2.url}{API}/hello").status_code == 200, "function")
    assert invoke(n2.url, "hello", {"name": "before"}, **FORWARDED).status_code == 200
    cluster.stop_etcd()
    health = wait_until(
        lambda: (h := httpx.get(f"{n2.url}/healthz").json())["status"] == "degraded" and h,
        "degraded health",
        30,
    )
    assert health["cluster"]["etcd"] == "unreachable"
    # Known functions keep serving; changes fail with a clear 503.
    resp = invoke(n2.url, "hello", {"name": "during"}, **FORWARDED)
    assert resp.status_code == 200 and resp.json()["hello"] == "during"
    failed = httpx.post(
        f"{n2.url}{API}",
        json={
            "FunctionName": "other",
            "Runtime": "python3.11",
            "Handler": "handler.handler",
            "Role": "arn:aws:iam::000000000000:role/x",
            "Code": {"ZipFile": base64.b64encode(make_zip({"handler.py": HELLO})).decode()},
        },
        timeout=60,
    )
    assert failed.status_code == 503, failed.text
    assert failed.headers["x-amzn-errortype"] == "ServiceException"
    assert "etcd" in failed.json()["message"]
    cluster.start_etcd()
    wait_until(lambda: httpx.get(f"{n2.url}/healthz").json()["status"] == "ok", "healthy", 60)
    create(n2.url, "other", HELLO)
    wait_until(lambda: len(nodes_state(n1.url)) == 3, "every node back in the cluster", 30)


def test_a_killed_node_rejoins_with_its_functions(cluster: LocalCluster) -> None:
    n1, n2, _ = cluster.nodes
    create(n1.url, "hello", HELLO)
    cluster.kill_node(n2.name)
    wait_until(lambda: n2.name not in nodes_state(n1.url), "node2 to leave", 30)
    cluster.start_node(n2.name)
    wait_until(lambda: n2.name in nodes_state(n1.url), "node2 to rejoin", 30)
    resp = invoke(n2.url, "hello", {"name": "again"}, **FORWARDED)
    assert resp.status_code == 200 and resp.json()["hello"] == "again"
    assert json.loads(httpx.get(f"{n2.url}/healthz").text)["cluster"]["nodes"] == 3


def test_a_forwarded_call_whose_node_dies_is_a_clear_502(cluster: LocalCluster) -> None:
    n1, n2, _ = cluster.nodes
    create(n1.url, "slow", SLEEPER, Timeout=60)
    wait_until(lambda: httpx.get(f"{n2.url}{API}/slow").status_code == 200, "function")
    # Make node2 the only warm node, and wait until node1 knows it.
    assert invoke(n2.url, "slow", {"sleep": 0}, **FORWARDED).status_code == 200
    wait_until(
        lambda: nodes_state(n1.url)[n2.name]["state"]["functions"].get("slow", {}).get("idle"),
        "node2's warm instance to be published",
    )
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(invoke(n1.url, "slow", {"sleep": 30})))
    t.start()
    wait_until(
        lambda: nodes_state(n1.url)[n2.name]["state"]["functions"]["slow"]["busy"] > 0,
        "the call to run on node2",
    )
    started = time.monotonic()
    cluster.kill_node(n2.name)
    t.join(60)
    assert not t.is_alive(), "the forwarded call hangs"
    assert time.monotonic() - started < 20
    resp = out[0]
    assert resp.status_code == 502, resp.text
    assert resp.headers["x-amzn-errortype"] == "ServiceException"
    assert n2.name in resp.json()["message"]
