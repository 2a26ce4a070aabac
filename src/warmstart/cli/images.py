"""``warmstart image ...``: pull an image into this node's store, convert one to eStargz."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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


HELP = "container images: pull into this node's store, convert to eStargz"


def add_parser(sub: Any, data_dir: Path) -> None:
    """``image``'s subcommands; ``data_dir`` is the node's default data directory."""
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
    cv.add_argument(
        "--profile",
        action="store_true",
        help="run the image's handler once (needs root) and put the files it opened first, "
        "so they are fetched together before the function starts (default: off)",
    )
    cv.add_argument(
        "--event", default="{}", help="the JSON event for the --profile run (default {})"
    )
    cv.add_argument(
        "--handler", default=None, help="module.function for --profile (default: the CMD)"
    )
    for sp in (pl, cv):
        sp.add_argument(
            "--insecure-registry",
            action="append",
            default=[],
            metavar="HOST",
            help="reach HOST over plain HTTP (repeatable; loopback registries always are; "
            "default: none)",
        )


def run(args: argparse.Namespace) -> int:
    if args.image_command == "pull":
        return _pull(args)
    return _convert(args)


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

        image = store.pull(args.ref, on_progress)
    manifest = image.manifest
    print(
        f"pulled {args.ref} ({manifest.digest}): {len(manifest.layers)} layer(s), "
        f"{sum(layer.size for layer in manifest.layers) / 1e6:.1f} MB in "
        f"{time.perf_counter() - t0:.2f} s"
    )
    client.close()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from warmstart.errors import InvalidParameter
    from warmstart.images.convert import convert_image
    from warmstart.images.reference import Reference

    try:
        json.loads(args.event)
    except ValueError as exc:
        raise InvalidParameter(f"--event must be JSON: {exc}") from exc
    client = _client(args)
    src, dst = Reference.parse(args.src), Reference.parse(args.dst)
    prioritized = None
    t0 = time.perf_counter()
    if args.profile:
        prioritized = profile_image(client, src, args.handler, args.event)
        print(f"profile: {len(prioritized)} file(s) opened by the first run", file=sys.stderr)
    digest = convert_image(client, src, dst, prioritized=prioritized)
    print(f"converted {src} -> {dst}@{digest} in {time.perf_counter() - t0:.2f} s")
    client.close()
    return 0


def profile_image(client: Any, src: Any, handler: str | None, event: str) -> list[str]:
    """The files the image's handler opens on its first run, in first-open order.

    The image is pulled into a scratch store, mounted read-only, and the handler run
    once under chroot in new mount/PID/network namespaces as nobody, while fanotify
    records what it opens (the interpreter and its libraries included).
    """
    from warmstart.images.profile import record_opens
    from warmstart.images.store import ImageStore

    if os.geteuid() != 0:
        raise SystemExit("warmstart: --profile needs root (it mounts and chroots the image)")
    with tempfile.TemporaryDirectory(prefix="warmstart-profile-") as tmp:
        store = ImageStore(Path(tmp) / "store", client, 1 << 40)
        image = store.pull(str(src))
        root = Path(tmp) / "root"
        root.mkdir()
        store.mount_rootfs(image, root)
        try:
            cfg = image.manifest.config_json.get("config") or {}
            handler = handler or (cfg.get("Cmd") or [""])[0]
            if "." not in handler:
                raise SystemExit(f"warmstart: no handler to profile (CMD is {cfg.get('Cmd')})")
            from warmstart.sandbox.manager import find_python

            env_path = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e).get(
                "PATH", ""
            )
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
