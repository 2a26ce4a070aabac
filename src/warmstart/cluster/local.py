"""A cluster on one machine, for trying cluster mode and for tests (``warmstart cluster
up|down|status``): etcd and N ``warmstart serve --cluster`` nodes, each node in a network
namespace of its own with its own address, as if it were a host of its own.

    host network namespace                     ws-<id>-node1          ws-<id>-node2
    bridge wsbr<id>  10.77.0.1/24 ─┬─ ws<id>n1 ══ eth0 10.77.0.11      ...  10.77.0.12
    etcd  http://10.77.0.1:2379    └─ ws<id>n2 ══ ...                 serve :8080
    (the host reaches every node through the bridge; nodes reach etcd and each other)

Everything lives under one directory (``--dir``, default ``./cluster``): ``cluster.json``
(what was planned and started: subnet, bridge, namespaces, veths, the pid and start time
of etcd and of each node), ``etcd/`` and ``etcd.log``, and per node ``node<i>/`` (its data
directory) and ``node<i>.log``.  The plan is written before anything is created, so
:meth:`LocalCluster.down` -- from this process or another -- finds everything a crashed or
half-finished ``up`` left, and deletes only what still exists (it is idempotent).

Several clusters may run side by side, each with its own directory (the id, hence the
interface and namespace names, is derived from it) and its own subnet; a subnet that any
route of the host already covers is refused.

The nodes see this machine at the bridge's address (the gateway), and reach a registry
listening there (or on every address) over plain HTTP: every node is started with
``--insecure-registry <gateway>``.  Extra ``serve`` arguments go to every node, or to one
(``node_args``: labels, say).

Nodes are started with ``nsenter --net``, not ``ip netns exec``: the latter also gives
the process a mount namespace of its own with a fresh ``/sys`` mounted over the host's,
which hides ``/sys/fs/cgroup`` -- and a node without cgroups has no sandbox limits and no
QoS.  Entering only the network namespace keeps the node's view of mounts and cgroups
the host's, as a node on a host of its own has.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from warmstart.errors import WarmstartError

DEFAULT_DIR = Path("cluster")
DEFAULT_SUBNET = "10.77.0.0/24"
# Where subnets are picked from when none is given (tests: one free /24 each).
AUTO_SUBNETS = "10.77.0.0/16"
NODE_PORT = 8080
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
FIRST_NODE_HOST = 10  # node i gets the subnet's address .10+i (node1: .11)
STATE_FILE = "cluster.json"
STATE_VERSION = 1
NETNS_DIR = Path("/run/netns")
# Held while a subnet is checked and claimed (its bridge made), so that two ``up``s at
# once -- two test sessions, say -- cannot both take the same one.
NET_LOCK = Path("/run/lock/warmstart-cluster.lock")
# Options of ``serve`` that the cluster sets itself for each node.
RESERVED_SERVE_OPTIONS = (
    "--host",
    "--port",
    "--data-dir",
    "--cluster",
    "--node-name",
    "--advertise",
)


class LocalClusterError(WarmstartError):
    """The local cluster could not be started, stopped or inspected; the message says why
    (and quotes the end of the log of a process that did not come up)."""


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodePlan:
    name: str  # node<i>, also its --node-name
    netns: str  # ws-<id>-node<i>
    veth: str  # the host end of its veth pair (the other end is eth0 in netns)
    address: str  # its address in the subnet (.10+i)
    port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass(frozen=True)
class ClusterPlan:
    id: str  # 6 hex digits derived from the directory: names the bridge, veths, netns
    dir: Path  # absolute
    subnet: str  # e.g. 10.77.0.0/24
    bridge: str  # wsbr<id>, holding the gateway address in the host namespace
    gateway: str  # the subnet's .1: the host as the nodes see it; etcd listens there
    nodes: tuple[NodePlan, ...]

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen

    @property
    def etcd_url(self) -> str:
        return f"http://{self.gateway}:{ETCD_CLIENT_PORT}"

    @property
    def etcd_peer_url(self) -> str:
        return f"http://{self.gateway}:{ETCD_PEER_PORT}"

    @property
    def etcd_data_dir(self) -> Path:
        return self.dir / "etcd"

    @property
    def etcd_log(self) -> Path:
        return self.dir / "etcd.log"

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LocalClusterError(
            f"no node {name!r} in the cluster in {self.dir} "
            f"(nodes: {', '.join(n.name for n in self.nodes)})"
        )


def cluster_id(directory: Path) -> str:
    """The id of the cluster kept in ``directory``: short enough for interface names
    (at most 15 bytes), distinct for distinct directories."""
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:6]


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(subnet, strict=False)
    except ValueError as exc:
        raise LocalClusterError(f"--subnet {subnet!r} is not an IPv4 network: {exc}") from exc
    return net


def plan(directory: Path, subnet: str, nodes: int, port: int = NODE_PORT) -> ClusterPlan:
    """Names and addresses for a cluster of ``nodes`` nodes in ``subnet`` (pure: nothing
    is created or checked against the host)."""
    if nodes < 1:
        raise LocalClusterError("a cluster needs at least one node")
    net = parse_subnet(subnet)
    last = FIRST_NODE_HOST + nodes
    # .0 is the network, .1 the bridge, the last address the broadcast.
    if last >= net.num_addresses - 1:
        room = max(0, net.num_addresses - 2 - FIRST_NODE_HOST)
        raise LocalClusterError(
            f"{nodes} node(s) do not fit in {net} (node addresses start at .{FIRST_NODE_HOST + 1}: "
            f"room for {room}): use a larger --subnet"
        )
    directory = directory.resolve()
    cid = cluster_id(directory)
    return ClusterPlan(
        id=cid,
        dir=directory,
        subnet=str(net),
        bridge=f"wsbr{cid}",
        gateway=str(net.network_address + 1),
        nodes=tuple(
            NodePlan(
                name=f"node{i}",
                netns=f"ws-{cid}-node{i}",
                veth=f"ws{cid}n{i}",
                address=str(net.network_address + FIRST_NODE_HOST + i),
                port=port,
                data_dir=directory / f"node{i}",
                log=directory / f"node{i}.log",
            )
            for i in range(1, nodes + 1)
        ),
    )


def overlapping(subnet: str, used: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The first of ``used`` (network, what uses it) that overlaps ``subnet``, if any."""
    net = parse_subnet(subnet)
    for network, owner in used:
        try:
            other = ipaddress.IPv4Network(network, strict=False)
        except ValueError:
            continue
        if other.prefixlen > 0 and net.overlaps(other):
            return network, owner
    return None


# -- what was started ----------------------------------------------------------------------
@dataclass(frozen=True)
class Process:
    """A process the cluster started: etcd, or a node."""

    role: str  # "etcd" or the node's name
    pid: int
    # Clock ticks after boot at which it started (/proc/PID/stat field 22): a pid the
    # kernel has since given to another process does not match it.
    start_time: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ClusterState:
    """What ``cluster.json`` holds: the plan, how nodes are started, what runs."""

    plan: ClusterPlan
    python: str  # the interpreter nodes run under
    serve_args: tuple[str, ...] = ()  # extra ``serve`` arguments for every node
    processes: tuple[Process, ...] = ()
    node_args: dict[str, tuple[str, ...]] = field(default_factory=dict)  # and for one

    def process(self, role: str) -> Process | None:
        for proc in self.processes:
            if proc.role == role:
                return proc
        return None

    def with_process(self, role: str, proc: Process | None) -> ClusterState:
        rest = tuple(p for p in self.processes if p.role != role)
        return replace(self, processes=rest if proc is None else (*rest, proc))

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "version": STATE_VERSION,
            "id": p.id,
            "dir": str(p.dir),
            "subnet": p.subnet,
            "bridge": p.bridge,
            "gateway": p.gateway,
            "etcd": {"url": p.etcd_url, "data_dir": str(p.etcd_data_dir), "log": str(p.etcd_log)},
            "nodes": [
                {
                    "name": n.name,
                    "netns": n.netns,
                    "veth": n.veth,
                    "address": n.address,
                    "port": n.port,
                    "url": n.url,
                    "data_dir": str(n.data_dir),
                    "log": str(n.log),
                }
                for n in p.nodes
            ],
            "python": self.python,
            "serve_args": list(self.serve_args),
            "node_args": {name: list(args) for name, args in self.node_args.items()},
            "processes": [
                {"role": q.role, "pid": q.pid, "start_time": q.start_time, "argv": list(q.argv)}
                for q in self.processes
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        plan = ClusterPlan(
            id=data["id"],
            dir=Path(data["dir"]),
            subnet=data["subnet"],
            bridge=data["bridge"],
            gateway=data["gateway"],
            nodes=tuple(
                NodePlan(
                    name=n["name"],
                    netns=n["netns"],
                    veth=n["veth"],
                    address=n["address"],
                    port=int(n["port"]),
                    data_dir=Path(n["data_dir"]),
                    log=Path(n["log"]),
                )
                for n in data["nodes"]
            ),
        )
        return cls(
            plan=plan,
            python=data["python"],
            serve_args=tuple(data["serve_args"]),
            node_args={n: tuple(a) for n, a in (data.get("node_args") or {}).items()},
            processes=tuple(
                Process(q["role"], int(q["pid"]), int(q["start_time"]), tuple(q["argv"]))
                for q in data["processes"]
            ),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ClusterState | None:
        """The state in ``path``; None if there is none."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LocalClusterError(f"{path}: {exc.strerror or exc}") from exc
        try:
            return cls.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalClusterError(f"{path} is not a cluster state file: {exc}") from exc


@dataclass(frozen=True)
class ComponentStatus:
    role: str  # "etcd" or a node's name
    url: str
    pid: int | None  # None: not running
    healthy: bool  # answers its health check (etcd: /health, a node: /healthz)
    netns: str | None = None  # a node's network namespace
    log: Path | None = None


@dataclass(frozen=True)
class ClusterStatus:
    dir: Path
    subnet: str | None  # None: no cluster in dir
    components: tuple[ComponentStatus, ...] = field(default=())

    @property
    def running(self) -> bool:
        return any(c.pid is not None for c in self.components)


# -- the host: ip, processes, mounts --------------------------------------------------------
def _ip(*args: str) -> str:
    """Run ``ip ARGS``; its stdout.  A failure is a LocalClusterError quoting ip's stderr."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise LocalClusterError("ip is not installed (Debian package iproute2)") from exc
    if proc.returncode != 0:
        raise LocalClusterError(f"ip {shlex.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _delete_link(name: str) -> None:
    """Delete network interface ``name`` if it exists."""
    try:
        if link_exists(name):
            _ip("link", "delete", name)
    except LocalClusterError:
        if link_exists(name):  # not "it went away meanwhile"
            raise


def link_exists(name: str) -> bool:
    return (Path("/sys/class/net") / name).exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def used_networks() -> list[tuple[str, str]]:
    """Every IPv4 network the host routes somewhere (all tables), with its device."""
    used = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst")
        if dst and dst != "default":
            used.append((dst, f"a route via {route.get('dev') or route.get('type', '?')}"))
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for addr in link.get("addr_info", []):
            used.append((f"{addr['local']}/32", f"an address of {link.get('ifname', '?')}"))
    return used


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks after boot, None if no such process (or
    a zombie: it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _tail(path: Path, lines: int = 25, since: int = 0) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(since, size - 16384))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror or exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or under ``directory``, deepest first."""
    found = []
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and '\' octal-escaped.
            point = _OCTAL.sub(lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == str(directory) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the cluster ---------------------------------------------------------------------------
class LocalCluster:
    """etcd and N nodes on this machine, kept in ``directory`` (see the module docstring).

    ``up`` starts them, ``down`` stops them and removes what ``up`` made; ``status`` says
    what runs.  Another process may ``down`` (or inspect) a cluster this one started:
    everything it needs is in ``cluster.json``.  The node methods (``kill_node``,
    ``start_node``, ``restart_node``, ``stop_etcd``, ``start_etcd``, ``run_in``) are for
    tests that exercise failures.
    """

    def __init__(
        self,
        directory: Path = DEFAULT_DIR,
        *,
        python: str = sys.executable,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = directory.resolve()
        self.python = python
        self._say = on_progress or (lambda _msg: None)
        self._popen: dict[int, subprocess.Popen[bytes]] = {}  # what this process started
        self._offsets: dict[str, int] = {}  # where each node's output starts in its log
        self.state = ClusterState.load(self.state_file)

    # -- what tests and the CLI read
    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def plan(self) -> ClusterPlan:
        if self.state is None:
            raise LocalClusterError(f"no cluster in {self.dir} (warmstart cluster up first)")
        return self.state.plan

    @property
    def nodes(self) -> tuple[NodePlan, ...]:
        return self.plan.nodes

    @property
    def node_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def etcd_url(self) -> str:
        return self.plan.etcd_url

    # -- up
    def up(
        self,
        nodes: int,
        subnet: str | None = DEFAULT_SUBNET,
        serve_args: Sequence[str] = (),
        timeout: float = 120.0,
        node_args: Mapping[str, Sequence[str]] | None = None,
    ) -> ClusterPlan:
        """Start etcd and ``nodes`` nodes; return once every node answers ``/healthz``.
        ``subnet=None`` picks a free /24 in 10.77.0.0/16.  ``serve_args`` go to every
        node, ``node_args[name]`` to that node only.  On failure, whatever was started
        is stopped and removed again (the logs stay) and LocalClusterError says why."""
        per_node = {n: tuple(a) for n, a in (node_args or {}).items()}
        for arg in (*serve_args, *(a for args in per_node.values() for a in args)):
            if arg.split("=", 1)[0] in RESERVED_SERVE_OPTIONS:
                raise LocalClusterError(
                    f"{arg}: the cluster sets {', '.join(RESERVED_SERVE_OPTIONS)} for each node"
                )
        if subnet is not None:
            plan(self.dir, subnet, nodes)  # a bad subnet or too many nodes: say so now
        check_prerequisites()
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / ".cluster.lock"):
            if self.state is not None:
                if any(self._alive(p) for p in self.state.processes):
                    raise LocalClusterError(
                        f"a cluster already runs in {self.dir} (see 'warmstart cluster status "
                        f"--dir {self.dir}'; stop it with 'warmstart cluster down')"
                    )
                self._down()  # whatever a crash or a half-finished up left
            try:
                self._up(nodes, subnet, tuple(serve_args), timeout, per_node)
            except BaseException:
                if self.state is not None:
                    self._say("start-up failed: stopping what was started (logs stay)")
                    try:
                        self._down()
                    except LocalClusterError as cleanup:
                        self._say(f"stopping failed too ({cleanup}): try 'warmstart cluster down'")
                elif created:  # nothing was planned: leave no trace
                    (self.dir / ".cluster.lock").unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        self.dir.rmdir()
                raise
        return self.plan

    def _up(
        self,
        nodes: int,
        subnet: str | None,
        serve_args: tuple[str, ...],
        timeout: float,
        node_args: dict[str, tuple[str, ...]],
    ) -> None:
        with _locked(NET_LOCK):
            if subnet is None:
                the_plan = self._free_plan(nodes)
            else:
                the_plan = plan(self.dir, subnet, nodes)
                clash = overlapping(the_plan.subnet, used_networks())
                if clash is not None:
                    raise LocalClusterError(
                        f"subnet {the_plan.subnet} is in use ({clash[0]}: {clash[1]}); "
                        "pick another with --subnet"
                    )
            for name in (the_plan.bridge, *(n.veth for n in the_plan.nodes)):
                if link_exists(name):
                    raise LocalClusterError(f"a network interface named {name} exists already")
            # Recorded before anything is created: down finds what a crash left.
            unknown = sorted(set(node_args) - {n.name for n in the_plan.nodes})
            if unknown:
                raise LocalClusterError(f"node_args names no node of the plan: {unknown}")
            self.state = ClusterState(the_plan, self.python, serve_args, node_args=node_args)
            self._save()
            self._say(f"bridge {the_plan.bridge} {the_plan.gateway}/{the_plan.prefixlen}")
            _ip("link", "add", the_plan.bridge, "type", "bridge")
            _ip("addr", "add", f"{the_plan.gateway}/{the_plan.prefixlen}", "dev", the_plan.bridge)
            _ip("link", "set", the_plan.bridge, "up")
        for node in the_plan.nodes:
            self._make_netns(node)
        self.start_etcd(timeout=timeout)
        for node in the_plan.nodes:
            self._spawn_node(node)
        for node in the_plan.nodes:
            self.wait_node(node.name, timeout=timeout)

    def _free_plan(self, nodes: int) -> ClusterPlan:
        used = used_networks()
        for candidate in ipaddress.IPv4Network(AUTO_SUBNETS).subnets(new_prefix=24):
            if overlapping(str(candidate), used) is None:
                return plan(self.dir, str(candidate), nodes)
        raise LocalClusterError(f"no free /24 left in {AUTO_SUBNETS}")

    def _make_netns(self, node: NodePlan) -> None:
        p = self.plan
        self._say(f"{node.name}: network namespace {node.netns}, {node.address}")
        _ip("netns", "add", node.netns)
        # The peer is created inside the namespace under its final name.
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("link", "set", node.veth, "master", p.bridge, "up")
        _ip("-n", node.netns, "addr", "add", f"{node.address}/{p.prefixlen}", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "lo", "up")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        _ip("-n", node.netns, "route", "add", "default", "via", p.gateway)

    # -- etcd
    def start_etcd(self, timeout: float = 60.0) -> None:
        """Start etcd (on its data directory: a restart keeps what it held) and wait until
        it answers ``/health``."""
        p = self.plan
        if self._process("etcd") is not None:
            raise LocalClusterError("etcd runs already")
        etcd = shutil.which("etcd")
        if etcd is None:
            raise LocalClusterError("etcd is not installed (Debian package etcd-server)")
        p.etcd_data_dir.mkdir(mode=0o700, exist_ok=True)
        name = f"ws-{p.id}"
        argv = [
            etcd,
            "--name", name,
            "--data-dir", str(p.etcd_data_dir),
            "--listen-client-urls", p.etcd_url,
            "--advertise-client-urls", p.etcd_url,
            "--listen-peer-urls", p.etcd_peer_url,
            "--initial-advertise-peer-urls", p.etcd_peer_url,
            "--initial-cluster", f"{name}={p.etcd_peer_url}",
            "--initial-cluster-token", name,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        self._say(f"etcd {p.etcd_url}")
        proc, offset = self._spawn("etcd", argv, p.etcd_log)
        self._wait_http(proc, f"{p.etcd_url}/health", p.etcd_log, offset, timeout)

    def stop_etcd(self, timeout: float = 30.0) -> None:
        self._stop_roles(["etcd"], timeout)

    # -- nodes
    def start_node(self, name: str, timeout: float = 120.0) -> None:
        """Start node ``name`` (on its data directory, as it was) and wait for /healthz."""
        self._spawn_node(self.plan.node(name))
        self.wait_node(name, timeout)

    def stop_node(self, name: str, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.plan.node(name)
        self._stop_roles([name], timeout)

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (kill -9 by default) to the node's process alone -- what it
        started stays, as after a crash -- and wait until it has ended."""
        self.plan.node(name)
        proc = self._process(name)
        if proc is None:
            raise LocalClusterError(f"{name} does not run")
        os.kill(proc.pid, sig)
        self._wait_ended([proc], timeout=30.0)
        self._forget(name)

    def restart_node(self, name: str, timeout: float = 120.0) -> None:
        """Stop the node if it runs, start it again on the same data directory."""
        if self._process(name) is not None:
            self.stop_node(name)
        self.start_node(name, timeout)

    def wait_node(self, name: str, timeout: float = 120.0) -> None:
        node = self.plan.node(name)
        proc = self._process(name)
        if proc is None:
            raise LocalClusterError(f"{name} does not run")
        self._wait_http(proc, f"{node.url}/healthz", node.log, self._offsets.get(name, 0), timeout)

    def netns_command(self, name: str, *argv: str) -> list[str]:
        """``argv`` run in node ``name``'s network namespace (as its processes see the
        network: the bridge, etcd at the gateway, the other nodes)."""
        node = self.plan.node(name)
        return ["nsenter", f"--net={NETNS_DIR / node.netns}", "--", *argv]

    def run_in(
        self, name: str, *argv: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.netns_command(name, *argv), capture_output=True, text=True, timeout=timeout
        )

    def _spawn_node(self, node: NodePlan) -> None:
        state = self._state()
        if self._process(node.name) is not None:
            raise LocalClusterError(f"{node.name} runs already")
        argv = [
            *self.netns_command(node.name),
            state.python, "-m", "warmstart.cli.main", "serve",
            "--host", node.address,
            "--port", str(node.port),
            "--data-dir", str(node.data_dir),
            "--cluster", self.plan.etcd_url,
            "--node-name", node.name,
            "--advertise", node.url,
            "--insecure-registry", self.plan.gateway,
            *state.serve_args,
            *state.node_args.get(node.name, ()),
        ]  # fmt: skip
        self._say(f"{node.name}: {node.url} (log {node.log})")
        _, self._offsets[node.name] = self._spawn(node.name, argv, node.log)

    # -- down
    def down(self, purge: bool = False, timeout: float = 30.0) -> bool:
        """Stop every node (SIGTERM, SIGKILL after ``timeout`` seconds) and etcd, unmount
        what was left mounted under the directory, delete the namespaces, veths and the
        bridge.  Safe to repeat, and after a crash or a half-finished ``up``.  ``purge``
        also deletes the data, the logs and the state file.  False if there was no cluster
        in the directory."""
        if not self.dir.is_dir():
            return False
        with _locked(self.dir / ".cluster.lock"):
            found = self.state is not None
            if found:
                self._down(timeout)
                if purge:
                    self._purge()
        return found

    def _down(self, timeout: float = 30.0) -> None:
        p = self.plan
        self._stop_roles([n.name for n in p.nodes], timeout)
        for node in p.nodes:
            self._kill_netns_leftovers(node)
        self._stop_roles(["etcd"], timeout)
        for point in _mounts_under(p.dir):
            self._say(f"unmounting {point}")
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        for node in p.nodes:
            # The veth first: deleting one end deletes the pair at once, whereas a deleted
            # namespace takes its devices along only later, when the kernel gets to it.
            _delete_link(node.veth)
            if netns_exists(node.netns):
                _ip("netns", "delete", node.netns)
        _delete_link(p.bridge)
        # The state stays (nothing runs): status says so, and down --purge knows what
        # to delete.
        self.state = replace(self._state(), processes=())
        self._save()

    def _kill_netns_leftovers(self, node: NodePlan) -> None:
        """Kill what a node left running in its namespace (a node killed -9 leaves, say,
        its FUSE daemons, which start sessions of their own)."""
        if not netns_exists(node.netns):
            return
        pids = [int(x) for x in _ip("netns", "pids", node.netns).split()]
        left = []
        for pid in pids:
            start = _start_time(pid)
            if start is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                left.append(Process(f"{node.name} leftover", pid, start, ()))
        if left:
            self._say(f"{node.name}: killed {len(left)} leftover process(es)")
            self._wait_ended(left, timeout=30.0)

    def _purge(self) -> None:
        """Delete what the cluster keeps in the directory (only what the state names:
        the directory may hold other things)."""
        if self.state is None:
            return
        names = ["etcd", "etcd.log", STATE_FILE, f".{STATE_FILE}.tmp"]
        for node in self.state.plan.nodes:
            names += [node.data_dir.name, node.log.name]
        self._say(f"deleting the data and logs in {self.dir}")
        for name in names:
            path = self.dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (self.dir / ".cluster.lock").unlink(missing_ok=True)
        self.state = None
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only if nothing else is in it

    # -- status
    def status(self) -> ClusterStatus:
        if self.state is None:
            return ClusterStatus(self.dir, None)
        p = self.state.plan
        components = [self._component("etcd", p.etcd_url, "/health", None, p.etcd_log)]
        for node in p.nodes:
            components.append(
                self._component(node.name, node.url, "/healthz", node.netns, node.log)
            )
        return ClusterStatus(self.dir, p.subnet, tuple(components))

    def _component(
        self, role: str, url: str, health: str, netns: str | None, log: Path
    ) -> ComponentStatus:
        proc = self._process(role)
        healthy = False
        if proc is not None:
            with contextlib.suppress(httpx.HTTPError):
                healthy = httpx.get(url + health, timeout=2, trust_env=False).status_code == 200
        return ComponentStatus(role, url, None if proc is None else proc.pid, healthy, netns, log)

    # -- processes
    def _state(self) -> ClusterState:
        if self.state is None:
            raise LocalClusterError(f"no cluster in {self.dir} (warmstart cluster up first)")
        return self.state

    def _save(self) -> None:
        self._state().save(self.state_file)

    def _process(self, role: str) -> Process | None:
        """``role``'s process if it still runs."""
        proc = self._state().process(role)
        return proc if proc is not None and self._alive(proc) else None

    def _forget(self, role: str) -> None:
        self.state = self._state().with_process(role, None)
        self._save()

    def _alive(self, proc: Process) -> bool:
        popen = self._popen.get(proc.pid)
        if popen is not None:
            return popen.poll() is None
        # Not started by this process: its parent (or init) reaps it.
        return _start_time(proc.pid) == proc.start_time

    def _spawn(self, role: str, argv: list[str], log_path: Path) -> tuple[Process, int]:
        """Start ``argv`` in a session of its own, output appended to ``log_path``; the
        process and the log's offset where its output starts."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = datetime.now().isoformat(timespec="seconds")
            log.write(f"--- {stamp} {shlex.join(argv)}\n".encode())
            log.flush()
            offset = log.tell()
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # not in the terminal's process group: Ctrl-C
            )  # at `cluster up` does not reach it
        self._popen[popen.pid] = popen
        proc = Process(role, popen.pid, _start_time(popen.pid) or 0, tuple(argv))
        self.state = self._state().with_process(role, proc)
        self._save()
        return proc, offset

    def _wait_http(self, proc: Process, url: str, log: Path, offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2, trust_env=False) as client:
            while True:
                if not self._alive(proc):
                    popen = self._popen.get(proc.pid)
                    how = "" if popen is None else f" with status {popen.returncode}"
                    raise LocalClusterError(
                        f"{proc.role} exited{how} before answering {url}; the end of "
                        f"{log}:\n{_tail(log, since=offset)}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise LocalClusterError(
                        f"{proc.role} did not answer {url} within {timeout:g} s; the end of "
                        f"{log}:\n{_tail(log, since=offset)}"
                    )
                time.sleep(0.1)

    def _stop_roles(self, roles: list[str], timeout: float) -> None:
        """SIGTERM each running ``roles`` process; SIGKILL its process group (it leads a
        session) if it has not ended after ``timeout`` seconds."""
        running = [p for p in (self._process(r) for r in roles) if p is not None]
        for proc in running:
            self._say(f"stopping {proc.role} (pid {proc.pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        left = self._wait_ended(running, timeout, raise_on_timeout=False)
        for proc in left:
            self._say(f"{proc.role} did not stop within {timeout:g} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._wait_ended(left, timeout=30.0)
        for proc in running:
            self._forget(proc.role)

    def _wait_ended(
        self, procs: list[Process], timeout: float, raise_on_timeout: bool = True
    ) -> list[Process]:
        """Wait until ``procs`` have ended; those that have not after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in procs if self._alive(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for proc in procs:
            if proc not in left:
                self._popen.pop(proc.pid, None)
        if left and raise_on_timeout:
            raise LocalClusterError(
                "still running after SIGKILL: " + ", ".join(f"{p.role} (pid {p.pid})" for p in left)
            )
        return left


def missing_prerequisites() -> str | None:
    """Why a local cluster cannot run here (not root, a tool missing); None if it can."""
    if os.geteuid() != 0:
        return "a local cluster needs root (it creates a bridge and network namespaces)"
    missing = [
        f"{tool} (Debian package {pkg})"
        for tool, pkg in (("ip", "iproute2"), ("etcd", "etcd-server"), ("nsenter", "util-linux"))
        if shutil.which(tool) is None
    ]
    return f"not installed: {', '.join(missing)}" if missing else None


def check_prerequisites() -> None:
    reason = missing_prerequisites()
    if reason is not None:
        raise LocalClusterError(reason)
