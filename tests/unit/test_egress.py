"""The package installer's egress: the address policy, the proxy and the relay."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import warmstart.packages.relay as relay_module
from warmstart.packages.egress import (
    SOCKET_NAME,
    EgressPolicy,
    EgressRefused,
    IPAddress,
    Refusal,
    Resolver,
    is_internal,
    open_egress,
    reap_stale_dirs,
)

ip = ipaddress.ip_address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.7",
        "0.0.0.0",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "198.18.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fd00::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_host_local_and_private_addresses_are_internal(address: str) -> None:
    assert is_internal(ip(address))


@pytest.mark.parametrize(
    "address", ["1.1.1.1", "8.8.4.4", "203.0.113.80", "172.32.0.1", "2606:4700::1111"]
)
def test_other_addresses_are_not(address: str) -> None:
    assert not is_internal(ip(address))


def _resolver(table: dict[str, list[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in table:
            raise OSError("no such host")
        return [ip(a) for a in table[host]]

    return resolve


NAMES = _resolver(
    {
        "index.example": ["203.0.113.80"],
        "rebound.example": ["127.0.0.1"],
        "mixed.example": ["203.0.113.9", "10.0.0.9"],
        "mirror.internal": ["10.0.0.5"],
    }
)


def _admit(policy: EgressPolicy, host: str, port: int) -> list[IPAddress]:
    return asyncio.run(policy.admit(host, port, NAMES))


def _refusal(policy: EgressPolicy, host: str, port: int) -> Refusal:
    with pytest.raises(EgressRefused) as err:
        _admit(policy, host, port)
    return err.value.reason


def test_public_names_on_web_ports_are_admitted_at_the_address_checked() -> None:
    assert _admit(EgressPolicy(), "index.example", 443) == [ip("203.0.113.80")]
    assert _admit(EgressPolicy(), "Index.Example.", 80) == [ip("203.0.113.80")]


def test_a_name_that_resolves_inside_is_refused() -> None:
    policy = EgressPolicy()
    assert _refusal(policy, "rebound.example", 443) is Refusal.INTERNAL
    assert _refusal(policy, "mixed.example", 443) is Refusal.INTERNAL  # any address inside
    assert _refusal(policy, "mirror.internal", 443) is Refusal.INTERNAL
    assert _refusal(policy, "nowhere.example", 443) is Refusal.UNRESOLVED


def test_other_ports_are_refused_before_anything_is_resolved() -> None:
    async def must_not_resolve(host: str, port: int) -> list[IPAddress]:
        raise AssertionError("resolved")

    with pytest.raises(EgressRefused) as err:
        asyncio.run(EgressPolicy().admit("index.example", 22, must_not_resolve))
    assert err.value.reason is Refusal.PORT


def test_the_operators_index_and_hosts_are_reached_wherever_they_are() -> None:
    policy = EgressPolicy.for_installer(
        "http://mirror.internal:3141/root/pypi/+simple/", ["rebound.example", "[::1]:8080"]
    )
    assert _admit(policy, "mirror.internal", 3141) == [ip("10.0.0.5")]
    assert _refusal(policy, "mirror.internal", 443) is Refusal.INTERNAL  # that port only
    assert _admit(policy, "rebound.example", 5000) == [ip("127.0.0.1")]  # every port
    assert policy.operator_allowed("::1", 8080)
    assert not policy.operator_allowed("::1", 8081)


def test_an_index_url_without_a_host_allows_nothing() -> None:
    assert EgressPolicy.for_installer("file:///srv/simple").allowed == frozenset()
    assert EgressPolicy.for_installer(None).allowed == frozenset()


@pytest.mark.parametrize("text", ["", "http://x/", "host:port", "a/b", "user@host"])
def test_malformed_allowed_hosts_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        EgressPolicy.for_installer(None, [text])


# -- the proxy, end to end, against a local server that records what reaches it ---------------
class Recorder(ThreadingHTTPServer):
    hits: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        body = b"secret behind loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder(("127.0.0.1", 0), _Handler)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def _ask(directory: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(directory / SOCKET_NAME)
    writer.write(request)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    return reply


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433"])
def test_the_proxy_refuses_loopback_at_once_and_nothing_is_reached(
    recorder: Recorder, host: str
) -> None:
    port = recorder.server_address[1]
    policy = EgressPolicy(public_ports=frozenset({80, 443, port}))  # the port is no excuse

    async def main() -> tuple[bytes, bytes]:
        async with open_egress(policy) as (proxy, directory):
            connect = await _ask(
                directory, f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
            )
            get = await _ask(
                directory,
                f"GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode(),
            )
            assert len(proxy.stats.refused) == 2
            return connect, get

    connect, get = asyncio.run(main())
    assert connect.startswith(b"HTTP/1.1 403 ")
    assert get.startswith(b"HTTP/1.1 403 ")
    assert b"secret" not in connect + get
    assert recorder.hits == []


def test_the_proxy_forwards_to_an_allowed_host(recorder: Recorder) -> None:
    port = recorder.server_address[1]
    policy = EgressPolicy.for_installer(f"http://127.0.0.1:{port}/simple/")

    async def main() -> tuple[bytes, bytes]:
        async with open_egress(policy) as (_proxy, directory):
            get = await _ask(
                directory,
                f"GET http://127.0.0.1:{port}/simple/six/?q=1 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nProxy-Connection: keep-alive\r\n\r\n".encode(),
            )
            reader, writer = await asyncio.open_unix_connection(directory / SOCKET_NAME)
            writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert await reader.readuntil(b"\r\n\r\n") == (
                b"HTTP/1.1 200 Connection established\r\n\r\n"
            )
            writer.write(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            tunnelled = await reader.read()
            writer.close()
            return get, tunnelled

    get, tunnelled = asyncio.run(main())
    assert get.startswith(b"HTTP/1.0 200 ") and get.endswith(b"secret behind loopback")
    assert tunnelled.endswith(b"secret behind loopback")
    assert recorder.hits == ["/simple/six/?q=1", "/tunnelled"]


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT noport HTTP/1.1\r\nHost: x\r\n\r\n",
        b"not http at all\r\n\r\n",
    ],
)
def test_the_proxy_answers_what_it_does_not_serve_with_400(request_head: bytes) -> None:
    async def main() -> bytes:
        async with open_egress(EgressPolicy()) as (_proxy, directory):
            return await _ask(directory, request_head)

    assert asyncio.run(main()).startswith(b"HTTP/1.1 400 ")


def test_the_socket_directory_goes_with_the_proxy() -> None:
    async def main() -> Path:
        async with open_egress(EgressPolicy()) as (_proxy, directory):
            assert (directory / SOCKET_NAME).exists()
            return directory

    assert not asyncio.run(main()).exists()


# -- the relay: a command's proxy variables lead to the worker's socket ------------------------
FETCH = """
import os, sys, urllib.error, urllib.request
assert os.environ["HTTP_PROXY"].startswith("http://127.0.0.1:"), os.environ["HTTP_PROXY"]
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def test_the_relay_carries_a_command_through_the_proxy(recorder: Recorder) -> None:
    port = recorder.server_address[1]
    allowed = EgressPolicy.for_installer(None, [f"localhost:{port}"])

    async def run(url: str) -> str:
        async with open_egress(allowed) as (_proxy, directory):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                relay_module.__file__,
                str(directory / SOCKET_NAME),
                "--",
                sys.executable,
                "-I",
                "-c",
                FETCH,
                url,
                stdout=subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_PROXY": "*"},
            )
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            return out.decode().strip()

    assert asyncio.run(run(f"http://localhost:{port}/via-relay")) == "secret behind loopback"
    assert asyncio.run(run(f"http://127.0.0.1:{port}/refused")) == "403"
    assert recorder.hits == ["/via-relay"]


def test_the_relay_exits_with_the_commands_status(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            relay_module.__file__,
            str(tmp_path / "s"),
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
        check=False,
    )
    assert out.returncode == 7


def _own_start_time() -> str:
    text = Path("/proc/self/stat").read_text()
    return text[text.rindex(")") + 2 :].split()[19]


def test_start_up_reaps_egress_dirs_whose_owner_is_gone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = f"{os.getpid()}.{_own_start_time()}"
    keep = {
        f"ws-egress-{me}-live01",  # this process: alive
        "ws-egress-legacy_listening",  # no owner in its name, but its socket answers
        "other-dir",
    }
    gone = {
        f"ws-egress-{dead.pid}.1-dead01",  # the process is gone
        f"ws-egress-{os.getpid()}.1-reused",  # a pid reused by another process
        "ws-egress-legacy_dead",  # no owner in its name, no listener
    }
    for name in keep | gone:
        (tmp_path / name).mkdir()
        (tmp_path / name / "leftover").write_text("x")
    (tmp_path / "ws-egress-a-file").write_text("not a directory")
    # A socket that was bound and whose process went (the file stays): no listener.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "ws-egress-legacy_dead" / SOCKET_NAME))
    stale.close()
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "ws-egress-legacy_listening" / SOCKET_NAME))
        listening.listen()
        assert reap_stale_dirs(tmp_path) == 3
    assert {p.name for p in tmp_path.iterdir()} == keep | {"ws-egress-a-file"}


def test_a_live_proxy_dir_is_named_after_its_owner_and_survives_a_reap() -> None:
    async def main() -> None:
        async with open_egress(EgressPolicy()) as (_proxy, directory):
            assert directory.name.startswith(f"ws-egress-{os.getpid()}.")
            reap_stale_dirs(directory.parent)
            assert (directory / SOCKET_NAME).exists()
        assert not directory.exists()

    asyncio.run(main())
