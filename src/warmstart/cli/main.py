"""``warmstart``: run the platform and talk to it.

warmstart serve [--port 8080] [--data-dir data] [--demo]
warmstart deploy DIR|ZIP --name N [--handler mod.fn] [--memory MB] [--timeout S]
warmstart deploy --image REF --name N [--registry-user U --registry-password-stdin]
warmstart invoke N ['{"json": "event"}'] [--log]
warmstart ls | rm N | logs N | top
warmstart job submit F FILE [--wait] | job status ID [--wait] | job results ID
warmstart image pull REF | image convert SRC DST [--profile]
warmstart image preheat REF [--nodes|--selector] [--wait] | image cache put NAME REF | cache ls
warmstart cluster up --nodes N | cluster down [--purge] | cluster status | cluster nodes

Client commands talk to a running server over HTTP; user errors (a missing file, an
unknown function, a server that cannot be reached) end in one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmstart.cli.client import FALLBACK_ENDPOINT, CLIError
from warmstart.cli.client import check as _check
from warmstart.cli.client import client as _client

DEFAULT_ENDPOINT = os.environ.get("WARMSTART_ENDPOINT") or FALLBACK_ENDPOINT
API = "/2015-03-31/functions"
# Commands whose options take their defaults from the worker's Settings (importing it
# loads the worker, which client commands do not need).
_SETTINGS_COMMANDS = ("serve", "image")

log = logging.getLogger("warmstart.cli")


def default_data_dir() -> Path:
    """The node's data directory: $WARMSTART_DATA_DIR, else Settings' default (relative
    to the working directory)."""
    from warmstart.worker.settings import Settings

    return Path(os.environ.get("WARMSTART_DATA_DIR") or Settings.data_dir)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser.  ``command`` is the subcommand about to be parsed: options
    whose defaults come from the worker's Settings are only added for it (None: all)."""
    from warmstart.functions.models import FunctionConfig

    p = argparse.ArgumentParser(
        prog="warmstart",
        description="A serverless platform for Python functions that makes every start feel warm.",
        epilog="Run 'warmstart COMMAND --help' for a command's options. Clients talk to "
        f"$WARMSTART_ENDPOINT (default {FALLBACK_ENDPOINT}).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    full = command is None or command in _SETTINGS_COMMANDS
    if full:
        _add_serve(sub)
    else:
        sub.add_parser("serve", help="run the single-node platform (API + worker)")

    d = sub.add_parser(
        "deploy",
        help="create or update a function from a directory, a zip or a container image",
    )
    d.add_argument(
        "source",
        type=Path,
        nargs="?",
        help="a directory with handler code, or a .zip (not with --image)",
    )
    d.add_argument(
        "--image",
        metavar="REF",
        default=None,
        help="deploy a container image (PackageType=Image) instead of code: its CMD names "
        "the handler; the image's own Python runs it (default: none)",
    )
    d.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="with --image: return once the node has the function, without waiting for its "
        "image to be mounted (default: wait until it is Active, or say why it Failed)",
    )
    d.add_argument(
        "--command",
        dest="image_cmd",  # not "command": that names the subcommand
        default=None,
        metavar="MODULE.FUNCTION",
        help="with --image: the handler, overriding the image's CMD (ImageConfig.Command; "
        "default: the CMD)",
    )
    d.add_argument(
        "--registry-user",
        metavar="USER",
        default=None,
        help="with --image: your registry user name, its password read from stdin "
        "(--registry-password-stdin); the node checks with the registry that you may pull "
        "the image, and does not keep them (default: none, the node's own credentials)",
    )
    d.add_argument(
        "--registry-password-stdin",
        action="store_true",
        help="read the password for --registry-user from stdin (off)",
    )
    d.add_argument(
        "--registry-token-stdin",
        action="store_true",
        help="with --image: read a registry bearer token from stdin and send it instead of "
        "a user name and password (off)",
    )
    d.add_argument(
        "--registry-docker-config",
        action="store_true",
        help="with --image: send the credentials for the image's registry from your Docker "
        "config ($DOCKER_CONFIG/config.json, else ~/.docker/config.json), running the "
        "credential helper it names (credHelpers, credsStore) as Docker does (off)",
    )
    d.add_argument("--name", required=True, help="function name")
    d.add_argument(
        "--handler",
        default=None,
        help="module.function (default: hello.handler if hello.py exists, else handler.handler)",
    )
    d.add_argument(
        "--memory",
        metavar="MB",
        type=int,
        default=None,
        help=f"MemorySize in MB (default {FunctionConfig.memory_mb}, or unchanged on update)",
    )
    d.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=int,
        default=None,
        help=f"timeout in seconds (default {FunctionConfig.timeout_s}, or unchanged on update)",
    )
    d.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable (repeatable; default: none)",
    )
    d.add_argument(
        "--network",
        choices=["none", "host"],
        default=None,
        help=f"none: loopback only; host: the host's network (default {FunctionConfig.network})",
    )

    i = sub.add_parser("invoke", help="invoke a function and print its result")
    i.add_argument("name", help="function name (NAME:VERSION or NAME:ALIAS for a version)")
    i.add_argument("event", nargs="?", default="{}", help="JSON event (default %(default)s)")
    i.add_argument(
        "--log", action="store_true", help="print the invocation's log tail to stderr (off)"
    )
    i.add_argument(
        "--async",
        dest="is_async",
        action="store_true",
        help="queue it (InvocationType=Event) instead of waiting for the result (off)",
    )

    sub.add_parser(
        "ls",
        help="list functions",
        description="List functions: a table on a terminal, tab-separated lines (with a "
        "header) otherwise.",
    )
    r = sub.add_parser("rm", help="delete a function")
    r.add_argument("name", help="function name")
    lg = sub.add_parser("logs", help="print a function's recent logs")
    lg.add_argument("name", help="function name")
    lg.add_argument(
        "--bytes",
        type=int,
        default=65536,
        metavar="N",
        help="how much of the end to print (default %(default)s)",
    )
    t = sub.add_parser(
        "top",
        help="a live view of the node: LS/BE usage, reclaimed capacity, queues",
        description="On a terminal, a live view (q or Ctrl-C quits). Otherwise one plain "
        "snapshot per interval (with --iterations N, N of them).",
    )
    t.add_argument(
        "--interval",
        metavar="SECONDS",
        type=float,
        default=1.0,
        help="seconds between refreshes (default %(default)s)",
    )
    t.add_argument(
        "--iterations",
        type=int,
        default=None,
        metavar="N",
        help="stop after N refreshes (default: until q, Ctrl-C or a closed pipe)",
    )
    j = sub.add_parser(
        "job",
        help="batch jobs: run a function over many inputs",
        description="Batch jobs. Job ids may be shortened to any unique prefix of at least "
        "6 characters (the progress bar shows 8).",
    )
    jsub = j.add_subparsers(dest="job_command", required=True, metavar="JOBCOMMAND")
    js = jsub.add_parser("submit", help="queue a job (one invocation per input line)")
    js.add_argument("function", help="function name")
    js.add_argument(
        "inputs", type=Path, help="a JSON-lines file: one event per line ('-' for stdin)"
    )
    js.add_argument("--wait", action="store_true", help="show progress until the job is done (off)")
    jst = jsub.add_parser("status", help="a job's progress as JSON")
    jst.add_argument("job_id", help="a job id, or a unique prefix of one (>= 6 characters)")
    jst.add_argument(
        "--wait", action="store_true", help="show progress until the job is done (off)"
    )
    jr = jsub.add_parser(
        "results", help="print a job's results, one JSON object per line, in input order"
    )
    jr.add_argument("job_id", help="a job id, or a unique prefix of one (>= 6 characters)")
    from warmstart.cli import images

    if full:
        images.add_parser(sub, default_data_dir(), DEFAULT_ENDPOINT)
    else:
        sub.add_parser("image", help=images.HELP)
    from warmstart.cli import cluster, versions

    cn = cluster.add_parser(sub)
    for sp in (d, i, r, lg, sub.choices["ls"], js, jst, jr, t, cn, *versions.add_parsers(sub)):
        sp.add_argument(
            "--endpoint",
            default=DEFAULT_ENDPOINT,
            help=f"server URL (default $WARMSTART_ENDPOINT, else {FALLBACK_ENDPOINT})",
        )
    return p


def _add_serve(sub: Any) -> None:
    """``serve``'s options.  Their defaults are read from :class:`Settings`, the one place
    they are written (importing it loads the worker, so only ``serve`` builds these)."""
    from warmstart.runtime.protocol import MAX_PAYLOAD
    from warmstart.worker.settings import EVENT_BYTES_MAX, Settings

    d = Settings()
    s = sub.add_parser(
        "serve",
        help="run the single-node platform (API + worker)",
        description="Run the API and the worker on this machine. State, code and logs live "
        "under --data-dir; nothing else to install or start. Stop it with Ctrl-C (SIGINT) "
        "or SIGTERM.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default %(default)s)")
    s.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        default=default_data_dir(),
        help="where functions, code, logs, images and state live, relative to the working "
        f"directory (default $WARMSTART_DATA_DIR, else {Settings.data_dir})",
    )
    s.add_argument(
        "--isolation",
        choices=["auto", "linux", "process"],
        default="auto" if d.isolation is None else d.isolation,
        help="linux: namespaces+chroot+cgroups (needs root); process: no isolation; "
        "auto: linux when possible (default %(default)s)",
    )
    s.add_argument(
        "--demo", action="store_true", help="deploy the 'hello' demo function at start (off)"
    )
    s.add_argument(
        "--max-concurrency",
        metavar="N",
        type=int,
        default=d.max_concurrency,
        help="instances per function without reserved concurrency (default %(default)s)",
    )
    s.add_argument(
        "--queue-depth",
        metavar="N",
        type=int,
        default=d.queue_depth,
        help="invocations that may wait per function before 429 (default %(default)s)",
    )
    s.add_argument(
        "--freeze-after-ms",
        metavar="MS",
        type=float,
        default=d.freeze_after_ms,
        help="freeze instances idle this long; 0 freezes at once (default %(default)s)",
    )
    s.add_argument(
        "--cache-budget-mb",
        metavar="MB",
        type=int,
        default=d.cache_budget_mb,
        help="memory idle instances may hold before LRU eviction (default 25%% of RAM, "
        "here %(default)s)",
    )
    s.add_argument(
        "--memory-budget-mb",
        metavar="MB",
        type=int,
        default=d.memory_budget_mb,
        help="sum of MemorySize over all instances (default 75%% of RAM, here %(default)s)",
    )
    s.add_argument(
        "--cpu-quota",
        metavar="CPUS",
        type=float,
        default=d.cpu_quota or 0.0,
        help="CPUs each instance may use (CFS quota); 0 = unlimited (default %(default)s)",
    )
    s.add_argument(
        "--no-qos",
        dest="qos",
        action="store_false",
        default=d.qos,
        help="turn the QoS loop off (best-effort work keeps only its low CPU weight; default: on)",
    )
    s.add_argument(
        "--qos-config",
        default=None,
        metavar="JSON|FILE",
        help="a JSON object, or a file holding one, overriding QoS thresholds (names and "
        "defaults: docs/architecture.md), e.g. '{\"be_sched_idle\": true}' (default: none)",
    )
    s.add_argument(
        "--min-be-concurrency",
        metavar="N",
        type=int,
        default=d.min_be_concurrency,
        help="best-effort invocations allowed even when nothing is reclaimed, so async work "
        "cannot starve (0: strictly within reclaimed capacity; default %(default)s)",
    )
    s.add_argument(
        "--be-concurrency",
        metavar="N",
        type=int,
        default=d.be_concurrency,
        help="best-effort (event, job) invocations at once at most (default 2 per CPU, "
        "here %(default)s)",
    )
    lim = s.add_argument_group(
        "payload limits",
        "Bodies over a limit are refused with 413 (RequestTooLargeException) before they "
        "are read; a result over its limit is a Function.ResponseSizeTooLarge error. The "
        "defaults are AWS Lambda's.",
    )
    lim.add_argument(
        "--max-request-bytes",
        metavar="BYTES",
        type=_byte_count(MAX_PAYLOAD),
        default=d.max_request_bytes,
        help="a synchronous invocation's payload (Invoke, POST /run) at most "
        "(default %(default)s: 6 MB)",
    )
    lim.add_argument(
        "--max-response-bytes",
        metavar="BYTES",
        type=_byte_count(MAX_PAYLOAD),
        default=d.max_response_bytes,
        help="what a synchronous invocation may return (default %(default)s: 6 MB and the "
        "100 bytes Lambda allows on top)",
    )
    lim.add_argument(
        "--max-event-bytes",
        metavar="BYTES",
        type=_byte_count(EVENT_BYTES_MAX),
        default=d.max_event_bytes,
        help="an Event invocation's payload, a job's input item, and the result kept for "
        "each, at most; up to 1048576 (default %(default)s: 256 KB)",
    )
    lim.add_argument(
        "--max-job-bytes",
        metavar="BYTES",
        type=_byte_count(None),
        default=d.max_job_bytes,
        help="a job's whole input (POST /jobs) at most (default %(default)s: 64 MB)",
    )
    keep = s.add_argument_group(
        "retention",
        "What the node keeps of finished work and of function logs, so its disk use stays "
        "bounded. Queued and running work is never deleted.",
    )
    keep.add_argument(
        "--event-retention-hours",
        metavar="HOURS",
        type=_positive(float),
        default=d.event_retention_hours,
        help="finished Event invocations and jobs, with their results, are deleted this "
        "long after they finished; GET /events/ID or /jobs/ID then answers 404 "
        "(default %(default)s)",
    )
    keep.add_argument(
        "--function-log-max-mb",
        metavar="MB",
        type=_positive(float),
        default=d.function_log_max_mb,
        help="a function's log file (data/logs/NAME.log) is rotated to NAME.log.1 past this "
        "size (default %(default)s)",
    )
    keep.add_argument(
        "--function-log-backups",
        metavar="N",
        type=_positive(int),
        default=d.function_log_backups,
        help="rotated log files kept per function (NAME.log.1 ... NAME.log.N; default "
        "%(default)s)",
    )
    s.add_argument(
        "--no-zygotes",
        dest="zygotes",
        action="store_false",
        default=d.zygotes,
        help="start every instance in a fresh interpreter (no import cache; default: zygotes on)",
    )
    s.add_argument(
        "--zygote-after",
        type=int,
        default=d.zygote_after,
        metavar="N",
        help="cold starts of a package set before it gets its own zygote, when it did not "
        "get one at deploy (default %(default)s)",
    )
    s.add_argument(
        "--no-zygote-at-deploy",
        dest="zygote_at_deploy",
        action="store_false",
        default=d.zygote_at_deploy,
        help="build a package set's zygote only on demand (--zygote-after), not as soon as a "
        "function with those packages is deployed (default: at deploy; zygotes are evicted "
        "least recently used first beyond --zygote-budget-mb)",
    )
    s.add_argument(
        "--zygote-uid",
        metavar="UID",
        type=int,
        default=d.zygote_uid,
        help="host uid (and gid) zygotes run as: uid 0 only inside their namespace "
        "(default %(default)s)",
    )
    s.add_argument(
        "--zygote-budget-mb",
        metavar="MB",
        type=int,
        default=d.zygote_budget_mb,
        help="zygotes' memory (PSS) before least recently used ones go (default %(default)s)",
    )
    s.add_argument(
        "--index-url",
        metavar="URL",
        default=d.index_url or _configured_index(),
        help="package index for requirements.txt (default: $UV_DEFAULT_INDEX or "
        "$UV_INDEX_URL, else the installer's own default)",
    )
    s.add_argument(
        "--find-links",
        action="append",
        type=Path,
        default=list(d.find_links),
        metavar="DIR",
        help="a local wheel directory for requirements.txt (repeatable; default: none)",
    )
    s.add_argument(
        "--offline",
        action="store_true",
        default=d.offline,
        help="install packages from --find-links only, never from the network (default: off)",
    )
    s.add_argument(
        "--allow-requirement-sources",
        action="store_true",
        default=d.allow_requirement_sources,
        help="let requirements.txt name its own sources (-i/--index-url, --extra-index-url, "
        "-f/--find-links, --trusted-host, -r/-c, -e, 'name @ URL'); by default a deploy "
        "that does is refused and packages come only from --index-url. The installer "
        "still reaches only public addresses and the hosts allowed here (default: off)",
    )
    s.add_argument(
        "--installer-allow-host",
        action="append",
        default=list(d.installer_allow_hosts),
        metavar="HOST[:PORT]",
        help="a host the package installer may reach even on a private or host-local "
        "address or a port other than 80 and 443 (repeatable; --index-url's host is "
        "always allowed; default: none)",
    )
    s.add_argument(
        "--image-pull",
        choices=["auto", "lazy", "full"],
        default=d.image_pull,
        help="how image functions get their root: auto = mounted lazily when every layer is "
        "eStargz or the image has a gzip index (warmstart image index) in its repository, else "
        "pulled in full first; lazy = the same, and say in the log when an image must be "
        "pulled in full; full = always pull in full first (default %(default)s)",
    )
    s.add_argument(
        "--insecure-registry",
        action="append",
        default=list(d.insecure_registries),
        metavar="HOST",
        help="a registry reached over plain HTTP (repeatable; loopback always is; default: none)",
    )
    s.add_argument(
        "--require-deployer-credentials",
        action="store_true",
        default=d.require_deployer_credentials,
        help="an image deploy must bring the deployer's registry credentials (header "
        "X-Warmstart-Registry-Auth) unless anonymous pulls may read the image (default: "
        "off: a deploy without them uses the node's own credentials, as on a single-tenant "
        "node)",
    )
    s.add_argument(
        "--registry-access-ttl",
        metavar="SECONDS",
        type=float,
        default=d.registry_access_ttl_s,
        help="how long a deployer's successful access check at the registry is reused "
        "for their next deploys from the same repository (0: check every deploy; default "
        "%(default)s)",
    )
    s.add_argument(
        "--image-budget-mb",
        metavar="MB",
        type=int,
        default=d.image_budget_mb,
        help="disk for pulled images before least recently used ones go (default %(default)s)",
    )
    s.add_argument(
        "--image-layers",
        choices=("auto", "squashfs", "dirs"),
        default=d.image_layers,
        help="how fully pulled layers are stored: squashfs, one read-only image per layer, "
        "loop-mounted (no file created per entry; needs root, loop devices and tar2sqfs); "
        "dirs, unpacked file by file; auto, squashfs where the node can (default "
        "%(default)s)",
    )
    s.add_argument(
        "--image-idle-release-s",
        metavar="SECONDS",
        type=float,
        default=d.image_idle_release_s,
        help="unmount an image no instance has used for this long: its functions become "
        "Inactive and their next invocation mounts it again (0: keep it mounted while a "
        "function uses it; default %(default)s)",
    )
    s.add_argument(
        "--no-background-fetch",
        dest="image_background_fetch",
        action="store_false",
        default=d.image_background_fetch,
        help="lazily mounted images fetch only what is read (default: the rest is fetched "
        "in the background after the start)",
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what the server logs to stderr (default %(default)s)",
    )
    c = s.add_argument_group(
        "cluster mode",
        "Join a cluster of nodes coordinated through etcd (docs/cluster.md). Without "
        "--cluster the node runs alone, its state in SQLite.",
    )
    c.add_argument(
        "--cluster",
        metavar="ETCD_URL[,ETCD_URL...]",
        default=None,
        help="etcd client URLs, e.g. http://10.0.0.1:2379 (default: no cluster)",
    )
    c.add_argument(
        "--node-name",
        metavar="NAME",
        default=None,
        help="this node's name in the cluster, a DNS label (default: the host name)",
    )
    c.add_argument(
        "--advertise",
        metavar="URL",
        default=None,
        help="the URL other nodes reach this node's API at (default http://HOST:PORT "
        "from --host and --port; give it when --host is 0.0.0.0)",
    )
    c.add_argument(
        "--p2p-sources",
        metavar="N",
        type=int,
        default=1,
        help="how many nodes fetch one image layer from the registry when several need "
        "it; the others fetch its pieces from them (default %(default)s)",
    )
    c.add_argument(
        "--no-p2p",
        dest="p2p",
        action="store_false",
        help="every node fetches image layers and lazy chunks from the registry itself "
        "(default: from peers first)",
    )
    c.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label other nodes can select this node by (repeatable; default: none)",
    )


def _byte_count(most: int | None) -> Callable[[str], int]:
    """An argparse type: a positive number of bytes, at most ``most``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
        if n <= 0 or (most is not None and n > most):
            bound = "a positive number" if most is None else f"between 1 and {most}"
            raise argparse.ArgumentTypeError(f"{n} bytes: must be {bound}")
        return n

    return parse


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a positive ``kind`` (int or float)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be positive")
        return value

    return parse


def _qos_config(text: str) -> Any:
    """--qos-config: a JSON object inline (it starts with ``{``) or in a file."""
    from warmstart.qos.policy import QoSConfig

    try:
        raw = text if text.lstrip().startswith("{") else Path(text).read_text()
        fields = json.loads(raw)
        if not isinstance(fields, dict):
            raise ValueError("expected a JSON object")
        return QoSConfig(**fields)
    except (OSError, ValueError, TypeError) as exc:
        raise CLIError(f"--qos-config {text}: {exc}") from exc


def _cluster_settings(args: argparse.Namespace) -> Any:
    """``--cluster`` and its companions as ClusterSettings (None without --cluster)."""
    if args.cluster is None:
        for flag in ("node_name", "advertise"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag.replace('_', '-')} needs --cluster")
        return None
    import socket

    from warmstart.cluster.settings import ClusterSettings

    labels: dict[str, str] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--label takes KEY=VALUE, not {item!r}")
        labels[key] = value
    host = args.host
    if host in ("0.0.0.0", "::") and args.advertise is None:
        raise CLIError(f"--host {host} listens everywhere: say where to reach it with --advertise")
    try:
        return ClusterSettings(
            endpoints=tuple(u.strip() for u in args.cluster.split(",") if u.strip()),
            node_name=args.node_name or socket.gethostname().split(".")[0].lower(),
            advertise=args.advertise or f"http://{host}:{args.port}",
            labels=labels,
            p2p_sources=args.p2p_sources,
            p2p=args.p2p,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _configured_index() -> str | None:
    """The index uv is configured with in this environment (the sandboxed installer runs
    with an environment of its own, so it is passed on explicitly)."""
    return os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or None


def _installer_hosts(hosts: list[str]) -> tuple[str, ...]:
    from warmstart.packages.egress import parse_allowed_host

    for host in hosts:
        try:
            parse_allowed_host(host)
        except ValueError as exc:
            raise CLIError(f"--installer-allow-host: {exc}") from exc
    return tuple(hosts)


# Each live instance holds a few of the worker's descriptors (its socket, its output and
# exit pipes, its freezer); below this many the node warns that it cannot hold many.
MIN_OPEN_FILES = 4096


def _raise_open_files_limit() -> None:
    """Raise the worker's soft limit on open files to the hard one (a shell's default soft
    limit of 1024 caps a node at a few hundred instances)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        logging.getLogger("warmstart").warning(
            "the open-files limit is %d (ulimit -n): a node holds a few per live instance; "
            "raise the hard limit (LimitNOFILE= in a systemd unit) for more than ~%d instances",
            soft,
            soft // 4,
        )


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from warmstart.api import create_asgi
    from warmstart.cluster.peer import SERVER_KEEP_ALIVE_S
    from warmstart.worker import Settings, Worker

    settings = Settings(
        data_dir=args.data_dir.resolve(),
        isolation=None if args.isolation == "auto" else args.isolation,
        max_concurrency=args.max_concurrency,
        queue_depth=args.queue_depth,
        freeze_after_ms=args.freeze_after_ms,
        cache_budget_mb=args.cache_budget_mb,
        memory_budget_mb=args.memory_budget_mb,
        cpu_quota=args.cpu_quota or None,
        index_url=args.index_url,
        find_links=tuple(args.find_links),
        offline=args.offline,
        allow_requirement_sources=args.allow_requirement_sources,
        installer_allow_hosts=_installer_hosts(args.installer_allow_host),
        zygotes=args.zygotes,
        zygote_after=args.zygote_after,
        zygote_at_deploy=args.zygote_at_deploy,
        zygote_budget_mb=args.zygote_budget_mb,
        zygote_uid=args.zygote_uid,
        image_pull=args.image_pull,
        insecure_registries=tuple(args.insecure_registry),
        image_budget_mb=args.image_budget_mb,
        image_layers=args.image_layers,
        image_background_fetch=args.image_background_fetch,
        image_idle_release_s=args.image_idle_release_s,
        require_deployer_credentials=args.require_deployer_credentials,
        registry_access_ttl_s=args.registry_access_ttl,
        qos=args.qos,
        min_be_concurrency=args.min_be_concurrency,
        be_concurrency=args.be_concurrency,
        max_request_bytes=args.max_request_bytes,
        max_response_bytes=args.max_response_bytes,
        max_event_bytes=args.max_event_bytes,
        max_job_bytes=args.max_job_bytes,
        event_retention_hours=args.event_retention_hours,
        function_log_max_mb=args.function_log_max_mb,
        function_log_backups=args.function_log_backups,
        **({} if args.qos_config is None else {"qos_config": _qos_config(args.qos_config)}),
        cluster=_cluster_settings(args),
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _raise_open_files_limit()
    if settings.cluster is not None:
        from warmstart.cluster.etcd import ClusterUnavailable
        from warmstart.cluster.node import ClusterNode

        try:
            asyncio.run(ClusterNode.check_etcd(settings.cluster))
        except ClusterUnavailable as exc:
            raise CLIError(
                f"cannot join the cluster: {exc} (is etcd running at "
                f"{', '.join(settings.cluster.endpoints)}?)"
            ) from exc
        node = ClusterNode(settings)
        worker = node.worker
        app = create_asgi(worker, node)
    else:
        worker = Worker(settings)
        app = create_asgi(worker)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        # Peers keep connections to forward calls; they drop them before this lapses.
        timeout_keep_alive=SERVER_KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    log.info(
        "data, code and logs in %s (function logs: %s); Ctrl-C or SIGTERM stops the server",
        settings.data_dir,
        settings.data_dir / "logs",
    )

    async def run() -> None:
        # The demo deploy is owned by this task group: it cannot outlive the server, and
        # it is cancelled when the server stops before it is done.
        async with asyncio.TaskGroup() as tg:
            demo = tg.create_task(_demo_when_up(server, worker, args)) if args.demo else None
            try:
                await server.serve()
            finally:
                if demo is not None:
                    demo.cancel()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0


async def _demo_when_up(server: Any, worker: Any, args: argparse.Namespace) -> None:
    """Deploy the 'hello' demo once the server is up (the worker started, the port bound).
    A failure is logged with its cause; the server keeps running without the demo."""
    import asyncio

    # uvicorn offers no event for "started", only this flag (set once the lifespan
    # startup, which starts the worker, has completed and the socket is bound).
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.02)
    try:
        await _deploy_demo(worker)
    except Exception:
        log.exception("--demo: deploying the 'hello' demo function failed")
        return
    print(
        f"demo: curl -s -X POST http://{args.host}:{args.port}/run/hello "
        """-d '{"name": "you"}'""",
        flush=True,
    )


async def _deploy_demo(worker: Any) -> None:
    from warmstart.cli.demo import hello_zip
    from warmstart.errors import Conflict
    from warmstart.functions import FunctionConfig

    with contextlib.suppress(Conflict):  # deployed by an earlier run: keep it
        await worker.create_function("hello", FunctionConfig(handler="hello.handler"), hello_zip())


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


_REGISTRY_FLAGS = (
    "registry_user",
    "registry_password_stdin",
    "registry_token_stdin",
    "registry_docker_config",
)


def _registry_auth(args: argparse.Namespace) -> dict[str, str]:
    """The header that carries the deployer's registry credentials, from deploy's flags
    (empty without them).  A password or token is only ever read from stdin."""
    from warmstart.errors import WarmstartError
    from warmstart.images.access import REGISTRY_AUTH_HEADER, RegistryCredential

    if not any(getattr(args, f) for f in _REGISTRY_FLAGS):
        return {}
    if args.registry_user and not args.registry_password_stdin:
        raise CLIError(
            "--registry-user needs --registry-password-stdin (a password is never taken "
            "on the command line)"
        )
    if args.registry_password_stdin and not args.registry_user:
        raise CLIError("--registry-password-stdin needs --registry-user")
    sources = (args.registry_user, args.registry_token_stdin, args.registry_docker_config)
    if sum(bool(x) for x in sources) > 1:
        raise CLIError(
            "give one of --registry-user, --registry-token-stdin, --registry-docker-config"
        )
    try:
        if args.registry_docker_config:
            credential = _docker_config_credential(args.image)
        else:
            secret = sys.stdin.readline().rstrip("\r\n")
            if not secret:
                raise CLIError("stdin holds no registry password or token")
            if args.registry_token_stdin:
                credential = RegistryCredential.bearer(secret)
            else:
                credential = RegistryCredential.basic(args.registry_user, secret)
    except WarmstartError as exc:
        raise CLIError(str(exc)) from exc
    _warn_if_plain_http(args.endpoint)
    return {REGISTRY_AUTH_HEADER: credential.authorization()}


def _docker_config_credential(image: str) -> Any:
    """The user's Docker login for ``image``'s registry (config.json or its credential
    helper), as a credential."""
    from warmstart.images.access import RegistryCredential
    from warmstart.images.credentials import DockerCredentials
    from warmstart.images.reference import Reference

    host = Reference.parse(image).registry
    logins = DockerCredentials()
    login = logins.get(host)  # may run the credential helper the config names
    if login is None:
        helper = logins.helper_for(host)
        where = f"docker-credential-{helper}" if helper else str(logins.path)
        raise CLIError(f"{where} holds no credentials for {host}")
    if login.identity_token:
        raise CLIError(
            f"the Docker login for {host} is an identity token; pass a user and password "
            "or a token explicitly (--registry-user, --registry-token-stdin)"
        )
    return RegistryCredential.basic(login.user, login.secret)


def _warn_if_plain_http(endpoint: str) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    if url.scheme == "http" and (url.hostname or "") not in ("localhost", "127.0.0.1", "::1"):
        print(
            f"warmstart: warning: registry credentials go to {url.netloc} over plain HTTP",
            file=sys.stderr,
        )


def _deploy_image(args: argparse.Namespace) -> int:
    conf = _config_args(args)
    auth = _registry_auth(args)
    with _client(args) as c:
        exists = c.get(f"{API}/{args.name}").status_code == 200
        image_config = {"Command": [args.image_cmd]} if args.image_cmd else {}
        if exists:
            if image_config:
                conf["ImageConfig"] = image_config
            if conf:
                hdrs = auth if image_config else {}  # only an image change is checked
                _check(c.put(f"{API}/{args.name}/configuration", json=conf, headers=hdrs))
            out = _check(
                c.put(f"{API}/{args.name}/code", json={"ImageUri": args.image}, headers=auth)
            ).json()
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
            out = _check(c.post(API, json=body, headers=auth)).json()
            verb = "created"
        if args.wait:
            out = _wait_deployed(c, args.name)
    print(
        f"{verb} {out['FunctionName']} from image {args.image} ({out['MemorySize']} MB, "
        f"{out['Timeout']} s, {out['CodeSize'] / 1e6:.1f} MB compressed)"
    )
    return 0


def _wait_deployed(c: Any, name: str) -> dict[str, Any]:
    """Poll GetFunction until the deploy settled (as boto3's function_active_v2 and
    function_updated_v2 waiters do): the configuration once Active, or a CLIError
    saying why the image Failed."""
    import time

    while True:
        conf: dict[str, Any] = _check(c.get(f"{API}/{name}")).json()["Configuration"]
        state, update = conf.get("State"), conf.get("LastUpdateStatus")
        if state == "Failed" or update == "Failed":
            code = conf.get("StateReasonCode") or conf.get("LastUpdateStatusReasonCode")
            reason = conf.get("StateReason") or conf.get("LastUpdateStatusReason")
            raise CLIError(f"{name} is {state} ({code}): {reason}")
        if state == "Active" and update == "Successful":
            return conf
        time.sleep(0.2)


def _deploy(args: argparse.Namespace) -> int:
    from warmstart.functions.bundle import zip_directory

    if args.image is not None:
        if args.source is not None:
            raise CLIError("give either a source directory/zip or --image, not both")
        return _deploy_image(args)
    if args.image_cmd is not None:
        raise CLIError("--command is for --image deployments (use --handler for code)")
    if any(getattr(args, f) for f in _REGISTRY_FLAGS):
        raise CLIError("--registry-* options are for --image deployments")
    src: Path | None = args.source
    if src is None:
        raise CLIError("deploy needs a source directory or zip, or --image REF")
    try:
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
    except OSError as exc:
        raise CLIError(f"{exc.filename or src}: {exc.strerror or exc}") from exc
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


def _state(conf: dict[str, Any]) -> str:
    """A function's State, with its reason code when it has one, and an update under way
    or failed ("Active, update InProgress")."""
    state = str(conf.get("State", "?"))
    if conf.get("StateReasonCode") and state != "Active":
        state += f" ({conf['StateReasonCode']})"
    update = conf.get("LastUpdateStatus")
    if update and update != "Successful" and state.split()[0] == "Active":
        state += f", update {update}"
    return state


def _ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        fns = _check(c.get(f"{API}/", params={"MaxItems": 10000})).json()["Functions"]
    header = (
        "name",
        "handler / image",
        "memory (MB)",
        "timeout (s)",
        "code (bytes)",
        "last modified",
        "state",
    )
    rows = [
        (
            f["FunctionName"],
            f.get("Handler")
            or f"image ({f.get('ImageConfigResponse', {}).get('ImageConfig', {}).get('Command', ['CMD'])[0]})",
            str(f["MemorySize"]),
            str(f["Timeout"]),
            str(f["CodeSize"]),
            f["LastModified"],
            _state(f),
        )
        for f in fns
    ]
    if not sys.stdout.isatty():
        # Piped or redirected: every column whole, one line per function, for cut and awk.
        for row in (header, *rows):
            print("\t".join(row))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*row)
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

    if args.interval <= 0:
        raise CLIError("--interval must be a positive number of seconds")
    with _client(args) as c:
        return top.run(
            lambda: _check(c.get("/node")).json(), args.endpoint, args.interval, args.iterations
        )


def _read_inputs(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror or exc}") from exc


def _job(args: argparse.Namespace) -> int:
    if args.job_command == "submit":
        data = _read_inputs(args.inputs)
    with _client(args) as c:
        if args.job_command == "submit":
            out = _check(
                c.post(
                    "/jobs",
                    params={"function": args.function},
                    content=data,
                    headers={"Content-Type": "application/x-ndjson"},
                )
            ).json()
            print(f"job {out['JobId']}: {out['total']} inputs queued", flush=True)
            if not args.wait:
                return 0
            job_id = out["JobId"]
        elif args.job_command == "results":
            # One JSON object per line: {"index", "status", "attempts", "result"}, where
            # "result" is the handler's JSON value (or its error object).
            for item in _check(c.get(f"/jobs/{args.job_id}/results")).json()["results"]:
                print(json.dumps(item))
            return 0
        else:
            job = _check(c.get(f"/jobs/{args.job_id}")).json()
            if not args.wait:
                print(json.dumps(job, indent=2))
                return 0
            job_id = job["JobId"]
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


def _cluster(args: argparse.Namespace) -> int:
    from warmstart.cli import cluster
    from warmstart.errors import WarmstartError

    try:
        return cluster.run(args)
    except WarmstartError as exc:
        raise CLIError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv[0] if argv else None).parse_args(argv)
    commands = {
        "image": _image,
        "cluster": _cluster,
        "top": _top,
        "job": _job,
        "serve": _serve,
        "deploy": _deploy,
        "invoke": _invoke,
        "ls": _ls,
        "rm": _rm,
        "logs": _logs,
        "publish": _versions_command,
        "versions": _versions_command,
        "alias": _versions_command,
    }
    try:
        return commands[args.command](args)
    except CLIError as exc:
        print(f"warmstart: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``warmstart ls | head``): not an error of ours.
        _quiet_stdout()
        return 0
    except Exception as exc:
        import httpx

        if isinstance(exc, httpx.TransportError):
            where = getattr(args, "endpoint", None) or "the registry"
            print(f"warmstart: cannot reach {where}: {exc}", file=sys.stderr)
            return 2
        raise


def _versions_command(args: argparse.Namespace) -> int:
    from warmstart.cli import versions

    command: dict[str, Any] = {
        "publish": versions.publish,
        "versions": versions.versions,
        "alias": versions.alias,
    }
    result: int = command[args.command](args)
    return result


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
