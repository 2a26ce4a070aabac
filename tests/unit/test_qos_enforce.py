"""QoS enforcement against a fake cgroupfs (v1 and v2 layouts) and, as root, the real one."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import pytest

from warmstart.errors import SandboxError
from warmstart.qos import enforce
from warmstart.qos.policy import QoSConfig
from warmstart.sandbox.cgroups import CgroupDriver, V1Driver, V2Driver

BE = "warmstart/abc/be"
LS = "warmstart/abc/ls"


def fake_v1(root: Path, rel: str, *, idle: bool = True, burst: bool = True) -> V1Driver:
    """A v1 cgroup as a freshly created one looks (kernel defaults)."""
    d = root / "cpu" / rel
    d.mkdir(parents=True, exist_ok=True)
    files = {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"}
    if idle:
        files["cpu.idle"] = "0"
    if burst:
        files["cpu.cfs_burst_us"] = "0"
    for name, value in files.items():
        (d / name).write_text(value + "\n")
    cs = root / "cpuset" / rel
    cs.mkdir(parents=True, exist_ok=True)
    (cs / "cpuset.cpus").write_text("\n")
    (cs / "cpuset.mems").write_text("\n")
    (cs.parent / "cpuset.effective_mems").write_text("0\n")
    return V1Driver(root)


def fake_v2(root: Path, rel: str, *, idle: bool = True, burst: bool = True) -> V2Driver:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    files = {"cpu.weight": "100", "cpu.max": "max 100000", "cpuset.cpus": ""}
    if idle:
        files["cpu.idle"] = "0"
    if burst:
        files["cpu.max.burst"] = "0"
    for name, value in files.items():
        (d / name).write_text(value + "\n")
    return V2Driver(root)


def read(path: Path) -> str:
    return path.read_text().strip()


# -- BE parent ---------------------------------------------------------------------------


def test_v1_be_parent_gets_lowest_shares_and_idle(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    assert enforce.set_be_parent(driver, BE) is True
    d = tmp_path / "cpu" / BE
    assert read(d / "cpu.shares") == "2"
    assert read(d / "cpu.idle") == "1"


def test_v2_be_parent_gets_lowest_weight_and_idle(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    assert enforce.set_be_parent(driver, BE) is True
    assert read(tmp_path / BE / "cpu.weight") == "1"
    assert read(tmp_path / BE / "cpu.idle") == "1"


@pytest.mark.parametrize("fake", [fake_v1, fake_v2])
def test_be_parent_without_cpu_idle(tmp_path: Path, fake: type) -> None:
    driver: CgroupDriver = fake(tmp_path, BE, idle=False)
    assert enforce.set_be_parent(driver, BE) is False
    d = enforce.cpu_dir(driver, BE)
    assert not (d / "cpu.idle").exists()  # never created on a kernel without it
    assert read(d / ("cpu.shares" if isinstance(driver, V1Driver) else "cpu.weight")) in {
        "2",
        "1",
    }


def test_idle_be_parent_weight_is_left_alone(tmp_path: Path) -> None:
    # The kernel rejects weight writes on an idle group; a second call must not try.
    driver = fake_v1(tmp_path, BE)
    d = tmp_path / "cpu" / BE
    (d / "cpu.idle").write_text("1\n")
    (d / "cpu.shares").write_text("3\n")  # what the kernel shows for an idle group
    mtime = (d / "cpu.shares").stat().st_mtime_ns
    assert enforce.set_be_parent(driver, BE) is True
    assert read(d / "cpu.shares") == "3"
    assert (d / "cpu.shares").stat().st_mtime_ns == mtime


def test_missing_cgroup_raises_sandbox_error(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    with pytest.raises(SandboxError, match="does not exist"):
        enforce.set_be_parent(V1Driver(tmp_path), "nope")
    with pytest.raises(SandboxError):
        enforce.set_cpu_quota(V2Driver(tmp_path), "nope", 10_000)


# -- CFS quota ------------------------------------------------------------------------------


def test_v1_be_cpu_limit_becomes_a_cfs_quota(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    assert enforce.set_be_cpu_limit(driver, BE, 0.75) == 75_000
    d = tmp_path / "cpu" / BE
    assert read(d / "cpu.cfs_quota_us") == "75000"
    assert read(d / "cpu.cfs_period_us") == "100000"
    # Fully suppressed BE keeps the floor, so it still makes progress.
    assert enforce.set_be_cpu_limit(driver, BE, 0.0) == 10_000
    assert read(d / "cpu.cfs_quota_us") == "10000"
    floor = QoSConfig(be_min_quota_cores=0.25)
    assert enforce.set_be_cpu_limit(driver, BE, 0.0, floor) == 25_000


def test_v2_be_cpu_limit_becomes_cpu_max(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    assert enforce.set_be_cpu_limit(driver, BE, 1.3) == 130_000
    assert read(tmp_path / BE / "cpu.max") == "130000 100000"
    enforce.set_cpu_quota(driver, BE, None)
    assert read(tmp_path / BE / "cpu.max") == "max 100000"
    enforce.set_cpu_quota(driver, BE, 20_000, period_us=50_000)
    assert read(tmp_path / BE / "cpu.max") == "20000 50000"


def test_v1_unlimited_quota_and_invalid_values(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    enforce.set_cpu_quota(driver, BE, 50_000)
    enforce.set_cpu_quota(driver, BE, None)
    assert read(tmp_path / "cpu" / BE / "cpu.cfs_quota_us") == "-1"
    with pytest.raises(SandboxError):
        enforce.set_cpu_quota(driver, BE, 0)


@pytest.mark.parametrize("fake", [fake_v1, fake_v2])
def test_lowering_quota_lowers_a_larger_burst_first(tmp_path: Path, fake: type) -> None:
    driver: CgroupDriver = fake(tmp_path, LS)
    enforce.set_cpu_quota(driver, LS, 50_000)
    assert enforce.set_cpu_burst(driver, LS, 50_000) is True
    enforce.set_cpu_quota(driver, LS, 20_000)
    d = enforce.cpu_dir(driver, LS)
    burst = "cpu.cfs_burst_us" if isinstance(driver, V1Driver) else "cpu.max.burst"
    assert read(d / burst) == "20000"


def test_unchanged_values_are_not_rewritten(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    enforce.set_be_cpu_limit(driver, BE, 0.5)
    quota = tmp_path / "cpu" / BE / "cpu.cfs_quota_us"
    mtime = quota.stat().st_mtime_ns
    enforce.set_be_cpu_limit(driver, BE, 0.5)
    assert quota.stat().st_mtime_ns == mtime


# -- LS burst -----------------------------------------------------------------------------


def test_v1_ls_burst(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, LS)
    assert enforce.set_cpu_burst(driver, LS, 40_000) is True
    assert read(tmp_path / "cpu" / LS / "cpu.cfs_burst_us") == "40000"
    assert enforce.set_cpu_burst(driver, LS, 0) is True
    assert read(tmp_path / "cpu" / LS / "cpu.cfs_burst_us") == "0"


def test_v2_ls_burst(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, LS)
    assert enforce.set_cpu_burst(driver, LS, 40_000) is True
    assert read(tmp_path / LS / "cpu.max.burst") == "40000"


@pytest.mark.parametrize("fake", [fake_v1, fake_v2])
def test_burst_on_a_kernel_without_it_is_a_no_op(tmp_path: Path, fake: type) -> None:
    driver: CgroupDriver = fake(tmp_path, LS, burst=False)
    assert enforce.set_cpu_burst(driver, LS, 40_000) is False
    d = enforce.cpu_dir(driver, LS)
    assert not (d / "cpu.cfs_burst_us").exists()
    assert not (d / "cpu.max.burst").exists()
    with pytest.raises(SandboxError):
        enforce.set_cpu_burst(driver, LS, -1)


# -- cpuset ---------------------------------------------------------------------------------


def test_v1_cpuset_fills_mems_from_parent(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    enforce.set_cpuset(driver, BE, "1")
    d = tmp_path / "cpuset" / BE
    assert read(d / "cpuset.cpus") == "1"
    assert read(d / "cpuset.mems") == "0"
    enforce.set_cpuset(driver, BE, "0-1")
    assert read(d / "cpuset.cpus") == "0-1"
    with pytest.raises(SandboxError):
        enforce.set_cpuset(driver, BE, "")


def test_v2_cpuset(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    enforce.set_cpuset(driver, BE, "1")
    assert read(tmp_path / BE / "cpuset.cpus") == "1"


# -- the real cgroupfs -------------------------------------------------------------------

REAL_ROOT = Path("/sys/fs/cgroup")
REAL_CPU = REAL_ROOT / "cpu"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not (REAL_CPU / "cpu.shares").exists(),
    reason="needs root and a cgroup v1 cpu hierarchy",
)
def test_real_v1_cgroupfs() -> None:
    top = f"warmstart-qos-test-{secrets.token_hex(4)}"
    be, ls = f"{top}/be", f"{top}/ls"
    dirs = [REAL_CPU / be, REAL_CPU / ls, REAL_CPU / top]
    driver = V1Driver(REAL_ROOT)
    try:
        (REAL_CPU / be).mkdir(parents=True)
        (REAL_CPU / ls).mkdir()
        has_idle = (REAL_CPU / be / "cpu.idle").exists()

        assert enforce.set_be_parent(driver, be) is has_idle
        shares = int(read(REAL_CPU / be / "cpu.shares"))
        if has_idle:
            assert read(REAL_CPU / be / "cpu.idle") == "1"
            # An idle group reports the kernel's idle weight (3), not what we wrote.
            assert shares <= 3
            # The kernel refuses weight changes now; a second call must not try.
            assert enforce.set_be_parent(driver, be) is True
        else:
            assert shares == 2

        assert enforce.set_be_cpu_limit(driver, be, 0.75) == 75_000
        assert read(REAL_CPU / be / "cpu.cfs_quota_us") == "75000"
        assert read(REAL_CPU / be / "cpu.cfs_period_us") == "100000"

        if (REAL_CPU / ls / "cpu.cfs_burst_us").exists():
            enforce.set_cpu_quota(driver, ls, 50_000)
            assert enforce.set_cpu_burst(driver, ls, 50_000) is True
            assert read(REAL_CPU / ls / "cpu.cfs_burst_us") == "50000"
            with pytest.raises(SandboxError, match="Invalid argument"):
                enforce.set_cpu_burst(driver, ls, 60_000)  # burst > quota
            enforce.set_cpu_quota(driver, ls, 20_000)  # lowers the burst first
            assert read(REAL_CPU / ls / "cpu.cfs_burst_us") == "20000"
            enforce.set_cpu_quota(driver, ls, None)
            assert read(REAL_CPU / ls / "cpu.cfs_quota_us") == "-1"
    finally:
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
    assert not any(d.exists() for d in dirs)
