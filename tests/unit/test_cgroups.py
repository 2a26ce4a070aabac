"""cgroup drivers and the pool against a fake cgroupfs directory (no root needed)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from warmstart.errors import SandboxError
from warmstart.sandbox import cgroups
from warmstart.sandbox.cgpool import CgroupPool
from warmstart.sandbox.cgroups import Limits, V1Driver, V2Driver


def fake_v1(root: Path) -> Path:
    for c in ("memory", "pids", "freezer", "cpu", "cpuacct"):
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")
    return root


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


class FakeV2(V2Driver):
    """Real cgroupfs creates the control files on mkdir; a fake directory needs help."""

    def create(self, rel: str) -> None:
        super().create(rel)
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            d = self.root.joinpath(*parts[:depth])
            for f in (
                "cgroup.procs",
                "cgroup.freeze",
                "cgroup.subtree_control",
                "memory.max",
                "pids.max",
                "cpu.max",
                "memory.current",
                "memory.events",
            ):
                if not (d / f).exists():
                    (d / f).write_text("")

    @staticmethod
    def _rmdir(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)


class FakeV1(V1Driver):
    @staticmethod
    def _rmdir(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)

    def create(self, rel: str) -> None:
        super().create(rel)
        files = {
            "memory": [
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "memory.oom_control",
                "memory.max_usage_in_bytes",
                "cgroup.procs",
            ],
            "pids": ["pids.max", "cgroup.procs"],
            "freezer": ["freezer.state", "cgroup.procs"],
            "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us", "cgroup.procs"],
        }
        for ctrl, names in files.items():
            for n in names:
                p = self.root / ctrl / rel / n
                if not p.exists():
                    p.write_text("")


def test_detect_v1_and_v2(tmp_path: Path) -> None:
    assert isinstance(cgroups.detect(fake_v1(tmp_path / "v1")), V1Driver)
    assert isinstance(cgroups.detect(fake_v2(tmp_path / "v2")), V2Driver)
    (tmp_path / "none").mkdir()
    assert cgroups.detect(tmp_path / "none") is None


def test_v1_limits_freeze_and_oom(tmp_path: Path) -> None:
    d = FakeV1(fake_v1(tmp_path))
    d.prepare_parent("warmstart/x")
    d.create("warmstart/x/cg0")
    d.set_limits("warmstart/x/cg0", Limits(128 << 20, 64, 50_000))
    mem = tmp_path / "memory/warmstart/x/cg0"
    assert (mem / "memory.limit_in_bytes").read_text() == str(128 << 20)
    assert (tmp_path / "pids/warmstart/x/cg0/pids.max").read_text() == "64"
    assert (tmp_path / "cpu/warmstart/x/cg0/cpu.cfs_quota_us").read_text() == "50000"
    d.freeze("warmstart/x/cg0")
    assert (tmp_path / "freezer/warmstart/x/cg0/freezer.state").read_text() == "FROZEN"
    d.thaw("warmstart/x/cg0")
    assert (tmp_path / "freezer/warmstart/x/cg0/freezer.state").read_text() == "THAWED"
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert d.oom_kills("warmstart/x/cg0") == 3
    assert sorted(d.procs_files("warmstart/x/cg0")) == sorted(
        str(tmp_path / c / "warmstart/x/cg0/cgroup.procs")
        for c in ("memory", "pids", "freezer", "cpu", "cpuacct")  # cpuacct where it exists
    )


def test_v2_delegates_controllers_down_the_tree(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    d = FakeV2(root)
    d.prepare_parent("warmstart/x")
    # Every ancestor from the root to our parent delegates memory, pids and cpu.
    for level in (root, root / "warmstart", root / "warmstart/x"):
        assert (level / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    d.create("warmstart/x/cg0")
    d.set_limits("warmstart/x/cg0", Limits(256 << 20, 10, None))
    assert (root / "warmstart/x/cg0/memory.max").read_text() == str(256 << 20)
    assert (root / "warmstart/x/cg0/cpu.max").read_text() == "max 100000"
    d.freeze("warmstart/x/cg0")
    assert (root / "warmstart/x/cg0/cgroup.freeze").read_text() == "1"
    (root / "warmstart/x/cg0/memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert d.oom_kills("warmstart/x/cg0") == 1


def test_v2_missing_controller_is_a_clear_error(tmp_path: Path) -> None:
    d = FakeV2(fake_v2(tmp_path, controllers="cpu io"))
    with pytest.raises(SandboxError, match="lacks controllers"):
        d.prepare_parent("warmstart/x")


def test_pool_reuses_cgroups_and_reaps_leftovers(tmp_path: Path) -> None:
    d = FakeV1(fake_v1(tmp_path))
    # A previous worker's leftover cgroup (empty: nothing to kill) is removed at start.
    d.create("warmstart/x/old")
    pool = CgroupPool(d, "warmstart/x", initial=2)
    pool.start()
    assert not d.exists("warmstart/x/old")
    assert pool.statistics().free == 2

    cg = pool.acquire(Limits(128 << 20, 16))
    assert pool.statistics().in_use == 1
    assert asyncio.run(pool.release(cg)) is True
    again = pool.acquire(Limits(128 << 20, 16))
    assert again.rel in {cg.rel, "warmstart/x/cg1"}
    assert pool.statistics().created == 2  # nothing new was created
    pool.close()
    assert not d.exists("warmstart/x")


class FakeCpusetV1(FakeV1):
    """The kernel gives a new cpuset directory empty ``cpuset.cpus`` and ``cpuset.mems``."""

    def create(self, rel: str) -> None:
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            d = self.root.joinpath("cpuset", *parts[:depth])
            if not d.is_dir():
                d.mkdir(parents=True)
                for name in ("cpuset.cpus", "cpuset.mems", "cgroup.procs"):
                    (d / name).write_text("")
        super().create(rel)


def fake_v1_cpuset(root: Path) -> Path:
    fake_v1(root)
    (root / "cpuset").mkdir()
    (root / "cpuset/cpuset.cpus").write_text("0-3\n")
    (root / "cpuset/cpuset.mems").write_text("0\n")
    return root


def test_v1_best_effort_cgroups_join_cpuset_with_cpus_and_mems(tmp_path: Path) -> None:
    root = fake_v1_cpuset(tmp_path)
    plain = FakeCpusetV1(root)
    be = plain.with_cpuset()
    assert plain.cpuset is False and be.cpuset is True and type(be) is FakeCpusetV1
    assert be.with_cpuset() is be
    # No process can join a v1 cpuset without CPUs and memory nodes: every level gets
    # its parent's, top-down, the moment it is created.
    pool = CgroupPool(be, "warmstart-be/x", initial=1)
    pool.start()
    cg = pool.acquire(Limits(128 << 20, 16))
    for rel in ("warmstart-be", "warmstart-be/x", cg.rel):
        assert (root / "cpuset" / rel / "cpuset.cpus").read_text() == "0-3"
        assert (root / "cpuset" / rel / "cpuset.mems").read_text() == "0"
    assert str(root / "cpuset" / cg.rel / "cgroup.procs") in cg.procs_files
    # A cpuset the QoS manager narrowed is what a new child inherits.
    (root / "cpuset/warmstart-be/x/cpuset.cpus").write_text("3\n")
    assert (root / "cpuset" / pool.grow().rel / "cpuset.cpus").read_text() == "3"
    # Latency-sensitive cgroups stay out of the cpuset hierarchy.
    assert not any("cpuset" in f for f in plain.procs_files("warmstart/x/cg0"))
    pool.close()
    assert not (root / "cpuset/warmstart-be/x").exists()


def test_with_cpuset_without_a_cpuset_controller(tmp_path: Path) -> None:
    d = FakeV1(fake_v1(tmp_path / "v1"))
    assert d.with_cpuset() is d
    v2 = FakeV2(fake_v2(tmp_path / "v2", controllers="cpu io memory pids"))
    assert v2.with_cpuset() is v2


def test_v2_best_effort_subtree_delegates_cpuset(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    be = FakeV2(root).with_cpuset()
    assert be.cpuset is True
    be.prepare_parent("warmstart-be/x")
    for level in (root, root / "warmstart-be", root / "warmstart-be/x"):
        assert (level / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"


def test_write_failure_is_a_sandbox_error(tmp_path: Path) -> None:
    d = V1Driver(fake_v1(tmp_path))
    with pytest.raises(SandboxError, match="cannot write"):
        d.set_limits("does/not/exist", Limits(1, 1))


def test_best_effort_subtree_weight_and_idle_class(tmp_path: Path) -> None:
    from warmstart.sandbox.cgpool import set_best_effort

    d = FakeV1(fake_v1(tmp_path))
    cpu = tmp_path / "cpu" / "warmstart-be"
    cpu.mkdir()
    (cpu / "cpu.shares").write_text("1024")
    (cpu / "cpu.idle").write_text("0")
    set_best_effort(d, "warmstart-be", idle=True)
    assert (cpu / "cpu.shares").read_text() == "2"
    assert (cpu / "cpu.idle").read_text() == "1"
    # An idle group refuses weight writes: a second call writes nothing.
    (cpu / "cpu.shares").write_text("3")
    set_best_effort(d, "warmstart-be", idle=True)
    assert (cpu / "cpu.shares").read_text() == "3"
    # Without the idle class (the default): made ordinary first, then the lowest weight.
    set_best_effort(d, "warmstart-be")
    assert (cpu / "cpu.idle").read_text() == "0"
    assert (cpu / "cpu.shares").read_text() == "2"
    # A kernel without cpu.idle: the weight alone.
    (cpu / "cpu.idle").unlink()
    (cpu / "cpu.shares").write_text("1024")
    set_best_effort(d, "warmstart-be", idle=True)
    assert (cpu / "cpu.shares").read_text() == "2"
    assert not (cpu / "cpu.idle").exists()
