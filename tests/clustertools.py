"""Clusters on this machine for tests: etcd and N ``warmstart serve --cluster`` nodes in
network namespaces (:class:`warmstart.cluster.local.LocalCluster`).

``local_cluster_factory`` (registered in conftest) starts clusters, each in a directory
of its own under the session's temporary directory (so its id, hence its namespace and
interface names, is unique) on a free /24 of 10.77.0.0/16 (picked under a machine-wide
lock: two test sessions at once get different ones), and takes every one down after the
test, failed or not::

    def test_something(local_cluster_factory):
        cluster = local_cluster_factory(2, "--no-zygotes", node_args={"node1": ("--label", "a=b")})
        node1, node2 = cluster.nodes
        httpx.get(f"{node1.url}/healthz")
        cluster.kill_node(node1.name); cluster.start_node(node1.name)

Tests using it skip (with the reason) without root, iproute2, nsenter or etcd;
``needs_local_cluster`` marks tests that drive a LocalCluster themselves.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from warmstart.cluster.local import LocalCluster, LocalClusterError, missing_prerequisites


def require(available: object, reason: str) -> None:
    """conftest's ``require`` (imported when called: conftest imports this module)."""
    from tests.conftest import require as conftest_require

    conftest_require(available, reason)

ClusterFactory = Callable[..., LocalCluster]
_MISSING = missing_prerequisites()
SKIP_REASON = f"local cluster: {_MISSING} (CI installs etcd-server and iproute2)"
# For tests that drive a LocalCluster themselves rather than through the factory.
# conftest's ``needs`` mark (skip, or fail in strict mode), spelled out: conftest imports
# this module, so its helper cannot be imported here.
needs_local_cluster = pytest.mark.needs(_MISSING is None, reason=SKIP_REASON)


@pytest.fixture
def local_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    require(_MISSING is None, SKIP_REASON)
    started: list[LocalCluster] = []

    def factory(
        nodes: int = 2,
        *serve_args: str,
        timeout: float = 120.0,
        node_args: dict[str, tuple[str, ...]] | None = None,
    ) -> LocalCluster:
        cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
        started.append(cluster)
        cluster.up(
            nodes, subnet=None, serve_args=serve_args, timeout=timeout, node_args=node_args
        )
        return cluster

    yield factory
    failures = []
    for cluster in started:
        try:
            cluster.down()
        except LocalClusterError as exc:
            failures.append(f"{cluster.dir}: {exc}")
    if failures:
        pytest.fail("taking a local cluster down failed: " + "; ".join(failures))


def leftovers(cluster_dir: Path, cluster_id: str) -> list[str]:
    """What a cluster that was taken down left on this machine: network namespaces and
    interfaces named after its id, live processes naming its directory, mounts under it."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found += [
        f"netns {line.split()[0]}" for line in netns.stdout.splitlines() if cluster_id in line
    ]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    found += [f"link {line.split()[0]}" for line in links.stdout.splitlines() if cluster_id in line]
    # pgrep -f matches command lines; a zombie has none, so only live processes count.
    procs = subprocess.run(["pgrep", "-af", str(cluster_dir)], capture_output=True, text=True)
    found += [f"process {line}" for line in procs.stdout.splitlines()]
    with open("/proc/self/mountinfo") as f:
        found += [
            f"mount {line.split()[4]}"
            for line in f
            if line.split()[4].startswith(str(cluster_dir)) or cluster_id in line.split()[4]
        ]
    return found
