"""Image distribution across a real cluster: three ``warmstart serve --cluster`` nodes in
network namespaces (``tests/clustertools.py``) pulling from the reference registry
(Debian's docker-registry), listening on the bridge's address where the nodes reach
this machine.

Preheat jobs on every node, on a label selector, and their failures (an image that does
not exist, a node that dies while the registry is away); image cache pins that the LRU
of a small store never evicts while unpinned images go, and that a node joining later
pulls; a hot function's code fetched by the next node before calls are routed there."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_zip, needs_root, remove_tree, require_tools, wait_until
from tests.imagetools import Registry, build_image, start_registry
from warmstart.cluster.local import LocalCluster

pytestmark = [pytest.mark.integration, needs_root]

ClusterFactory = Callable[..., LocalCluster]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
API = "/2015-03-31/functions"
FORWARDED = {"X-Warmstart-Forwarded": "test"}
SLEEPER = """
import time
def handler(event, context):
    time.sleep(event.get("sleep", 1))
    return {"slept": event.get("sleep", 1)}
"""


@pytest.fixture
def registry_for(tmp_path: Path) -> Iterator[Callable[[LocalCluster], Registry]]:
    """A registry listening where a cluster's nodes reach this machine (its gateway)."""
    require_tools("docker-registry", "umoci", "skopeo")
    started: list[Registry] = []

    def start(cluster: LocalCluster) -> Registry:
        reg = start_registry(tmp_path / "registry", address=cluster.plan.gateway)
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.stop()
    remove_tree(tmp_path / "registry")


def image(tmp_path: Path, reg: Registry, name: str, size: int = 64 << 10) -> str:
    """An image of one layer of ``size`` random (incompressible) bytes."""
    return build_image(
        tmp_path / f"build-{name}", [{f"data/{name}": os.urandom(size)}], ref=f"{reg.host}/{name}:1"
    )


def layer_digests(ref: str) -> set[str]:
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.partition(":")
    resp = httpx.get(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    resp.raise_for_status()
    return {layer["digest"] for layer in resp.json()["layers"]}


def nodes_state(url: str) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{url}/cluster/nodes", timeout=10).json()
    return {n["name"]: n["state"] for n in data["nodes"]}


def preheat(url: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{url}/images/preheat", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


def finished(url: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> Any:
        job = httpx.get(f"{url}/images/preheat/{job_id}", timeout=10).json()
        return job if job["completionTime"] else None

    job: dict[str, Any] = wait_until(done, f"preheat job {job_id} to finish", timeout)
    return job


def holds(url: str, node: str, ref: str) -> bool:
    """Whether ``node`` published holding every layer of ``ref`` (every few seconds)."""
    return layer_digests(ref) <= set(nodes_state(url)[node].get("layers") or {})


def test_preheat_on_every_node_on_a_selector_and_when_it_fails(
    local_cluster_factory: ClusterFactory,
    registry_for: Callable[[LocalCluster], Registry],
    tmp_path: Path,
) -> None:
    labels = {"node1": "a", "node2": "b", "node3": "a"}
    cluster = local_cluster_factory(
        3, node_args={n: ("--label", f"zone={z}") for n, z in labels.items()}
    )
    n1, n2, n3 = cluster.nodes
    reg = registry_for(cluster)
    first, second = image(tmp_path, reg, "first"), image(tmp_path, reg, "second")
    for node in cluster.nodes:
        wait_until(lambda node=node: len(nodes_state(node.url)) == 3, "three live nodes")

    # Every node, through any node; status through another.
    job = preheat(n2.url, image=first)
    assert job["desired"] == 3 and job["phase"] == "Running"
    done = finished(n3.url, job["id"])
    assert (done["phase"], done["succeeded"], done["failed"]) == ("Succeeded", 3, 0)
    for name, node in done["nodes"].items():
        assert node["state"] == "succeeded", (name, node)
        assert node["bytesDone"] == node["bytesTotal"] > 64 << 10
        assert node["digest"].startswith("sha256:")
    for node in cluster.nodes:
        wait_until(lambda node=node: holds(n1.url, node.name, first), f"{node.name}'s layers")

    # The nodes labelled zone=a, two at a time at most.
    job = preheat(n1.url, image=second, selector={"zone": "a"}, parallelism=1)
    assert sorted(job["nodes"]) == ["node1", "node3"]
    assert finished(n1.url, job["id"])["succeeded"] == 2
    wait_until(lambda: holds(n1.url, "node3", second), "node3 to hold the second image")
    assert not holds(n1.url, "node2", second)
    listed = httpx.get(f"{n2.url}/images/preheat").json()["jobs"]
    assert [j["id"] for j in listed][:1] == [job["id"]]

    # Bad requests are 400s that say why; an unknown job is a 404.
    for body, why in (
        ({"image": first, "selector": {"zone": "z"}}, "matches no live node"),
        ({"image": "not a reference"}, "not a valid image reference"),
        ({"image": first, "parallelism": 0}, "parallelism"),
    ):
        resp = httpx.post(f"{n1.url}/images/preheat", json=body)
        assert resp.status_code == 400 and why in resp.json()["message"], resp.text
    assert httpx.get(f"{n1.url}/images/preheat/0123").status_code == 404

    # An image that does not exist fails on every node, without retrying in vain.
    missing = f"{reg.host}/first:nope"
    done = finished(n1.url, preheat(n1.url, image=missing, backoffLimit=5)["id"])
    assert (done["phase"], sorted(done["failedNodes"])) == ("Failed", ["node1", "node2", "node3"])
    for node in done["nodes"].values():
        assert node["attempts"] == 1 and "ImageNotFound" in node["message"], node

    # A node that dies while the registry is away: its part fails ("left the cluster"),
    # the others succeed once the registry is back, and the job ends.
    third = image(tmp_path, reg, "third")
    reg.stop()
    job = preheat(n1.url, image=third, backoffLimit=30)
    wait_until(
        lambda: (
            httpx.get(f"{n1.url}/images/preheat/{job['id']}").json()["nodes"]["node3"]["attempts"]
            >= 1
        ),
        "node3 to try",
    )
    cluster.kill_node(n3.name)
    wait_until(
        lambda: (
            httpx.get(f"{n1.url}/images/preheat/{job['id']}").json()["nodes"]["node3"]["state"]
            == "failed"
        ),
        "node3's part to fail once its lease lapsed",
        60,
    )
    reg.restart()
    done = finished(n2.url, job["id"], 180)
    assert (done["phase"], done["failedNodes"]) == ("Failed", ["node3"])
    assert done["nodes"]["node3"]["message"].startswith("the node left the cluster")
    assert done["nodes"]["node1"]["state"] == done["nodes"]["node2"]["state"] == "succeeded"
    # A named node that is down fails at once; the others are not held up.
    done = finished(n1.url, preheat(n1.url, image=first, nodes=["node1", "node3"])["id"])
    assert done["failedNodes"] == ["node3"] and done["succeeded"] == 1
    assert "not a live node" in done["nodes"]["node3"]["message"]


def test_pinned_images_outlive_the_lru_and_follow_a_node_that_joins_later(
    local_cluster_factory: ClusterFactory,
    registry_for: Callable[[LocalCluster], Registry],
    tmp_path: Path,
) -> None:
    # A store of 5 MB: two images of 3 MB do not fit.
    cluster = local_cluster_factory(3, "--image-budget-mb", "5")
    n1, _, n3 = cluster.nodes
    reg = registry_for(cluster)
    kept, other, newest = (image(tmp_path, reg, n, 3 << 20) for n in ("kept", "other", "newest"))
    cluster.stop_node(n3.name)  # it joins later
    wait_until(lambda: n3.name not in nodes_state(n1.url), "node3 to be gone")

    resp = httpx.put(f"{n1.url}/images/cache/base", json={"image": kept})
    assert resp.status_code == 201, resp.text
    assert resp.json()["desired"] == 2
    entry = wait_until(
        lambda: (e := httpx.get(f"{n1.url}/images/cache/base").json())["ready"] and e,
        "the image pinned on node1 and node2",
        120,
    )
    assert {n: p["state"] for n, p in entry["nodes"].items()} == {
        "node1": "pinned",
        "node2": "pinned",
    }
    assert httpx.get(f"{n1.url}/images/cache").json()["entries"][0]["name"] == "base"
    assert httpx.put(f"{n1.url}/images/cache/Base", json={"image": kept}).status_code == 400

    # Two more images through the small store: the older unpinned one is evicted, the
    # pinned one (older still) stays.
    for ref in (other, newest):
        assert finished(n1.url, preheat(n1.url, image=ref)["id"])["phase"] == "Succeeded"
    wait_until(
        lambda: holds(n1.url, "node1", newest) and not holds(n1.url, "node1", other),
        "the unpinned image to be evicted",
    )
    assert holds(n1.url, "node1", kept)
    assert nodes_state(n1.url)["node1"]["pins"]["base"]["state"] == "pinned"

    # The node that joins now pulls and pins it.
    cluster.start_node(n3.name)
    entry = wait_until(
        lambda: (
            (e := httpx.get(f"{n1.url}/images/cache/base").json())["desired"] == 3
            and e["ready"]
            and e
        ),
        "node3 to pin the image",
        120,
    )
    assert entry["nodes"]["node3"]["state"] == "pinned"
    wait_until(lambda: holds(n1.url, "node3", kept), "node3 to hold the image")

    # Removed: every node unpins it, and the store shrinks back to its budget.
    assert httpx.delete(f"{n3.url}/images/cache/base").status_code == 204
    assert httpx.get(f"{n1.url}/images/cache/base").status_code == 404
    wait_until(lambda: not holds(n1.url, "node1", kept), "the unpinned image to go")
    assert holds(n1.url, "node1", newest)


def test_a_hot_functions_next_node_gets_its_code_before_calls_are_routed_there(
    local_cluster_factory: ClusterFactory,
) -> None:
    cluster = local_cluster_factory(3)
    n1 = cluster.nodes[0]
    body = {
        "FunctionName": "slow",
        "Runtime": "python3.11",
        "Handler": "handler.handler",
        "Role": "arn:aws:iam::000000000000:role/x",
        "Timeout": 60,
        "Code": {"ZipFile": base64.b64encode(make_zip({"handler.py": SLEEPER})).decode()},
    }
    created = httpx.post(f"{n1.url}{API}", json=body, timeout=120)
    assert created.status_code == 201, created.text
    sha = base64.b64decode(created.json()["CodeSha256"]).hex()
    limit = httpx.put(
        f"{n1.url}/2017-10-31/functions/slow/concurrency",
        json={"ReservedConcurrentExecutions": 3},  # one call at a time on each node
    )
    assert limit.status_code == 200
    url = {node.name: node.url for node in cluster.nodes}
    for node_url in url.values():
        wait_until(
            lambda u=node_url: httpx.get(f"{u}{API}/slow").json().get("Concurrency"),
            "the limit everywhere",
        )

    def holders_of_the_bundle() -> list[str] | None:
        held = sorted(n for n, st in nodes_state(n1.url).items() if sha in st["code"])
        return held if len(held) == 2 else None

    holders = wait_until(holders_of_the_bundle, "the bundle on two nodes")
    (cold,) = set(url) - set(holders)

    calls: list[httpx.Response] = []

    def call(node: str, **headers: str) -> None:
        calls.append(
            httpx.post(
                f"{url[node]}{API}/slow/invocations",
                json={"sleep": 15},
                headers=headers,
                timeout=120,
            )
        )

    threads = [threading.Thread(target=call, args=(h,), kwargs=FORWARDED) for h in holders]
    for t in threads:
        t.start()

    def busy(node: str) -> bool:
        return bool(nodes_state(n1.url)[node]["functions"].get("slow", {}).get("busy"))

    wait_until(lambda: all(busy(h) for h in holders), "both holders to run a call")

    # Both holders are at their share: the next call would go to the third node, which
    # is asked to fetch the code first -- and has it before any call reaches it.
    def fetched() -> dict[str, Any] | None:
        st = nodes_state(n1.url)[cold]
        return st if sha in st["code"] else None

    state = wait_until(fetched, f"{cold} to fetch the bundle ahead of traffic", 30)
    assert "slow" not in state["functions"], "the node ran the function before prewarm"
    resp = httpx.post(f"{n1.url}{API}/slow/invocations", json={"sleep": 0}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-warmstart-node"] == cold
    for t in threads:
        t.join(60)
    assert [c.status_code for c in calls] == [200, 200]
