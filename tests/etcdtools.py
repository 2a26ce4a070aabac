"""A real etcd for tests: Debian's ``etcd`` on loopback ports, its data in a temp dir."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port


@dataclass
class EtcdServer:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None
    log_path: Path
    client_port: int
    peer_port: int

    def _args(self) -> list[str]:
        return [
            "etcd",
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            f"test=http://127.0.0.1:{self.peer_port}",
        ]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not come up: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def etcd_available() -> bool:
    return shutil.which("etcd") is not None


def start_etcd(directory: Path) -> EtcdServer:
    directory.mkdir(parents=True, exist_ok=True)
    client, peer = free_port(), free_port()
    server = EtcdServer(
        f"http://127.0.0.1:{client}", directory / "etcd", None, directory / "etcd.log", client, peer
    )
    server.start()
    return server
