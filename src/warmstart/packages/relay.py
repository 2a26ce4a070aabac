"""Runs inside the installer's sandbox: a local proxy address that leads to the worker.

Usage: ``python -I relay.py SOCKET -- COMMAND...``

The sandbox's network namespace has loopback only, and uv's HTTP client takes a proxy
as a TCP address.  This listens on ``127.0.0.1`` (an ephemeral port of the sandbox's own
loopback), runs COMMAND with ``HTTP_PROXY``/``HTTPS_PROXY`` pointing there, and copies
every connection it accepts to the worker's egress proxy on the unix socket SOCKET,
byte for byte.  It exits with COMMAND's status.

It decides nothing: whatever runs in the sandbox may use it, or the socket directly,
and either way meets the worker's egress policy.  Standard library only (it runs with
the sandbox's Python and no site-packages).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _bridge(client: socket.socket, worker: socket.socket) -> None:
    back = threading.Thread(target=_pump, args=(worker, client), daemon=True)
    back.start()
    _pump(client, worker)
    back.join()
    client.close()
    worker.close()


def _accept(listener: socket.socket, path: str) -> None:
    while True:
        client, _ = listener.accept()
        worker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.connect(path)
        except OSError:
            client.close()
            worker.close()
            continue
        threading.Thread(target=_bridge, args=(client, worker), daemon=True).start()


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: relay.py SOCKET -- COMMAND...", file=sys.stderr)
        return 2
    path, command = args[0], args[2:]
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.upper() != "NO_PROXY"}
    for name in PROXY_VARIABLES:
        env[name] = env[name.lower()] = proxy
    threading.Thread(target=_accept, args=(listener, path), daemon=True).start()
    child = subprocess.Popen(command, env=env)
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
