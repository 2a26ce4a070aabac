"""QoS enforcement against a fake cgroupfs (v1 and v2 layouts) and, as root, the real one."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, has_cgroup_v1, needs
from warmstart.errors import SandboxError
from warmstart.qos import enforce
from warmstart.qos.policy import QoSConfig
from warmstart.sandbox.cgpool import set_best_effort
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


# -- BE parent (made best-effort by the sandbox manager) ---------------------------------------------------------------------------


def test_v1_be_parent_gets_lowest_shares_and_idle(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    assert set_best_effort(driver, BE, idle=True) is True
    d = tmp_path / "cpu" / BE
    assert read(d / "cpu.shares") == "2"
    assert read(d / "cpu.idle") == "1"


def test_v2_be_parent_gets_lowest_weight_and_idle(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    assert set_best_effort(driver, BE, idle=True) is True
    assert read(tmp_path / BE / "cpu.weight") == "1"
    assert read(tmp_path / BE / "cpu.idle") == "1"


@pytest.mark.parametrize("fake", [fake_v1, fake_v2])
def test_be_parent_without_cpu_idle(tmp_path: Path, fake: type) -> None:
    driver: CgroupDriver = fake(tmp_path, BE, idle=False)
    assert set_best_effort(driver, BE, idle=True) is False
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
    assert set_best_effort(driver, BE, idle=True) is True
    assert read(d / "cpu.shares") == "3"
    assert (d / "cpu.shares").stat().st_mtime_ns == mtime


def test_missing_cgroup_raises_sandbox_error(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    with pytest.raises(SandboxError, match="does not exist"):
        set_best_effort(V1Driver(tmp_path), "nope")
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


def test_cpu_lists() -> None:
    assert enforce.parse_cpus("0-2,5\n") == {0, 1, 2, 5}
    assert enforce.parse_cpus("3") == {3}
    assert enforce.parse_cpus("") == set()
    assert enforce.format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert enforce.format_cpus({1}) == "1"
    assert enforce.format_cpus(set()) == ""
    with pytest.raises(SandboxError, match="not a cpuset list"):
        enforce.parse_cpus("0-x")


def _fake_be_tree(root: Path, cpus: str, children: int = 2) -> tuple[V1Driver, list[str]]:
    kids = [f"{BE}/cg{i}" for i in range(children)]
    fake_v1(root, BE)
    for rel in kids:
        fake_v1(root, rel)
    for rel in [BE, *kids]:
        (root / "cpuset" / rel / "cpuset.cpus").write_text(cpus + "\n")
        (root / "cpuset" / rel / "cpuset.mems").write_text("0\n")
    return V1Driver(root), kids


def _record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    writes: list[tuple[str, str]] = []
    real = enforce._write

    def write(path: Path, value: str) -> None:
        writes.append((str(path), value))
        real(path, value)

    monkeypatch.setattr(enforce, "_write", write)
    return writes


def test_v1_be_cpuset_shrinks_children_before_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel refuses (EBUSY) a v1 parent cpuset that would no longer hold a child's.
    driver, kids = _fake_be_tree(tmp_path, "0-3")
    writes = _record_writes(monkeypatch)
    assert enforce.set_be_cpuset(driver, BE, kids, "3") is True
    parent = str(tmp_path / "cpuset" / BE / "cpuset.cpus")
    assert [w for w in writes if w[0] == parent] == [(parent, "3")]
    assert writes[-1][0] == parent  # after every child
    for rel in [BE, *kids]:
        assert read(tmp_path / "cpuset" / rel / "cpuset.cpus") == "3"
    writes.clear()
    assert enforce.set_be_cpuset(driver, BE, kids, "3") is False  # nothing to do
    assert writes == []


def test_v1_be_cpuset_grows_the_parent_before_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child may not hold CPUs its parent lacks (EACCES): the parent goes first.
    driver, kids = _fake_be_tree(tmp_path, "3")
    writes = _record_writes(monkeypatch)
    assert enforce.set_be_cpuset(driver, BE, kids, "2-3") is True
    parent = str(tmp_path / "cpuset" / BE / "cpuset.cpus")
    assert writes[0] == (parent, "2-3")
    assert {w[0] for w in writes[1:]} == {
        str(tmp_path / "cpuset" / k / "cpuset.cpus") for k in kids
    }


def test_v1_be_cpuset_moving_to_other_cores_passes_through_the_union(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, kids = _fake_be_tree(tmp_path, "0", children=1)
    writes = _record_writes(monkeypatch)
    enforce.set_be_cpuset(driver, BE, kids, "1")
    parent = str(tmp_path / "cpuset" / BE / "cpuset.cpus")
    child = str(tmp_path / "cpuset" / kids[0] / "cpuset.cpus")
    assert writes == [(parent, "0-1"), (child, "1"), (parent, "1")]


def test_v1_be_cpuset_skips_children_that_went_away(tmp_path: Path) -> None:
    driver, kids = _fake_be_tree(tmp_path, "0-1")
    enforce.set_be_cpuset(driver, BE, [*kids, f"{BE}/gone"], "1")
    assert read(tmp_path / "cpuset" / BE / "cpuset.cpus") == "1"
    assert not (tmp_path / "cpuset" / BE / "gone").exists()
    with pytest.raises(SandboxError, match="at least one CPU"):
        enforce.set_be_cpuset(driver, BE, kids, "")


def test_v2_be_cpuset_is_written_on_the_parent_only(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    fake_v2(tmp_path, f"{BE}/cg0")
    assert enforce.set_be_cpuset(driver, BE, [f"{BE}/cg0"], "1") is True
    assert read(tmp_path / BE / "cpuset.cpus") == "1"
    assert read(tmp_path / BE / "cg0" / "cpuset.cpus") == ""  # empty: follows the parent
    assert enforce.set_be_cpuset(driver, BE, [f"{BE}/cg0"], "1") is False


# -- the real cgroupfs -------------------------------------------------------------------

REAL_ROOT = Path("/sys/fs/cgroup")
REAL_CPU = REAL_ROOT / "cpu"


@needs(IS_ROOT and has_cgroup_v1("cpu/cpu.shares"), "needs root and the cgroup v1 cpu controller")
def test_real_v1_cgroupfs() -> None:
    top = f"warmstart-qos-test-{secrets.token_hex(4)}"
    be, ls = f"{top}/be", f"{top}/ls"
    dirs = [REAL_CPU / be, REAL_CPU / ls, REAL_CPU / top]
    driver = V1Driver(REAL_ROOT)
    try:
        (REAL_CPU / be).mkdir(parents=True)
        (REAL_CPU / ls).mkdir()
        has_idle = (REAL_CPU / be / "cpu.idle").exists()

        assert set_best_effort(driver, be, idle=True) is has_idle
        shares = int(read(REAL_CPU / be / "cpu.shares"))
        if has_idle:
            assert read(REAL_CPU / be / "cpu.idle") == "1"
            # An idle group reports the kernel's idle weight (3), not what we wrote.
            assert shares <= 3
            # The kernel refuses weight changes now; a second call must not try.
            assert set_best_effort(driver, be, idle=True) is True
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


REAL_CPUSET = REAL_ROOT / "cpuset"


@needs(
    IS_ROOT
    and has_cgroup_v1("cpuset/cpuset.cpus")
    and len(enforce.parse_cpus((REAL_CPUSET / "cpuset.cpus").read_text())) >= 2,
    "needs root, the cgroup v1 cpuset controller and two CPUs",
)
def test_real_v1_be_cpuset_shrinks_and_grows() -> None:
    """The kernel's subset rules, for real: a child cpuset joined by a process shrinks
    to one core and grows back without EBUSY or EACCES."""
    import subprocess

    all_cpus = enforce.parse_cpus((REAL_CPUSET / "cpuset.cpus").read_text())
    top = f"warmstart-qos-test-{secrets.token_hex(4)}"
    be = f"{top}/be"
    kid = f"{be}/cg0"
    driver = V1Driver(REAL_ROOT, cpuset=True)
    proc = None
    try:
        driver.create(kid)  # fills cpus and mems top-down, so a task may join
        assert enforce.parse_cpus(read(REAL_CPUSET / kid / "cpuset.cpus")) == all_cpus
        proc = subprocess.Popen(["sleep", "30"])
        (REAL_CPUSET / kid / "cgroup.procs").write_text(str(proc.pid))
        last = max(all_cpus)
        assert enforce.set_be_cpuset(driver, be, [kid], str(last)) is True
        assert read(REAL_CPUSET / kid / "cpuset.cpus") == str(last)
        assert read(REAL_CPUSET / be / "cpuset.cpus") == str(last)
        affinity = os.sched_getaffinity(proc.pid)
        assert affinity == {last}
        everything = enforce.format_cpus(all_cpus)
        assert enforce.set_be_cpuset(driver, be, [kid], everything) is True
        assert os.sched_getaffinity(proc.pid) == all_cpus
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for rel in (kid, be, top):
            for d in driver.dirs(rel):
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rmdir(d)
    assert not any(d.exists() for d in driver.dirs(top))
