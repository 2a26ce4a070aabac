"""OCI layer tars (``images/unpack.py``): generated archives of files, directories,
symlinks pointing out of the layer with files written through them, hard links to outside,
device nodes, whiteouts, long names and PAX records, compressed or not, then damaged.
A layer is unpacked inside its target or refused with ``UnsafeLayer`` / ``CorruptLayer``:
nothing is written outside, no device but a whiteout exists, no privilege is granted."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import scaled
from tests.fuzz.escape import Arena, arena, walk
from warmstart.images.errors import CorruptLayer, UnsafeLayer
from warmstart.images.unpack import OPAQUE_XATTR, decompress_stream, unpack

OUT = "{OUT}"  # replaced by the arena's "outside" directory (an absolute path)

_PARTS = st.sampled_from(
    ["a", "b", "c", "..", ".", "", "x" * 120, "é", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh."]
)
_NAMES = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "", "./", "/", "../", "../outside/", OUT + "/"]),
    st.lists(_PARTS, min_size=1, max_size=4),
)
_LINK_TARGETS = st.one_of(
    _NAMES,
    st.sampled_from(["..", "../outside", "/", OUT, OUT + "/sentinel", OUT + "/dir", "a", "a/b"]),
)
_TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.DIRTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        b"V",  # a GNU volume header: an unknown type to us
    ]
)
_PAX = st.dictionaries(
    st.sampled_from(
        [
            "mtime",
            "uid",
            "gid",
            "size",
            "path",
            "linkpath",
            "SCHILY.xattr.user.k",
            "SCHILY.xattr.trusted.overlay.opaque",
            "SCHILY.xattr.trusted.overlay.redirect",
            "SCHILY.xattr.security.capability",
            "GNU.sparse.map",
        ]
    ),
    st.sampled_from(
        ["0", "1", "-1", "1e20", "inf", "nan", "4294967296", "99999999999999999999", "y", "",
         "x", "../outside/sentinel", OUT + "/sentinel", "1.5"]
    ),
    max_size=3,
)


@dataclass(frozen=True)
class Member:
    name: str
    type: bytes
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    mtime: int = 0
    pax: dict[str, str] = field(default_factory=dict)


_MEMBERS = st.builds(
    Member,
    _NAMES,
    _TYPES,
    st.binary(max_size=600),
    _LINK_TARGETS,
    st.sampled_from([0, 0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777, 0o000]),
    st.sampled_from([0, 1000, 65534, (1 << 21) - 1]),
    st.sampled_from([0, 1, 1_700_000_000, (1 << 33) - 1]),
    _PAX,
)


def _fill(text: str, outside: str) -> str:
    return text.replace(OUT, outside)


def build_tar(members: list[Member], outside: str, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for m in members:
            info = tarfile.TarInfo(_fill(m.name, outside))
            info.type = m.type
            info.mode = m.mode
            info.uid = m.uid
            info.mtime = m.mtime
            info.linkname = _fill(m.linkname, outside)
            if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            pax = {k: _fill(v, outside) for k, v in m.pax.items()}
            data = m.data if info.isreg() else b""
            info.size = len(data)
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = pax
            try:
                tf.addfile(info, io.BytesIO(data) if data else None)
            except ValueError:
                continue  # not expressible in this format (a long name in ustar)
    return buf.getvalue()


@dataclass(frozen=True)
class Damage:
    """Damage described independently of the bytes it hits (the tar holds the arena's
    path, which differs from run to run): positions are fractions of the length."""

    kind: str
    at: tuple[float, ...]
    values: tuple[int, ...]
    junk: bytes

    def apply(self, data: bytes) -> bytes:
        out = bytearray(data)
        if self.kind == "truncate" and out:
            del out[int(self.at[0] * len(out)) :]
        elif self.kind == "overwrite" and out:
            for at, value in zip(self.at, self.values, strict=False):
                out[int(at * len(out))] = value
        elif self.kind == "append":
            out += self.junk
        return bytes(out)


_FRACTIONS = st.floats(min_value=0, max_value=1, exclude_max=True)
_DAMAGE = st.builds(
    Damage,
    st.sampled_from(["none", "none", "none", "truncate", "overwrite", "append"]),
    st.lists(_FRACTIONS, min_size=1, max_size=6).map(tuple),
    st.lists(st.integers(0, 255), min_size=1, max_size=6).map(tuple),
    st.binary(min_size=1, max_size=1100),
)


@dataclass(frozen=True)
class Layer:
    members: list[Member]
    fmt: int
    compression: str
    damage: Damage
    damage_before: bool  # damage the tar (then compress) or the compressed blob


_LAYERS = st.builds(
    Layer,
    st.lists(_MEMBERS, max_size=8),
    st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]),
    st.sampled_from(["none", "none", "gzip", "zstd"]),
    _DAMAGE,
    st.booleans(),
)


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _media_type(compression: str) -> str:
    suffix = {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]
    return "application/vnd.oci.image.layer.v1.tar" + suffix


def check_unpacked(a: Arena) -> None:
    """Inside the target: no device but the 0/0 whiteout, no setuid bit anywhere and no
    setgid on files, and no extended attribute but ``user.*`` and the opaque marker; the
    target itself is still a directory."""
    assert a.target.is_dir() and not a.target.is_symlink(), "the target was replaced"
    for path, st_ in walk(a.target):
        mode = st_.st_mode
        assert not stat.S_ISBLK(mode), path
        if stat.S_ISCHR(mode):
            assert st_.st_rdev == 0, f"a device node: {path}"
        assert not mode & stat.S_ISUID, path
        if not stat.S_ISDIR(mode):
            assert not mode & stat.S_ISGID, path
        if not stat.S_ISLNK(mode):
            for name in os.listxattr(path, follow_symlinks=False):
                assert name.startswith("user.") or name == OPAQUE_XATTR, (path, name)
                if name == OPAQUE_XATTR:
                    assert os.getxattr(path, name, follow_symlinks=False) == b"y"


@given(_LAYERS)
def test_a_layer_unpacks_inside_its_target_or_is_refused(layer: Layer) -> None:
    with arena() as a:
        tar = build_tar(layer.members, str(a.outside), layer.fmt)
        if layer.damage_before:
            blob = _compress(layer.damage.apply(tar), layer.compression)
        else:
            blob = layer.damage.apply(_compress(tar, layer.compression))
        stream = decompress_stream(io.BytesIO(blob), _media_type(layer.compression))
        with contextlib.suppress(UnsafeLayer, CorruptLayer):
            unpack(stream, a.target)
        check_unpacked(a)


@given(st.binary(max_size=4096), st.sampled_from(["none", "gzip", "zstd"]))
def test_bytes_that_are_no_tar_are_refused(blob: bytes, compression: str) -> None:
    with arena() as a:
        stream = decompress_stream(io.BytesIO(blob), _media_type(compression))
        with contextlib.suppress(UnsafeLayer, CorruptLayer):
            unpack(stream, a.target)
        check_unpacked(a)


@settings(max_examples=scaled(10))  # a child process per example
@given(st.lists(_MEMBERS, max_size=8))
def test_the_sequential_gzip_child_process_agrees(members: list[Member]) -> None:
    """``process=True`` inflates through ISA-L's command line: damaged gzip is refused
    the same way (its exit status becomes CorruptLayer)."""
    with arena() as a:
        blob = gzip.compress(build_tar(members, str(a.outside), tarfile.PAX_FORMAT), mtime=0)
        blob = blob[: len(blob) * 2 // 3]  # cut short: the child must say so
        path = a.root / "outside.blob"
        path.write_bytes(blob)
        try:
            with open(path, "rb", buffering=0) as raw:
                stream = decompress_stream(raw, _media_type("gzip"), process=True)
                try:
                    unpack(stream, a.target)
                except (UnsafeLayer, CorruptLayer):
                    pass
                finally:
                    stream.close()
        finally:
            path.unlink()
        check_unpacked(a)



@settings(max_examples=scaled(25))  # a tar2sqfs run and a loop mount per example
@given(_LAYERS)
def test_a_layer_image_holds_what_unpacking_makes(layer: Layer) -> None:
    """The squashfs builder applies the unpacker's rules: the same refusal, or an image
    whose mounted tree is the unpacked tree."""
    from tests.integration.test_layer_images import snapshot
    from warmstart.images import layerimage
    from warmstart.runtime import syscalls

    if os.geteuid() != 0 or not layerimage.available():
        return  # the builder needs tar2sqfs, the mount root (tests/integration say so)
    with arena() as a:
        tar = build_tar(layer.members, str(a.outside), layer.fmt)
        blob = layer.damage.apply(tar)

        def outcome(build: Callable[[io.BytesIO], object]) -> type[Exception] | None:
            try:
                build(io.BytesIO(blob))
            except (UnsafeLayer, CorruptLayer) as exc:
                return type(exc)
            return None

        work = a.outside / "image"  # the builder's own files, removed below
        image, mnt = work / "layer.sqfs", work / "mnt"
        try:
            unpacked = outcome(lambda s: unpack(s, a.target))
            built = outcome(lambda s: layerimage.build_squashfs(s, image, workdir=work / "spool"))
            assert built is unpacked
            if built is not None:
                assert not image.exists()
                return
            layerimage.mount_image(image, mnt)
            try:
                # squashfs keeps unsigned 32-bit seconds: a later time is clamped.
                last = (1 << 32) - 1
                unpacked_tree = {
                    k: (*v[:4], None if v[4] is None else min(v[4], last), *v[5:])
                    for k, v in snapshot(a.target).items()
                }
                assert snapshot(mnt) == unpacked_tree
            finally:
                syscalls.umount(str(mnt), syscalls.MNT_DETACH)
        finally:
            shutil.rmtree(work, ignore_errors=True)
