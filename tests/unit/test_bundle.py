"""Code bundles: safe unpacking, limits, and content addressing."""

from __future__ import annotations

import io
import os
import stat
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_zip
from warmstart.errors import EntityTooLarge, InvalidParameter
from warmstart.functions import bundle
from warmstart.functions.store import FunctionStore


def test_unpack_compiles_and_is_content_addressed(tmp_path: Path) -> None:
    data = make_zip({"handler.py": "def handler(e, c):\n    return 1\n", "pkg/mod.py": "X = 1\n"})
    sha, d = bundle.unpack(data, tmp_path)
    assert d == tmp_path / sha
    assert (d / "handler.py").read_text().startswith("def handler")
    assert list((d / "__pycache__").glob("handler.*.pyc")), "code is byte-compiled at deploy"
    assert stat.S_IMODE((d / "pkg" / "mod.py").stat().st_mode) == 0o644
    assert bundle.unpack(data, tmp_path) == (sha, d)  # idempotent
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["../evil.py", "/abs.py", "a/../../evil.py", "..\\evil.py"])
def test_path_traversal_is_rejected(tmp_path: Path, name: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), "x")
    with pytest.raises(InvalidParameter, match="unsafe path"):
        bundle.unpack(buf.getvalue(), tmp_path)
    assert not list(tmp_path.iterdir()) or not any(
        p.name != ".tmp" for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".tmp")
    )


def test_symlinks_are_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/shadow")
    with pytest.raises(InvalidParameter, match="symbolic link"):
        bundle.unpack(buf.getvalue(), tmp_path)


def test_garbage_is_not_a_zip(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter, match="Could not unzip"):
        bundle.unpack(b"this is not a zip file at all", tmp_path)


def test_zip_bomb_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "MAX_UNZIPPED_BYTES", 1000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", b"\0" * 100_000)
    with pytest.raises(InvalidParameter, match="Unzipped size"):
        bundle.unpack(buf.getvalue(), tmp_path)
    assert not list(tmp_path.glob(".tmp-*")), "nothing half-unpacked is left"


def test_clean_partial(tmp_path: Path) -> None:
    (tmp_path / ".tmp-abc").mkdir()
    (tmp_path / ".tmp-def-x.zip").write_bytes(b"half a zip")
    assert bundle.clean_partial(tmp_path) == 2
    assert not list(tmp_path.iterdir())


def test_the_same_bundle_stored_twice_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deploys of the same bytes store its zip at the same moment (each on a thread):
    both succeed and one zip is left, whichever renames first."""
    data = make_zip({"handler.py": "def handler(e, c):\n    return 1\n"})
    store = FunctionStore(tmp_path)
    both_written = threading.Barrier(2, timeout=30)
    real_rename, real_replace = os.rename, os.replace

    def when_both_wrote(real: Callable[..., None]) -> Callable[..., None]:
        def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if str(dst).endswith(".zip"):
                both_written.wait()  # neither has put its zip in place yet
            real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", when_both_wrote(real_rename))
    monkeypatch.setattr(os, "replace", when_both_wrote(real_replace))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: store.put_code(data), range(2)))
    sha = results[0][0]
    assert results[0] == results[1]
    assert (tmp_path / "code" / f"{sha}.zip").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "code").iterdir()) == [sha, f"{sha}.zip"]


def test_zip_directory_skips_caches(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.py").write_text("x = 1\n")
    (tmp_path / "src" / "__pycache__").mkdir()
    (tmp_path / "src" / "__pycache__" / "hello.cpython-311.pyc").write_bytes(b"junk")
    names = zipfile.ZipFile(io.BytesIO(bundle.zip_directory(tmp_path / "src"))).namelist()
    assert names == ["hello.py"]


def test_a_zip_over_the_zipped_limit_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zip's own size is its own error (413), not the unzipped size's."""
    monkeypatch.setattr(bundle, "MAX_ZIP_BYTES", 1000)
    data = make_zip({"handler.py": "X = '" + "y" * 5000 + "'\n"})
    data += b"\0" * max(0, 1001 - len(data))
    with pytest.raises(EntityTooLarge, match="Zipped size must be smaller than 1000 bytes"):
        bundle.unpack(data, tmp_path)


# -- archives the fuzz tests (tests/fuzz/test_code_zips.py) found answered with a 500 --------
def _zip_bytes(*members: tuple[str, bytes]) -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return bytearray(buf.getvalue())


def _central(data: bytearray) -> int:
    return data.rfind(b"PK\x01\x02")


@pytest.mark.parametrize(
    "members",
    [
        [("a", b"file"), ("a/b.py", b"")],  # a file where a directory is needed
        [("a/b.py", b""), ("a", b"file")],  # and the reverse
        [("x" * 300 + ".py", b"")],  # a name no filesystem takes
    ],
)
def test_names_that_cannot_coexist_are_invalid(
    tmp_path: Path, members: list[tuple[str, bytes]]
) -> None:
    with pytest.raises(InvalidParameter, match="Could not unzip"):
        bundle.unpack(bytes(_zip_bytes(*members)), tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_bad_crc_or_corrupt_data_is_invalid(tmp_path: Path) -> None:
    data = _zip_bytes(("a.py", b"hello world" * 100))
    data[_central(data) + 16] ^= 0xFF  # the CRC the data is checked against
    with pytest.raises(InvalidParameter, match="corrupt"):
        bundle.unpack(bytes(data), tmp_path)
    data = _zip_bytes(("a.py", b"hello world" * 100))
    data[40] ^= 0xFF  # inside the deflated data
    with pytest.raises(InvalidParameter, match="corrupt"):
        bundle.unpack(bytes(data), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (8, 1, "encrypted"),  # general purpose flag: encrypted
        (8, 1 << 5, "unsupported"),  # compressed patched data
        (10, 99, "unsupported compression"),  # compression method
        (6, 64, "Could not unzip uploaded file"),  # "version needed to extract": 6.4
    ],
)
def test_what_zipfile_cannot_read_is_invalid(
    tmp_path: Path, offset: int, value: int, match: str
) -> None:
    data = _zip_bytes(("a.py", b"x"))
    start = _central(data)
    data[start + offset : start + offset + 2] = value.to_bytes(2, "little")
    with pytest.raises(InvalidParameter, match=match):
        bundle.unpack(bytes(data), tmp_path)


def test_an_entry_without_a_name_is_invalid(tmp_path: Path) -> None:
    data = _zip_bytes(("a", b"x"))
    start = _central(data)
    data[start + 28 : start + 30] = b"\0\0"  # file name length 0: the name becomes data
    data[start + 46 : start + 47] = b""
    # the end record's central directory size shrinks by the byte removed
    end = data.rfind(b"PK\x05\x06")
    size = int.from_bytes(data[end + 12 : end + 16], "little") - 1
    data[end + 12 : end + 16] = size.to_bytes(4, "little")
    with pytest.raises(InvalidParameter, match="without a name"):
        bundle.unpack(bytes(data), tmp_path)
