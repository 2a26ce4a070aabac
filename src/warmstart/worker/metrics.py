"""Prometheus metrics for one worker (its own registry: no module-level state).

Per-invocation counters and histograms are updated on the invocation path.  The node's
state is read when /metrics is scraped, from a snapshot the worker builds out of what it
holds in memory (no /proc or cgroupfs reads on the event loop: memory figures that need
them -- zygotes' PSS -- are the last reading of a background measurement).  A snapshot
value whose name ends in ``_total`` only grows and is exposed as a counter; the others
are gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class _NodeCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Without this the registry would collect at registration time, before the worker
        # that owns the snapshot is built; the node's metric names are unique anyway.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        inst = GaugeMetricFamily("warmstart_instances", "Instances by state", labels=["state"])
        for state, n in snap["instances"].items():
            inst.add_metric([state], n)
        yield inst
        states = GaugeMetricFamily(
            "warmstart_function_states", "Functions by State on this node", labels=["state"]
        )
        for state, n in snap.get("function_states", {}).items():
            states.add_metric([state], n)
        yield states
        mem = GaugeMetricFamily("warmstart_memory_bytes", "Memory by kind", labels=["kind"])
        for kind, n in snap["memory"].items():
            mem.add_metric([kind], n)
        yield mem
        for name, value in snap["other"].items():
            if name.endswith("_total"):
                base = name.removesuffix("_total")
                yield CounterMetricFamily(f"warmstart_{base}", base.replace("_", " "), value=value)
            else:
                yield GaugeMetricFamily(f"warmstart_{name}", name.replace("_", " "), value=value)


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, dict[str, float]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter(
            "warmstart_invocations",
            "Invocations by function, version and outcome",
            ["function", "version", "outcome"],
            registry=self.registry,
        )
        self.starts = Counter(
            "warmstart_starts",
            "Instance starts by function, version and kind (warm, cold, fork)",
            ["function", "version", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "warmstart_invocation_duration_seconds",
            "Invocation latency inside the worker, by function, version and start kind",
            ["function", "version", "start"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sandbox_create = Histogram(
            "warmstart_sandbox_create_seconds",
            "Time to create a sandbox and import the handler",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.too_large = Counter(
            "warmstart_requests_too_large",
            "Requests refused with 413 for their body's size, by the limit they met",
            ["limit"],
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(snapshot))
