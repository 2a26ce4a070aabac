"""The QoS manager's BE CPU policies against a fake v1 cgroupfs (the sandboxes are a seam)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import pytest

from tests.unit.test_qos_enforce import fake_v1, read
from warmstart.qos.manager import QoSManager
from warmstart.qos.policy import NodeSample, QoSConfig
from warmstart.sandbox import SandboxManager
from warmstart.sandbox.cgroups import Limits, V1Driver

BE = "warmstart-be/abc"
LS = "warmstart/abc/ls"


class FakeCgroup:
    def __init__(self, rel: str) -> None:
        self.rel = rel


class FakePool:
    def __init__(self, free: list[str], in_use: list[str]) -> None:
        self._free = [FakeCgroup(r) for r in free]
        self._in_use = [FakeCgroup(r) for r in in_use]

    def free(self) -> list[FakeCgroup]:
        return self._free

    def in_use(self) -> list[FakeCgroup]:
        return self._in_use


class FakeSandboxes:
    """What the QoS manager reads of a SandboxManager."""

    def __init__(self, root: Path) -> None:
        self.children = [f"{BE}/cg0", f"{BE}/cg1"]
        for rel in [LS, BE, *self.children]:
            fake_v1(root, rel)
        for rel in [BE, *self.children]:
            (root / "cpuset" / rel / "cpuset.cpus").write_text("0-1\n")
            (root / "cpuset" / rel / "cpuset.mems").write_text("0\n")
        self.driver = V1Driver(root)
        self.be_driver = V1Driver(root, cpuset=True)
        self.ls_parent, self.be_parent = LS, BE
        self.be_pool = FakePool(self.children[:1], self.children[1:])
        self.pool = FakePool([], [])

    def limits_for(self, memory_mb: int, qos: str = "ls") -> Limits:
        return Limits(memory_mb << 20, 64, None)  # no CPU quota: no LS burst to manage


def manager(tmp_path: Path, **config: Any) -> tuple[QoSManager, FakeSandboxes]:
    sandboxes = FakeSandboxes(tmp_path)
    qos = QoSManager(
        cast(SandboxManager, sandboxes),
        lambda: [],
        lambda ids: None,
        config=QoSConfig(**config),
    )
    return qos, sandboxes


def sample(ls: float, node: float | None = None) -> NodeSample:
    """A 2-core node at t=100 with LS using ``ls`` cores and the system 0.1."""
    return NodeSample(100.0, 2.0, 4 << 30, ls + 0.1 if node is None else node, 1 << 30, ls, 0)


def test_no_enforcement_computes_the_grant_and_writes_nothing(tmp_path: Path) -> None:
    qos, _ = manager(tmp_path)
    qos._suppress_be(sample(0.4), now=100.0)
    # BE's grant is what LS and the system leave idle (2 - 0.4 - 0.1): reported, not
    # enforced.
    assert qos.be_cpu_cores == pytest.approx(1.5)
    assert read(tmp_path / "cpu" / BE / "cpu.cfs_quota_us") == "-1"
    assert read(tmp_path / "cpuset" / BE / "cpuset.cpus") == "0-1"
    assert qos.status()["be_cpu_policy"] == "none"


def test_quota_policy_uses_the_configured_period(tmp_path: Path) -> None:
    qos, _ = manager(tmp_path, be_cpu_policy="quota", be_cfs_period_us=20_000)
    qos._suppress_be(sample(0.4), now=100.0)
    d = tmp_path / "cpu" / BE
    assert read(d / "cpu.cfs_period_us") == "20000"
    assert read(d / "cpu.cfs_quota_us") == str(round(1.15 * 20_000))
    # LS surges: the quota shrinks at once ...
    qos._suppress_be(sample(1.4), now=101.0)
    assert read(d / "cpu.cfs_quota_us") == str(round(0.15 * 20_000))
    # ... and grows back by a tenth of the node (0.2 cores) per tick.
    qos._suppress_be(sample(0.4), now=102.0)
    assert read(d / "cpu.cfs_quota_us") == str(round(0.35 * 20_000))


def test_cpuset_policy_confines_the_subtree_and_its_cgroups(tmp_path: Path) -> None:
    qos, sandboxes = manager(tmp_path, be_cpu_policy="cpuset")
    pooled = qos.inputs().be_cgroups  # the pool's free and busy cgroups, from the loop
    assert sorted(pooled) == sandboxes.children
    qos._suppress_be(sample(1.0), now=100.0, be_cgroups=pooled)  # 1.65 - 1.1: one core
    for rel in [BE, *sandboxes.children]:
        assert read(tmp_path / "cpuset" / rel / "cpuset.cpus") == "1"
    assert qos.be_cpuset == "1" and qos.be_cpu_cores == 1.0
    qos._suppress_be(sample(0.2), now=101.0, be_cgroups=pooled)  # 1.35: two, one step up
    for rel in [BE, *sandboxes.children]:
        assert read(tmp_path / "cpuset" / rel / "cpuset.cpus") == "0-1"
    assert qos.status()["be_cpuset"] == "0-1"


def test_the_tick_runs_off_the_loop_and_evictions_happen_on_it(tmp_path: Path) -> None:
    """Memory pressure (a threshold every node exceeds) evicts the running BE instance:
    the tick decides on the manager's thread, the worker's callback runs on the loop."""
    import asyncio
    import threading

    from tests.unit.test_qos_usage import meminfo, proc_stat
    from warmstart.qos import usage
    from warmstart.qos.manager import BEInstance

    sandboxes = FakeSandboxes(tmp_path)
    mem = tmp_path / "memory" / f"{BE}/cg1"
    mem.mkdir(parents=True)
    (mem / "memory.usage_in_bytes").write_text(str(300 << 20))
    ticks: list[str] = []
    evicted: list[tuple[list[str], str]] = []
    qos = QoSManager(
        cast(SandboxManager, sandboxes),
        lambda: [BEInstance("be-1", f"{BE}/cg1", 0.25)],
        lambda ids: evicted.append((ids, threading.current_thread().name)),
        config=QoSConfig(memory_evict_upper=0.001, memory_evict_lower=0.0),
        interval_s=0.01,
    )
    stat = proc_stat(tmp_path / "stat", busy=100, idle=100)
    info = meminfo(tmp_path / "meminfo", 4 << 20, 2 << 20)
    clock = iter(float(t) for t in range(100, 10_000))
    qos.sampler = usage.Sampler(
        sandboxes.driver, [LS], [BE], proc_stat=stat, meminfo=info, clock=lambda: next(clock)
    )
    real_tick = qos.tick

    def tick(inputs: Any = None) -> list[str]:
        ticks.append(threading.current_thread().name)
        return real_tick(inputs)

    qos.tick = tick  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(qos.run())
        for _ in range(500):
            if evicted:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert evicted and evicted[0] == (["be-1"], threading.main_thread().name)
    assert ticks and all(name.startswith("warmstart-qos") for name in ticks)
    assert qos.evictions >= 1
