"""One mount's life in the daemon process: build, prefetch, mount, serve, stop; ``main``.

The process is started by :class:`warmstart.images.lazymount.LazyMounts` (often ahead
of time, as a spare that has imported pyfuse3 and trio and waits for its spec), reads a
JSON :class:`~warmstart.images.lazymount.DaemonSpec` and writes one JSON line on its
ready pipe: ready (with its first stats), or the error that stopped it. It unmounts on
SIGTERM, SIGINT or SIGHUP, and when the worker that started it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.fetcher import Fetcher
from warmstart.images.lazyfs.fs import LazyFS, mount_options
from warmstart.images.lazyfs.layers import Layer, TOCLayer
from warmstart.images.lazyfs.loading import load_layers
from warmstart.images.lazyfs.peers import PEERS_FILE, PeerChunks
from warmstart.images.lazyfs.sources import RegistryBlobSource
from warmstart.images.lazyfs.stats import Stats, write_json_atomic
from warmstart.images.lazymount import BackgroundFetch, DaemonSpec

log = logging.getLogger(__name__)


class Daemon:
    """Runs one mount: prefetch, mount, serve, background fetch, stats, stop."""

    def __init__(
        self,
        layers: Sequence[Layer],
        mountpoint: Path,
        cache: ChunkCache,
        stats: Stats,
        *,
        read_ahead: int = 64 << 10,
        background: BackgroundFetch | None = None,
        stats_path: Path | None = None,
        stats_interval: float = 0.5,
        parent_pid: int = 0,
        allow_other: bool = True,
    ) -> None:
        self.mountpoint = mountpoint
        self.stats = stats
        self.background = background or BackgroundFetch(enabled=False)
        # In a cluster the node keeps peers.json beside the chunk cache: chunks are asked
        # of the other nodes before the registry.
        peers = PeerChunks(cache.root.parent / PEERS_FILE)
        self.fetcher = Fetcher(
            cache, stats, read_ahead=read_ahead, background=self.background, peers=peers
        )
        self.fs = LazyFS(layers, self.fetcher)
        self.stats_path = stats_path
        self.stats_interval = stats_interval
        self.parent_pid = parent_pid
        self.allow_other = allow_other
        self._token: trio.lowlevel.TrioToken | None = None
        self._stopping = False

    def stop(self) -> None:
        """Ask the daemon to unmount and return; callable from any thread."""
        token = self._token
        if token is None:
            self._stopping = True
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop_in_loop, trio_token=token)

    def _stop_in_loop(self) -> None:
        if not self._stopping:
            self._stopping = True
            pyfuse3.terminate()

    def write_stats(self) -> None:
        if self.stats_path is not None:
            snap = self.stats.snapshot()
            snap["mountpoint"] = str(self.mountpoint)
            snap["inodes"] = self.fs.inodes  # held in memory now
            # What the registry client itself counted: HTTP bodies including multipart
            # framing, and every request including retries.
            clients = {
                id(t.source.client): t.source.client
                for t in self.fs.toc_layers
                if isinstance(t.source, RegistryBlobSource)
            }
            if clients:
                snap["http_bytes"] = sum(int(c.bytes_downloaded) for c in clients.values())
                snap["http_requests"] = sum(int(c.requests) for c in clients.values())
            try:
                write_json_atomic(self.stats_path, snap)
            except OSError as exc:
                log.warning("cannot write stats to %s: %s", self.stats_path, exc)

    async def _stats_loop(self) -> None:
        while True:
            self.write_stats()
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.warning("worker (pid %d) is gone: unmounting", self.parent_pid)
                self._stop_in_loop()
            await trio.sleep(self.stats_interval)

    async def _signals(self) -> None:
        stop = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*stop, signal.SIGUSR1) as sigs:
            async for signum in sigs:
                if signum == signal.SIGUSR1:  # the worker wants fresh stats
                    self.write_stats()
                    continue
                log.info("signal %d: unmounting", signum)
                self._stop_in_loop()

    async def _background(self, layers: Sequence[TOCLayer]) -> None:
        """The background fetch, contained: whatever goes wrong in it is logged and ends
        it, never the filesystem (reads then fetch on demand)."""
        try:
            await self.fetcher.prefetched.wait()
            await self.fetcher.background(layers)
        except Exception:
            log.exception("background fetch failed; the rest is fetched on read")

    async def run(
        self, on_ready: Callable[[dict[str, Any]], None], *, handle_signals: bool = False
    ) -> None:
        """Prefetch, mount, call ``on_ready`` once the mount answers, serve until stopped
        or unmounted."""
        self._token = trio.lowlevel.current_trio_token()
        # The prioritized files are claimed now and stream in after the mount is up: a
        # start begins with its first files while the rest of them still arrive.
        plan = self.fetcher.plan_prefetch(self.fs.toc_layers)
        if self._stopping:
            return
        pyfuse3.init(self.fs, str(self.mountpoint), mount_options(self.allow_other))
        try:
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    try:
                        await pyfuse3.main()
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(serve)
                if handle_signals:
                    nursery.start_soon(self._signals)
                nursery.start_soon(self.fetcher.prefetch, self.fs.toc_layers, plan)
                # A stat through the mount proves the kernel reaches our handlers.
                await trio.to_thread.run_sync(os.stat, self.mountpoint, abandon_on_cancel=True)
                self.stats.ready_seconds = time.monotonic() - self.stats.started
                self.write_stats()
                log.info(
                    "mounted %s: ready in %.3f s (TOCs %.3f s, prefetching %d chunks)",
                    self.mountpoint,
                    self.stats.ready_seconds,
                    self.stats.toc_seconds,
                    sum(len(claim.entries) for claim in plan),
                )
                on_ready(self.stats.snapshot())
                nursery.start_soon(self._stats_loop)
                if self.background.enabled and self.fs.toc_layers:
                    nursery.start_soon(self._background, self.fs.toc_layers)
        finally:
            self.write_stats()
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            self._token = None
            log.info("unmounted %s", self.mountpoint)


def build_daemon(spec: DaemonSpec) -> Daemon:
    """Everything before mounting: layers (TOCs verified), cache, stats."""
    stats = Stats()
    cache = ChunkCache(Path(spec.cache_dir))
    layers = load_layers(spec, stats)
    return Daemon(
        layers,
        Path(spec.mountpoint),
        cache,
        stats,
        read_ahead=spec.read_ahead,
        background=spec.background,
        stats_path=Path(spec.stats_path) if spec.stats_path else None,
        stats_interval=spec.stats_interval,
        parent_pid=spec.parent_pid,
        allow_other=spec.allow_other,
    )


def _report(fd: int | None, message: dict[str, Any]) -> None:
    """Write the one ready/error line for the parent and close the pipe."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(message).encode() + b"\n")
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m warmstart.images.lazyfs",
        description="Serve one image's layers as a lazily fetched, read-only FUSE mount.",
    )
    parser.add_argument("--spec", required=True, help="JSON mount spec file, or - for stdin")
    parser.add_argument("--ready-fd", type=int, help="write one JSON line here when ready")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s lazyfs[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "pyfuse3"):  # a line per request or FUSE worker
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    ready_fd: int | None = args.ready_fd
    # Asked for fresh stats before the signal loop runs: ignore rather than die.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        raw = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        spec = DaemonSpec.from_json(json.loads(raw))
        daemon = build_daemon(spec)
    except Exception as exc:
        log.error("cannot mount: %s: %s", type(exc).__name__, exc)
        _report(ready_fd, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1

    def on_ready(snapshot: dict[str, Any]) -> None:
        nonlocal ready_fd
        _report(ready_fd, {"ready": True, **snapshot})
        ready_fd = None

    try:
        trio.run(functools.partial(daemon.run, on_ready, handle_signals=True))
    except Exception as exc:
        log.exception("lazy filesystem failed")
        _report(ready_fd, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    if ready_fd is not None:
        _report(ready_fd, {"ready": False, "error": "stopped before it was ready"})
        return 1
    return 0
