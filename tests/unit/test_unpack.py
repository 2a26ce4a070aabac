"""Layer unpacking: hostile archives, whiteouts, compression formats, damaged data."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.conftest import require_tools
from warmstart.images import unpack as unpack_module
from warmstart.images.errors import CorruptLayer, UnsafeLayer
from warmstart.images.unpack import (
    OPAQUE_XATTR,
    decompress_stream,
    open_layer,
    unpack,
    unpack_layer,
)

Member = tuple[tarfile.TarInfo, bytes | None]


def member(
    name: str,
    data: bytes | None = None,
    *,
    type: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    linkname: str = "",
    uid: int = 0,
    gid: int = 0,
    mtime: float = 1_600_000_000,
    pax: dict[str, str] | None = None,
    devmajor: int = 0,
    devminor: int = 0,
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.linkname = linkname
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.devmajor, info.devminor = devmajor, devminor
    if pax:
        info.pax_headers = dict(pax)
    if data is not None:
        info.size = len(data)
    return info, data


def d(name: str, mode: int = 0o755, **kw: object) -> Member:
    return member(name, type=tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Member:
    return member(name, type=tarfile.SYMTYPE, linkname=target, mode=0o777)


def hard(name: str, target: str) -> Member:
    return member(name, type=tarfile.LNKTYPE, linkname=target)


def make_tar(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def do_unpack(tmp_path: Path, members: list[Member]) -> Path:
    dest = tmp_path / f"layer-{uuid.uuid4().hex[:8]}"
    unpack(io.BytesIO(make_tar(members)), dest)
    return dest


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the layer that no entry may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("original")
    yield path
    assert (path / "victim").read_text() == "original"
    assert sorted(p.name for p in path.iterdir()) == ["victim"]


# -- ordinary content --------------------------------------------------------------------
def test_files_dirs_links_and_metadata(tmp_path: Path) -> None:
    members = [
        d("./"),
        d("./etc/", mode=0o750, uid=1, gid=2),
        member("./etc/hosts", b"127.0.0.1 localhost\n", mode=0o640, uid=3, gid=4, mtime=1234),
        sym("./etc/alias", "hosts"),
        hard("./etc/hosts2", "./etc/hosts"),
        member("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),  # parents implied
        member("empty", b""),
        member("fifo", type=tarfile.FIFOTYPE, mode=0o600),
        d("./ro/", mode=0o555),
        member("./ro/inside", b"x", mode=0o444),
    ]
    raw = make_tar(members)
    dest = tmp_path / "layer"
    result = unpack(io.BytesIO(raw), dest)
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.tar_bytes == len(raw)
    hosts = dest / "etc/hosts"
    assert hosts.read_text() == "127.0.0.1 localhost\n"
    st = hosts.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (3, 4, 1234)
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o750
    assert (dest / "etc").stat().st_uid == 1
    assert os.readlink(dest / "etc/alias") == "hosts"
    assert (dest / "etc/hosts2").stat().st_ino == st.st_ino
    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "empty").read_bytes() == b""
    assert stat.S_ISFIFO((dest / "fifo").lstat().st_mode)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro/inside").read_text() == "x"


def test_diff_id_covers_padding_after_the_archive(tmp_path: Path) -> None:
    raw = make_tar([member("a", b"1")]) + b"\0" * 4096
    assert unpack_layer(io.BytesIO(raw), tmp_path / "l") == (
        "sha256:" + hashlib.sha256(raw).hexdigest()
    )


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_tar_dialect(tmp_path: Path, fmt: int) -> None:
    deep = "/".join(["directory-with-a-long-name"] * 5) + "/file.txt"
    target = "t" * 90
    members = [member(deep, b"deep"), member(target, b"t"), hard("h" * 120, target)]
    if fmt == tarfile.USTAR_FORMAT:
        members = members[:2]  # ustar cannot hold a 120-character link name
    dest = tmp_path / "l"
    buf = make_tar(members, fmt)
    unpack(io.BytesIO(buf), dest)
    assert (dest / deep).read_text() == "deep"
    if fmt != tarfile.USTAR_FORMAT:
        assert (dest / ("h" * 120)).read_text() == "t"


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    dest = do_unpack(
        tmp_path,
        [
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
    )
    assert (dest / "f").read_text() == "second"
    assert (dest / "x/child").read_text() == "c"
    assert (dest / "y").read_text() == "now a file"
    assert not (dest / "s").is_symlink()
    assert (dest / "s").read_text() == "file again"


def test_many_files_rewritten_and_linked(tmp_path: Path) -> None:
    members: list[Member] = []
    for i in range(400):
        members.append(member(f"dir{i % 7}/file{i}", f"content {i}".encode() * (i % 50)))
    members.append(member("dir0/file0", b"rewritten"))
    members.append(hard("dir1/link", "dir0/file0"))
    members.append(member("big", os.urandom(700_000)))
    dest = do_unpack(tmp_path, members)
    for i in range(1, 400):
        assert (dest / f"dir{i % 7}/file{i}").read_bytes() == f"content {i}".encode() * (i % 50)
    assert (dest / "dir0/file0").read_text() == "rewritten"
    assert (dest / "dir1/link").read_text() == "rewritten"
    assert (dest / "big").stat().st_size == 700_000


def test_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "x").write_text("")
    with pytest.raises(ValueError):
        unpack(io.BytesIO(make_tar([member("a", b"")])), tmp_path / "l")


# -- hostile archives --------------------------------------------------------------------
def test_absolute_paths_stay_inside_the_layer(tmp_path: Path, outside: Path) -> None:
    dest = do_unpack(
        tmp_path,
        [member(f"{outside}/victim", b"pwned"), member("/abs/file", b"a")],
    )
    assert (dest / str(outside).lstrip("/") / "victim").read_text() == "pwned"
    assert (dest / "abs/file").read_text() == "a"


@pytest.mark.parametrize("name", ["../outside/victim", "a/../../outside/x", "./../x", ".."])
def test_dotdot_is_refused(tmp_path: Path, outside: Path, name: str) -> None:
    with pytest.raises(UnsafeLayer, match=r"\.\."):
        do_unpack(tmp_path, [member(name, b"pwned")])


@pytest.mark.parametrize("name", ["../evil", "a/../../evil"])
def test_dotdot_in_a_symlink_or_hardlink_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeLayer):
        do_unpack(tmp_path, [sym(name, "/etc")])
    with pytest.raises(UnsafeLayer):
        do_unpack(tmp_path, [member("f", b"x"), hard(name, "f")])


@pytest.mark.parametrize("target_kind", ["absolute", "relative"])
def test_no_write_through_a_symlink(tmp_path: Path, outside: Path, target_kind: str) -> None:
    target = str(outside) if target_kind == "absolute" else "../outside"
    with pytest.raises(UnsafeLayer, match="symlink"):
        do_unpack(tmp_path, [sym("escape", target), member("escape/victim", b"pwned")])
    with pytest.raises(UnsafeLayer, match="symlink"):
        do_unpack(tmp_path, [sym("escape", target), d("escape/sub/")])
    with pytest.raises(UnsafeLayer, match="symlink"):
        do_unpack(tmp_path, [sym("escape", target), sym("escape/link", "/")])


def test_file_over_a_symlink_replaces_the_link(tmp_path: Path, outside: Path) -> None:
    dest = do_unpack(tmp_path, [sym("f", str(outside / "victim")), member("f", b"new")])
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_text() == "new"


def test_symlinks_pointing_anywhere_are_kept_as_links(tmp_path: Path, outside: Path) -> None:
    dest = do_unpack(tmp_path, [sym("abs", "/etc/passwd"), sym("rel", "../../../../etc")])
    assert os.readlink(dest / "abs") == "/etc/passwd"
    assert os.readlink(dest / "rel") == "../../../../etc"


@pytest.mark.parametrize("target", ["../outside/victim", "/etc/passwd", "missing", "dir"])
def test_hardlinks_must_point_into_the_layer(tmp_path: Path, outside: Path, target: str) -> None:
    with pytest.raises(UnsafeLayer):
        do_unpack(tmp_path, [d("dir/"), hard("link", target)])


def test_hardlink_to_a_symlink_links_the_symlink_itself(tmp_path: Path, outside: Path) -> None:
    dest = do_unpack(tmp_path, [sym("s", str(outside / "victim")), hard("h", "s")])
    assert (dest / "h").is_symlink()
    assert os.readlink(dest / "h") == str(outside / "victim")


def test_device_nodes_are_never_created(tmp_path: Path) -> None:
    dest = tmp_path / "l"
    result = unpack(
        io.BytesIO(
            make_tar(
                [
                    member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
                    member("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
                    member("dev/zero", type=tarfile.CHRTYPE, devmajor=0, devminor=0),
                    member("ok", b"fine"),
                ]
            )
        ),
        dest,
    )
    assert result.skipped == 3
    assert sorted(p.name for p in (dest / "dev").iterdir()) == []
    assert (dest / "ok").read_text() == "fine"


def test_setuid_and_setgid_are_cleared(tmp_path: Path) -> None:
    dest = do_unpack(
        tmp_path,
        [
            member("su", b"\x7fELF", mode=0o4755),
            member("wall", b"\x7fELF", mode=0o2755),
            d("tmp/", mode=0o1777),
            d("shared/", mode=0o2775),
        ],
    )
    assert stat.S_IMODE((dest / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "wall").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "shared").stat().st_mode) == 0o2775  # setgid dir: harmless


def test_only_user_xattrs_are_applied(tmp_path: Path) -> None:
    pax = {
        "SCHILY.xattr.user.note": "kept",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
    }
    dest = do_unpack(tmp_path, [d("dir/", pax=pax), member("file", b"x", pax=pax)])
    for name in ("dir", "file"):
        path = dest / name
        attrs = os.listxattr(path)
        assert os.getxattr(path, "user.note") == b"kept"
        assert "trusted.overlay.opaque" not in attrs
        assert "security.capability" not in attrs


# -- whiteouts ---------------------------------------------------------------------------
def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    dest = do_unpack(
        tmp_path,
        [
            d("etc/"),
            member("etc/.wh.passwd", b""),
            member("usr/lib/.wh.gone-dir", b""),
            d("opaque/"),
            member("opaque/.wh..wh..opq", b""),
            member("opaque/new", b"n"),
            member("implied/.wh..wh..opq", b""),
            member(".wh..wh.plnk", b""),
            member("keep", b"k"),
            member(".wh.keep", b""),  # a whiteout never hides its own layer's entry
        ],
    )
    for path in (dest / "etc/passwd", dest / "usr/lib/gone-dir"):
        st = path.lstat()
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc/.wh.passwd").exists()
    assert os.getxattr(dest / "opaque", OPAQUE_XATTR) == b"y"
    assert os.getxattr(dest / "implied", OPAQUE_XATTR) == b"y"
    assert (dest / "opaque/new").read_text() == "n"
    assert not (dest / "opaque/.wh..wh..opq").exists()
    assert (dest / "keep").read_text() == "k"
    assert not (dest / ".wh..wh.plnk").exists()


def test_an_entry_after_a_whiteout_replaces_it(tmp_path: Path) -> None:
    dest = do_unpack(tmp_path, [member(".wh.x", b""), member("x", b"back")])
    assert (dest / "x").read_text() == "back"


def test_whiteout_through_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    with pytest.raises(UnsafeLayer):
        do_unpack(tmp_path, [sym("link", str(outside)), member("link/.wh.victim", b"")])
    with pytest.raises(UnsafeLayer):
        do_unpack(tmp_path, [member("../.wh.outside", b"")])


@pytest.mark.parametrize("name", [".wh.", "a/.wh.", ".wh..", "a/.wh..."])
def test_a_whiteout_that_names_no_entry_is_refused(tmp_path: Path, name: str) -> None:
    # ".wh." at the top used to delete the unpack target and leave a device in its place
    dest = tmp_path / "layer"
    with pytest.raises(UnsafeLayer, match="names no entry"):
        unpack(io.BytesIO(make_tar([member("a/b", b"x"), member(name, b"")])), dest)
    assert dest.is_dir() and not dest.is_symlink()


@pytest.mark.parametrize(
    "pax",
    [{"mtime": "inf"}, {"mtime": "1e20"}, {"mtime": "nan"}, {"mtime": "-1e20"}],
)
def test_times_beyond_what_utime_takes_are_clamped(tmp_path: Path, pax: dict[str, str]) -> None:
    dest = do_unpack(tmp_path, [member("f", b"x", pax=pax), d("dir", pax=pax)])
    for path in (dest / "f", dest / "dir"):
        assert path.stat().st_mtime_ns in (0, (1 << 63) - 1)


@pytest.mark.parametrize(
    "pax", [{"uid": "-2"}, {"gid": "4294967296"}, {"uid": "4294967295"}, {"uid": "-1"}]
)
def test_owners_that_are_no_ids_are_corrupt(tmp_path: Path, pax: dict[str, str]) -> None:
    with pytest.raises(CorruptLayer, match="is not an id"):
        do_unpack(tmp_path, [member("f", b"x", pax=pax)])


# -- compression -------------------------------------------------------------------------
FILES = [d("app/"), member("app/main.py", b"print('hi')\n" * 1000), sym("app/link", "main.py")]


def compressed(kind: str) -> bytes:
    raw = make_tar(FILES)
    if kind == "gzip":
        return gzip.compress(raw)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("labelled", [True, False])
def test_gzip_zstd_and_plain_layers(tmp_path: Path, kind: str, labelled: bool) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(compressed(kind))
    media_type = MEDIA[kind] if labelled else "application/octet-stream"
    stream = open_layer(blob, media_type)
    try:
        diff_id = unpack_layer(stream, tmp_path / "l")
    finally:
        stream.close()
    assert diff_id == "sha256:" + hashlib.sha256(make_tar(FILES)).hexdigest()
    assert (tmp_path / "l/app/main.py").read_bytes() == b"print('hi')\n" * 1000


def test_docker_media_type_and_multi_member_gzip(tmp_path: Path) -> None:
    raw = make_tar(FILES)
    half = len(raw) // 2
    blob = gzip.compress(raw[:half]) + gzip.compress(raw[half:])  # like eStargz
    stream = decompress_stream(
        io.BytesIO(blob), "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
    assert unpack_layer(stream, tmp_path / "l") == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_zstd_multi_frame(tmp_path: Path) -> None:
    raw = make_tar(FILES)
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(raw[:1000]) + cctx.compress(raw[1000:])
    stream = decompress_stream(io.BytesIO(blob), MEDIA["zstd"])
    assert unpack_layer(stream, tmp_path / "l") == "sha256:" + hashlib.sha256(raw).hexdigest()


def _corrupt(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    for i in range(at, min(at + 64, len(b))):
        b[i] ^= 0x5A
    return bytes(b)


def _big_tar() -> bytes:
    rnd = hashlib.sha256(b"seed").digest() * 20000  # 640 KB, poorly compressible: many blocks
    return make_tar([member("a", rnd), member("b", b"tail" * 1000)])


@pytest.mark.parametrize(
    ("kind", "damage"),
    [
        ("gzip", "truncate"),
        ("gzip", "flip"),
        ("gzip", "header"),
        ("zstd", "truncate"),
        ("zstd", "flip"),
        ("none", "truncate"),
        ("none", "garbage"),
    ],
)
def test_damaged_data_is_a_clear_error(tmp_path: Path, kind: str, damage: str) -> None:
    raw = _big_tar()
    blob = {
        "gzip": gzip.compress(raw),
        "zstd": zstandard.ZstdCompressor().compress(raw),
        "none": raw,
    }[kind]
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob = _corrupt(blob, len(blob) // 2)
    elif damage == "header":
        blob = blob[:2] + b"\x07" + blob[3:]  # compression method 7: not deflate
    elif damage == "garbage":
        blob = hashlib.sha256(b"x").digest() * 100
    stream = decompress_stream(io.BytesIO(blob), MEDIA[kind])
    with pytest.raises(CorruptLayer) as info:
        unpack(stream, tmp_path / "l")
    assert str(info.value)


def test_an_empty_stream_is_an_empty_layer(tmp_path: Path) -> None:
    # zero bytes: no members and no end marker, which tar itself accepts
    assert unpack_layer(io.BytesIO(b""), tmp_path / "l") == (
        "sha256:" + hashlib.sha256(b"").hexdigest()
    )


def test_sparse_members_are_refused(tmp_path: Path) -> None:
    raw = bytearray(make_tar([member("f", b"x" * 10)], tarfile.GNU_FORMAT))
    raw[156] = ord("S")
    # fix the header checksum so the type flag, not the checksum, is what is refused
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    with pytest.raises(CorruptLayer, match="sparse"):
        unpack(io.BytesIO(bytes(raw)), tmp_path / "l")


@pytest.mark.parametrize("damage", ["none", "truncate", "flip", "crc"])
@pytest.mark.parametrize("binary", ["igzip", "python"])
def test_gzip_in_a_child_process(
    tmp_path: Path, damage: str, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if binary == "python":
        monkeypatch.setattr(unpack_module, "GUNZIP_BINARY", "no-such-binary")
    else:
        require_tools("igzip")  # ISA-L's (Debian package isal)
    command = unpack_module.gunzip_command()
    assert ("isal.igzip" in command) == (binary == "python")
    raw = _big_tar()
    blob = gzip.compress(raw)
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob = _corrupt(blob, len(blob) // 2)
    elif damage == "crc":
        blob = blob[:-6] + bytes([blob[-6] ^ 0xFF]) + blob[-5:]
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with open(path, "rb", buffering=0) as raw_file:
        stream = decompress_stream(raw_file, MEDIA["gzip"], process=True)  # type: ignore[arg-type]
        try:
            if damage == "none":
                assert unpack_layer(stream, tmp_path / "l") == (
                    "sha256:" + hashlib.sha256(raw).hexdigest()
                )
            else:
                with pytest.raises(CorruptLayer, match=r"gzip layer data is corrupt|truncated"):
                    unpack(stream, tmp_path / "l")
        finally:
            stream.close()
