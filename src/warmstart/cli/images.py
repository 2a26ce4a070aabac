"""``warmstart image ...``: pull an image into this node's store, convert one to eStargz,
index a plain gzip image for lazy loading, preheat an image on the nodes of a cluster, keep images cached there.

``pull``, ``convert`` and ``index`` work on this machine; ``preheat`` and ``cache`` are clients of a
running node's API (``--endpoint``), in a cluster or on a node alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# What a profiling run executes inside the image: import the handler and call it once,
# with a context like the runtime's (handlers read its request id, name, time left).
# Standard library modules the handler would not import are left out (they would be
# profiled as if the function needed them).
_PROFILE_DRIVER = """
import importlib, json, os, sys, time
sys.path.insert(0, os.getcwd())
class Context:
    function_name = "profile"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:profile"
    memory_limit_in_mb = 128
    aws_request_id = "00000000-0000-4000-8000-000000000000"
    log_group_name = log_stream_name = ""
    identity = client_context = None
    deadline = time.monotonic() + 300
    def get_remaining_time_in_millis(self):
        return max(0, int((self.deadline - time.monotonic()) * 1000))
module, _, func = sys.argv[1].rpartition(".")
handler = getattr(importlib.import_module(module), func)
handler(json.loads(sys.argv[2]), Context())
"""


HELP = "container images: pull, convert to eStargz, index, preheat on the nodes, keep cached"
PREHEAT_COMMANDS = ("status", "ls", "rm")


def add_parser(sub: Any, data_dir: Path, endpoint: str = "http://127.0.0.1:8080") -> None:
    """``image``'s subcommands; ``data_dir`` is the node's default data directory,
    ``endpoint`` the default server URL of the client subcommands."""
    from warmstart.worker.settings import Settings

    im = sub.add_parser(
        "image",
        help=HELP,
        description="Work with container images in OCI registries. Image functions are "
        "deployed with 'warmstart deploy --image REF'.",
    )
    isub = im.add_subparsers(dest="image_command", required=True, metavar="IMAGECOMMAND")
    pl = isub.add_parser(
        "pull",
        help="pull an image in full into the node's content store (preheat), with progress",
    )
    pl.add_argument("ref", help="image reference, e.g. 127.0.0.1:5000/fn:1")
    pl.add_argument(
        "--data-dir",
        type=Path,
        default=data_dir,
        help="the data directory of the node to preheat, as given to 'warmstart serve' "
        f"(default $WARMSTART_DATA_DIR, else {Settings.data_dir})",
    )
    pl.add_argument(
        "--budget-mb",
        type=int,
        default=Settings.image_budget_mb,
        help="the store's disk budget, as 'warmstart serve --image-budget-mb' "
        "(default %(default)s)",
    )
    cv = isub.add_parser(
        "convert",
        help="rewrite an image as eStargz (lazily loadable) and push it",
        description="Read SRC from its registry, rewrite every layer as eStargz (per-file "
        "gzip members, chunked large files, a TOC, prefetch landmarks) and push the result "
        "as DST. The layers stay valid tar.gz for tools that know nothing of eStargz.",
    )
    cv.add_argument("src", help="source image reference")
    cv.add_argument("dst", help="destination image reference")
    _add_profile(
        cv,
        "run the image's handler once (needs root) and put the files it opened first, "
        "so they are fetched together before the function starts (default: off)",
    )
    ix = isub.add_parser(
        "index",
        help="index a plain gzip image so it mounts lazily, unconverted, and push the index",
        description="Read every plain gzip layer of REF once and build its gzip index "
        "(checkpoints every --spacing bytes of uncompressed data with their 32 KiB windows, "
        "every file's offset and chunk digests); push the indexes to REF's repository as an "
        "OCI artifact whose subject is the image (the referrers API, or the sha256-<digest> "
        "tag where the registry has none). The image itself is unchanged; a node deploying it "
        "finds the index and mounts it lazily instead of pulling it in full.",
    )
    ix.add_argument("ref", help="image reference, e.g. 127.0.0.1:5000/fn:1")
    ix.add_argument(
        "--spacing",
        type=int,
        default=256 << 10,
        metavar="BYTES",
        help="uncompressed bytes between checkpoints (at least; a checkpoint sits on a deflate "
        "block boundary): a lazy read fetches the spans between checkpoints that hold its "
        "bytes, so smaller spacing reads less per file and makes a larger index "
        "(default %(default)s, at least 65536)",
    )
    _add_profile(
        ix,
        "run the image's handler once (needs root) and record the files it opened: "
        "they are fetched together when the image mounts (default: off)",
    )
    for sp in (pl, cv, ix):
        sp.add_argument(
            "--insecure-registry",
            action="append",
            default=[],
            metavar="HOST",
            help="reach HOST over plain HTTP (repeatable; loopback registries always are; "
            "default: none)",
        )
    _add_preheat(isub, endpoint)
    _add_cache(isub, endpoint)


def _add_profile(sp: Any, what: str) -> None:
    sp.add_argument("--profile", action="store_true", help=what)
    sp.add_argument(
        "--event", default="{}", help="the JSON event for the --profile run (default {})"
    )
    sp.add_argument(
        "--handler", default=None, help="module.function for --profile (default: the CMD)"
    )


def _add_endpoint(sp: Any, endpoint: str) -> None:
    from warmstart.cli.client import FALLBACK_ENDPOINT

    sp.add_argument(
        "--endpoint",
        default=endpoint,
        help=f"a node's URL (default $WARMSTART_ENDPOINT, else {FALLBACK_ENDPOINT})",
    )


def _add_nodes(sp: Any) -> None:
    which = sp.add_mutually_exclusive_group()
    which.add_argument(
        "--nodes",
        metavar="NAME[,NAME...]",
        help="exactly these nodes (default: every live node; a cluster only)",
    )
    which.add_argument(
        "--selector",
        metavar="KEY=VALUE[,...]",
        help="the nodes whose labels (serve --label) include all of these (default: every "
        "live node; a cluster only)",
    )


def _add_preheat(isub: Any, endpoint: str) -> None:
    from warmstart.cluster.preheat import DEFAULT_BACKOFF_LIMIT, DEFAULT_TIMEOUT_S, DEFAULT_TTL_S

    ph = isub.add_parser(
        "preheat",
        help="pull an image onto the nodes now, before anything needs it (a preheat job)",
        description="Make a preheat job: every selected node pulls REF in full into its "
        "content store. 'preheat status ID' shows a job, 'preheat ls' lists jobs, "
        "'preheat rm ID' deletes one (an image whose name is one of these words must be "
        "written in full, e.g. docker.io/library/status).",
    )
    ph.add_argument(
        "what",
        nargs="+",
        metavar="ARG",
        help="REF, the image to preheat (e.g. registry:5000/fn:1); or status ID, ls, rm ID",
    )
    _add_nodes(ph)
    ph.add_argument(
        "--parallelism",
        type=int,
        metavar="N",
        help="at most N nodes pull at once (default: every selected node)",
    )
    ph.add_argument(
        "--timeout",
        type=int,
        metavar="SECONDS",
        help=f"one attempt on one node may take this long (default {DEFAULT_TIMEOUT_S})",
    )
    ph.add_argument(
        "--backoff-limit",
        type=int,
        metavar="N",
        help=f"retries of a failed attempt on a node (default {DEFAULT_BACKOFF_LIMIT})",
    )
    ph.add_argument(
        "--ttl",
        type=int,
        metavar="SECONDS",
        help=f"keep the finished job this long (default {DEFAULT_TTL_S}, a day)",
    )
    ph.add_argument(
        "--wait",
        action="store_true",
        help="show each node's progress until the job is done; exit 1 if a node failed (off)",
    )
    _add_endpoint(ph, endpoint)


def _add_cache(isub: Any, endpoint: str) -> None:
    ca = isub.add_parser(
        "cache",
        help="images the nodes keep: pulled where selected, never evicted, followed by "
        "nodes that join later",
        description="Image cache entries: each names an image that the selected nodes "
        "pull and pin (the store's LRU never evicts it) until the entry is removed.",
    )
    csub = ca.add_subparsers(dest="cache_command", required=True, metavar="CACHECOMMAND")
    put = csub.add_parser("put", help="create or change an entry")
    put.add_argument("name", help="the entry's name (lower-case letters, digits, '-', '.')")
    put.add_argument("ref", help="the image, e.g. registry:5000/fn:1")
    _add_nodes(put)
    ls = csub.add_parser("ls", help="every entry and how many of its nodes have it pinned")
    get = csub.add_parser("get", help="an entry and each selected node's state, as JSON")
    get.add_argument("name", help="the entry's name")
    rm = csub.add_parser("rm", help="remove an entry: the nodes unpin its image")
    rm.add_argument("name", help="the entry's name")
    for sp in (put, ls, get, rm):
        _add_endpoint(sp, endpoint)


def run(args: argparse.Namespace) -> int:
    if args.image_command == "pull":
        return _pull(args)
    if args.image_command == "preheat":
        return _preheat(args)
    if args.image_command == "cache":
        return _cache(args)
    if args.image_command == "index":
        return _index(args)
    return _convert(args)


# -- preheat and cache: clients of a node's API ----------------------------------------------------
def _selection(args: argparse.Namespace) -> dict[str, Any]:
    if args.nodes:
        return {"nodes": [n.strip() for n in args.nodes.split(",") if n.strip()]}
    if args.selector:
        return {"selector": args.selector}
    return {}


def _preheat(args: argparse.Namespace) -> int:
    from warmstart.cli.client import CLIError, check, client

    what = args.what
    with client(args) as c:
        if what[0] in PREHEAT_COMMANDS:
            command, rest = what[0], what[1:]
            if command == "ls":
                if rest:
                    raise CLIError("preheat ls takes no arguments")
                for job in check(c.get("/images/preheat")).json()["jobs"]:
                    print(_job_line(job))
                return 0
            if len(rest) != 1:
                raise CLIError(f"preheat {command} takes a job id")
            if command == "rm":
                check(c.delete(f"/images/preheat/{rest[0]}"))
                print(f"preheat job {rest[0]} deleted")
                return 0
            job = check(c.get(f"/images/preheat/{rest[0]}")).json()
            if not args.wait:
                print(json.dumps(job, indent=2))
                return 0
            return _follow_preheat(c, job["id"])
        if len(what) != 1:
            raise CLIError("preheat takes one image reference (or status ID, ls, rm ID)")
        body: dict[str, Any] = {"image": what[0], **_selection(args)}
        for option, key in (
            ("parallelism", "parallelism"),
            ("timeout", "timeoutSeconds"),
            ("backoff_limit", "backoffLimit"),
            ("ttl", "ttlSecondsAfterFinished"),
        ):
            if getattr(args, option) is not None:
                body[key] = getattr(args, option)
        job = check(c.post("/images/preheat", json=body)).json()
        print(f"preheat job {job['id']}: {job['image']} on {job['desired']} node(s)", flush=True)
        if not args.wait:
            print(f"(warmstart image preheat status {job['id']} [--wait] to follow it)")
            return 0
        return _follow_preheat(c, job["id"])


def _job_line(job: dict[str, Any]) -> str:
    return (
        f"{job['id']}  {job['phase']:<9}  {job['succeeded']}/{job['desired']} succeeded"
        f"  {job['failed']} failed  {job['image']}"
    )


def _follow_preheat(c: Any, job_id: str, interval: float = 0.5) -> int:
    """Each node's progress until the job is done: a bar per node on a terminal, a line
    per change otherwise.  1 if a node failed."""
    from warmstart.cli.client import check

    def read() -> dict[str, Any]:
        job: dict[str, Any] = check(c.get(f"/images/preheat/{job_id}")).json()
        return job

    job = read()
    if sys.stdout.isatty():
        job = _preheat_bars(read, job, interval)
    else:
        job = _preheat_lines(read, job, interval)
    failed = ", ".join(job["failedNodes"])
    print(
        f"preheat job {job['id']}: {job['phase']}: {job['succeeded']} of {job['desired']} "
        f"node(s) succeeded" + (f", failed: {failed}" if failed else "")
    )
    for node in job["failedNodes"]:
        print(f"  {node}: {job['nodes'][node]['message']}")
    return 1 if job["failed"] else 0


def _preheat_bars(read: Any, job: dict[str, Any], interval: float) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    width = max(len(n) for n in job["nodes"]) if job["nodes"] else 8
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
    ) as progress:
        tasks: dict[str, Any] = {}
        while True:
            for name, node in job["nodes"].items():
                label = f"{name:<{width}}  {node['state']:<9}"
                total = node["bytesTotal"] or None
                if name not in tasks:
                    tasks[name] = progress.add_task(label, total=total)
                progress.update(
                    tasks[name], description=label, total=total, completed=node["bytesDone"]
                )
            if job["completionTime"]:
                return job
            time.sleep(interval)
            job = read()


def _preheat_lines(read: Any, job: dict[str, Any], interval: float) -> dict[str, Any]:
    seen: dict[str, tuple[str, int]] = {}
    last_progress = 0.0
    while True:
        now = time.monotonic()
        for name, node in job["nodes"].items():
            state = node["state"]
            shown = seen.get(name)
            report = shown is None or shown[0] != state
            if (
                state == "pulling"
                and now - last_progress >= 5
                and shown != (state, node["bytesDone"])
            ):
                report = True
            if report:
                extra = ""
                if state == "pulling" and node["bytesTotal"]:
                    extra = f" {node['bytesDone'] / 1e6:.1f}/{node['bytesTotal'] / 1e6:.1f} MB"
                elif state == "failed":
                    extra = f": {node['message']}"
                print(f"{name}: {state}{extra}", flush=True)
                seen[name] = (state, node["bytesDone"])
        if now - last_progress >= 5:
            last_progress = now
        if job["completionTime"]:
            return job
        time.sleep(interval)
        job = read()


def _cache(args: argparse.Namespace) -> int:
    from warmstart.cli.client import check, client

    with client(args) as c:
        if args.cache_command == "put":
            resp = check(
                c.put(f"/images/cache/{args.name}", json={"image": args.ref, **_selection(args)})
            )
            entry = resp.json()
            verb = "created" if resp.status_code == 201 else "changed"
            print(
                f"image cache entry {entry['name']} {verb}: {entry['image']} on "
                f"{entry['desired']} node(s)"
            )
        elif args.cache_command == "ls":
            for entry in check(c.get("/images/cache")).json()["entries"]:
                print(
                    f"{entry['name']}  {entry['pinned']}/{entry['desired']} pinned  "
                    f"{entry['image']}"
                )
        elif args.cache_command == "get":
            print(json.dumps(check(c.get(f"/images/cache/{args.name}")).json(), indent=2))
        else:
            check(c.delete(f"/images/cache/{args.name}"))
            print(f"image cache entry {args.name} removed")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from warmstart.images.registry import RegistryClient

    return RegistryClient(insecure=tuple(args.insecure_registry))


def _pull(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from warmstart.images.store import ImageStore

    client = _client(args)
    store = ImageStore(args.data_dir.resolve() / "images" / "store", client, args.budget_mb << 20)
    tasks: dict[str, Any] = {}
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    ) as progress:

        def on_progress(layer: str, done: int, size: int) -> None:
            task = tasks.get(layer)
            if task is None:
                task = tasks[layer] = progress.add_task(layer[7:19], total=size)
            progress.update(task, completed=done)

        try:
            image = store.pull(args.ref, on_progress)
        finally:
            store.close()
    manifest = image.manifest
    print(
        f"pulled {args.ref} ({manifest.digest}): {len(manifest.layers)} layer(s), "
        f"{sum(layer.size for layer in manifest.layers) / 1e6:.1f} MB in "
        f"{time.perf_counter() - t0:.2f} s"
    )
    client.close()
    return 0


def _check_event(args: argparse.Namespace) -> None:
    from warmstart.errors import InvalidParameter

    try:
        json.loads(args.event)
    except ValueError as exc:
        raise InvalidParameter(f"--event must be JSON: {exc}") from exc


def _profile(args: argparse.Namespace, client: Any, ref: Any) -> list[str] | None:
    """With ``--profile``: the files the handler opens on its first run."""
    if not args.profile:
        return None
    prioritized = profile_image(client, ref, args.handler, args.event)
    print(f"profile: {len(prioritized)} file(s) opened by the first run", file=sys.stderr)
    return prioritized


def _convert(args: argparse.Namespace) -> int:
    from warmstart.images.convert import convert_image
    from warmstart.images.reference import Reference

    _check_event(args)
    client = _client(args)
    src, dst = Reference.parse(args.src), Reference.parse(args.dst)
    t0 = time.perf_counter()
    prioritized = _profile(args, client, src)
    with _convert_progress(sys.stderr.isatty()) as progress:
        digest = convert_image(client, src, dst, prioritized=prioritized, progress=progress)
    print(f"converted {src} -> {dst}@{digest} in {time.perf_counter() - t0:.2f} s")
    client.close()
    return 0


def _index(args: argparse.Namespace) -> int:
    from warmstart.errors import InvalidParameter
    from warmstart.images.indexes import index_image
    from warmstart.images.reference import Reference

    if args.spacing < 65536:
        raise InvalidParameter("--spacing must be at least 65536 bytes")
    _check_event(args)
    client = _client(args)
    ref = Reference.parse(args.ref)
    t0 = time.perf_counter()
    prioritized = _profile(args, client, ref)
    with _convert_progress(sys.stderr.isatty()) as progress:
        result = index_image(
            client, ref, spacing=args.spacing, prioritized=prioritized, progress=progress
        )
    where = "referrers API" if result.referrers_api else f"tag sha256-{result.manifest[7:19]}..."
    print(
        f"indexed {ref} ({result.manifest}): {len(result.layers)} layer(s), "
        f"{result.index_bytes / 1e6:.2f} MB of index for {result.image_bytes / 1e6:.1f} MB of "
        f"layers, artifact {result.artifact} (found through the {where}) in "
        f"{time.perf_counter() - t0:.2f} s"
    )
    client.close()
    return 0


@contextlib.contextmanager
def _convert_progress(bars: bool) -> Iterator[Callable[[Any], None]]:
    """A convert's progress on stderr: a bar per layer on a terminal (bytes of the source
    layer fetched, then converted), else a line per layer and stage (and every 5 s while a
    stage runs)."""
    if bars:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            tasks: dict[int, Any] = {}
            lock = threading.Lock()

            def update(event: Any) -> None:
                label = f"layer {event.index + 1}/{event.total} {event.stage:<7}"
                with lock:
                    if event.index not in tasks:
                        tasks[event.index] = bar.add_task(label, total=event.size or None)
                    bar.update(tasks[event.index], description=label, completed=event.done)

            yield update
        return
    shown: dict[int, tuple[str, float]] = {}
    lock = threading.Lock()

    def line(event: Any) -> None:
        now = time.monotonic()
        with lock:
            last = shown.get(event.index)
            if last is not None and last[0] == event.stage and now - last[1] < 5:
                return
            shown[event.index] = (event.stage, now)
        size = f" {event.done / 1e6:.1f}/{event.size / 1e6:.1f} MB" if event.size else ""
        print(
            f"layer {event.index + 1}/{event.total} {event.digest[7:19]}: {event.stage}{size}",
            file=sys.stderr,
            flush=True,
        )

    yield line


def profile_image(client: Any, src: Any, handler: str | None, event: str) -> list[str]:
    """The files the image's handler opens on its first run, in first-open order.

    The image is pulled into a scratch store, mounted read-only, and the handler run
    once under chroot in new mount/PID/network namespaces as nobody, while fanotify
    records what it opens (the interpreter and its libraries included).
    """
    from warmstart.images.store import ImageStore

    if os.geteuid() != 0:
        raise SystemExit("warmstart: --profile needs root (it mounts and chroots the image)")
    with tempfile.TemporaryDirectory(prefix="warmstart-profile-") as tmp:
        store = ImageStore(Path(tmp) / "store", client, 1 << 40)
        try:
            return _profile_run(store, store.pull(str(src)), Path(tmp) / "root", handler, event)
        finally:
            store.close()  # unmounts its layer images: the scratch dir can go


def _profile_run(store: Any, image: Any, root: Path, handler: str | None, event: str) -> list[str]:
    from warmstart.images.profile import record_opens

    root.mkdir()
    store.mount_rootfs(image, root)
    try:
        cfg = image.manifest.config_json.get("config") or {}
        handler = handler or (cfg.get("Cmd") or [""])[0]
        if "." not in handler:
            raise SystemExit(f"warmstart: no handler to profile (CMD is {cfg.get('Cmd')})")
        from warmstart.sandbox.manager import find_python

        env_path = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e).get("PATH", "")
        python = find_python(root, env_path)
        if python is None:
            raise SystemExit("warmstart: the image has no python3 on its PATH")
        workdir = cfg.get("WorkingDir") or "/var/task"
        with record_opens(root, whole_filesystem=True) as opened:
            subprocess.run(
                [
                    "unshare",
                    "--mount",
                    "--pid",
                    "--fork",
                    "--net",
                    "chroot",
                    "--userspec=65534:65534",
                    str(root),
                    "/bin/sh",
                    "-c",
                    'cd "$0" && exec "$@"',
                    workdir,
                    python,
                    "-c",
                    _PROFILE_DRIVER,
                    handler,
                    json.dumps(json.loads(event)),
                ],
                check=False,
                timeout=300,
                stdin=subprocess.DEVNULL,
            )
            time.sleep(0.2)  # let the last events arrive
        return list(opened)
    finally:
        store.unmount(root)
