"""Layer images (squashfs) against unpacked layers: the same tree from the same tar, the
same refusals of hostile archives, whiteouts and opaque directories that overlayfs
honours.  Each image is built by ``tar2sqfs`` and loop-mounted (root)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs, needs_root
from tests.unit.test_unpack import Member, d, hard, make_tar, member, sym
from warmstart.images import layerimage
from warmstart.images.errors import CorruptLayer, UnsafeLayer
from warmstart.images.layerimage import build_squashfs, mount_image
from warmstart.images.unpack import OPAQUE_XATTR, unpack
from warmstart.runtime import syscalls

pytestmark = [
    pytest.mark.integration,
    needs_root,
    needs(layerimage.available(), "needs tar2sqfs (squashfs-tools-ng)"),
]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points to unmount at the end."""
    points: list[Path] = []
    yield points
    for p in reversed(points):
        syscalls.unmount(str(p))


def as_image(tmp_path: Path, raw: bytes, mounted: list[Path]) -> Path:
    name = uuid.uuid4().hex[:8]
    image = tmp_path / f"{name}.sqfs"
    build_squashfs(io.BytesIO(raw), image, workdir=tmp_path / "work")
    target = tmp_path / f"mnt-{name}"
    mount_image(image, target)
    mounted.append(target)
    return target


def as_dir(tmp_path: Path, raw: bytes) -> Path:
    dest = tmp_path / f"dir-{uuid.uuid4().hex[:8]}"
    unpack(io.BytesIO(raw), dest)
    return dest


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every name under ``root`` with what a process in the sandbox can see of it (a
    directory's size and an implied directory's time are the filesystem's own)."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for top, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(kind):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(kind):
                extra = os.readlink(path)
            elif stat.S_ISCHR(kind):
                extra = st.st_rdev
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError as exc:  # an image without xattrs has no xattr table
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                names = []
            xattrs = {
                a: os.getxattr(path, a, follow_symlinks=False)
                for a in sorted(names)
                if a.startswith("user.") or a == OPAQUE_XATTR
            }
            # Hard links: the first name of the inode stands for its identity.
            link = inodes.setdefault(st.st_ino, rel) if not stat.S_ISDIR(kind) else None
            # A whiteout (0/0 device) is made when the layer is: its time is that moment,
            # which differs between two builds a second apart.
            whiteout = stat.S_ISCHR(kind) and st.st_rdev == 0
            mtime = int(st.st_mtime) if not (stat.S_ISDIR(kind) or whiteout) else None
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                extra,
                xattrs,
                link,
            )
    return out


CASES: dict[str, list[Member]] = {
    "files, dirs, links, metadata": [
        d("./"),
        d("./etc/", mode=0o750, uid=1, gid=2),
        member("./etc/hosts", b"127.0.0.1 localhost\n", mode=0o640, uid=3, gid=4, mtime=1234),
        sym("./etc/alias", "hosts"),
        hard("./etc/hosts2", "./etc/hosts"),
        member("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
        member("empty", b""),
        member("fifo", type=tarfile.FIFOTYPE, mode=0o600),
        d("./ro/", mode=0o555),
        member("./ro/inside", b"x", mode=0o444),
    ],
    "later entries replace earlier ones": [
        member("f", b"first"),
        member("f", b"second"),
        member("x", b"file"),
        d("x/"),
        member("x/child", b"c"),
        d("y/"),
        member("y/old", b"o"),
        member("y", b"now a file"),
        sym("s", "f"),
        member("s", b"file again"),
    ],
    "many files rewritten and linked": [
        *(member(f"dir{i % 7}/file{i}", f"content {i}".encode() * (i % 50)) for i in range(300)),
        member("dir0/file0", b"rewritten"),
        hard("dir1/link", "dir0/file0"),
        member("big", os.urandom(700_000)),
    ],
    "long names": [
        member("/".join(["directory-with-a-long-name"] * 5) + "/file.txt", b"deep"),
        member("t" * 90, b"t"),
        hard("h" * 120, "t" * 90),
    ],
    "symlinks anywhere, hard link to a symlink": [
        sym("abs", "/etc/passwd"),
        sym("rel", "../../../../etc"),
        hard("h", "abs"),
    ],
    "devices skipped, setuid and setgid cleared": [
        member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("dev/zero", type=tarfile.CHRTYPE, devmajor=0, devminor=0),
        member("su", b"\x7fELF", mode=0o4755),
        member("wall", b"\x7fELF", mode=0o2755),
        d("tmp/", mode=0o1777),
        d("shared/", mode=0o2775),
    ],
    "only user xattrs": [
        d(
            "dir/",
            pax={
                "SCHILY.xattr.user.note": "kept",
                "SCHILY.xattr.trusted.overlay.opaque": "y",
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
            },
        ),
        member("file", b"x", pax={"SCHILY.xattr.user.note": "kept too"}),
    ],
    "whiteouts and opaque directories": [
        d("etc/"),
        member("etc/.wh.passwd", b""),
        member("usr/lib/.wh.gone-dir", b""),
        d("opaque/"),
        member("opaque/.wh..wh..opq", b""),
        member("opaque/new", b"n"),
        member("implied/.wh..wh..opq", b""),
        member(".wh..wh.plnk", b""),
        member("keep", b"k"),
        member(".wh.keep", b""),
        member(".wh.x", b""),
        member("x", b"back"),
    ],
    "times beyond what squashfs keeps": [
        member("old", b"x", mtime=0),
        member("late", b"x", pax={"mtime": "5000000000"}),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_image_holds_what_unpacking_makes(
    tmp_path: Path, mounted: list[Path], case: str
) -> None:
    raw = make_tar(CASES[case])
    image = snapshot(as_image(tmp_path, raw, mounted))
    unpacked = snapshot(as_dir(tmp_path, raw))
    if case == "times beyond what squashfs keeps":
        # squashfs keeps unsigned 32-bit seconds: a later time is clamped to the last.
        assert image["late"][4] == (1 << 32) - 1
        image.pop("late")
        unpacked.pop("late")
    assert image == unpacked


def test_the_result_counts_and_digests_match_unpacking(tmp_path: Path) -> None:
    raw = make_tar(CASES["whiteouts and opaque directories"]) + b"\0" * 4096
    made = build_squashfs(io.BytesIO(raw), tmp_path / "l.sqfs", workdir=tmp_path / "w")
    assert made.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert made.tar_bytes == len(raw)
    unpacked = unpack(io.BytesIO(raw), tmp_path / "dir")
    assert (made.entries, made.skipped, made.file_bytes) == (
        unpacked.entries,
        unpacked.skipped,
        unpacked.file_bytes,
    )
    assert not list((tmp_path / "w").iterdir())  # the spool is gone


HOSTILE: dict[str, tuple[list[Member], type[Exception]]] = {
    "dotdot": ([member("a/../../outside", b"x")], UnsafeLayer),
    "write through a symlink": ([sym("link", "/tmp"), member("link/victim", b"x")], UnsafeLayer),
    "hard link outside": ([hard("link", "../outside/victim")], UnsafeLayer),
    "hard link to nothing": ([hard("link", "missing")], UnsafeLayer),
    "whiteout through a symlink": (
        [sym("link", "/etc"), member("link/.wh.passwd", b"")],
        UnsafeLayer,
    ),
    "whiteout naming nothing": ([member("a/.wh.", b"")], UnsafeLayer),
    "owner no id": ([member("f", b"x", pax={"uid": "-2"})], CorruptLayer),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_and_leave_nothing(tmp_path: Path, case: str) -> None:
    members, error = HOSTILE[case]
    raw = make_tar(members)
    with pytest.raises(error):
        unpack(io.BytesIO(raw), tmp_path / "dir")
    with pytest.raises(error):
        build_squashfs(io.BytesIO(raw), tmp_path / "l.sqfs", workdir=tmp_path / "w")
    assert not (tmp_path / "l.sqfs").exists()
    assert not list((tmp_path / "w").iterdir())


def test_a_truncated_layer_is_corrupt(tmp_path: Path) -> None:
    raw = make_tar([member("big", os.urandom(100_000))])[:50_000]
    with pytest.raises(CorruptLayer):
        build_squashfs(io.BytesIO(raw), tmp_path / "l.sqfs", workdir=tmp_path / "w")
    assert not (tmp_path / "l.sqfs").exists()


def test_overlayfs_applies_an_images_whiteouts_and_opaque_directories(
    tmp_path: Path, mounted: list[Path]
) -> None:
    lower = as_image(
        tmp_path,
        make_tar(
            [
                member("etc/passwd", b"root:x:0:0\n"),
                member("etc/hosts", b"localhost\n"),
                member("opaque/old", b"old"),
                member("gone/deep/file", b"d"),
            ]
        ),
        mounted,
    )
    upper = as_image(
        tmp_path,
        make_tar(
            [
                member("etc/.wh.passwd", b""),
                member(".wh.gone", b""),
                d("opaque/"),
                member("opaque/.wh..wh..opq", b""),
                member("opaque/new", b"new"),
            ]
        ),
        mounted,
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={upper}:{lower}", str(merged)],
        check=True,
    )
    mounted.append(merged)
    assert sorted(os.listdir(merged / "etc")) == ["hosts"]
    assert not (merged / "gone").exists()
    assert sorted(os.listdir(merged / "opaque")) == ["new"]
    assert (merged / "opaque/new").read_text() == "new"
