"""The lazy filesystem package as a whole: which parts pull in pyfuse3 and trio, the FUSE
layer's view of the tree, and the ``python -m warmstart.images.lazyfs`` entry point."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from warmstart.images.lazyfs.tree import ROOT_INODE, Attributes

# Everything but the fetcher, the FUSE operations and the daemon: the host side and the
# unit tests import these without the event loop and FUSE libraries of the daemon.
PURE = (
    "warmstart.images.lazyfs",
    "warmstart.images.lazyfs.sources",
    "warmstart.images.lazyfs.chunks",
    "warmstart.images.lazyfs.stats",
    "warmstart.images.lazyfs.layers",
    "warmstart.images.lazyfs.tree",
    "warmstart.images.lazyfs.planning",
    "warmstart.images.lazyfs.loading",
    "warmstart.images.lazymount",
)


def imported_after(modules: tuple[str, ...]) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        for name in {list(modules)!r}:
            importlib.import_module(name)
        print(json.dumps(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout))


def test_pure_modules_import_neither_pyfuse3_nor_trio() -> None:
    loaded = imported_after(PURE)
    assert set(PURE) <= loaded
    assert not {name for name in loaded if name.split(".")[0] in ("pyfuse3", "trio")}


def test_the_daemon_modules_do_import_them() -> None:
    """The check above can fail: the daemon's own modules are seen importing both."""
    loaded = imported_after(("warmstart.images.lazyfs.daemon",))
    assert {"pyfuse3", "trio"} <= loaded


def test_fuse_attributes_say_what_the_tree_says() -> None:
    import pyfuse3

    from warmstart.images.lazyfs.fs import CACHE_TIMEOUT, entry_attributes

    assert pyfuse3.ROOT_INODE == ROOT_INODE
    attrs = Attributes(
        ino=7,
        mode=stat.S_IFREG | 0o4755,
        nlink=2,
        uid=1000,
        gid=42,
        rdev=0,
        size=5000,
        blksize=4096,
        blocks=10,
        mtime_ns=1_700_000_000_123_456_789,
    )
    a = entry_attributes(attrs)
    assert (a.st_ino, a.st_mode, a.st_nlink) == (7, stat.S_IFREG | 0o4755, 2)
    assert (a.st_uid, a.st_gid, a.st_rdev, a.st_size) == (1000, 42, 0, 5000)
    assert (a.st_blksize, a.st_blocks) == (4096, 10)
    assert a.st_mtime_ns == a.st_atime_ns == a.st_ctime_ns == attrs.mtime_ns
    assert a.entry_timeout == a.attr_timeout == CACHE_TIMEOUT


@pytest.mark.parametrize("spec_text", ["{not json", '{"mountpoint": "/nonexistent"}'])
def test_daemon_reports_a_bad_spec_on_its_ready_pipe(spec_text: str) -> None:
    r, w = os.pipe()
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.images.lazyfs", "--spec", "-", "--ready-fd", str(w)],
        input=spec_text.encode(),
        pass_fds=(w,),
        capture_output=True,
        timeout=60,
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = json.loads(f.readline())
    assert proc.returncode == 1
    assert line["ready"] is False and line["error"]
    assert b"cannot mount" in proc.stderr
