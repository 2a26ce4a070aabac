"""record_opens: the files a workload opens under a mount, in first-open order (fanotify)."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root
from warmstart.images.errors import ImageError
from warmstart.images.profile import parse_events, record_opens, relative_to_mount

pytestmark = [pytest.mark.integration, needs_root]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, so only this test's opens land on it."""
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_records_first_open_order(mount: Path, tmp_path: Path) -> None:
    for name in ("a", "b", "lib/c.so", "untouched"):
        (mount / name).parent.mkdir(parents=True, exist_ok=True)
        (mount / name).write_text(name)
    script = mount / "bin" / "run.sh"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nexec cat {mount}/lib/c.so {mount}/a\n")
    script.chmod(0o755)
    outside = tmp_path / "outside"
    outside.write_text("not on the mount")
    with record_opens(mount) as paths:
        subprocess.run(
            ["cat", str(mount / "b"), str(outside), str(mount / "b")],
            check=True,
            capture_output=True,
        )
        subprocess.run([str(script)], check=True, capture_output=True)
        subprocess.run(["ls", str(mount / "lib")], check=True, capture_output=True)
    # Each file once, in first-open order; the executed script counts; directories and
    # files elsewhere do not.
    assert paths == ["b", "bin/run.sh", "lib/c.so", "a"]


def test_empty_when_nothing_opens(mount: Path) -> None:
    (mount / "f").write_text("x")
    with record_opens(mount) as paths:
        pass
    assert paths == []


def test_missing_mount_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError), record_opens(tmp_path / "does-not-exist"):
        pass


def test_event_parsing_and_paths() -> None:
    one = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x20, 7, 100)
    two = struct.pack("=IBBHQii", 24, 3, 0, 24, 0x1000, 8, 101)
    events = parse_events(one + two)
    assert [(e.mask, e.fd, e.pid) for e in events] == [(0x20, 7, 100), (0x1000, 8, 101)]
    with pytest.raises(ImageError):
        parse_events(struct.pack("=IBBHQii", 24, 2, 0, 24, 0x20, 7, 100))
    with pytest.raises(ImageError):
        parse_events(struct.pack("=IBBHQii", 48, 3, 0, 24, 0x20, 7, 100))
    assert relative_to_mount("/m/usr/bin/x", "/m") == "usr/bin/x"
    assert relative_to_mount("/mnt/x", "/m") is None
    assert relative_to_mount("/m/x (deleted)", "/m") is None
    assert relative_to_mount("/usr/x", "/") == "usr/x"
