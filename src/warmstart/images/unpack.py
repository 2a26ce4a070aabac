"""Decompress and unpack image layers safely into overlayfs lower directories.

A layer is a tar archive (plain, gzip or zstd) written by whoever built the image, so it is
treated as hostile input. The rules, checked entry by entry:

* names are normalised: a leading ``/`` or ``./`` is dropped (the layer root is the only
  root there is); a name with a ``..`` component is refused (:class:`UnsafeLayer`);
* nothing is ever written *through* a symbolic link: a name whose parent directory is a
  symlink in this layer is refused, and a file replacing a symlink replaces the link itself.
  Symlinks themselves are kept as they are: they are resolved later inside the sandbox's
  root, never on the host;
* a hard link must point at an entry unpacked earlier in this same layer;
* device nodes are skipped, setuid/setgid bits are cleared, and only ``user.*`` extended
  attributes are applied (``trusted.overlay.*`` from a tar could forge whiteouts or
  redirects, ``security.capability`` would grant file capabilities);
* OCI whiteouts become what overlayfs expects in a lower directory: ``.wh.NAME`` a 0/0
  character device at ``NAME``, ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr on
  its directory.

The layer's diff-id (sha256 of the uncompressed tar stream, trailing padding included) is
computed as the archive is read, so a caller can compare it with the image config.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import queue
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard
from isal import igzip_threaded, isal_zlib

from warmstart.images.errors import CorruptLayer, UnsafeLayer

log = logging.getLogger("warmstart.images.unpack")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_READ = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ISAL_ERROR = cast(type[Exception], isal_zlib.error)
_F_SETPIPE_SZ = 1031


def compression_of(media_type: str) -> str | None:
    """ "gzip", "zstd" or "none" from a layer media type; None when it does not say."""
    mt = media_type.lower()
    if mt.endswith(("+gzip", ".tar.gzip", ".gzip")):
        return "gzip"
    if mt.endswith(("+zstd", ".zstd")):
        return "zstd"
    if mt.endswith((".tar", "+tar", "layer.v1.tar", "diff.tar")):
        return "none"
    return None


class _ErrorTranslating(io.RawIOBase):
    """Turns a decompressor's own exceptions into :class:`CorruptLayer` with one message."""

    def __init__(self, inner: IO[bytes], what: str) -> None:
        self._inner = inner
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._inner.read(len(buffer))
        except CorruptLayer:
            raise
        except (OSError, EOFError, ValueError, zstandard.ZstdError, _ISAL_ERROR) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O error (disk, broken pipe) is not corruption
            raise CorruptLayer(f"{self._what}: {exc or type(exc).__name__}") from exc
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        except Exception:  # closing a reader that already failed must not mask the failure
            log.debug("closing %s failed", self._what, exc_info=True)
        super().close()


def decompress_stream(raw: BinaryIO, media_type: str = "", *, process: bool = False) -> BinaryIO:
    """A readable stream of the uncompressed tar inside ``raw``.

    The media type decides; when it names no compression (plain tar, or an unknown type)
    the first bytes are sniffed, so a mislabelled gzip or zstd blob still unpacks. gzip goes
    through ISA-L, zstd through ``zstandard``. Corrupt or truncated data raises
    :class:`CorruptLayer` from ``read``.

    ISA-L's inflate holds the GIL, so in-process it cannot overlap with the Python work of
    unpacking. With ``process`` (and ``raw`` a real file or pipe), a gzip layer is inflated
    by a child process (ISA-L's command line, running on another core), the way container
    runtimes hand gzip to pigz.
    """
    kind = compression_of(media_type)
    if process and kind == "gzip" and _has_fileno(raw):
        return cast(BinaryIO, io.BufferedReader(_GunzipProcess(raw), _READ))
    buffered = (
        raw
        if isinstance(raw, io.BufferedReader)
        else io.BufferedReader(cast(io.RawIOBase, _RawAdapter(raw)), _READ)
    )
    if kind in (None, "none"):
        head = buffered.peek(4)[:4]
        if head.startswith(_GZIP_MAGIC):
            kind = "gzip"
        elif head.startswith(_ZSTD_MAGIC):
            kind = "zstd"
        else:
            kind = "none"
    inner: IO[bytes]
    if kind == "gzip":
        # a reader thread: hashing and pipe reads (GIL-free) overlap with inflating
        inner = cast(IO[bytes], igzip_threaded.open(buffered, "rb", threads=1))  # type: ignore[no-untyped-call]
    elif kind == "zstd":
        inner = cast(IO[bytes], _ZstdReader(buffered))
    else:
        return cast(BinaryIO, buffered)
    return cast(
        BinaryIO,
        io.BufferedReader(_ErrorTranslating(inner, f"{kind} layer data is corrupt"), _READ),
    )


def _has_fileno(raw: BinaryIO) -> bool:
    try:
        raw.fileno()
    except (OSError, AttributeError, ValueError):
        return False
    return True


GUNZIP_BINARY = "igzip"
"""ISA-L's own command line (Debian package ``isal``): used when installed, since it starts
in a millisecond; otherwise the same library's Python command line (``isal`` on PyPI)."""


def gunzip_command() -> list[str]:
    binary = shutil.which(GUNZIP_BINARY)
    if binary:
        return [binary, "-d", "-c"]
    return [sys.executable, "-m", "isal.igzip", "-d", "-c"]


class _GunzipProcess(io.RawIOBase):
    """The output of ISA-L's ``igzip -d -c`` fed from ``raw``'s file descriptor.

    A non-zero exit (bad header, CRC mismatch, truncation) becomes :class:`CorruptLayer`
    with the child's own last line of explanation.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._proc = subprocess.Popen(
            gunzip_command(),
            stdin=raw.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        assert self._proc.stdout is not None
        self._fd = self._proc.stdout.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _READ)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        if n == 0:
            assert self._proc.stderr is not None
            rc = self._proc.wait()
            if rc != 0:
                lines = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
                reason = lines[-1] if lines else f"exit status {rc}"
                raise CorruptLayer(f"gzip layer data is corrupt: {reason}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """zstd frames, one after another, decompressed; a frame cut short is an error.

    (``zstandard``'s stream reader ends quietly on a truncated frame, which would let a
    truncated layer pass for a complete one.)
    """

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._pending = b""
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._pending) and not self._eof:
            self._pending, self._pos = b"", 0
            data = self._inner.read(_READ)
            if not data:
                self._eof = True
                if self._in_frame:
                    raise CorruptLayer("zstd layer data is truncated (a frame is cut short)")
                break
            while data:
                out = self._obj.decompress(data)
                self._in_frame = True
                if out:
                    self._pending += out
                if self._obj.eof:
                    data = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
                    self._in_frame = False
                else:
                    data = b""
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = self._pending[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


class _RawAdapter(io.RawIOBase):
    """Any object with ``read`` as a RawIOBase (so it can be wrapped in a BufferedReader)."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_layer(path: Path, media_type: str = "") -> BinaryIO:
    """The uncompressed tar stream of a layer blob stored at ``path``."""
    return decompress_stream(open(path, "rb", buffering=0), media_type)


# -- reading tar ---------------------------------------------------------------------------
# The tar reader is ours rather than ``tarfile``'s: profiling a 167 MB, 8,000-entry layer
# showed ``tarfile``'s stream mode spending more time copying buffers than the kernel spent
# creating files. This one parses the ustar/PAX/GNU headers image builders write, reads
# file data as large slices, and hashes the stream (the diff-id) as it goes.

BLOCK = 512
_NO_ID = (1 << 32) - 1  # uid_t -1: chown's "leave unchanged", and the end of the id range
_MAX_NS = (1 << 63) - 1
_REGULAR = (b"0", b"\0", b"7")


@dataclass(slots=True)
class TarEntry:
    """One member of a layer tar, after PAX and GNU long-name headers were applied."""

    name: str
    type: bytes  # the ustar type flag: b"0" file, b"1" hard link, b"2" symlink, b"5" dir …
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    linkname: str
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# name mode uid gid size mtime chksum type linkname magic version uname gname devmajor
# devminor prefix (ustar header layout)
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(512)


def _str(raw: bytes) -> str:
    return _decode(raw.split(b"\0", 1)[0])


def _num(raw: bytes, what: str) -> int:
    if raw[:1] and raw[0] & 0x80:  # base-256 (GNU) for values too large for octal
        if raw[0] == 0xFF:
            return 0  # a negative number: only ever seen for pre-1970 mtimes
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptLayer(f"tar header field {what} is not a number: {raw!r}") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """``"%d %s=%s\\n"`` records → {key: raw value}."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptLayer("malformed PAX header record") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise CorruptLayer("malformed PAX header record")
        key, _, value = record[:-1].partition(b"=")
        out[_decode(key)] = value
        pos += length
    return out


class _BackgroundHash:
    """sha256 in a thread of its own: ``hashlib`` releases the GIL while it hashes, so the
    diff-id of a layer costs the unpacking thread nothing but a queue put per block."""

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="diff-id", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            self._hasher.update(block)

    def update(self, block: bytes) -> None:
        self._queue.put(block)

    def hexdigest(self) -> str:
        self.close()
        return self._hasher.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class TarReader:
    """Reads tar members from an uncompressed stream, hashing every byte (the diff-id)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._hasher = _BackgroundHash()
        self.size = 0
        self._global: dict[str, bytes] = {}

    def close(self) -> None:
        self._hasher.close()

    def _fill(self, n: int) -> bool:
        """Make ``n`` bytes available; False if the stream ends first."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return True
        parts = [self._buf[self._pos :]] if avail else []
        while avail < n:
            data = self._stream.read(max(_READ, n - avail))
            if not data:
                self._buf, self._pos = b"".join(parts), 0
                return False
            self._hasher.update(data)
            self.size += len(data)
            parts.append(data)
            avail += len(data)
        self._buf, self._pos = b"".join(parts) if len(parts) > 1 else parts[0], 0
        return True

    def read(self, n: int) -> bytes:
        if not self._fill(n):
            raise CorruptLayer("layer tar archive is truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _more(self) -> None:
        """At least one unread byte in the buffer, or CorruptLayer (truncated archive)."""
        if self._pos >= len(self._buf):
            self._fill(_READ)
            if self._pos >= len(self._buf):
                raise CorruptLayer("layer tar archive ends inside a file's data")

    def chunks(self, n: int) -> Iterator[bytes | memoryview]:
        """The next ``n`` bytes (a member's data) in large pieces, then its padding skipped."""
        remaining = n
        while remaining:
            self._more()
            take = min(remaining, len(self._buf) - self._pos)
            yield memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            remaining -= take
        self.skip((-n) % BLOCK)

    def skip(self, n: int) -> None:
        while n:
            self._more()
            take = min(n, len(self._buf) - self._pos)
            self._pos += take
            n -= take

    def diff_id(self) -> str:
        """Read to the end of the stream (padding after the archive counts) → diff-id."""
        self._pos = len(self._buf)
        while self._fill(_READ):
            self._pos = len(self._buf)
        return "sha256:" + self._hasher.hexdigest()

    def next(self) -> TarEntry | None:
        """The next member's header (its data follows, to be consumed by the caller)."""
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            if not self._fill(BLOCK):
                if len(self._buf) - self._pos:
                    raise CorruptLayer("layer tar archive ends inside a header")
                return None  # no end-of-archive marker: accepted, as tar itself does
            block = self.read(BLOCK)
            if block == _ZERO_BLOCK:
                return None
            fields = _HEADER.unpack(block)
            if _num(fields[6], "chksum") != sum(block) - sum(fields[6]) + 8 * 32:
                raise CorruptLayer("not a tar archive (header checksum mismatch)")
            kind = fields[7]
            size = _num(fields[4], "size")
            if kind in (b"x", b"g"):
                records = _parse_pax(self.read(size))
                self.skip((-size) % BLOCK)
                if kind == b"g":
                    self._global.update(records)
                else:
                    pax.update(records)
                continue
            if kind in (b"L", b"K"):
                value = _decode(self.read(size).split(b"\0", 1)[0])
                self.skip((-size) % BLOCK)
                if kind == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            merged = {**self._global, **pax}
            if kind in (b"S", b"M") or any(k.startswith("GNU.sparse.") for k in merged):
                raise CorruptLayer("sparse or multi-volume tar members are not supported")
            name = _str(fields[0])
            if fields[9] == b"ustar\0":  # POSIX: a prefix field extends the name
                prefix = _str(fields[15])
                if prefix:
                    name = f"{prefix}/{name}"
            entry = TarEntry(
                name=long_name if long_name is not None else name,
                type=kind,
                size=size,
                mode=_num(fields[1], "mode") & 0o7777,
                uid=_num(fields[2], "uid"),
                gid=_num(fields[3], "gid"),
                mtime=float(_num(fields[5], "mtime")),
                linkname=long_link if long_link is not None else _str(fields[8]),
                devmajor=_num(fields[13], "devmajor") if kind in (b"3", b"4") else 0,
                devminor=_num(fields[14], "devminor") if kind in (b"3", b"4") else 0,
            )
            self._apply_pax(entry, merged)
            return entry

    @staticmethod
    def _apply_pax(entry: TarEntry, pax: dict[str, bytes]) -> None:
        try:
            for key, value in pax.items():
                if key == "path":
                    entry.name = _decode(value)
                elif key == "linkpath":
                    entry.linkname = _decode(value)
                elif key == "size":
                    entry.size = int(value)
                elif key == "uid":
                    entry.uid = int(value)
                elif key == "gid":
                    entry.gid = int(value)
                elif key == "mtime":
                    entry.mtime = float(value)
                elif key.startswith("SCHILY.xattr."):
                    entry.xattrs[key[len("SCHILY.xattr.") :]] = value
        except ValueError:
            raise CorruptLayer(f"malformed PAX value in header of {entry.name!r}") from None
        if entry.size < 0:
            raise CorruptLayer(f"negative size for {entry.name!r}")
        if not (0 <= entry.uid < _NO_ID and 0 <= entry.gid < _NO_ID):
            raise CorruptLayer(f"owner {entry.uid}:{entry.gid} of {entry.name!r} is not an id")


# -- writing a layer directory -------------------------------------------------------------
@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # "sha256:…" of the uncompressed tar stream
    tar_bytes: int  # length of that stream
    file_bytes: int  # bytes of regular-file data written (hard links counted once)
    entries: int  # tar entries applied
    skipped: int  # entries neutralised (device nodes, unknown types, foreign xattrs)


def _normalise(name: str) -> str:
    """``./a//b/`` → ``a/b``; ``/abs`` → ``abs``; "" for the root; refuse ``..``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"entry {name!r} has a '..' component")
    return "/".join(parts)


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for every
    thread, for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: always chmod


def _ns(mtime: float) -> int:
    """Nanoseconds for ``utime``: before 1970 (or NaN) is 1970, and a time past what a
    64-bit count of nanoseconds holds (infinity included: PAX times are decimal text) is
    the last one it does."""
    if not mtime > 0:
        return 0
    if mtime >= _MAX_NS / 1_000_000_000:
        return _MAX_NS
    return int(mtime * 1_000_000_000)


def _safe_mode(mode: int) -> int:
    """Permission bits without setuid/setgid: a layer never grants privileges."""
    return mode & 0o1777


def _dir_mode(mode: int) -> int:
    """A directory's permission bits: setuid cleared (setgid on a directory only makes
    new files inherit its group: harmless, and kept)."""
    return mode & 0o7777 & ~stat.S_ISUID


def _user_xattrs(xattrs: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in xattrs.items() if k.startswith("user.")]


class _Unpacker:
    """Applies tar members in archive order to ``dest``, which starts empty and is ours.

    ``kinds`` records what this layer has created at each path. Because nothing else
    writes under ``dest`` while we work, it tells exactly which parents are real
    directories, so a name is never resolved through a symlink the archive planted.
    (Handing small files to writer threads was measured: with the GIL it only cost time.)
    """

    def __init__(self, dest: Path) -> None:
        self.dest = str(dest)
        self.kinds: dict[str, str] = {"": "dir"}  # → "dir" | "file" | "link" | "other" | "wh"
        self.explicit: set[str] = set()  # paths created by an entry of this layer
        self.dirs: dict[str, TarEntry] = {}  # metadata applied at the end
        self.file_bytes = 0
        self.entries = 0
        self.skipped = 0
        self.can_chown = os.geteuid() == 0
        self.ids = (os.geteuid(), os.getegid())
        self.umask = _umask()

    def _path(self, rel: str) -> str:
        return f"{self.dest}/{rel}" if rel else self.dest

    # -- paths -----------------------------------------------------------------------------
    def _parent(self, rel: str, original: str) -> None:
        """Make sure every parent of ``rel`` is a real directory of this layer."""
        slash = rel.rfind("/")
        if slash < 0 or self.kinds.get(rel[:slash]) == "dir":
            return
        cur = ""
        for part in rel[:slash].split("/"):
            cur = f"{cur}/{part}" if cur else part
            kind = self.kinds.get(cur)
            if kind == "dir":
                continue
            if kind == "link":
                raise UnsafeLayer(f"entry {original!r} would be written through symlink {cur!r}")
            if kind is not None:  # a file or whiteout where a directory is needed: replace
                self._remove(cur)
            self._make_dir(cur, 0o755)
            self.kinds[cur] = "dir"

    def _remove(self, rel: str) -> None:
        """Remove what this layer has at ``rel`` (a later entry replaces an earlier one)."""
        kind = self.kinds.pop(rel, None)
        if kind is None:
            return
        self.explicit.discard(rel)
        self._delete(rel, kind)
        if kind == "dir":
            prefix = rel + "/"
            for table in (self.kinds, self.dirs):
                for key in [k for k in table if k.startswith(prefix)]:
                    del table[key]
            self.explicit = {k for k in self.explicit if not k.startswith(prefix)}
            self.dirs.pop(rel, None)

    # -- entries ---------------------------------------------------------------------------
    def apply(self, reader: TarReader, entry: TarEntry) -> None:
        rel = _normalise(entry.name)
        base = rel.rsplit("/", 1)[-1]
        kind = entry.type
        if base.startswith(WHITEOUT_PREFIX):
            reader.skip(entry.size + (-entry.size) % BLOCK)
            self._whiteout(rel, base, entry.name)
            return
        if kind in _REGULAR and rel:
            self._parent(rel, entry.name)
            self._file(reader, rel, entry)
            return
        reader.skip(entry.size + (-entry.size) % BLOCK)
        if kind == b"5":
            if rel:
                self._parent(rel, entry.name)
                if self.kinds.get(rel) != "dir":
                    self._remove(rel)
                    self._make_dir(rel, 0o700)
                    self.kinds[rel] = "dir"
                self.explicit.add(rel)
            self.dirs[rel] = entry
            self._dir_xattrs(rel, _user_xattrs(entry.xattrs))
            self.entries += 1
            return
        if not rel:
            self.skipped += 1
            return
        self._parent(rel, entry.name)
        if kind == b"1":
            self._hardlink(rel, entry)
            return
        if kind == b"2":
            self._remove(rel)
            self._make_symlink(rel, entry)
            self.kinds[rel] = "link"
        elif kind == b"6":
            self._remove(rel)
            self._make_fifo(rel, entry)
            self.kinds[rel] = "other"
        else:  # character/block devices and unknown types are never created from a layer
            log.debug("skipping %s (tar type %r)", entry.name, kind)
            self.skipped += 1
            return
        self.explicit.add(rel)
        self.entries += 1

    def _file(self, reader: TarReader, rel: str, entry: TarEntry) -> None:
        self._remove(rel)
        self.kinds[rel] = "file"
        self.explicit.add(rel)
        self.entries += 1
        self.file_bytes += entry.size
        self._make_file(rel, entry, reader.chunks(entry.size))

    # -- what the rules make, on disk (``layerimage`` records it instead) --------------------
    def _make_dir(self, rel: str, mode: int) -> None:
        os.mkdir(self._path(rel), mode)

    def _delete(self, rel: str, kind: str) -> None:
        if kind == "dir":
            shutil.rmtree(self._path(rel))
        else:
            os.unlink(self._path(rel))

    def _dir_xattrs(self, rel: str, xattrs: list[tuple[str, bytes]]) -> None:
        path = self._path(rel)
        for name, value in xattrs:
            self._setxattr(path, name, value)

    def _make_symlink(self, rel: str, entry: TarEntry) -> None:
        path = self._path(rel)
        os.symlink(entry.linkname, path)
        if self.can_chown:
            os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        os.utime(path, ns=(_ns(entry.mtime),) * 2, follow_symlinks=False)

    def _make_fifo(self, rel: str, entry: TarEntry) -> None:
        path = self._path(rel)
        os.mkfifo(path, 0o600)
        if self.can_chown:
            os.chown(path, entry.uid, entry.gid)
        os.chmod(path, _safe_mode(entry.mode))
        os.utime(path, ns=(_ns(entry.mtime),) * 2)

    def _make_file(self, rel: str, entry: TarEntry, data: Iterable[bytes | memoryview]) -> None:
        meta = (entry.uid, entry.gid, _safe_mode(entry.mode), _ns(entry.mtime))
        self._write(self._path(rel), data, meta, _user_xattrs(entry.xattrs))

    def _make_hardlink(self, rel: str, target: str) -> None:
        os.link(self._path(target), self._path(rel), follow_symlinks=False)

    def _make_whiteout(self, rel: str) -> None:
        os.mknod(self._path(rel), stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def _mark_opaque(self, rel: str) -> None:
        os.setxattr(self._path(rel), OPAQUE_XATTR, b"y")

    def _dir_meta(self, rel: str, entry: TarEntry) -> None:
        path = self._path(rel)
        if self.can_chown:
            os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        os.chmod(path, _dir_mode(entry.mode))
        mtime = _ns(entry.mtime)
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)

    def _setxattr(self, path: str, name: str, value: bytes) -> None:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            log.debug("xattr %s on %s not applied: %s", name, path, exc)

    def _write(
        self,
        path: str,
        data: Iterable[bytes | memoryview],
        meta: tuple[int, int, int, int],
        xattrs: list[tuple[str, bytes]],
    ) -> None:
        uid, gid, mode, mtime = meta
        # created with its final mode; the calls skipped when they would change nothing
        # are a good part of the syscalls per file (thousands of files per layer)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
        try:
            for block in data:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
            if self.can_chown and (uid, gid) != self.ids:
                os.fchown(fd, uid, gid)
            if mode & self.umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        for name, value in xattrs:
            self._setxattr(path, name, value)

    def _hardlink(self, rel: str, entry: TarEntry) -> None:
        target = _normalise(entry.linkname)
        kind = self.kinds.get(target)
        if not target or kind not in ("file", "link", "other"):
            raise UnsafeLayer(
                f"hard link {entry.name!r} -> {entry.linkname!r}: the target is not a file "
                "unpacked earlier in this layer"
            )
        if target == rel:
            return
        self._remove(rel)
        self._make_hardlink(rel, target)
        self.kinds[rel] = kind
        self.explicit.add(rel)
        self.entries += 1

    def _whiteout(self, rel: str, base: str, original: str) -> None:
        slash = rel.rfind("/")
        parent = rel[:slash] if slash >= 0 else ""
        self._parent(rel, original)
        if base == OPAQUE_MARKER:
            self._mark_opaque(parent)
            self.entries += 1
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            self.skipped += 1  # other AUFS metadata (.wh..wh.plnk …): meaningless here
            return
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            # ".wh." alone would delete the directory it is in: at the top, the target
            raise UnsafeLayer(f"whiteout {original!r} names no entry")
        target = f"{parent}/{hidden}" if parent else hidden
        if target in self.explicit:
            return  # a whiteout never hides an entry of its own layer (OCI image spec)
        self._remove(target)
        self._make_whiteout(target)
        self.kinds[target] = "wh"
        self.entries += 1

    def finish(self) -> None:
        """Give directories their owners, modes and times, last: a read-only mode must not
        stop children being created, and creating children changes a directory's mtime."""
        for rel in sorted(self.dirs, key=len, reverse=True):
            if self.kinds.get(rel) != "dir":
                continue
            self._dir_meta(rel, self.dirs[rel])


def unpack(stream: BinaryIO, dest: Path) -> UnpackResult:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``dest``.

    Raises :class:`UnsafeLayer` for an entry that breaks the rules in the module docstring
    and :class:`CorruptLayer` for data that is not a (complete) tar archive; ``dest`` is
    then partial and the caller removes it.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"unpack target {dest} is not empty")
    reader = TarReader(stream)
    unpacker = _Unpacker(dest)
    name = ""
    try:
        while (entry := reader.next()) is not None:
            name = entry.name
            unpacker.apply(reader, entry)
        unpacker.finish()
        diff_id = reader.diff_id()
    except OSError as exc:
        if exc.errno in _ENTRY_ERRNOS:
            raise CorruptLayer(f"cannot unpack {name!r}: {exc.strerror}") from exc
        raise
    finally:
        reader.close()
    return UnpackResult(
        diff_id=diff_id,
        tar_bytes=reader.size,
        file_bytes=unpacker.file_bytes,
        entries=unpacker.entries,
        skipped=unpacker.skipped,
    )


# errors that say "this entry cannot exist here", not "the disk failed"
_ENTRY_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EINVAL}
)


def unpack_layer(stream: BinaryIO, dest: Path) -> str:
    """Unpack an uncompressed tar stream into ``dest``; returns the layer's diff-id."""
    return unpack(stream, dest).diff_id
