"""The package installer's only way out: an HTTP proxy that checks every destination.

The resolver and installer run in a sandbox with a network namespace of its own that
holds nothing but loopback.  Their one way out is this proxy, which the worker serves
on a unix socket bound into the sandbox (``relay.py``, inside, turns it into the
``127.0.0.1`` proxy address that uv's HTTP client expects)::

    sandbox netns                       │ the worker (host network)
    uv ──HTTP(S)_PROXY──▶ relay.py ──unix socket──▶ EgressProxy ──▶ index, file host

For every request (``CONNECT host:port`` for HTTPS, an absolute-form request for plain
HTTP) the proxy resolves the host itself and connects to the address it checked, so a
name that resolves to loopback, or resolves differently a moment later, gets nowhere:

* a host:port the operator configured (the index URL, ``--installer-allow-host``) is
  reached whatever it resolves to -- the operator's own mirror may well be private;
* anything else must be on a web port and resolve only to addresses outside the
  node's own and private networks (loopback, RFC 1918, link-local, CGNAT, unique-local,
  multicast, reserved...).  Which hosts a default index sends files to is the index's
  business: they are public addresses, and nothing here needs to know their names.

A refusal is a ``403`` at once (nothing is connected, so there is no time to measure);
the worker's log says what was refused.  Following a redirect is a new request, checked
again.

The proxy's socket lives in a directory of the temp dir (a unix socket's path must be
short; a data dir may be deep), ``ws-egress-<pid>.<start>-<random>``, named after the
worker that made it: its pid and that process's start time, so a pid reused by another
process is not mistaken for it.  The worker removes it when the install is done; a worker
killed meanwhile cannot, and the next one's start-up removes every such directory whose
owner is gone (``reap_stale_dirs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import h11

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

SOCKET_NAME = "proxy.sock"
DIR_PREFIX = "ws-egress-"
MAX_HEAD = 16 * 1024  # a proxy request's line and headers
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
WEB_PORTS = frozenset({80, 443})
# Hop-by-hop headers of the client's request to the proxy (RFC 9110 7.6.1), not sent on.
HOP_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"upgrade"}
)

# Networks that are the node's own or its neighbours'.  (``is_global`` is not the test:
# it also excludes the documentation and benchmarking ranges, which are not routed and
# so point nowhere -- test networks put their mirrors there.)
_INTERNAL_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT (some clouds' metadata services)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata services)
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking (and many proxies' fake addresses)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
    )
)
_INTERNAL_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback, IPv4-compatible
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_internal(address: IPAddress) -> bool:
    """Whether an address is the node's own, on its private networks, or not unicast."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_internal(embedded)
        return any(address in net for net in _INTERNAL_V6)
    return any(address in net for net in _INTERNAL_V4)


class Refusal(enum.Enum):
    """Why the proxy would not connect somewhere."""

    PORT = "not a web port, and not a host the operator allowed"
    INTERNAL = "resolves to a host-local or private address"
    UNRESOLVED = "does not resolve"
    MALFORMED = "not a proxy request this proxy serves"


class EgressRefused(Exception):
    def __init__(self, host: str, port: int, reason: Refusal) -> None:
        super().__init__(f"{host}:{port}: {reason.value}")
        self.host, self.port, self.reason = host, port, reason


def _host_key(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def host_port(url: str) -> tuple[str, int] | None:
    """The (host, port) an http(s) URL connects to; None for other schemes."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return _host_key(parts.hostname), port or (443 if parts.scheme == "https" else 80)


def parse_allowed_host(text: str) -> tuple[str, int | None]:
    """``HOST`` or ``HOST:PORT`` (``[v6]:PORT``) as the operator writes it."""
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not HOST[:PORT]: {text!r}") from exc
    if not parts.hostname or parts.path or parts.query or parts.username:
        raise ValueError(f"not HOST[:PORT]: {text!r}")
    return _host_key(parts.hostname), port


@dataclass(frozen=True)
class EgressPolicy:
    """Where the package installer may connect.

    ``allowed`` holds the operator's hosts, reached whatever they resolve to (a port of
    None allows every port); every other destination must be on a web port and resolve
    only to addresses ``is_internal`` rejects not.
    """

    allowed: frozenset[tuple[str, int | None]] = frozenset()
    public_ports: frozenset[int] = WEB_PORTS

    @classmethod
    def for_installer(cls, index_url: str | None, allow_hosts: Iterable[str] = ()) -> EgressPolicy:
        allowed: set[tuple[str, int | None]] = {parse_allowed_host(h) for h in allow_hosts}
        if index_url and (index := host_port(index_url)) is not None:
            allowed.add(index)
        return cls(frozenset(allowed))

    def operator_allowed(self, host: str, port: int) -> bool:
        key = _host_key(host)
        return (key, port) in self.allowed or (key, None) in self.allowed

    async def admit(self, host: str, port: int, resolve: Resolver) -> list[IPAddress]:
        """The addresses to connect to for host:port, or ``EgressRefused``."""
        operator = self.operator_allowed(host, port)
        if not operator and port not in self.public_ports:
            raise EgressRefused(host, port, Refusal.PORT)
        try:
            addresses = await resolve(_host_key(host), port)
        except OSError:
            addresses = []
        if not addresses:
            raise EgressRefused(host, port, Refusal.UNRESOLVED)
        if not operator and any(is_internal(a) for a in addresses):
            raise EgressRefused(host, port, Refusal.INTERNAL)
        return addresses


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The addresses a host name (or literal, in any form the C library takes) means."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


@dataclass
class EgressStatistics:
    connections: int = 0
    refused: list[str] = field(default_factory=list)  # "host:port: reason"


class EgressProxy:
    """An HTTP proxy (CONNECT and absolute-form requests) that applies an EgressPolicy."""

    def __init__(self, policy: EgressPolicy, *, resolve: Resolver = resolve_host) -> None:
        self.policy = policy
        self._resolve = resolve
        self.stats = EgressStatistics()
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection: one CONNECT tunnel or one forwarded request."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        """End every connection still open (the installer is done)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        request = _parse_head(head)
        if request is None:
            self._refuse(writer, EgressRefused("?", 0, Refusal.MALFORMED), 400)
            return
        method, target, headers = request
        tunnel = method == b"CONNECT"
        where = _connect_target(target) if tunnel else _absolute_target(target)
        if where is None:
            self._refuse(writer, EgressRefused("?", 0, Refusal.MALFORMED), 400)
            return
        host, port, path = where
        try:
            addresses = await self.policy.admit(host, port, self._resolve)
        except EgressRefused as refused:
            self._refuse(writer, refused, 403)
            return
        upstream = await self._open(addresses, port)
        if upstream is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        up_reader, up_writer = upstream
        self.stats.connections += 1
        try:
            if tunnel:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(_origin_request(method, path, headers))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _open(
        self, addresses: list[IPAddress], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for address in addresses:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    return await asyncio.open_connection(str(address), port)
            except (OSError, TimeoutError):
                continue
        return None

    def _refuse(self, writer: asyncio.StreamWriter, refused: EgressRefused, status: int) -> None:
        self.stats.refused.append(str(refused))
        log.warning("package installer: refused a connection to %s", refused)
        reason = b"Forbidden" if status == 403 else b"Bad Request"
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n" % (status, reason))


def _parse_head(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return event.method, event.target, list(event.headers)


def _connect_target(target: bytes) -> tuple[str, int, bytes] | None:
    try:
        host, port = parse_allowed_host(target.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return None if port is None else (host, port, b"")


def _absolute_target(target: bytes) -> tuple[str, int, bytes] | None:
    try:
        url = target.decode("ascii")
    except UnicodeDecodeError:
        return None
    where = host_port(url) if url.startswith("http://") else None
    if where is None:
        return None
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return where[0], where[1], path.encode("ascii")


def _origin_request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request as the origin server expects it, one request per connection."""
    lines = [method + b" " + path + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers if name not in HOP_HEADERS]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


@contextlib.asynccontextmanager
async def open_egress(policy: EgressPolicy) -> AsyncIterator[tuple[EgressProxy, Path]]:
    """Serve an EgressProxy on a unix socket in a fresh directory (yielded: mount it into
    the sandbox; the socket is ``SOCKET_NAME`` in it).  Everything goes on exit."""
    # A short path: a unix socket's address holds 107 bytes, and data dirs can be deep.
    directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{_owner_tag(os.getpid())}-"))
    proxy = EgressProxy(policy)
    try:
        directory.chmod(0o755)
        path = directory / SOCKET_NAME
        server = await asyncio.start_unix_server(proxy.handle, path, limit=MAX_HEAD)
        os.chmod(path, 0o666)  # the sandbox's uid connects to it
        try:
            yield proxy, directory
        finally:
            server.close()
            await proxy.aclose()
            await server.wait_closed()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, ``/proc/PID/stat`` field 22), or
    None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"  # it exists; /proc does not say more
    # The command name (field 2) is in parentheses and may hold spaces and parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else "?"


def _owner_tag(pid: int) -> str:
    return f"{pid}.{_start_time(pid) or '?'}"


def _owner_alive(tag: str) -> bool:
    """Whether the process an egress directory's name names still runs."""
    pid_text, _, start = tag.partition(".")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now = _start_time(pid)
    return now is not None and (now == start or "?" in (now, start))


def reap_stale_dirs(root: Path | None = None) -> int:
    """Remove the egress directories in ``root`` (the temp dir) that a worker killed
    during a package install left: those whose owner process is gone.  How many went.

    Directories named before their owner was part of the name (``ws-egress-<random>``)
    are removed when their socket has no listener any more."""
    base = Path(tempfile.gettempdir()) if root is None else root
    reaped = 0
    try:
        entries = list(base.iterdir())
    except OSError as exc:
        log.warning("cannot list %s for leftover egress directories: %s", base, exc)
        return 0
    uid = os.getuid()
    for entry in entries:
        if not entry.name.startswith(DIR_PREFIX):
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        # Only directories this user made: the temp dir is everyone's.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        tag, sep, _ = entry.name[len(DIR_PREFIX) :].rpartition("-")
        if sep and tag[:1].isdigit():
            if _owner_alive(tag):
                continue
        elif _listening(entry / SOCKET_NAME):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            reaped += 1
    if reaped:
        log.info("removed %d egress directory(ies) left by a stopped worker in %s", reaped, base)
    return reaped


def _listening(path: Path) -> bool:
    """Whether a process listens on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
