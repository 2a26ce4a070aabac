"""Memory QoS: the BE subtree's cap, LS protection, background reclaim of idle page cache
and the OOM preference, against a fake cgroupfs (v1 and v2) and, as root, the real v1
memory controller with processes that allocate and read files."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, has_cgroup_v1, needs
from warmstart.qos import enforce
from warmstart.qos.policy import QoSConfig, Reclaimed, be_memory_cap
from warmstart.sandbox.cgroups import V1Driver, V2Driver

BE = "warmstart-be/abc"
LS = "warmstart/abc/ls"
MB = 1 << 20


NO_LIMIT_V1 = (1 << 63) - 4096  # what v1 shows for "no limit" (rounded to pages)


def fake_v1(root: Path, rel: str, usage: int = 100 * MB) -> V1Driver:
    d = root / "memory" / rel
    d.mkdir(parents=True)
    for name, value in {
        "memory.limit_in_bytes": str(NO_LIMIT_V1),
        "memory.soft_limit_in_bytes": str(NO_LIMIT_V1),
        "memory.usage_in_bytes": str(usage),
        "memory.stat": f"cache {usage // 2}\ntotal_cache {usage // 2}\nrss {usage // 2}\n",
    }.items():
        (d / name).write_text(value + "\n")
    return V1Driver(root)


def fake_v2(root: Path, rel: str, usage: int = 100 * MB) -> V2Driver:
    d = root / rel
    d.mkdir(parents=True)
    for name, value in {
        "memory.high": "max",
        "memory.max": "max",
        "memory.low": "0",
        "memory.current": str(usage),
        "memory.reclaim": "",
        "memory.stat": f"anon {usage // 2}\nfile {usage // 2}\n",
    }.items():
        (d / name).write_text(value + "\n")
    return V2Driver(root)


def read(path: Path) -> str:
    return path.read_text().strip()


def test_the_cap_is_the_reclaimed_memory_with_a_floor() -> None:
    config = QoSConfig(be_memory_floor_mb=256)
    assert be_memory_cap(Reclaimed(1.0, 3000 * MB), config) == 3000 * MB
    assert be_memory_cap(Reclaimed(1.0, 10 * MB), config) == 256 * MB
    assert be_memory_cap(Reclaimed(0.0, 0, stale=True), config) is None  # blind: keep
    with pytest.raises(ValueError):
        QoSConfig(idle_reclaim_after_s=-1)


def test_v1_be_cap_and_soft_limit(tmp_path: Path) -> None:
    driver = fake_v1(tmp_path, BE)
    d = tmp_path / "memory" / BE
    assert enforce.set_be_memory_limit(driver, BE, 1000 * MB + 1) == 1000 * MB + 4096
    assert read(d / "memory.limit_in_bytes") == str(1000 * MB + 4096)  # whole pages
    assert read(d / "memory.soft_limit_in_bytes") == "0"  # reclaimed first


def test_v2_be_cap_is_high_with_max_above(tmp_path: Path) -> None:
    driver = fake_v2(tmp_path, BE)
    assert enforce.set_be_memory_limit(driver, BE, 1000 * MB) == 1000 * MB
    assert read(tmp_path / BE / "memory.high") == str(1000 * MB)
    assert read(tmp_path / BE / "memory.max") == str(1100 * MB)
    enforce.set_be_memory_limit(driver, BE, 2000 * MB)  # grows: max first, then high
    assert read(tmp_path / BE / "memory.high") == str(2000 * MB)
    assert read(tmp_path / BE / "memory.max") == str(2200 * MB)


def test_ls_protection_is_v2_only(tmp_path: Path) -> None:
    v2 = fake_v2(tmp_path / "v2", LS)
    assert enforce.protect_ls_memory(v2, LS, 300 * MB) is True
    assert read(tmp_path / "v2" / LS / "memory.low") == str(300 * MB)
    v1 = fake_v1(tmp_path / "v1", LS)
    assert enforce.protect_ls_memory(v1, LS, 300 * MB) is False


def test_page_cache_and_v2_reclaim(tmp_path: Path) -> None:
    v2 = fake_v2(tmp_path, LS)
    assert enforce.page_cache(v2, LS) == 50 * MB
    enforce.reclaim_memory(v2, LS, 50 * MB)
    assert read(tmp_path / LS / "memory.reclaim") == str(50 * MB)
    assert enforce.page_cache(v2, "gone") == 0


def test_oom_preference_of_processes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert enforce.set_oom_score_adj([proc.pid, 2**22 + 7], 1000) == 1
        assert Path(f"/proc/{proc.pid}/oom_score_adj").read_text().strip() == "1000"
    finally:
        proc.kill()
        proc.wait()


# -- the real v1 memory controller ---------------------------------------------------------
REAL = Path("/sys/fs/cgroup")
ALLOCATE = "import sys, time; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('up', flush=True); time.sleep(60)"


@contextlib.contextmanager
def real_cgroup() -> Iterator[str]:
    rel = f"warmstart-mem-test-{secrets.token_hex(4)}"
    path = REAL / "memory" / rel
    path.mkdir()
    try:
        yield rel
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _join(rel: str, args: list[str]) -> subprocess.Popen[str]:
    procs = REAL / "memory" / rel / "cgroup.procs"

    def enter() -> None:
        procs.write_text(str(os.getpid()))

    return subprocess.Popen(args, preexec_fn=enter, stdout=subprocess.PIPE, text=True)


@needs(IS_ROOT and has_cgroup_v1("memory/memory.limit_in_bytes"), "needs root and cgroup v1 memory")
def test_real_v1_cap_below_usage_keeps_what_cannot_be_reclaimed() -> None:
    driver = V1Driver(REAL)
    with real_cgroup() as rel:
        proc = _join(str(rel), [sys.executable, "-c", ALLOCATE, "64"])
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"
            d = REAL / "memory" / str(rel)
            used = int(read(d / "memory.usage_in_bytes"))
            # Without swap, 64 MB of anonymous memory cannot be reclaimed: the kernel
            # refuses the lower limit (EBUSY) and the cap stays at what is in use.
            cap = enforce.set_be_memory_limit(driver, str(rel), 16 * MB)
            assert int(read(d / "memory.limit_in_bytes")) == cap
            assert read(d / "memory.soft_limit_in_bytes") == "0"
            if Path("/proc/swaps").read_text().count("\n") <= 1:  # no swap device
                assert cap >= 64 * MB and used >= 64 * MB, (cap, used)
            else:
                assert cap >= 16 * MB
            assert proc.poll() is None  # never an OOM kill for lowering the cap
            big = enforce.set_be_memory_limit(driver, str(rel), 512 * MB)
            assert big == 512 * MB and int(read(d / "memory.limit_in_bytes")) == 512 * MB
        finally:
            proc.kill()
            proc.wait()


@needs(IS_ROOT and has_cgroup_v1("memory/memory.limit_in_bytes"), "needs root and cgroup v1 memory")
def test_real_v1_reclaim_drops_page_cache_and_restores_the_limit(tmp_path: Path) -> None:
    driver = V1Driver(REAL)
    data = tmp_path / "data"
    data.write_bytes(os.urandom(32 * MB))
    os.sync()
    with real_cgroup() as rel:
        d = REAL / "memory" / str(rel)
        (d / "memory.limit_in_bytes").write_text(str(512 * MB))
        # Drop the file's pages so the reader below is charged for them in this cgroup.
        fd = os.open(data, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        reader = _join(
            str(rel),
            [
                sys.executable,
                "-c",
                f"open({str(data)!r}, 'rb').read(); print('up', flush=True); import time; time.sleep(60)",
            ],
        )
        try:
            assert reader.stdout is not None and reader.stdout.readline() == "up\n"
            cache = enforce.page_cache(driver, str(rel))
            assert cache >= 16 * MB, cache
            freed = enforce.reclaim_memory(driver, str(rel), cache)
            assert freed >= 16 * MB, (freed, cache)
            assert enforce.page_cache(driver, str(rel)) < cache // 2
            assert int(read(d / "memory.limit_in_bytes")) == 512 * MB  # put back
            assert reader.poll() is None
        finally:
            reader.kill()
            reader.wait()
