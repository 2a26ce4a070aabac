"""``warmstart cluster ...``: a cluster on this machine (up, down, status) and the live
nodes of any cluster (nodes).

``up``/``down``/``status`` drive :class:`warmstart.cluster.local.LocalCluster` (etcd and
N nodes in network namespaces, as root); ``nodes`` asks one node's API for
``GET /cluster/nodes`` and prints it as ``warmstart ls`` prints functions: a table on a
terminal, tab-separated lines with a header (every value whole) when piped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from warmstart.errors import WarmstartError

HELP = "a cluster on this machine (up, down, status) and the live nodes of a cluster"


class CommandError(WarmstartError):
    """A ``cluster`` command failed on the user's input or a node's answer."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """``cluster``'s subcommands; returns ``cluster nodes``' parser (the caller gives it
    the usual ``--endpoint``)."""
    from warmstart.cluster import local

    c = sub.add_parser(
        "cluster",
        help=HELP,
        description="Try cluster mode on one machine: 'up' starts etcd and N nodes, each in "
        "a network namespace of its own with its own address behind a bridge (needs root, "
        "iproute2 and Debian's etcd-server); 'down' stops them and removes what 'up' made. "
        "'nodes' lists the live nodes of any cluster, asking one of them.",
    )
    csub = c.add_subparsers(dest="cluster_command", required=True, metavar="CLUSTERCOMMAND")
    up = csub.add_parser(
        "up",
        help="start etcd and N nodes on this machine (as root)",
        description="Start etcd on the bridge's address (the subnet's .1) and N nodes "
        f"('warmstart serve --cluster ...'), node i in network namespace ws-ID-node<i> at "
        f"the subnet's .{local.FIRST_NODE_HOST}+i, port {local.NODE_PORT}. Data and logs "
        "go under --dir; 'warmstart cluster down' stops it all. Arguments after '--' go "
        "to every node's 'warmstart serve', e.g. '-- --no-zygotes'.",
    )
    up.add_argument(
        "--nodes", type=int, default=3, metavar="N", help="how many nodes (default %(default)s)"
    )
    up.add_argument(
        "--subnet",
        default=local.DEFAULT_SUBNET,
        metavar="CIDR",
        help="the IPv4 subnet for the bridge and the nodes; one no route of this host uses "
        "(default %(default)s)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long etcd and each node may take to answer (default %(default)s)",
    )
    up.add_argument(
        "serve_args",
        nargs="*",
        metavar="-- SERVE_ARG",
        help="options for every node's 'warmstart serve', after '--' (default: none)",
    )
    down = csub.add_parser(
        "down",
        help="stop the local cluster and remove its namespaces, veths and bridge",
        description="Stop the nodes (SIGTERM, then SIGKILL), then etcd; delete the network "
        "namespaces, veths and the bridge. Safe to repeat, and after a crash.",
    )
    down.add_argument(
        "--purge",
        action="store_true",
        help="also delete the nodes' data, etcd's data, the logs and the state file (off)",
    )
    down.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a process may take to stop before SIGKILL (default %(default)s)",
    )
    status = csub.add_parser(
        "status",
        help="what of the local cluster runs, and whether it answers",
        description="etcd and each node: URL, pid, whether it answers its health check. "
        "Exit status 0 when everything runs and answers, 1 otherwise.",
    )
    for sp in (up, down, status):
        sp.add_argument(
            "--dir",
            type=Path,
            default=local.DEFAULT_DIR,
            help="where the cluster's state, data and logs live, relative to the working "
            "directory (default ./%(default)s)",
        )
    nodes: argparse.ArgumentParser = csub.add_parser(
        "nodes",
        help="list a cluster's live nodes and their state (GET /cluster/nodes)",
        description="Ask one node (--endpoint) for the cluster's live nodes: capacity, "
        "latency-sensitive usage, reclaimed capacity, instances, zygotes, functions. A "
        "table on a terminal, tab-separated lines (with a header) otherwise; '*' marks the "
        "node that answered.",
    )
    return nodes


def run(args: argparse.Namespace) -> int:
    command = args.cluster_command
    if command == "nodes":
        return _nodes(args)
    from warmstart.cluster.local import LocalCluster

    cluster = LocalCluster(args.dir, on_progress=_progress)
    if command == "up":
        return _up(cluster, args)
    if command == "down":
        if cluster.down(purge=args.purge, timeout=args.timeout):
            print(f"cluster in {args.dir} stopped" + (" and deleted" if args.purge else ""))
        else:
            print(f"no cluster in {args.dir}")
        return 0
    return _status(cluster, args)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _up(cluster: Any, args: argparse.Namespace) -> int:
    plan = cluster.up(args.nodes, args.subnet, args.serve_args, timeout=args.timeout)
    first = plan.nodes[0].url
    d = args.dir
    width = max(len(n.name) for n in plan.nodes)
    lines = [
        f"cluster up in {d}: etcd and {len(plan.nodes)} node(s) on {plan.subnet}",
        f"  {'etcd':<{width}}  {plan.etcd_url:<24} log {plan.etcd_log}",
        *(
            f"  {n.name:<{width}}  {n.url:<24} log {n.log}  (namespace {n.netns})"
            for n in plan.nodes
        ),
        "",
        "Every node answers every API call. Point the CLI at one:",
        f"  export WARMSTART_ENDPOINT={first}",
        "  warmstart cluster nodes",
        "AWS CLI and boto3 (dummy credentials, as for one node):",
        f"  aws lambda list-functions --endpoint-url {first}",
        f'  boto3.client("lambda", endpoint_url="{first}")',
        "A shell that sees the network as the nodes do:",
        f"  nsenter --net=/run/netns/{plan.nodes[0].netns}",
        f"Stop it: warmstart cluster down --dir {d}   (--purge also deletes data and logs)",
    ]
    print("\n".join(lines))
    return 0


def _status(cluster: Any, args: argparse.Namespace) -> int:
    st = cluster.status()
    if st.subnet is None:
        print(f"no cluster in {args.dir}", file=sys.stderr)
        return 1
    header = ("component", "url", "pid", "state", "network namespace", "log")
    rows = [
        (
            c.role,
            c.url,
            "-" if c.pid is None else str(c.pid),
            "stopped" if c.pid is None else "ok" if c.healthy else "not answering",
            c.netns or "(host)",
            str(c.log),
        )
        for c in st.components
    ]
    _print_table(header, rows, title=f"cluster in {args.dir} ({st.subnet})")
    return 0 if all(c.pid is not None and c.healthy for c in st.components) else 1


# -- cluster nodes ---------------------------------------------------------------------------
NODES_HEADER = (
    "name",
    "url",
    "cpus",
    "memory_bytes",
    "ls_cpu",
    "ls_memory_bytes",
    "reclaimed_cpu_cores",
    "reclaimed_memory_bytes",
    "idle",
    "busy",
    "zygotes",
    "functions",
    "started",
    "labels",
)
NODES_TABLE_HEADER = (
    "node",
    "url",
    "CPUs",
    "memory",
    "idle/busy",
    "zygotes",
    "functions",
    "up",
    "labels",
)
NODES_CAPTION = (
    "CPUs, memory: capacity / latency-sensitive use / reclaimed for best-effort work; "
    "idle/busy: instances; * the node that answered"
)


def _nodes(args: argparse.Namespace) -> int:
    import httpx

    with httpx.Client(base_url=args.endpoint, timeout=30) as client:
        resp = client.get("/cluster/nodes")
    if resp.status_code == 404:
        raise CommandError(
            f"{args.endpoint} is not a cluster node (GET /cluster/nodes: 404); "
            "nodes join a cluster with 'warmstart serve --cluster ETCD_URL'"
        )
    if resp.status_code != 200:
        raise CommandError(f"GET /cluster/nodes: {resp.status_code} {resp.text.strip()[:200]}")
    try:
        payload = resp.json()
    except ValueError as exc:
        raise CommandError(f"GET /cluster/nodes did not answer JSON: {exc}") from exc
    render_nodes(payload, tty=sys.stdout.isatty())
    return 0


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _num(value: Any) -> str:
    return "" if value is None else str(value)


def human_bytes(n: Any) -> str:
    """Bytes, short: 4.0G, 512M, 12K, 0."""
    if not isinstance(n, int | float):
        return "?"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.1f}G"
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.0f}{unit}"
    return f"{int(n)}"


def human_cpu(x: Any) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if isinstance(x, int | float) else "?"


def human_uptime(started: Any, now: datetime) -> str:
    """How long ago ISO 8601 ``started`` was: 42s, 3m12s, 2h05m, 4d03h ('?' if unknown)."""
    try:
        since = datetime.fromisoformat(str(started))
    except ValueError:
        return "?"
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    s = max(0, int((now - since).total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _labels(node: dict[str, Any]) -> str:
    labels = node.get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def nodes_rows(
    payload: dict[str, Any], human: bool, now: datetime | None = None
) -> list[tuple[str, ...]]:
    """One row per node of a ``GET /cluster/nodes`` answer: whole values (``human``
    False: bytes, CPUs and times as sent) or short ones for a terminal."""
    now = now or datetime.now(UTC)
    rows: list[tuple[str, ...]] = []
    me = payload.get("self")
    for node in payload.get("nodes", []):
        s = node.get("state") or {}
        parts = ("capacity", "cpus"), ("ls_usage", "cpu"), ("reclaimed", "cpu_cores")
        cpus = [_get(s, *path) for path in parts]
        memory = [_get(s, key, "memory_bytes") for key in ("capacity", "ls_usage", "reclaimed")]
        idle, busy = _get(s, "instances", "idle"), _get(s, "instances", "busy")
        tail = (_num(s.get("zygotes")), _num(s.get("functions")))
        if human:
            name = str(node.get("name", ""))
            rows.append(
                (
                    f"{name} *" if name == me else name,
                    str(node.get("url", "")),
                    "/".join(human_cpu(c) for c in cpus),
                    "/".join(human_bytes(m) for m in memory),
                    f"{_num(idle)}/{_num(busy)}",
                    *tail,
                    human_uptime(node.get("started"), now),
                    _labels(node),
                )
            )
        else:
            rows.append(
                (
                    str(node.get("name", "")),
                    str(node.get("url", "")),
                    *(_num(x) for x in (cpus[0], memory[0], cpus[1], memory[1])),
                    *(_num(x) for x in (cpus[2], memory[2], idle, busy)),
                    *tail,
                    str(node.get("started", "")),
                    _labels(node),
                )
            )
    return rows


def render_nodes(
    payload: dict[str, Any], tty: bool, console: Any = None, now: datetime | None = None
) -> None:
    """Print a ``GET /cluster/nodes`` answer: a rich table (``tty``) or tab-separated
    lines.  An unreachable etcd is said on stderr either way (the list may be stale)."""
    if payload.get("etcd") != "ok":
        print(
            f"warning: {payload.get('self')} cannot reach etcd ({payload.get('etcd')}): "
            "this list may be out of date",
            file=sys.stderr,
        )
    if not tty:
        _print_table(NODES_HEADER, nodes_rows(payload, human=False), tty=False)
        return
    n = len(payload.get("nodes", []))
    _print_table(
        NODES_TABLE_HEADER,
        nodes_rows(payload, human=True, now=now),
        title=f"{n} live node(s), as {payload.get('self')} sees them (etcd {payload.get('etcd')})",
        caption=NODES_CAPTION,
        tty=True,
        console=console,
    )


def fit_columns(
    header: Sequence[str], rows: Sequence[Sequence[str]], width: int, keep: int
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Leave out the last columns (but not the first ``keep``) until a boxed table of
    the rest is at most ``width`` wide: whole values in fewer columns read better than
    every column squeezed."""
    n = len(header)
    while n > keep:
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(n)]
        if sum(widths) + 3 * n + 1 <= width:
            break
        n -= 1
    return tuple(header[:n]), [tuple(r[:n]) for r in rows]


def _print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    caption: str | None = None,
    tty: bool | None = None,
    console: Any = None,
    keep: int = 2,
) -> None:
    """Tab-separated lines with a header when piped (every column whole, one line per
    row, for cut and awk); on a terminal a rich table of as many columns as fit whole (at
    least ``keep``), the caption naming those left out."""
    if not (sys.stdout.isatty() if tty is None else tty):
        for row in (header, *rows):
            print("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    shown, rows = fit_columns(header, rows, console.width, keep)
    if len(shown) < len(header):
        left_out = f"{', '.join(header[len(shown) :])}: on a wider terminal, or piped"
        caption = f"{caption}; {left_out}" if caption else left_out
    table = Table(title=title, caption=caption)
    for column in shown:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
