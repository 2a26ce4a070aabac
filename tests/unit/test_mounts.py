"""The one reader of the mount table and the one unmount (``warmstart.runtime.syscalls``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import needs_root
from warmstart.runtime import syscalls

SAMPLE = (
    "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
    "95 29 0:52 / /srv/a\\040b\\134c rw,relatime shared:51 - fuse.lazyfs lazyfs rw,user_id=0\n"
    "96 29 0:53 / /data/roots/x ro - overlay overlay ro,lowerdir=/l/2:/l/1\n"
    "garbage line\n"
)


def test_mountinfo_unescaping() -> None:
    assert syscalls.unescape_mountinfo(r"/a\040b\134c") == "/a b\\c"
    assert syscalls.unescape_mountinfo("/plain") == "/plain"
    assert syscalls.unescape_mountinfo("/trailing\\04") == "/trailing\\04"
    assert syscalls.unescape_mountinfo("/not\\999octal") == "/not\\999octal"


def test_mountinfo_parsing() -> None:
    entries = syscalls.parse_mountinfo(SAMPLE)
    assert [(e.mount_point, e.fstype) for e in entries] == [
        ("/proc", "proc"),
        ("/srv/a b\\c", "fuse.lazyfs"),
        ("/data/roots/x", "overlay"),
    ]
    assert entries[1].source == "lazyfs"
    assert entries[2].super_options == "ro,lowerdir=/l/2:/l/1"


def test_this_process_mount_table_has_its_root() -> None:
    assert any(e.mount_point == "/" for e in syscalls.mounts())
    assert syscalls.is_mount_point("/")
    assert not syscalls.is_mount_point("/no/such/mount/point")


@needs_root
def test_unmount_plain_busy_and_not_mounted(tmp_path: Path) -> None:
    target = tmp_path / "a dir"  # a space: the table escapes it
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    assert syscalls.is_mount_point(str(target))
    assert syscalls.unmount(str(target))
    assert not syscalls.is_mount_point(str(target))
    assert not syscalls.unmount(str(target))  # not mounted: nothing to do
    # Busy (a file held open on it): detached lazily, gone from the table at once.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    with open(target / "held", "w"):
        assert syscalls.unmount(str(target))
        assert not syscalls.is_mount_point(str(target))
