"""Lazy image mounts: one FUSE daemon per mounted image, owned by the worker.

:class:`LazyMounts` starts ``python -m warmstart.images.lazyfs`` for an image whose layers
are eStargz blobs in a registry (or unpacked directories), hands it a JSON
:class:`DaemonSpec` on stdin and waits for its "ready" line on a pipe, which the daemon
writes only once the TOCs are verified, the prioritized files are in the chunk cache and
the mount answers. Each daemon is a separate process so that a crash or a hung registry
read takes down one image's mount, never the worker, and so that its trio loop and FUSE
threads stay out of the worker's asyncio process.

Failure handling lives here too: a daemon that died (killed, crashed) is noticed on the
next :meth:`LazyMounts.mount` of the same image, its dead mount (every access answers
ENOTCONN) is detached and a new daemon is started; :meth:`LazyMounts.recover` at start
detaches the FUSE mounts a crashed worker left under its root.

The spec types live in this module, not in the daemon's package
(:mod:`warmstart.images.lazyfs`), so the worker never imports pyfuse3 or trio to
describe a mount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from warmstart.images.errors import ImageError
from warmstart.runtime import syscalls

log = logging.getLogger(__name__)

LAYER_KINDS = ("estargz", "file", "dir", "gzindex")


@dataclass(frozen=True)
class LayerSource:
    """One layer of a lazily mounted image.

    ``kind`` is ``"estargz"`` (a blob in a registry, read by Range requests: ``ref`` names
    the repository holding it, ``digest`` the blob, ``toc_digest`` the manifest's
    ``containerd.io/snapshot/stargz/toc.digest`` annotation, ``size`` the descriptor's
    size or 0 to ask the registry), ``"file"`` (an eStargz blob already on local disk at
    ``path``) or ``"dir"`` (a layer that was fully pulled and unpacked at ``path``, with
    whiteouts in overlayfs form) or ``"gzindex"`` (a plain gzip blob in a registry, or on
    local disk at ``path``, read through its gzip index: the blob ``index_digest`` of
    ``index_size`` bytes in the same repository, or the file ``index_path``; its first
    ``toc_size`` bytes are the TOC member, hashing to ``toc_digest``).
    """

    kind: str
    ref: str = ""
    digest: str = ""
    toc_digest: str = ""
    size: int = 0
    path: str = ""
    index_digest: str = ""
    index_size: int = 0
    index_path: str = ""
    toc_size: int = 0

    @classmethod
    def estargz(cls, ref: str, digest: str, toc_digest: str, size: int = 0) -> LayerSource:
        return cls("estargz", ref=ref, digest=digest, toc_digest=toc_digest, size=size)

    @classmethod
    def gzindex(
        cls,
        ref: str,
        digest: str,
        size: int,
        index_digest: str,
        index_size: int = 0,
        *,
        toc_size: int = 0,
        toc_digest: str = "",
    ) -> LayerSource:
        return cls(
            "gzindex",
            ref=ref,
            digest=digest,
            size=size,
            index_digest=index_digest,
            index_size=index_size,
            toc_size=toc_size,
            toc_digest=toc_digest,
        )

    @classmethod
    def directory(cls, path: Path | str) -> LayerSource:
        return cls("dir", path=str(path))

    @classmethod
    def blob_file(cls, path: Path | str, toc_digest: str = "") -> LayerSource:
        return cls("file", path=str(path), toc_digest=toc_digest)

    def check(self) -> None:
        """Refuse a spec the daemon could only fail on later, with a clearer message."""
        if self.kind not in LAYER_KINDS:
            raise ImageError(f"unknown lazy layer kind {self.kind!r}")
        if self.kind == "estargz" and not (self.ref and self.digest):
            raise ImageError("an eStargz layer needs a registry reference and a blob digest")
        if self.kind in ("file", "dir") and not self.path:
            raise ImageError(f"a {self.kind!r} layer needs a path")
        if self.kind == "gzindex":
            if not self.digest or not (self.ref or self.path):
                raise ImageError("an indexed layer needs its blob digest and where it is")
            if not self.index_path and not (
                self.index_digest and self.toc_size > 0 and self.toc_digest
            ):
                raise ImageError("an indexed layer needs its index (digest, TOC size and digest)")
        if self.size < 0:
            raise ImageError(f"negative layer size {self.size}")

    @classmethod
    def from_json(cls, raw: Any) -> LayerSource:
        if not isinstance(raw, dict):
            raise ImageError("layer spec is not an object")
        try:
            layer = cls(
                kind=str(raw["kind"]),
                ref=str(raw.get("ref", "")),
                digest=str(raw.get("digest", "")),
                toc_digest=str(raw.get("toc_digest", "")),
                size=int(raw.get("size", 0)),
                path=str(raw.get("path", "")),
                index_digest=str(raw.get("index_digest", "")),
                index_size=int(raw.get("index_size", 0)),
                index_path=str(raw.get("index_path", "")),
                toc_size=int(raw.get("toc_size", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"bad layer spec {raw!r}: {exc}") from exc
        layer.check()
        return layer


@dataclass(frozen=True)
class BackgroundFetch:
    """How the rest of an image is fetched after the mount is ready.

    Background batches wait while any foreground read is fetching, so they never delay
    the function; ``bandwidth`` (bytes/s, 0 = unlimited) and ``concurrency`` (batches in
    flight) bound what they take from the registry and the network.
    """

    enabled: bool = True
    concurrency: int = 1
    bandwidth: int = 0
    batch_bytes: int = 1 << 20
    delay: float = 0.0  # seconds after "ready" before the first batch
    quiet: float = 1.0  # seconds without a foreground fetch before each batch

    @classmethod
    def from_json(cls, raw: Any) -> BackgroundFetch:
        if not isinstance(raw, dict):
            raise ImageError("background spec is not an object")
        try:
            bg = cls(
                enabled=bool(raw.get("enabled", True)),
                concurrency=int(raw.get("concurrency", 1)),
                bandwidth=int(raw.get("bandwidth", 0)),
                batch_bytes=int(raw.get("batch_bytes", 1 << 20)),
                delay=float(raw.get("delay", 0.0)),
                quiet=float(raw.get("quiet", 1.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ImageError(f"bad background spec {raw!r}: {exc}") from exc
        if (
            bg.concurrency < 1
            or bg.bandwidth < 0
            or bg.batch_bytes < 1
            or bg.delay < 0
            or bg.quiet < 0
        ):
            raise ImageError(f"bad background spec {raw!r}")
        return bg


@dataclass(frozen=True)
class RegistrySettings:
    """What the daemon needs to build its own ``RegistryClient``.

    Secrets never travel in the spec: ``credentials_file`` is a JSON file
    ``{"host:port": ["user", "password"]}`` (mode 0600, written by the worker) and
    ``docker_config`` a ``~/.docker/config.json``.
    """

    docker_config: str = ""
    credentials_file: str = ""
    insecure: tuple[str, ...] = ()
    retries: int = 4
    timeout: float = 30.0

    @classmethod
    def from_json(cls, raw: Any) -> RegistrySettings:
        if not isinstance(raw, dict):
            raise ImageError("registry spec is not an object")
        try:
            return cls(
                docker_config=str(raw.get("docker_config", "")),
                credentials_file=str(raw.get("credentials_file", "")),
                insecure=tuple(str(h) for h in raw.get("insecure", ())),
                retries=int(raw.get("retries", 4)),
                timeout=float(raw.get("timeout", 30.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ImageError(f"bad registry spec {raw!r}: {exc}") from exc


@dataclass(frozen=True)
class MountSpec:
    """An image to mount lazily: its layers bottom → top, and how to fetch it."""

    layers: tuple[LayerSource, ...]
    background: BackgroundFetch = field(default_factory=BackgroundFetch)
    read_ahead: int = 64 << 10  # compressed bytes fetched past a missed chunk, in blob order

    def key(self) -> str:
        """The mount's identity: the same layers give the same mount, whatever the fetch
        settings, so two functions of one image share one daemon."""
        ident = json.dumps([asdict(layer) for layer in self.layers], sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DaemonSpec:
    """Everything one ``lazyfs`` daemon is told, as JSON on its stdin."""

    mountpoint: str
    cache_dir: str
    layers: tuple[LayerSource, ...]
    stats_path: str = ""
    background: BackgroundFetch = field(default_factory=BackgroundFetch)
    read_ahead: int = 64 << 10
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    stats_interval: float = 0.5
    parent_pid: int = 0  # the daemon unmounts and exits when this process is gone
    allow_other: bool = True  # sandboxes read the mount as other users

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> DaemonSpec:
        if not isinstance(raw, dict):
            raise ImageError("daemon spec is not a JSON object")
        try:
            layers = tuple(LayerSource.from_json(x) for x in raw["layers"])
            spec = cls(
                mountpoint=str(raw["mountpoint"]),
                cache_dir=str(raw["cache_dir"]),
                layers=layers,
                stats_path=str(raw.get("stats_path", "")),
                background=BackgroundFetch.from_json(raw.get("background", {})),
                read_ahead=int(raw.get("read_ahead", 64 << 10)),
                registry=RegistrySettings.from_json(raw.get("registry", {})),
                stats_interval=float(raw.get("stats_interval", 0.5)),
                parent_pid=int(raw.get("parent_pid", 0)),
                allow_other=bool(raw.get("allow_other", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"bad daemon spec: {exc!r}") from exc
        if not spec.layers:
            raise ImageError("daemon spec has no layers")
        if spec.read_ahead < 0 or spec.stats_interval <= 0:
            raise ImageError("daemon spec has a negative read_ahead or stats_interval")
        return spec


# -- mount table helpers ---------------------------------------------------------------------
def fuse_mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every FUSE mount in this mount namespace."""
    return [(m.mount_point, m.fstype) for m in syscalls.mounts() if m.fstype.startswith("fuse")]


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a FUSE mount point; works when the daemon is dead, where a
    stat of the mount point fails with ENOTCONN."""
    target = str(path)
    return any(mp == target for mp, _ in fuse_mounts())


def detach(path: Path) -> None:
    """Lazily unmount ``path``: gone from the tree at once, torn down when the last user
    lets go. ``umount2(MNT_DETACH)`` as root, ``fusermount3 -u -z`` otherwise."""
    try:
        syscalls.umount(str(path), syscalls.MNT_DETACH)
        return
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a mount point (any more)
            return
        cause = exc
    res = subprocess.run(
        ["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0 and is_mounted(path):
        raise ImageError(
            f"cannot unmount {path}: {cause.strerror}; fusermount3: {res.stderr.strip()}"
        )


# -- the worker's side -----------------------------------------------------------------------
@dataclass
class _Mount:
    key: str
    spec: MountSpec
    path: Path
    proc: subprocess.Popen[bytes]
    stats_path: Path
    log_path: Path
    ready_seconds: float
    mounted_at: float = field(default_factory=time.time)
    remounts: int = 0


# While mounts run, the chunk cache is trimmed this often, sparing what was used this
# recently.
TRIM_INTERVAL_S = 30.0
KEEP_RECENT_S = 60.0


class LazyMounts:
    """The lazy mounts of one worker, under ``root``:

    ``root/mnt/<key>``          mount points (one per distinct image)
    ``root/run/<key>.log``      the daemon's log (appended across remounts)
    ``root/run/<key>.stats.json`` its stats, rewritten every ``stats_interval``
    ``cache_dir``               the chunk cache, by chunk digest (default ``root/cache``),
                                shared by every mount and every image

    Thread-safe: the worker calls :meth:`mount` from threads; two calls for one image
    start one daemon.
    """

    def __init__(
        self,
        root: Path,
        *,
        cache_dir: Path | None = None,
        registry: RegistrySettings | None = None,
        python: str = sys.executable,
        ready_timeout: float = 300.0,
        stop_timeout: float = 10.0,
        stats_interval: float = 0.5,
        log_level: str = "INFO",
        cache_budget_bytes: int | None = None,
        trim_interval: float = TRIM_INTERVAL_S,
        keep_recent_s: float = KEEP_RECENT_S,
    ) -> None:
        self.root = root
        self.mnt_dir = root / "mnt"
        self.run_dir = root / "run"
        self.cache_dir = cache_dir or root / "cache"
        self.registry = registry or RegistrySettings()
        self.python = python
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.stats_interval = stats_interval
        self.log_level = log_level
        for d in (self.mnt_dir, self.run_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._mounts: dict[str, _Mount] = {}
        self._lock = threading.Lock()
        self._spare: tuple[subprocess.Popen[bytes], int, Path] | None = None
        self._closed = False
        self.spare_delay = 2.0
        self._key_locks: dict[str, threading.Lock] = {}
        self._remounts: dict[str, int] = {}
        self.cache_budget_bytes = cache_budget_bytes
        self.keep_recent_s = keep_recent_s
        self.trimmed_bytes = 0  # chunk bytes removed to keep the cache within its budget
        self._stop_trimming = threading.Event()
        self._trimmer: threading.Thread | None = None
        if cache_budget_bytes is not None:
            self._trimmer = threading.Thread(
                target=self._trim_loop, args=(trim_interval,), name="chunk-trim", daemon=True
            )
            self._trimmer.start()

    # -- mounting ----------------------------------------------------------------------------
    def mount(self, spec: MountSpec) -> Path:
        """Mount the image (or return its live mount) and return the mount point.

        Blocks until the daemon reports ready: TOCs verified, prioritized files cached,
        the mount answering. A daemon found dead is replaced (its dead mount detached).
        """
        for layer in spec.layers:
            layer.check()
        if not spec.layers:
            raise ImageError("an image needs at least one layer to mount")
        key = spec.key()
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                current = self._mounts.get(key)
            if current is not None:
                code = current.proc.poll()
                if code is None:
                    return current.path
                log.warning(
                    "lazy mount %s: daemon pid %d exited with %s; remounting (log: %s)",
                    current.path,
                    current.proc.pid,
                    _describe_exit(code),
                    current.log_path,
                )
                self._remounts[key] = self._remounts.get(key, 0) + 1
                with self._lock:
                    self._mounts.pop(key, None)
            path = self.mnt_dir / key
            if is_mounted(path):
                detach(path)
            path.mkdir(parents=True, exist_ok=True)
            mount = self._spawn(key, spec, path)
            mount.remounts = self._remounts.get(key, 0)
            with self._lock:
                self._mounts[key] = mount
            return path

    def _spawn(self, key: str, spec: MountSpec, path: Path) -> _Mount:
        stats_path = self.run_dir / f"{key}.stats.json"
        log_path = self.run_dir / f"{key}.log"
        with contextlib.suppress(FileNotFoundError):
            stats_path.unlink()
        daemon_spec = DaemonSpec(
            mountpoint=str(path),
            cache_dir=str(self.cache_dir),
            layers=spec.layers,
            stats_path=str(stats_path),
            background=spec.background,
            read_ahead=spec.read_ahead,
            registry=self.registry,
            stats_interval=self.stats_interval,
            parent_pid=os.getpid(),
        )
        payload = json.dumps(daemon_spec.to_json()).encode()
        started = time.monotonic()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is None:
            # A spare has imported its libraries already: it only waits for a spec.
            proc, ready_r, spare_log = spare
            if not log_path.exists():
                with contextlib.suppress(OSError):
                    spare_log.rename(log_path)
            if not log_path.exists():
                log_path = spare_log
            self._schedule_spare()
        else:
            if spare is not None:
                os.close(spare[1])
            proc, ready_r = self._popen(log_path)
        try:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(payload)
                proc.stdin.close()
            message = _read_ready(ready_r, self.ready_timeout)
        finally:
            os.close(ready_r)
        if message is None or not message.get("ready"):
            reason = (message or {}).get("error") or "the daemon exited before it was ready"
            if message is None and proc.poll() is None:
                reason = f"not ready after {self.ready_timeout:.0f} s"
            self._stop_process(proc)
            if is_mounted(path):
                detach(path)
            raise ImageError(f"lazy mount of {path} failed: {reason}\n{_tail(log_path)}".rstrip())
        ready_seconds = time.monotonic() - started
        log.info("lazy mount %s ready in %.3f s (daemon pid %d)", path, ready_seconds, proc.pid)
        return _Mount(key, spec, path, proc, stats_path, log_path, ready_seconds)

    def _popen(self, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
        """Start a daemon (it imports its libraries, then reads its spec from stdin);
        returns it and the read end of its ready pipe."""
        ready_r, ready_w = os.pipe()
        try:
            with open(log_path, "ab") as log_file:
                proc = subprocess.Popen(
                    [
                        self.python,
                        "-m",
                        "warmstart.images.lazyfs",
                        "--spec",
                        "-",
                        "--ready-fd",
                        str(ready_w),
                        "--log-level",
                        self.log_level,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=(ready_w,),
                    # Not in the worker's process group: a Ctrl-C meant for the worker must
                    # not kill the mounts under running sandboxes mid-read.
                    start_new_session=True,
                )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        return proc, ready_r

    def prestart(self) -> None:
        """Keep one spare daemon that has already imported pyfuse3 and trio, so a mount
        does not wait for a Python start (about a quarter of a second)."""
        with self._lock:
            if self._closed or (self._spare is not None and self._spare[0].poll() is None):
                return
        log_path = self.run_dir / f"spare-{os.getpid()}-{time.monotonic_ns()}.log"
        proc, ready_r = self._popen(log_path)
        with self._lock:
            old, self._spare = self._spare, (proc, ready_r, log_path)
        if old is not None:
            os.close(old[1])
            self._stop_process(old[0])

    def _schedule_spare(self) -> None:
        """A new spare, a little later: not while the mount just made serves a start."""
        timer = threading.Timer(self.spare_delay, self.prestart)
        timer.daemon = True
        timer.start()

    def unmount(self, path: Path) -> None:
        """Stop the daemon of ``path`` and make sure nothing stays mounted there."""
        with self._lock:
            mount = next((m for m in self._mounts.values() if m.path == path), None)
        if mount is not None:
            with self._lock:
                self._mounts.pop(mount.key, None)
            self._stop_process(mount.proc)
        if is_mounted(path):
            detach(path)
        with contextlib.suppress(OSError):
            path.rmdir()

    def _stop_process(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def close(self) -> None:
        """Unmount everything this object mounted, and stop the spare daemon and the
        trimmer."""
        self._stop_trimming.set()
        if self._trimmer is not None:
            self._trimmer.join(timeout=30)
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            paths = [m.path for m in self._mounts.values()]
        if spare is not None:
            os.close(spare[1])
            self._stop_process(spare[0])
            with contextlib.suppress(OSError):
                spare[2].unlink()
        for p in paths:
            self.unmount(p)

    def trim_cache(self, budget_bytes: int, *, keep_recent_s: float = 0.0) -> int:
        """Remove the least recently used chunks until the cache fits ``budget_bytes``;
        returns the bytes freed.  Safe while daemons run: a chunk removed under a reader
        is fetched again; chunks used in the last ``keep_recent_s`` seconds stay (a read
        in flight, a mount's prioritized files), even above the budget.  Leftover partial
        writes go: all of them while nothing is mounted, else those an hour old."""
        with self._lock:
            live = any(m.proc.poll() is None for m in self._mounts.values())
        chunks: list[tuple[float, int, Path]] = []
        for path in (self.cache_dir / "sha256").glob("*/*"):
            with contextlib.suppress(OSError):
                st = path.stat()
                chunks.append((st.st_mtime, st.st_size, path))
        stale = time.time() - 3600
        for leftover in (self.cache_dir / "tmp").glob("*"):  # a crashed daemon's writes
            with contextlib.suppress(OSError):
                if not live or leftover.stat().st_mtime < stale:
                    leftover.unlink()
        total = sum(size for _, size, _ in chunks)
        freed = 0
        recent = time.time() - keep_recent_s
        for mtime, size, path in sorted(chunks):
            if total - freed <= budget_bytes or (keep_recent_s and mtime >= recent):
                break
            with contextlib.suppress(OSError):
                path.unlink()
                freed += size
        if freed:
            self.trimmed_bytes += freed
            log.info(
                "lazy chunk cache: removed %d bytes, least recently used first (budget %d)",
                freed,
                budget_bytes,
            )
        return freed

    def _trim_loop(self, interval: float) -> None:
        """Keep the chunk cache within its budget while mounts run."""
        budget = self.cache_budget_bytes
        assert budget is not None
        while not self._stop_trimming.wait(interval):
            try:
                self.trim_cache(budget, keep_recent_s=self.keep_recent_s)
            except Exception:  # the next round tries again; reads are unaffected
                log.exception("trimming the lazy chunk cache failed")

    def recover(self) -> list[Path]:
        """Detach FUSE mounts under our root that no live daemon of ours serves: what a
        crashed worker left behind. Call once at start, before any :meth:`mount`.

        Detaching is lazy, so a sandbox still reading from a left-over (live) daemon keeps
        working until it lets go; the daemon then exits on its own.
        """
        with self._lock:
            ours = {str(m.path) for m in self._mounts.values() if m.proc.poll() is None}
        prefix = str(self.mnt_dir) + os.sep
        recovered = []
        for mp, _ in fuse_mounts():
            if mp.startswith(prefix) and mp not in ours:
                try:
                    detach(Path(mp))
                except ImageError as exc:
                    log.error("recover: %s", exc)
                    continue
                log.warning("recover: detached stale lazy mount %s", mp)
                recovered.append(Path(mp))
        return recovered

    # -- observing ---------------------------------------------------------------------------
    def alive(self, path: Path) -> bool:
        """Whether a live daemon serves ``path``."""
        with self._lock:
            mount = next((m for m in self._mounts.values() if m.path == path), None)
        return mount is not None and mount.proc.poll() is None

    def pid(self, path: Path) -> int | None:
        with self._lock:
            mount = next((m for m in self._mounts.values() if m.path == path), None)
        return mount.proc.pid if mount is not None else None

    def stats(self, path: Path | None = None, *, fresh: bool = False) -> dict[str, Any]:
        """One mount's stats (what its daemon last wrote, plus liveness), or, without
        ``path``, every mount's and the totals: bytes and requests fetched, chunks
        cached, prefetch and background progress.

        The daemons rewrite their stats every ``stats_interval``; ``fresh`` asks them to
        write now (SIGUSR1) and waits up to a second for it.
        """
        with self._lock:
            mounts = list(self._mounts.values())
        if path is not None:
            mount = next((m for m in mounts if m.path == path), None)
            if mount is None:
                raise ImageError(f"{path} is not a lazy mount of ours")
            mounts = [mount]
        if fresh:
            self._refresh(mounts)
        if path is not None:
            return self._mount_stats(mounts[0])
        per = {str(m.path): self._mount_stats(m) for m in mounts}
        totals = {
            k: sum(int(s.get(k, 0)) for s in per.values())
            for k in ("bytes_fetched", "requests", "chunks_fetched", "chunks_cached", "read_errors")
        }
        return {
            "mounts": per,
            "mounted": sum(1 for s in per.values() if s["alive"]),
            "remounts": sum(self._remounts.values()),
            **totals,
        }

    def _refresh(self, mounts: list[_Mount]) -> None:
        waiting = {}
        for m in mounts:
            if m.proc.poll() is None:
                waiting[m.key] = (m, self._read_stats(m).get("seq", 0))
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 1.0
        while waiting and time.monotonic() < deadline:
            for key, (m, seq) in list(waiting.items()):
                if self._read_stats(m).get("seq", 0) != seq or m.proc.poll() is not None:
                    del waiting[key]
            if waiting:
                time.sleep(0.005)

    @staticmethod
    def _read_stats(mount: _Mount) -> dict[str, Any]:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(mount.stats_path.read_text())
            if isinstance(data, dict):
                return data
        return {}

    def _mount_stats(self, mount: _Mount) -> dict[str, Any]:
        data = self._read_stats(mount)
        data.update(
            alive=mount.proc.poll() is None,
            pid=mount.proc.pid,
            key=mount.key,
            mount_seconds=round(mount.ready_seconds, 4),
            remounts=mount.remounts,
        )
        return data


def _read_ready(fd: int, timeout: float) -> dict[str, Any] | None:
    """The daemon's one JSON line on the ready pipe; None on timeout, {} on EOF."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    line = buf.split(b"\n", 1)[0]
    if not line:
        return {}
    try:
        msg = json.loads(line)
    except ValueError:
        return {"error": f"unreadable ready line {line[:200]!r}"}
    return msg if isinstance(msg, dict) else {}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
