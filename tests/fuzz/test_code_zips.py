"""Code zips (``functions/bundle.py``): generated archives, hostile names and modes, lying
and corrupted bytes.  A zip is either unpacked inside the code root or refused with
``InvalidParameter``; nothing else escapes, nothing is left half-unpacked."""

from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.escape import arena, walk
from warmstart.errors import InvalidParameter
from warmstart.functions import bundle

# Name components chosen to reach every branch of the path checks: traversal, absolute
# paths (POSIX and Windows), empty and dot components, very long names, non-ASCII.
_PARTS = st.sampled_from(
    ["a", "b", "pkg", "m.py", "__init__.py", "..", ".", "", "é", "x" * 300, "outside"]
)
_PREFIXES = st.sampled_from(["", "", "", "/", "\\", "./", "../", "C:/", "../outside/"])
_NAMES = st.builds(
    lambda prefix, parts, sep: prefix + sep.join(parts),
    _PREFIXES,
    st.lists(_PARTS, min_size=1, max_size=4),
    st.sampled_from(["/", "/", "\\"]),
)
# st_mode values in external_attr: files, executables, directories, symlinks, devices,
# setuid, and nothing at all (zips made on Windows).
_MODES = st.sampled_from(
    [0, 0o100644, 0o100755, 0o040755, 0o120777, 0o020644, 0o060644, 0o104755, 0o010644]
)
_COMPRESSION = st.sampled_from(
    [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
_CONTENT = st.one_of(
    st.binary(max_size=300),
    # highly compressible: a bomb at small scale (the limit is lowered in the test)
    st.integers(min_value=0, max_value=200_000).map(lambda n: b"\0" * n),
    st.just(b"/work/outside/sentinel"),  # what a symlink entry would point at
)


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes
    mode: int
    compression: int


_MEMBERS = st.builds(Member, _NAMES, _CONTENT, _MODES, _COMPRESSION)


def build_zip(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        with zipfile.ZipFile(buf, "w") as zf:
            for m in members:
                info = zipfile.ZipInfo(m.name)
                info.external_attr = m.mode << 16
                info.compress_type = m.compression
                zf.writestr(info, m.data)
    return buf.getvalue()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` as sent, truncated, with bytes overwritten (CRCs, sizes, flags, methods,
    offsets, names: wherever they land), or followed by junk."""
    kind = draw(st.sampled_from(["none", "none", "truncate", "overwrite", "append", "header"]))
    out = bytearray(data)
    if kind == "truncate" and out:
        del out[draw(st.integers(0, len(out) - 1)) :]
    elif kind == "overwrite" and out:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
    elif kind == "append":
        out += draw(st.binary(min_size=1, max_size=64))
    elif kind == "header":
        # a field of the central directory: sizes that lie, flags (encryption), method
        start = out.rfind(b"PK\x01\x02")
        if start >= 0:
            offset = draw(st.sampled_from([8, 10, 16, 20, 24, 28, 42]))  # flag .. offset
            width = 2 if offset in (8, 10, 28) else 4
            value = draw(st.integers(0, (1 << (8 * width)) - 1))
            out[start + offset : start + offset + width] = value.to_bytes(width, "little")
    return bytes(out)


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=200))  # not a zip at all
    return draw(mutated(build_zip(draw(st.lists(_MEMBERS, max_size=6)))))


_SHA = re.compile(r"[0-9a-f]{64}")
_LIMIT = 64 << 10  # MAX_UNZIPPED_BYTES, lowered so that a small bomb trips it


@given(zips())
def test_a_zip_unpacks_inside_its_directory_or_is_refused(data: bytes) -> None:
    with arena() as a, mock.patch.object(bundle, "MAX_UNZIPPED_BYTES", _LIMIT):
        try:
            sha, directory = bundle.unpack(data, a.target)
        except InvalidParameter:
            ok = False
        else:
            ok = True
            assert directory == a.target / sha
        # nothing half-unpacked stays behind; a success leaves one directory per digest
        if a.target.exists():
            left = sorted(p.name for p in a.target.iterdir())
            assert left == ([sha] if ok else []), left
        if ok:
            written = 0
            for path, st_ in walk(directory):
                assert stat.S_ISDIR(st_.st_mode) or stat.S_ISREG(st_.st_mode), path
                assert not st_.st_mode & (stat.S_ISUID | stat.S_ISGID), path
                if stat.S_ISREG(st_.st_mode) and "__pycache__" not in path.parts:
                    written += st_.st_size
            assert written <= _LIMIT


_SAFE_PARTS = st.sampled_from(["a", "b", "pkg", "m.py", "__init__.py", "é", "data.bin"])


@given(
    st.dictionaries(
        st.lists(_SAFE_PARTS, min_size=1, max_size=3).map("/".join),
        st.binary(max_size=2000),
        max_size=8,
    ),
    _COMPRESSION,
)
def test_a_well_formed_zip_unpacks_exactly(files: dict[str, bytes], compression: int) -> None:
    """The oracle that keeps the refusals honest: sound archives are unpacked byte for
    byte (names where one is a directory of another are refused, not half-applied)."""
    names = sorted(files)
    clash = any(other.startswith(n + "/") for n in names for other in names)
    data = build_zip([Member(n, d, 0o100644, compression) for n, d in files.items()])
    with arena() as a:
        try:
            _, directory = bundle.unpack(data, a.target)
        except InvalidParameter:
            assert clash
            return
        assert not clash
        for name, content in files.items():
            assert (directory / name).read_bytes() == content
