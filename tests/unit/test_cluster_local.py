"""The local cluster without root: address planning, the subnet check, the state file,
``warmstart cluster`` argument parsing and the ``cluster nodes`` table."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from warmstart.cli import cluster as cluster_cli
from warmstart.cli import main as cli
from warmstart.cluster import local
from warmstart.cluster.local import (
    ClusterState,
    LocalCluster,
    LocalClusterError,
    Process,
    overlapping,
    plan,
)


# -- planning ----------------------------------------------------------------------------------
def test_a_plan_gives_the_bridge_dot_1_and_node_i_dot_10_plus_i(tmp_path: Path) -> None:
    p = plan(tmp_path / "c", "10.77.3.0/24", 3)
    assert p.dir == (tmp_path / "c").resolve()
    assert p.subnet == "10.77.3.0/24" and p.prefixlen == 24
    assert p.gateway == "10.77.3.1"
    assert p.etcd_url == "http://10.77.3.1:2379"
    assert p.etcd_peer_url == "http://10.77.3.1:2380"
    assert [n.name for n in p.nodes] == ["node1", "node2", "node3"]
    assert [n.address for n in p.nodes] == ["10.77.3.11", "10.77.3.12", "10.77.3.13"]
    assert [n.url for n in p.nodes] == [f"http://10.77.3.1{i}:8080" for i in (1, 2, 3)]
    assert p.nodes[1].data_dir == p.dir / "node2"
    assert p.nodes[1].log == p.dir / "node2.log"
    assert p.nodes[1].netns == f"ws-{p.id}-node2"
    assert p.bridge == f"wsbr{p.id}"
    # Interface names fit the kernel's 15 bytes, even for node 200.
    assert len(plan(tmp_path, "10.77.0.0/24", 200).nodes[-1].veth) <= 15
    assert len(p.bridge) <= 15


def test_the_id_follows_the_directory(tmp_path: Path) -> None:
    a = plan(tmp_path / "a", "10.77.0.0/24", 1)
    assert plan(tmp_path / "a", "10.77.9.0/24", 2).id == a.id
    assert plan(tmp_path / "b", "10.77.0.0/24", 1).id != a.id
    assert {n.veth for n in a.nodes}.isdisjoint(
        n.veth for n in plan(tmp_path / "b", "10.77.0.0/24", 1).nodes
    )


def test_a_subnet_given_by_any_of_its_addresses_is_its_network(tmp_path: Path) -> None:
    assert plan(tmp_path, "10.77.5.200/24", 1).subnet == "10.77.5.0/24"


@pytest.mark.parametrize(
    "subnet,nodes,message",
    [
        ("10.77.0.0/24", 0, "at least one node"),
        ("10.77.0.0/24", 245, "room for 244"),
        ("10.77.0.0/28", 5, "room for 4"),
        ("not-a-subnet", 1, "not an IPv4 network"),
        ("fd00::/64", 1, "not an IPv4 network"),
    ],
)
def test_impossible_plans_are_refused(
    tmp_path: Path, subnet: str, nodes: int, message: str
) -> None:
    with pytest.raises(LocalClusterError, match=message):
        plan(tmp_path, subnet, nodes)


def test_the_largest_cluster_that_fits() -> None:
    # .0 network, .1 bridge, .11-.254 nodes, .255 broadcast
    assert plan(Path("/x"), "10.77.0.0/24", 244).nodes[-1].address == "10.77.0.254"
    assert plan(Path("/x"), "10.77.0.0/28", 4).nodes[-1].address == "10.77.0.14"


def test_a_subnet_overlapping_a_route_is_in_use() -> None:
    used = [("192.0.2.0/24", "a route via eth0"), ("10.77.0.0/24", "a route via wsbr1")]
    assert overlapping("10.77.0.0/24", used) == ("10.77.0.0/24", "a route via wsbr1")
    assert overlapping("10.0.0.0/8", used) == ("10.77.0.0/24", "a route via wsbr1")
    assert overlapping("10.77.1.0/24", used) is None
    assert overlapping("10.77.1.0/24", [("10.77.1.7/32", "an address of eth1")]) is not None
    # A default route (0.0.0.0/0) covers everything and says nothing about use.
    assert overlapping("10.77.1.0/24", [("0.0.0.0/0", "a route via eth0")]) is None


# -- the state file ----------------------------------------------------------------------------
def _state(tmp_path: Path) -> ClusterState:
    p = plan(tmp_path / "c", "10.77.4.0/24", 2)
    return (
        ClusterState(
            p, "/usr/bin/python3", ("--no-zygotes",), node_args={"node2": ("--label", "a=b")}
        )
        .with_process("etcd", Process("etcd", 100, 5000, ("etcd", "--name", "x")))
        .with_process("node1", Process("node1", 101, 5001, ("nsenter", "--net=/run/netns/a")))
    )


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state = _state(tmp_path)
    path = tmp_path / "cluster.json"
    state.save(path)
    assert ClusterState.load(path) == state
    data = json.loads(path.read_text())
    assert data["subnet"] == "10.77.4.0/24"
    assert data["nodes"][0]["url"] == "http://10.77.4.11:8080"
    assert data["etcd"]["url"] == "http://10.77.4.1:2379"
    assert data["node_args"] == {"node2": ["--label", "a=b"]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_processes_are_replaced_and_forgotten_by_role(tmp_path: Path) -> None:
    state = _state(tmp_path)
    again = state.with_process("node1", Process("node1", 200, 6000, ()))
    assert again.process("node1") == Process("node1", 200, 6000, ())
    assert again.process("etcd") == state.process("etcd")
    assert state.with_process("node1", None).process("node1") is None
    assert state.process("node2") is None


def test_a_missing_state_file_is_no_cluster_and_a_bad_one_an_error(tmp_path: Path) -> None:
    assert ClusterState.load(tmp_path / "cluster.json") is None
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(LocalClusterError, match="not a cluster state file"):
        ClusterState.load(tmp_path / "cluster.json")
    (tmp_path / "cluster.json").write_text('{"version": 99}')
    with pytest.raises(LocalClusterError, match="version"):
        ClusterState.load(tmp_path / "cluster.json")


def test_without_a_cluster_down_and_status_say_so(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "none")
    assert c.down() is False
    assert c.status().subnet is None and not c.status().running
    with pytest.raises(LocalClusterError, match="no cluster"):
        c.kill_node("node1")


def test_a_recorded_process_that_ended_does_not_run(tmp_path: Path) -> None:
    # Our own pid, but another start time: the pid was reused, the process is gone.
    state = _state(tmp_path).with_process("node2", Process("node2", os.getpid(), 1, ()))
    (tmp_path / "c").mkdir()
    state.save(tmp_path / "c" / "cluster.json")
    c = LocalCluster(tmp_path / "c")
    status = {s.role: s for s in c.status().components}
    assert status["node2"].pid is None
    assert status["node2"].netns == c.plan.node("node2").netns
    with pytest.raises(LocalClusterError, match="no node 'node9'"):
        c.plan.node("node9")


@pytest.mark.parametrize("arg", ["--port", "--data-dir=/x", "--cluster"])
def test_up_refuses_serve_options_the_cluster_sets(tmp_path: Path, arg: str) -> None:
    with pytest.raises(LocalClusterError, match="the cluster sets"):
        LocalCluster(tmp_path / "c").up(1, serve_args=[arg, "1"])
    assert not (tmp_path / "c").exists()


# -- the CLI -----------------------------------------------------------------------------------
def _parse(*argv: str) -> Any:
    return cli._parser(argv[0]).parse_args(list(argv))


def test_cluster_up_defaults_and_serve_arguments_after_dashes() -> None:
    args = _parse("cluster", "up")
    assert (args.nodes, args.subnet, args.dir, args.serve_args) == (
        3,
        local.DEFAULT_SUBNET,
        Path("cluster"),
        [],
    )
    args = _parse(
        "cluster", "up", "--nodes", "2", "--subnet", "10.9.0.0/24", "--dir", "/tmp/c", "--",
        "--no-zygotes", "--max-concurrency", "4",
    )  # fmt: skip
    assert (args.nodes, args.subnet, args.dir) == (2, "10.9.0.0/24", Path("/tmp/c"))
    assert args.serve_args == ["--no-zygotes", "--max-concurrency", "4"]


def test_cluster_down_status_and_nodes_options(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parse("cluster", "down", "--purge", "--dir", "d")
    assert (args.cluster_command, args.purge, args.dir) == ("down", True, Path("d"))
    assert _parse("cluster", "down").purge is False
    assert _parse("cluster", "status").dir == Path("cluster")
    args = _parse("cluster", "nodes", "--endpoint", "http://10.77.0.11:8080")
    assert (args.cluster_command, args.endpoint) == ("nodes", "http://10.77.0.11:8080")
    assert _parse("cluster", "nodes").endpoint == cli.DEFAULT_ENDPOINT


def test_cluster_without_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "status", "--dir", str(tmp_path / "x")]) == 1
    assert "no cluster in" in capsys.readouterr().err
    assert cli.main(["cluster", "down", "--dir", str(tmp_path / "x")]) == 0
    assert "no cluster in" in capsys.readouterr().out


def test_cluster_up_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "up", "--nodes", "999", "--dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warmstart: 999 node(s) do not fit in 10.77.0.0/24")
    assert err.count("\n") == 1


# -- cluster nodes -----------------------------------------------------------------------------
SAMPLE: dict[str, Any] = {
    "self": "node1",
    "etcd": "ok",
    "nodes": [
        {
            "name": "node1",
            "url": "http://10.77.0.11:8080",
            "labels": {"zone": "a", "disk": "ssd"},
            "started": "2026-01-02T03:04:05Z",
            "state": {
                "capacity": {"cpus": 2, "memory_bytes": 4 << 30},
                "ls_usage": {"cpu": 0.25, "memory_bytes": 512 << 20},
                "reclaimed": {"cpu_cores": 1.5, "memory_bytes": 3 << 30},
                "instances": {"idle": 3, "busy": 1},
                "zygotes": 2,
                "functions": 5,
            },
        },
        {
            "name": "node2",
            "url": "http://10.77.0.12:8080",
            "labels": {},
            "started": "2026-01-02T03:04:06Z",
            "state": {
                "capacity": {"cpus": 2, "memory_bytes": 4 << 30},
                "ls_usage": {"cpu": 0, "memory_bytes": 0},
                "reclaimed": {"cpu_cores": 2, "memory_bytes": 4 << 30},
                "instances": {"idle": 0, "busy": 0},
                "zygotes": 0,
                "functions": 5,
            },
        },
    ],
}


def test_cluster_nodes_piped_is_whole_values_tab_separated(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster_cli.render_nodes(SAMPLE, tty=False)
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert lines[0] == list(cluster_cli.NODES_HEADER)
    assert len(lines) == 3 and all(len(row) == len(lines[0]) for row in lines)
    row = dict(zip(lines[0], lines[1], strict=True))
    assert row["name"] == "node1" and row["url"] == "http://10.77.0.11:8080"
    assert row["memory_bytes"] == str(4 << 30)
    assert (row["ls_cpu"], row["reclaimed_cpu_cores"]) == ("0.25", "1.5")
    assert (row["idle"], row["busy"], row["zygotes"], row["functions"]) == ("3", "1", "2", "5")
    assert row["labels"] == "disk=ssd,zone=a"
    assert row["started"] == "2026-01-02T03:04:05Z"
    assert err == ""


def test_cluster_nodes_on_a_terminal_is_a_table() -> None:
    buf = io.StringIO()
    from rich.console import Console

    now = datetime(2026, 1, 2, 3, 7, 17, tzinfo=UTC)
    cluster_cli.render_nodes(SAMPLE, tty=True, console=Console(file=buf, width=250), now=now)
    text = buf.getvalue()
    assert "node1 *" in text and "node2 *" not in text
    assert "http://10.77.0.11:8080" in text
    assert "2/0.25/1.5" in text  # CPUs: capacity / LS use / reclaimed
    assert "4.0G/512M/3.0G" in text  # memory, likewise
    assert "3/1" in text  # instances idle/busy
    assert "3m12s" in text and "3m11s" in text  # up since
    assert "disk=ssd,zone=a" in text
    assert "2 live node(s), as node1 sees them (etcd ok)" in text


def test_on_a_narrow_terminal_names_urls_and_resources_stay_whole() -> None:
    buf = io.StringIO()
    from rich.console import Console

    cluster_cli.render_nodes(SAMPLE, tty=True, console=Console(file=buf, width=80))
    text = buf.getvalue()
    assert "http://10.77.0.11:8080" in text and "http://10.77.0.12:8080" in text
    assert "2/0.25/1.5" in text and "4.0G/512M/3.0G" in text and "3/1" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    # What did not fit is named, not squeezed.
    assert "disk=ssd" not in text
    assert "zygotes, functions, up, labels: on a wider terminal, or piped" in " ".join(text.split())


def test_fit_columns_leaves_out_the_last_columns_first() -> None:
    header = ("a", "b", "c")
    rows = [("1234", "12345678", "123")]
    assert cluster_cli.fit_columns(header, rows, 100, keep=1) == (header, rows)
    # Boxed: each column takes its width + 3, and one more for the last border.
    assert cluster_cli.fit_columns(header, rows, 4 + 8 + 3 + 9 + 1, keep=1)[0] == header
    assert cluster_cli.fit_columns(header, rows, 4 + 8 + 3 + 9, keep=1)[0] == ("a", "b")
    assert cluster_cli.fit_columns(header, rows, 5, keep=2) == (("a", "b"), [("1234", "12345678")])


def test_cluster_nodes_warns_when_etcd_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    cluster_cli.render_nodes({**SAMPLE, "etcd": "unreachable"}, tty=False)
    assert "node1 cannot reach etcd" in capsys.readouterr().err


def test_cluster_nodes_tolerates_missing_state_fields(capsys: pytest.CaptureFixture[str]) -> None:
    cluster_cli.render_nodes({"self": "a", "etcd": "ok", "nodes": [{"name": "a"}]}, tty=False)
    assert capsys.readouterr().out.splitlines()[1].startswith("a\t")
    row = cluster_cli.nodes_rows({"nodes": [{"name": "a"}]}, human=True)[0]
    assert row[2:5] == ("?/?/?", "?/?/?", "/")


@pytest.mark.parametrize(
    "status,body,expected",
    [
        (200, SAMPLE, None),
        (404, {"message": "not found"}, "is not a cluster node"),
        (500, {"message": "boom"}, "GET /cluster/nodes: 500"),
    ],
)
def test_cluster_nodes_asks_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: int,
    body: Any,
    expected: str | None,
) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(status, json=body)

    real = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw)
    )
    rc = cli.main(["cluster", "nodes", "--endpoint", "http://10.77.0.12:8080"])
    out, err = capsys.readouterr()
    assert seen == ["http://10.77.0.12:8080/cluster/nodes"]
    if expected is None:
        assert rc == 0 and out.splitlines()[1].startswith("node1\t")
    else:
        assert rc == 2 and expected in err


@pytest.mark.parametrize(
    "n,text",
    [(0, "0"), (1023, "1023"), (1536, "2K"), (512 << 20, "512M"), (3 << 29, "1.5G"), (None, "?")],
)
def test_human_bytes(n: Any, text: str) -> None:
    assert cluster_cli.human_bytes(n) == text


def test_human_cpu() -> None:
    assert [cluster_cli.human_cpu(x) for x in (2, 0, 0.25, 1.5, 10, None)] == [
        "2",
        "0",
        "0.25",
        "1.5",
        "10",
        "?",
    ]


@pytest.mark.parametrize(
    "started,text",
    [
        ("2026-01-02T03:04:05Z", "42s"),
        ("2026-01-02T03:04:05+00:00", "42s"),
        ("2026-01-02T03:04:05", "42s"),  # no zone: UTC
        ("2026-01-02T02:00:00Z", "1h04m"),
        ("2025-12-30T01:00:00Z", "3d02h"),
        ("2026-01-02T03:05:00Z", "0s"),  # a clock ahead of ours
        ("yesterday", "?"),
        (None, "?"),
    ],
)
def test_human_uptime(started: Any, text: str) -> None:
    now = datetime(2026, 1, 2, 3, 4, 47, tzinfo=UTC)
    assert cluster_cli.human_uptime(started, now) == text
