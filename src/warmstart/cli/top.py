"""``warmstart top``: the node at a glance (LS and BE usage, reclaimed capacity, instances
by state, queue depth, evictions), refreshed from ``GET /node``.

On a terminal it is a live view that ``q`` (or Ctrl-C) quits; piped or redirected, it
prints plain-text snapshots, one per interval, so ``warmstart top --iterations 1 | grep``
and logging it to a file both work.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

QUIT_KEYS = (b"q", b"Q")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f} GiB"


def _cores(n: float | None) -> str:
    return "-" if n is None else f"{n:.2f}"


@dataclass(frozen=True)
class Snapshot:
    """What one refresh shows, in the order both views show it."""

    title: str
    usage: list[tuple[str, float | None, float | None]]  # (who, CPU cores, memory bytes)
    cpus: float
    memory: float
    capacity: tuple[float | None, float | None]
    qos: list[tuple[str, str]]
    instances: dict[str, int]
    footer: str

    @classmethod
    def of(cls, node: dict[str, Any], endpoint: str) -> Snapshot:
        cap = node.get("capacity") or {}
        use = node.get("usage") or {}
        rec = node.get("reclaimed") or {}
        stale = " (stale: withdrawn)" if rec.get("stale") else ""
        policy = node.get("be_cpu_policy")
        how = {"none": " (not enforced)", "quota": " (CFS quota)", "cpuset": " (cpuset)"}
        cpuset = f" cpus {node['be_cpuset']}" if node.get("be_cpuset") else ""
        return cls(
            title=f"warmstart top · {endpoint} · {time.strftime('%H:%M:%S')}",
            usage=[
                ("latency-sensitive", use.get("ls_cpu"), use.get("ls_memory")),
                ("best-effort", use.get("be_cpu"), use.get("be_memory")),
                ("system", use.get("system_cpu"), use.get("system_memory")),
                ("node", use.get("node_cpu"), use.get("node_memory")),
            ],
            cpus=cap.get("cpus") or 1.0,
            memory=cap.get("memory_bytes") or 1,
            capacity=(cap.get("cpus"), cap.get("memory_bytes")),
            qos=[
                ("QoS loop", "on" if node.get("qos") else "off"),
                (
                    "reclaimed",
                    f"{_cores(rec.get('cpu_cores'))} cores, {_gib(rec.get('memory_bytes'))}{stale}",
                ),
                (
                    "BE CPU limit",
                    f"{_cores(node.get('be_cpu_limit_cores'))} cores"
                    f"{how.get(str(policy), '')}{cpuset}",
                ),
                (
                    "BE running / slots",
                    f"{node.get('best_effort_running', 0)} / {node.get('best_effort_slots', '-')}",
                ),
                ("queue depth", str(node.get("queue_depth", 0))),
                ("evictions", str(node.get("evictions", 0))),
            ],
            instances={k: int(v) for k, v in (node.get("instances") or {}).items()},
            footer=f"functions {node.get('functions', 0)} · zygotes {node.get('zygotes', 0)}"
            f" · isolation {node.get('isolation', '?')}",
        )

    def text(self) -> str:
        """The plain view: aligned lines, no colours or bars."""
        lines = [self.title, f"{'':18} {'CPU (cores)':>11}  {'memory':>10}"]
        for label, cpu, mem in [*self.usage, ("capacity", *self.capacity)]:
            lines.append(f"{label:18} {_cores(cpu):>11}  {_gib(mem):>10}")
        lines += [f"{label + ':':19} {value}" for label, value in self.qos]
        states = ", ".join(f"{k} {v}" for k, v in self.instances.items()) or "none"
        lines += [f"{'instances:':19} {states}", self.footer]
        return "\n".join(lines)


def render(node: dict[str, Any], endpoint: str) -> Panel:
    """The live view of one ``GET /node`` answer."""
    snap = Snapshot.of(node, endpoint)
    usage = Table("", "CPU (cores)", "", "memory", "", box=None, expand=True)
    for label, c, m in snap.usage:
        usage.add_row(
            label,
            _cores(c),
            ProgressBar(total=snap.cpus, completed=c or 0, width=20),
            _gib(m),
            ProgressBar(total=snap.memory, completed=m or 0, width=20),
        )
    usage.add_row("capacity", _cores(snap.capacity[0]), "", _gib(snap.capacity[1]), "")
    qos = Table(box=None, show_header=False, expand=True)
    for label, value in snap.qos:
        qos.add_row(label, value)
    inst = Table(*snap.instances, box=None, expand=True, title="instances")
    inst.add_row(*[str(v) for v in snap.instances.values()])
    return Panel(
        Group(usage, "", qos, "", inst),
        title=snap.title,
        subtitle=f"{snap.footer} · q to quit",
    )


@contextlib.contextmanager
def _keypresses() -> Iterator[Callable[[float], bool]]:
    """A ``wait(seconds) -> quit?`` that returns early, True, when q is pressed.

    The terminal is put in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    raises KeyboardInterrupt) and restored on the way out, whatever happens.  Without a
    terminal on stdin, waiting is plain sleeping."""
    if not sys.stdin.isatty():

        def sleep(seconds: float) -> bool:
            time.sleep(seconds)
            return False

        yield sleep
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and os.read(fd, 16)[:1] in QUIT_KEYS:
                return True
        return False

    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(
    fetch: Callable[[], dict[str, Any]],
    endpoint: str,
    interval: float,
    iterations: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Show ``fetch()`` (the node's status) every ``interval`` seconds, ``iterations``
    times (None: until q, Ctrl-C or a closed pipe)."""
    out = out or sys.stdout
    if not out.isatty():
        return _print_snapshots(fetch, endpoint, interval, iterations, out)
    count = 0
    try:
        with _keypresses() as wait, Live(refresh_per_second=4, screen=False) as live:
            while iterations is None or count < iterations:
                live.update(render(fetch(), endpoint))
                count += 1
                if (iterations is None or count < iterations) and wait(interval):
                    break
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a live view is left, like q
    return 0


def _print_snapshots(
    fetch: Callable[[], dict[str, Any]],
    endpoint: str,
    interval: float,
    iterations: int | None,
    out: TextIO,
) -> int:
    count = 0
    while iterations is None or count < iterations:
        if count:
            out.write("\n")
        out.write(Snapshot.of(fetch(), endpoint).text() + "\n")
        out.flush()
        count += 1
        if iterations is None or count < iterations:
            time.sleep(interval)
    return 0
