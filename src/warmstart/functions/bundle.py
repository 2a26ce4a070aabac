"""Code bundles: validate a zip, unpack it safely, byte-compile it, store it by digest.

A bundle is stored once per content digest under ``code/<sha256>/`` (read-only to the
sandbox, world-readable so the unprivileged sandbox user can read it).  Unpacking goes
to a temporary directory that is renamed into place, so a half-unpacked bundle is never
visible, and a crash leaves only a ``.tmp-*`` directory that start-up removes.
"""

from __future__ import annotations

import compileall
import errno
import hashlib
import io
import lzma
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from warmstart.errors import EntityTooLarge, InvalidParameter

MAX_ZIP_BYTES = 50 << 20
MAX_UNZIPPED_BYTES = 250 << 20
MAX_ENTRIES = 20_000
_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
# What reading a member raises when the archive lies or is damaged (bad CRC, truncated or
# corrupt compressed data; bz2 reports it as an OSError without errno) or asks for what
# zipfile cannot do (patched data, strong encryption, a newer format version), or has a
# local header whose name is not the UTF-8 it claims (a ValueError) ...
_CORRUPT = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    ValueError,
)
# ... and what writing it raises when its name cannot exist beside the others (a file
# where another member needs a directory, or the reverse) or on this filesystem.
_ENTRY_ERRNOS = frozenset({errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG})


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    if not info.filename:
        raise InvalidParameter("Code zip has an entry without a name")
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith("/"):
        raise InvalidParameter(f"Code zip has an unsafe path: {info.filename!r}")
    if info.flag_bits & 0x1:
        raise InvalidParameter(f"Code zip has an encrypted entry: {info.filename!r}")
    if info.compress_type not in _METHODS:
        raise InvalidParameter(
            f"Code zip entry {info.filename!r} uses an unsupported compression method "
            f"({info.compress_type})"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidParameter(
            f"Code zip contains a symbolic link, which is not allowed: {info.filename!r}"
        )
    if info.is_dir() or not path.parts:
        return None
    return path


def unpack(data: bytes, code_root: Path) -> tuple[str, Path]:
    """Validate and unpack a zip; returns (sha256 hex, directory).  Idempotent per digest."""
    if len(data) > MAX_ZIP_BYTES:
        raise EntityTooLarge(
            f"Zipped size must be smaller than {MAX_ZIP_BYTES} bytes for a direct upload "
            f"(the zip is {len(data)} bytes)"
        )
    sha = digest(data)
    final = code_root / sha
    if final.is_dir():
        return sha, final
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise InvalidParameter(
            "Could not unzip uploaded file. Please check your file, then try to upload again."
        ) from exc
    if len(infos) > MAX_ENTRIES:
        raise InvalidParameter(f"Code zip has more than {MAX_ENTRIES} entries")
    if sum(i.file_size for i in infos) > MAX_UNZIPPED_BYTES:
        raise InvalidParameter(f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes")
    code_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=code_root))
    try:
        _extract(zf, infos, tmp)
        # Byte-compile now: the sandbox sees the code read-only and could never cache it.
        compileall.compile_dir(str(tmp), quiet=2, workers=1)
        for dirpath, dirnames, _ in os.walk(tmp):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in os.listdir(dirpath):
                p = os.path.join(dirpath, f)
                if os.path.isfile(p) and f.endswith(".pyc"):
                    os.chmod(p, 0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # somebody else won the race with the same bytes: fine
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        zf.close()
    return sha, final


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], tmp: Path) -> None:
    written = 0
    for info in infos:
        rel = _safe_member(info)
        if rel is None:
            continue
        target = tmp.joinpath(*rel.parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > MAX_UNZIPPED_BYTES:  # the sizes in the directory can lie
                        raise InvalidParameter(
                            f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes"
                        )
                    dst.write(chunk)
        except _CORRUPT as exc:
            raise InvalidParameter(
                f"Could not unzip {info.filename!r}: the archive is corrupt or unsupported ({exc})"
            ) from exc
        except OSError as exc:
            if exc.errno is not None and exc.errno not in _ENTRY_ERRNOS:
                raise  # the disk failed, not the archive
            reason = exc.strerror or str(exc)
            raise InvalidParameter(f"Could not unzip {info.filename!r}: {reason}") from exc
        executable = (info.external_attr >> 16) & 0o111
        target.chmod(0o755 if executable else 0o644)


def clean_partial(code_root: Path) -> int:
    """Remove unpack directories and partly written zips a crash left behind."""
    n = 0
    if code_root.is_dir():
        for p in code_root.glob(".tmp-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def zip_directory(directory: Path) -> bytes:
    """Zip a directory the way the CLI deploys it (used by ``warmstart deploy DIR``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(directory.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            zf.write(path, path.relative_to(directory).as_posix())
    return buf.getvalue()
