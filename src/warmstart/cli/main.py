"""``warmstart``: run the platform and talk to it.

warmstart serve [--port 8080] [--data-dir data] [--demo]
warmstart deploy DIR|ZIP --name N [--handler mod.fn] [--memory MB] [--timeout S]
warmstart invoke N ['{"json": "event"}'] [--log]
warmstart ls | rm N | logs N
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_ENDPOINT = os.environ.get("WARMSTART_ENDPOINT", "http://127.0.0.1:8080")
API = "/2015-03-31/functions"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmstart",
        description="A serverless platform for Python functions that makes every start feel warm.",
        epilog="Run 'warmstart COMMAND --help' for a command's options. Clients talk to "
        "$WARMSTART_ENDPOINT (default http://127.0.0.1:8080).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the single-node platform (API + worker)",
        description="Run the API and the worker on this machine. State lives in "
        "SQLite under --data-dir; nothing else to install or start.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default %(default)s)")
    s.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("WARMSTART_DATA_DIR", "data")),
        help="where functions, code, logs and state live (default %(default)s)",
    )
    s.add_argument(
        "--isolation",
        choices=["auto", "linux", "process"],
        default="auto",
        help="linux: namespaces+chroot+cgroups (needs root); process: no isolation; "
        "auto: linux when possible (default)",
    )
    s.add_argument("--demo", action="store_true", help="deploy the 'hello' demo function at start")
    s.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        help="instances per function without reserved concurrency (default %(default)s)",
    )
    s.add_argument(
        "--queue-depth",
        type=int,
        default=128,
        help="invocations that may wait per function before 429 (default %(default)s)",
    )
    s.add_argument(
        "--freeze-after-ms",
        type=float,
        default=100.0,
        help="freeze instances idle this long; 0 freezes at once (default %(default)s)",
    )
    s.add_argument(
        "--cache-budget-mb",
        type=int,
        default=None,
        help="memory idle instances may hold before LRU eviction (default 25%% of RAM)",
    )
    s.add_argument(
        "--memory-budget-mb",
        type=int,
        default=None,
        help="sum of MemorySize over all instances (default 75%% of RAM)",
    )
    s.add_argument(
        "--cpu-quota",
        type=float,
        default=1.0,
        help="CPUs each instance may use (CFS quota); 0 = unlimited (default %(default)s)",
    )
    s.add_argument(
        "--no-qos",
        action="store_true",
        help="turn the QoS loop off (best-effort work keeps only its low CPU weight)",
    )
    s.add_argument(
        "--qos-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a JSON object overriding QoS thresholds (names and defaults: "
        'docs/architecture.md), e.g. {"cpu_reclaim_threshold": 0.6}',
    )
    s.add_argument(
        "--min-be-concurrency",
        type=int,
        default=1,
        help="best-effort invocations allowed even when nothing is reclaimed, so async work "
        "cannot starve (0: strictly within reclaimed capacity; default %(default)s)",
    )
    s.add_argument(
        "--be-concurrency",
        type=int,
        default=None,
        help="best-effort (event, job) invocations at once at most (default 2 per CPU)",
    )
    s.add_argument(
        "--no-zygotes",
        action="store_true",
        help="start every instance in a fresh interpreter (no import cache)",
    )
    s.add_argument(
        "--zygote-after",
        type=int,
        default=2,
        metavar="N",
        help="cold starts of a package set before it gets its own zygote (default %(default)s)",
    )
    s.add_argument(
        "--zygote-uid",
        type=int,
        default=200000,
        help="host uid (and gid) zygotes run as: uid 0 only inside their namespace "
        "(default %(default)s)",
    )
    s.add_argument(
        "--zygote-budget-mb",
        type=int,
        default=4096,
        help="zygotes' memory (PSS) before least recently used ones go (default %(default)s)",
    )
    s.add_argument(
        "--index-url", default=None, help="package index for requirements.txt (default: PyPI)"
    )
    s.add_argument(
        "--find-links",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a local wheel directory for requirements.txt (repeatable)",
    )
    s.add_argument(
        "--offline",
        action="store_true",
        help="install packages from --find-links only, never from the network",
    )
    s.add_argument(
        "--image-pull",
        choices=["auto", "lazy", "full"],
        default="auto",
        help="how image functions get their root: auto = lazily when every layer is "
        "eStargz, else a full pull; full = always pull first (default %(default)s)",
    )
    s.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST",
        help="a registry reached over plain HTTP (repeatable; loopback always is)",
    )
    s.add_argument(
        "--image-budget-mb",
        type=int,
        default=20480,
        help="disk for pulled images before least recently used ones go (default %(default)s)",
    )
    s.add_argument(
        "--no-background-fetch",
        action="store_true",
        help="lazily mounted images fetch only what is read (no background fetch of the rest)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    d = sub.add_parser(
        "deploy",
        help="create or update a function from a directory, a zip or a container image",
    )
    d.add_argument(
        "source", type=Path, nargs="?", help="a directory with handler code, or a .zip"
    )
    d.add_argument(
        "--image",
        metavar="REF",
        default=None,
        help="deploy a container image (PackageType=Image) instead of code: its CMD names "
        "the handler; the image's own Python runs it",
    )
    d.add_argument(
        "--command",
        dest="image_cmd",  # not "command": that names the subcommand
        default=None,
        metavar="MODULE.FUNCTION",
        help="with --image: the handler, overriding the image's CMD (ImageConfig.Command)",
    )
    d.add_argument("--name", required=True, help="function name")
    d.add_argument(
        "--handler",
        default=None,
        help="module.function (default: hello.handler if hello.py exists, else handler.handler)",
    )
    d.add_argument("--memory", type=int, default=None, help="MemorySize in MB (default 128)")
    d.add_argument("--timeout", type=int, default=None, help="timeout in seconds (default 3)")
    d.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable"
    )
    d.add_argument(
        "--network",
        choices=["none", "host"],
        default=None,
        help="none: loopback only (default); host: the host's network",
    )

    i = sub.add_parser("invoke", help="invoke a function and print its result")
    i.add_argument("name")
    i.add_argument("event", nargs="?", default="{}", help="JSON event (default {})")
    i.add_argument("--log", action="store_true", help="print the invocation's log tail to stderr")
    i.add_argument(
        "--async", dest="is_async", action="store_true", help="queue it (InvocationType=Event)"
    )

    sub.add_parser("ls", help="list functions")
    r = sub.add_parser("rm", help="delete a function")
    r.add_argument("name")
    lg = sub.add_parser("logs", help="print a function's recent logs")
    lg.add_argument("name")
    lg.add_argument("--bytes", type=int, default=65536, help="how much of the end to print")
    t = sub.add_parser(
        "top", help="a live view of the node: LS/BE usage, reclaimed capacity, queues"
    )
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--iterations", type=int, default=None, help="stop after N refreshes")
    j = sub.add_parser("job", help="batch jobs: run a function over many inputs")
    jsub = j.add_subparsers(dest="job_command", required=True, metavar="JOBCOMMAND")
    js = jsub.add_parser("submit", help="queue a job (one invocation per input line)")
    js.add_argument("function")
    js.add_argument(
        "inputs", type=Path, help="a JSON-lines file: one event per line ('-' for stdin)"
    )
    js.add_argument("--wait", action="store_true", help="show progress until the job is done")
    jst = jsub.add_parser("status", help="a job's progress")
    jst.add_argument("job_id")
    jst.add_argument("--wait", action="store_true", help="show progress until the job is done")
    jr = jsub.add_parser("results", help="print a job's results as JSON lines")
    jr.add_argument("job_id")
    from warmstart.cli import images

    images.add_parser(sub)
    for sp in (d, i, r, lg, sub.choices["ls"], js, jst, jr, t):
        sp.add_argument(
            "--endpoint", default=DEFAULT_ENDPOINT, help="server URL (default %(default)s)"
        )
    return p


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from warmstart.api import create_app
    from warmstart.worker import Settings, Worker

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kwargs: dict[str, Any] = {
        "data_dir": args.data_dir.resolve(),
        "isolation": None if args.isolation == "auto" else args.isolation,
        "max_concurrency": args.max_concurrency,
        "queue_depth": args.queue_depth,
        "freeze_after_ms": args.freeze_after_ms,
        "cpu_quota": args.cpu_quota or None,
        "index_url": args.index_url,
        "zygotes": not args.no_zygotes,
        "zygote_after": args.zygote_after,
        "zygote_budget_mb": args.zygote_budget_mb,
        "zygote_uid": args.zygote_uid,
        "qos": not args.no_qos,
        "find_links": tuple(args.find_links),
        "offline": args.offline,
        "image_pull": args.image_pull,
        "insecure_registries": tuple(args.insecure_registry),
        "image_budget_mb": args.image_budget_mb,
        "image_background_fetch": not args.no_background_fetch,
    }
    if args.qos_config is not None:
        from warmstart.qos.policy import QoSConfig

        try:
            kwargs["qos_config"] = QoSConfig(**json.loads(args.qos_config.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CLIError(f"--qos-config {args.qos_config}: {exc}") from exc
    kwargs["min_be_concurrency"] = args.min_be_concurrency
    if args.be_concurrency is not None:
        kwargs["be_concurrency"] = args.be_concurrency
    if args.cache_budget_mb is not None:
        kwargs["cache_budget_mb"] = args.cache_budget_mb
    if args.memory_budget_mb is not None:
        kwargs["memory_budget_mb"] = args.memory_budget_mb
    worker = Worker(Settings(**kwargs))
    app = create_app(worker)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        if args.demo:

            async def demo_after_start() -> None:
                while not server.started:
                    await asyncio.sleep(0.02)
                await _deploy_demo(worker)
                print(
                    f'demo: curl -s -X POST http://{args.host}:{args.port}/run/hello -d \'{{"name": "you"}}\'',
                    flush=True,
                )

            asyncio.get_running_loop().create_task(demo_after_start())
        await server.serve()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    return 0


async def _deploy_demo(worker: Any) -> None:
    from warmstart.cli.demo import hello_zip
    from warmstart.errors import Conflict
    from warmstart.functions import FunctionConfig

    with contextlib.suppress(Conflict):  # deployed by an earlier run: keep it
        await worker.create_function("hello", FunctionConfig(handler="hello.handler"), hello_zip())


class CLIError(Exception):
    pass


def _client(args: argparse.Namespace) -> Any:
    import httpx

    return httpx.Client(base_url=args.endpoint, timeout=960)


def _check(resp: Any) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            msg = body.get("message") or body.get("Message") or resp.text
        except ValueError:
            msg = resp.text
        code = resp.headers.get("x-amzn-ErrorType", f"HTTP {resp.status_code}")
        raise CLIError(f"{code}: {msg}")
    return resp


def _config_args(args: argparse.Namespace) -> dict[str, Any]:
    """MemorySize, Timeout and Environment from deploy's flags (only those given)."""
    conf: dict[str, Any] = {}
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--env takes KEY=VALUE, not {item!r}")
        env[key] = value
    if args.memory is not None:
        conf["MemorySize"] = args.memory
    if args.timeout is not None:
        conf["Timeout"] = args.timeout
    if env:
        conf["Environment"] = {"Variables": env}
    return conf


def _deploy_image(args: argparse.Namespace) -> int:
    conf = _config_args(args)
    with _client(args) as c:
        exists = c.get(f"{API}/{args.name}").status_code == 200
        image_config = {"Command": [args.image_cmd]} if args.image_cmd else {}
        if exists:
            if image_config:
                conf["ImageConfig"] = image_config
            if conf:
                _check(c.put(f"{API}/{args.name}/configuration", json=conf))
            out = _check(c.put(f"{API}/{args.name}/code", json={"ImageUri": args.image})).json()
            verb = "updated"
        else:
            body: dict[str, Any] = {
                "FunctionName": args.name,
                "PackageType": "Image",
                "Code": {"ImageUri": args.image},
                "Role": "arn:aws:iam::000000000000:role/x",
                **conf,
            }
            if image_config:
                body["ImageConfig"] = image_config
            if args.network:
                body["Tags"] = {"warmstart:network": args.network}
            out = _check(c.post(API, json=body)).json()
            verb = "created"
    print(
        f"{verb} {out['FunctionName']} from image {args.image} ({out['MemorySize']} MB, "
        f"{out['Timeout']} s, {out['CodeSize'] / 1e6:.1f} MB compressed)"
    )
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from warmstart.functions.bundle import zip_directory

    if args.image is not None:
        if args.source is not None:
            raise CLIError("give either a source directory/zip or --image, not both")
        return _deploy_image(args)
    if args.image_cmd is not None:
        raise CLIError("--command is for --image deployments (use --handler for code)")
    src: Path | None = args.source
    if src is None:
        raise CLIError("deploy needs a source directory or zip, or --image REF")
    if src.is_dir():
        data = zip_directory(src)
        handler = args.handler or (
            "hello.handler" if (src / "hello.py").exists() else "handler.handler"
        )
    elif src.is_file():
        data = src.read_bytes()
        handler = args.handler or "handler.handler"
    else:
        raise CLIError(f"{src}: no such file or directory")
    conf = _config_args(args)
    zip_b64 = base64.b64encode(data).decode()
    with _client(args) as c:
        exists = c.get(f"{API}/{args.name}").status_code == 200
        if exists:
            _check(c.put(f"{API}/{args.name}/code", json={"ZipFile": zip_b64}))
            conf["Handler"] = handler
            out = _check(c.put(f"{API}/{args.name}/configuration", json=conf)).json()
            verb = "updated"
        else:
            body: dict[str, Any] = {
                "FunctionName": args.name,
                "Runtime": "python3.11",
                "Handler": handler,
                "Code": {"ZipFile": zip_b64},
                "Role": "arn:aws:iam::000000000000:role/x",
                **conf,
            }
            if args.network:
                body["Tags"] = {"warmstart:network": args.network}
            out = _check(c.post(API, json=body)).json()
            verb = "created"
    print(
        f"{verb} {out['FunctionName']} ({out['Handler']}, {out['MemorySize']} MB, {out['Timeout']} s, "
        f"{out['CodeSize']} bytes)"
    )
    return 0


def _invoke(args: argparse.Namespace) -> int:
    try:
        json.loads(args.event)
    except ValueError as exc:
        raise CLIError(f"the event must be JSON: {exc}") from exc
    headers = {"X-Amz-Log-Type": "Tail"}
    if args.is_async:
        headers["X-Amz-Invocation-Type"] = "Event"
    with _client(args) as c:
        resp = _check(
            c.post(f"{API}/{args.name}/invocations", content=args.event.encode(), headers=headers)
        )
    if args.is_async:
        print("queued")
        return 0
    if args.log and resp.headers.get("X-Amz-Log-Result"):
        sys.stderr.write(
            base64.b64decode(resp.headers["X-Amz-Log-Result"]).decode(errors="replace")
        )
    print(resp.text)
    return 1 if resp.headers.get("X-Amz-Function-Error") else 0


def _ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        fns = _check(c.get(f"{API}/", params={"MaxItems": 10000})).json()["Functions"]
    table = Table(
        "name", "handler / image", "memory (MB)", "timeout (s)", "code (bytes)", "last modified"
    )
    for f in fns:
        table.add_row(
            f["FunctionName"],
            f.get("Handler") or f"image ({f.get('ImageConfigResponse', {}).get('ImageConfig', {}).get('Command', ['CMD'])[0]})",
            str(f["MemorySize"]),
            str(f["Timeout"]),
            str(f["CodeSize"]),
            f["LastModified"],
        )
    Console().print(table)
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _check(c.delete(f"{API}/{args.name}"))
    print(f"deleted {args.name}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sys.stdout.write(
            _check(c.get(f"/functions/{args.name}/logs", params={"tail": args.bytes})).text
        )
    return 0


def _top(args: argparse.Namespace) -> int:
    from warmstart.cli import top

    with _client(args) as c:
        return top.run(c, args.endpoint, args.interval, args.iterations)


def _job(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.job_command == "submit":
            data = sys.stdin.buffer.read() if str(args.inputs) == "-" else args.inputs.read_bytes()
            out = _check(
                c.post(
                    "/jobs",
                    params={"function": args.function},
                    content=data,
                    headers={"Content-Type": "application/x-ndjson"},
                )
            ).json()
            print(f"job {out['JobId']}: {out['total']} inputs queued")
            if not args.wait:
                return 0
            job_id = out["JobId"]
        elif args.job_command == "results":
            for item in _check(c.get(f"/jobs/{args.job_id}/results")).json()["results"]:
                print(json.dumps(item))
            return 0
        else:
            job_id = args.job_id
            if not args.wait:
                print(json.dumps(_check(c.get(f"/jobs/{job_id}")).json(), indent=2))
                return 0
        return _follow_job(c, job_id)


def _follow_job(c: Any, job_id: str) -> int:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        job = _check(c.get(f"/jobs/{job_id}")).json()
        task = progress.add_task(f"job {job_id[:8]}", total=job["total"])
        while True:
            done = job["succeeded"] + job["failed"]
            progress.update(
                task, completed=done, description=f"job {job_id[:8]} ({job['failed']} failed)"
            )
            if job["status"] == "completed":
                break
            time.sleep(0.25)
            job = _check(c.get(f"/jobs/{job_id}")).json()
    print(f"job {job_id}: {job['succeeded']} succeeded, {job['failed']} failed")
    return 1 if job["failed"] else 0


def _image(args: argparse.Namespace) -> int:
    from warmstart.cli import images
    from warmstart.errors import WarmstartError

    try:
        return images.run(args)
    except WarmstartError as exc:
        raise CLIError(f"{type(exc).__name__}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "image": _image,
        "top": _top,
        "job": _job,
        "serve": _serve,
        "deploy": _deploy,
        "invoke": _invoke,
        "ls": _ls,
        "rm": _rm,
        "logs": _logs,
    }
    try:
        return commands[args.command](args)
    except CLIError as exc:
        print(f"warmstart: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.TransportError):
            print(
                f"warmstart: cannot reach {getattr(args, 'endpoint', '?')}: {exc}", file=sys.stderr
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
