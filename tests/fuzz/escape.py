"""Checks that an unpacker stayed inside its target directory.

Each example unpacks into ``<root>/target`` beside ``<root>/outside``, a directory holding
a sentinel file that hostile names aim at (``../outside/...``, absolute paths, symlinks to
it).  Afterwards nothing but those two may exist in ``<root>``, ``outside`` must be as it
was, and inside the target no hard link may share an inode with a file elsewhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

SENTINEL = b"must not change"


@dataclass(frozen=True)
class Arena:
    root: Path
    target: Path
    outside: Path


def _listing(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, directory)] = (st.st_mode, st.st_ino, data)
    return out


@contextmanager
def arena() -> Iterator[Arena]:
    """A fresh ``<root>/{target,outside}``; checks containment when the block ends
    (whether or not the unpacker raised)."""
    with TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        outside = root / "outside"
        outside.mkdir()
        (outside / "sentinel").write_bytes(SENTINEL)
        (outside / "dir").mkdir()
        before = _listing(outside)
        a = Arena(root, root / "target", outside)
        yield a
        assert sorted(p.name for p in root.iterdir()) in (
            ["outside"],
            ["outside", "target"],
        ), f"something was written beside the target: {sorted(root.iterdir())}"
        assert _listing(outside) == before, "the directory beside the target changed"
        assert_no_foreign_links(a)


def assert_no_foreign_links(a: Arena) -> None:
    """Every inode in the target with several names has all of them in the target (a
    hard link to a file outside would let the sandbox change it), and none is the
    sentinel's."""
    if not a.target.is_dir() or a.target.is_symlink():
        return
    sentinel_ino = os.lstat(a.outside / "sentinel").st_ino
    names: dict[int, int] = {}
    links: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(a.target):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_ino != sentinel_ino, "a hard link to a file outside the target"
            if not stat.S_ISDIR(st.st_mode):
                names[st.st_ino] = names.get(st.st_ino, 0) + 1
                links[st.st_ino] = st.st_nlink
    for ino, n in names.items():
        assert links[ino] == n, f"inode {ino} has {links[ino]} links, {n} in the target"


def walk(directory: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every path below ``directory`` with its lstat."""
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            yield path, os.lstat(path)
