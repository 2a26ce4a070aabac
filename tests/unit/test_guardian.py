"""The guardian's sweep and its pipe protocol, against a fake cgroupfs directory.

The fake "kernel" lists a member only while that process exists (a reaped or zombie
child drops out), as ``cgroup.procs`` does; the members are real ``sleep`` processes of
this test, so a sweep's SIGKILLs are real too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmstart.errors import SandboxError
from warmstart.sandbox import guardian
from warmstart.sandbox.cgroups import V1Driver


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class FakeKernelV1(V1Driver):
    """A v1 driver over a plain directory: members are listed while they live."""

    def create(self, rel: str) -> None:
        super().create(rel)
        for d in self.dirs(rel):
            (d / "cgroup.procs").touch()
        (self.root / "freezer" / rel / "freezer.state").write_text("THAWED\n")

    def pids(self, rel: str) -> list[int]:
        return [p for p in super().pids(rel) if _alive(p)]

    def add(self, rel: str, pid: int) -> None:
        for d in self.dirs(rel):
            with open(d / "cgroup.procs", "a") as f:
                f.write(f"{pid}\n")

    @staticmethod
    def _rmdir(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)


class Immortal(FakeKernelV1):
    """Members that never die (a kill the kernel does not act on)."""

    def kill(self, rel: str) -> None:
        self.freeze(rel)
        self.thaw(rel)

    def pids(self, rel: str) -> list[int]:
        return V1Driver.pids(self, rel)

    @staticmethod
    def _rmdir(d: Path) -> None:
        raise SandboxError(f"cannot remove cgroup {d}: busy")  # as a real one with members


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    for c in ("memory", "pids", "freezer", "cpu"):
        (root / c).mkdir(parents=True)
    return root


def _sleeper(procs: list[subprocess.Popen[bytes]]) -> int:
    # Reaped by a thread of its own, as the kernel would: the member drops out at exit.
    p = subprocess.Popen(["sleep", "600"])
    procs.append(p)
    return p.pid


def test_sweep_kills_every_member_thaws_frozen_cgroups_and_removes_the_subtrees(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    root = _fake_root(tmp_path)
    d = FakeKernelV1(root)
    for rel in ("warmstart/abc/ls/cg0", "warmstart/abc/ls/cg1", "warmstart-be/abc/cg0"):
        d.create(rel)
    d.add("warmstart/abc/ls/cg0", _sleeper(sleepers))
    d.add("warmstart/abc/ls/cg1", _sleeper(sleepers))
    d.add("warmstart/abc/ls/cg1", _sleeper(sleepers))
    d.add("warmstart-be/abc/cg0", _sleeper(sleepers))
    frozen = root / "freezer/warmstart/abc/ls/cg1/freezer.state"
    frozen.write_text("FROZEN\n")
    d.create("warmstart/other/ls/cg0")  # another data dir's: not ours to touch
    d.add("warmstart/other/ls/cg0", _sleeper(sleepers))

    report = guardian.sweep([(d, "warmstart/abc"), (d, "warmstart-be/abc")], timeout=30)

    assert all(p.wait(timeout=30) == -9 for p in sleepers[:4])
    assert sleepers[4].poll() is None
    assert report.killed == 4
    assert report.frozen == 1
    assert report.cgroups == 6  # abc, abc/ls, ls/cg0, ls/cg1, be/abc, be/abc/cg0
    assert report.clean
    assert not (root / "freezer/warmstart/abc").exists()
    assert not (root / "memory/warmstart-be/abc").exists()
    assert (root / "freezer/warmstart/other/ls/cg0").is_dir()


def test_a_sweep_of_nothing_is_clean(tmp_path: Path) -> None:
    d = FakeKernelV1(_fake_root(tmp_path))
    assert guardian.sweep([(d, "warmstart/abc")]) == guardian.SweepReport(0, 0, 0, ())


def test_a_sweep_gives_up_on_members_that_do_not_die_and_says_which(
    tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    d = Immortal(_fake_root(tmp_path))
    d.create("warmstart/abc/ls/cg0")
    d.add("warmstart/abc/ls/cg0", _sleeper(sleepers))
    state = tmp_path / "cgroup/freezer/warmstart/abc/ls/cg0/freezer.state"
    state.write_text("FROZEN\n")
    report = guardian.sweep([(d, "warmstart/abc")], timeout=0.05)
    assert not report.clean
    assert report.frozen == 1
    assert state.read_text() == "THAWED"  # the kill's signals are delivered on thaw
    assert report.left == ("warmstart/abc/ls/cg0",)
    assert sleepers[0].poll() is None


def test_watch_tells_a_stand_down_from_a_hang_up() -> None:
    r, w = os.pipe()
    os.write(w, guardian.STAND_DOWN)
    os.close(w)
    assert guardian.watch(r) is True
    os.close(r)
    r, w = os.pipe()
    os.close(w)  # what the kernel does when the worker dies
    assert guardian.watch(r) is False
    os.close(r)


def test_main_stands_down_without_touching_the_cgroups(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    d = FakeKernelV1(root)
    d.create("warmstart/abc/ls/cg0")
    r, w = os.pipe()
    os.write(w, guardian.STAND_DOWN)
    os.close(w)
    code = guardian.main(
        ["--watch-fd", str(r), "--cgroup-root", str(root), "--subtree", "warmstart/abc"]
    )
    os.close(r)
    assert code == 0
    assert (root / "freezer/warmstart/abc/ls/cg0").is_dir()


def test_main_sweeps_after_a_hang_up_and_releases_the_lock(tmp_path: Path) -> None:
    import fcntl

    root = _fake_root(tmp_path)
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    held = os.dup(lock)  # what the guardian inherits
    os.close(lock)
    other = os.open(tmp_path / "lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r, w = os.pipe()
    os.close(w)
    code = guardian.main(
        [
            "--watch-fd",
            str(r),
            "--lock-fd",
            str(held),
            "--cgroup-root",
            str(root),
            "--subtree",
            "warmstart/abc",
        ]
    )
    os.close(r)
    assert code == 0
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
    os.close(other)
