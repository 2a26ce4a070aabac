"""``warmstart top``: a live view of a node (LS and BE usage, reclaimed capacity,
instances by state, queue depth, evictions), refreshed from ``GET /node``."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f} GiB"


def _cores(n: float | None) -> str:
    return "-" if n is None else f"{n:.2f}"


def render(node: dict[str, Any], endpoint: str) -> Panel:
    cap = node.get("capacity") or {}
    use = node.get("usage") or {}
    rec = node.get("reclaimed") or {}
    cpus = cap.get("cpus") or 1.0
    mem = cap.get("memory_bytes") or 1

    usage = Table("", "CPU (cores)", "", "memory", "", box=None, expand=True)
    for label, c, m in (
        ("latency-sensitive", use.get("ls_cpu"), use.get("ls_memory")),
        ("best-effort", use.get("be_cpu"), use.get("be_memory")),
        ("system", use.get("system_cpu"), use.get("system_memory")),
        ("node", use.get("node_cpu"), use.get("node_memory")),
    ):
        usage.add_row(
            label,
            _cores(c),
            ProgressBar(total=cpus, completed=c or 0, width=20),
            _gib(m),
            ProgressBar(total=mem, completed=m or 0, width=20),
        )
    usage.add_row("capacity", _cores(cap.get("cpus")), "", _gib(cap.get("memory_bytes")), "")

    qos = Table(box=None, show_header=False, expand=True)
    stale = " (stale: withdrawn)" if rec.get("stale") else ""
    qos.add_row("QoS loop", "on" if node.get("qos") else "off")
    qos.add_row(
        "reclaimed", f"{_cores(rec.get('cpu_cores'))} cores, {_gib(rec.get('memory_bytes'))}{stale}"
    )
    policy = node.get("be_cpu_policy")
    how = {"none": " (not enforced)", "quota": " (CFS quota)", "cpuset": " (cpuset)"}
    cpuset = f" cpus {node['be_cpuset']}" if node.get("be_cpuset") else ""
    qos.add_row(
        "BE CPU limit",
        f"{_cores(node.get('be_cpu_limit_cores'))} cores{how.get(str(policy), '')}{cpuset}",
    )
    qos.add_row(
        "BE running / slots",
        f"{node.get('best_effort_running', 0)} / {node.get('best_effort_slots', '-')}",
    )
    qos.add_row("queue depth", str(node.get("queue_depth", 0)))
    qos.add_row("evictions", str(node.get("evictions", 0)))

    states = node.get("instances") or {}
    inst = Table(*[s for s in states], box=None, expand=True, title="instances")
    inst.add_row(*[str(int(v)) for v in states.values()])

    title = f"warmstart top · {endpoint} · {time.strftime('%H:%M:%S')}"
    footer = f"functions {node.get('functions', 0)} · zygotes {node.get('zygotes', 0)} · isolation {node.get('isolation', '?')}"
    return Panel(Group(usage, "", qos, "", inst), title=title, subtitle=footer)


def run(client: Any, endpoint: str, interval: float, iterations: int | None = None) -> int:
    count = 0
    with Live(refresh_per_second=4, screen=False) as live:
        while iterations is None or count < iterations:
            resp = client.get("/node")
            resp.raise_for_status()
            live.update(render(resp.json(), endpoint))
            count += 1
            if iterations is None or count < iterations:
                time.sleep(interval)
    return 0
