"""Node and cgroup usage readings, against fake /proc files and a fake cgroupfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmstart.errors import SandboxError
from warmstart.qos import usage
from warmstart.sandbox.cgroups import V1Driver, V2Driver

GiB = 1 << 30


def proc_stat(path: Path, busy: int, idle: int, iowait: int = 0) -> Path:
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is part of
    # user already and must not be counted twice.
    path.write_text(
        f"cpu  {busy - 10} 0 10 {idle} {iowait} 0 0 0 50 0\n"
        "cpu0 1 0 1 1 0 0 0 0 0 0\n"
        "cpu1 1 0 1 1 0 0 0 0 0 0\n"
        "intr 12345\nctxt 999\n"
    )
    return path


def meminfo(path: Path, total_kb: int, available_kb: int) -> Path:
    path.write_text(
        f"MemTotal:       {total_kb} kB\nMemFree:        1 kB\n"
        f"MemAvailable:   {available_kb} kB\nHugePages_Total:       0\n"
    )
    return path


def test_read_proc_stat(tmp_path: Path) -> None:
    t = usage.read_proc_stat(proc_stat(tmp_path / "stat", busy=300, idle=600, iowait=100))
    assert t == usage.CpuTimes(busy=300, total=1000, cpus=2)
    (tmp_path / "bad").write_text("intr 1\n")
    with pytest.raises(SandboxError):
        usage.read_proc_stat(tmp_path / "bad")
    with pytest.raises(SandboxError):
        usage.read_proc_stat(tmp_path / "missing")


def test_read_meminfo(tmp_path: Path) -> None:
    m = usage.read_meminfo(meminfo(tmp_path / "meminfo", 4 * 1024 * 1024, 3 * 1024 * 1024))
    assert m.total_bytes == 4 * GiB
    assert m.used_bytes == GiB


def test_real_proc_files_parse() -> None:
    t = usage.read_proc_stat()
    assert t.cpus >= 1 and t.total >= t.busy > 0
    assert usage.read_meminfo().total_bytes > 0


def fake_v1(root: Path) -> V1Driver:
    for rel, cpu_ns, mem, inactive in (("ws/ls", 0, 3 * GiB, GiB), ("ws/be", 0, GiB, 0)):
        (root / "cpuacct" / rel).mkdir(parents=True)
        (root / "cpuacct" / rel / "cpuacct.usage").write_text(f"{cpu_ns}\n")
        (root / "memory" / rel).mkdir(parents=True)
        (root / "memory" / rel / "memory.usage_in_bytes").write_text(f"{mem}\n")
        (root / "memory" / rel / "memory.stat").write_text(
            f"cache 5\ninactive_file 7\ntotal_inactive_file {inactive}\n"
        )
        (root / "cpu" / rel).mkdir(parents=True)
        (root / "cpu" / rel / "cpu.stat").write_text(
            "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n"
        )
    return V1Driver(root)


def fake_v2(root: Path) -> V2Driver:
    for rel, mem, inactive in (("ws/ls", 3 * GiB, GiB), ("ws/be", GiB, 0)):
        (root / rel).mkdir(parents=True)
        (root / rel / "cpu.stat").write_text(
            "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"
            "nr_periods 10\nnr_throttled 2\nthrottled_usec 5\n"
        )
        (root / rel / "memory.current").write_text(f"{mem}\n")
        (root / rel / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")
    return V2Driver(root)


def test_v1_cgroup_readings(tmp_path: Path) -> None:
    d = fake_v1(tmp_path)
    (tmp_path / "cpuacct/ws/ls/cpuacct.usage").write_text("1500000000\n")
    assert usage.cgroup_cpu_usage_ns(d, "ws/ls") == 1_500_000_000
    assert usage.cgroup_memory_working_set(d, "ws/ls") == 2 * GiB
    assert usage.cgroup_throttling(d, "ws/ls") == usage.Throttling(10, 2, 5000)
    # A cgroup that does not exist yet reads as zero.
    assert usage.cgroup_cpu_usage_ns(d, "ws/none") == 0
    assert usage.cgroup_memory_working_set(d, "ws/none") == 0
    assert usage.cgroup_throttling(d, "ws/none") == usage.Throttling()


def test_v2_cgroup_readings(tmp_path: Path) -> None:
    d = fake_v2(tmp_path)
    (tmp_path / "ws/ls/cpu.stat").write_text("usage_usec 1500000\nnr_throttled 4\n")
    assert usage.cgroup_cpu_usage_ns(d, "ws/ls") == 1_500_000_000
    assert usage.cgroup_memory_working_set(d, "ws/ls") == 2 * GiB
    assert usage.cgroup_throttling(d, "ws/ls").throttled == 4
    assert usage.cgroup_throttling(d, "ws/be") == usage.Throttling(10, 2, 5000)


def test_was_throttled() -> None:
    a = usage.Throttling(10, 2, 0)
    assert usage.was_throttled(a, usage.Throttling(20, 3, 10))
    assert not usage.was_throttled(a, usage.Throttling(20, 2, 0))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sampler_turns_two_readings_into_a_node_sample(tmp_path: Path, version: str) -> None:
    root = tmp_path / "cg"
    driver = fake_v1(root) if version == "v1" else fake_v2(root)
    stat = proc_stat(tmp_path / "stat", busy=1000, idle=9000)
    mem = meminfo(tmp_path / "meminfo", 8 * 1024 * 1024, 2 * 1024 * 1024)
    clock = iter([10.0, 12.0])
    sampler = usage.Sampler(
        driver, ["ws/ls"], ["ws/be"], proc_stat=stat, meminfo=mem, clock=lambda: next(clock)
    )
    assert sampler.sample() is None  # the first reading has nothing to compare with

    # Two seconds later: node busy 50% of 2 CPUs, LS used 1.2 s, BE 0.4 s of CPU.
    proc_stat(stat, busy=1200, idle=9200)
    if version == "v1":
        (root / "cpuacct/ws/ls/cpuacct.usage").write_text("1200000000\n")
        (root / "cpuacct/ws/be/cpuacct.usage").write_text("400000000\n")
    else:
        (root / "ws/ls/cpu.stat").write_text("usage_usec 1200000\n")
        (root / "ws/be/cpu.stat").write_text("usage_usec 400000\n")
    s = sampler.sample()
    assert s is not None
    assert s.timestamp == 12.0
    assert s.capacity_cpus == 2.0
    assert s.capacity_memory_bytes == 8 * GiB
    assert s.node_cpu_used == pytest.approx(1.0)
    assert s.node_memory_used == 6 * GiB
    assert s.ls_cpu_used == pytest.approx(0.6)
    assert s.be_cpu_used == pytest.approx(0.2)
    assert s.ls_memory_used == 2 * GiB
    assert s.be_memory_used == GiB
    assert s.system_cpu_used == pytest.approx(0.2)
    assert s.system_memory_used == 3 * GiB


def test_sampler_without_cgroups_and_with_a_stuck_clock(tmp_path: Path) -> None:
    stat = proc_stat(tmp_path / "stat", busy=100, idle=100)
    mem = meminfo(tmp_path / "meminfo", 1024, 512)
    times = iter([1.0, 1.0, 2.0])
    sampler = usage.Sampler(None, proc_stat=stat, meminfo=mem, clock=lambda: next(times))
    assert sampler.sample() is None
    assert sampler.sample() is None  # no time passed: no sample, base kept
    proc_stat(stat, busy=200, idle=100)
    s = sampler.sample()
    assert s is not None
    assert s.node_cpu_used == pytest.approx(2.0)
    assert s.ls_cpu_used == 0.0 and s.ls_memory_used == 0


def test_recreated_cgroup_counts_nothing_for_the_interval() -> None:
    cpu = usage.CpuTimes(0, 100, 2)
    mem = usage.MemInfo(GiB, GiB // 2)
    a = usage.Reading(0.0, cpu, mem, {"ls": 5_000_000_000, "gone": 1}, 0, {}, 0)
    b = usage.Reading(1.0, cpu, mem, {"ls": 1_000_000, "new": 9_000_000_000}, 0, {}, 0)
    assert usage.delta(a, b).ls_cpu_used == 0.0
    with pytest.raises(ValueError):
        usage.delta(b, a)
