"""Test tooling for container images: the real OCI registry on loopback, images built with
umoci and pushed with skopeo (tools independent of warmstart), a Debian root with Python.

Everything here shells out to Debian's packages (docker-registry, umoci, skopeo,
debootstrap), which ``scripts/test`` installs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CACHE = Path(os.environ.get("WARMSTART_TEST_CACHE", "/var/cache/warmstart-test"))
DEBIAN_MIRROR = os.environ.get("WARMSTART_TEST_MIRROR", "http://deb.debian.org/debian")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A running ``docker-registry`` (the reference distribution implementation)."""

    host: str  # "127.0.0.1:PORT": image references start with it
    root: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Start the same registry again (same port, same storage) after stop()."""
        self.stop()
        self.proc = _spawn_registry(self.config_path, self.log_path)
        _wait_registry(self)


def _spawn_registry(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_registry(reg: Registry, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited:\n{reg.log()}")
        try:
            r = httpx.get(f"{reg.url}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not come up:\n{reg.log()}")


def start_registry(root: Path, *, auth_yaml: str = "", port: int | None = None) -> Registry:
    """Start a registry storing under ``root``; ``auth_yaml`` is an indented ``auth:`` block."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        + (f"auth:\n{auth_yaml}" if auth_yaml else "")
    )
    log_path = root / "registry.log"
    reg = Registry(f"127.0.0.1:{port}", root, _spawn_registry(config, log_path), log_path, config)
    _wait_registry(reg)
    return reg


# -- a Debian root with Python ---------------------------------------------------------------
def base_rootfs() -> Path:
    """A minimal Debian bookworm with python3, made once by debootstrap and cached."""
    dest = CACHE / "bookworm-python3"
    if (dest / "usr/bin/python3").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".bookworm-python3.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3",
            "bookworm",
            str(tmp),
            DEBIAN_MIRROR,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (tmp / junk).glob("*"):
            if p.is_file():
                p.unlink()
    tmp.rename(dest)
    return dest


# -- building images with umoci and pushing them with skopeo ---------------------------------
def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}{res.stdout}")
    return res.stdout


def build_image(
    workdir: Path,
    layers: list[Path | dict[str, str | bytes]],
    *,
    ref: str,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    workingdir: str | None = None,
    compress: str = "gzip",
) -> str:
    """Build an OCI image whose layers are the given directories (copied) or file maps,
    push it to ``ref`` (``host:port/repo:tag``) over plain HTTP, and return ``ref``.

    ``compress`` is "gzip" or "none" (umoci's layer compression).
    """
    layout = workdir / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:img")
    bundle = workdir / "bundle"
    for layer in layers:
        shutil.rmtree(bundle, ignore_errors=True)
        run("umoci", "unpack", "--rootless", "--image", f"{layout}:img", str(bundle))
        rootfs = bundle / "rootfs"
        if isinstance(layer, Path):
            subprocess.run(["cp", "-a", f"{layer}/.", str(rootfs)], check=True)
        else:
            for name, content in layer.items():
                p = rootfs / name.lstrip("/")
                if name.endswith("/"):
                    p.mkdir(parents=True, exist_ok=True)
                    continue
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.exists() or p.is_symlink():
                    p.unlink()
                if isinstance(content, bytes):
                    p.write_bytes(content)
                elif content.startswith("->"):
                    p.symlink_to(content[2:])
                else:
                    p.write_text(content)
        args = ["umoci", "repack", "--image", f"{layout}:img", str(bundle)]
        if compress != "gzip":
            args[2:2] = [f"--compress={compress}"]
        run(*args)
    config = ["umoci", "config", "--image", f"{layout}:img"]
    for c in cmd or []:
        config += ["--config.cmd", c]
    for e in entrypoint or []:
        config += ["--config.entrypoint", e]
    for e in env or []:
        config += ["--config.env", e]
    if workingdir:
        config += ["--config.workingdir", workingdir]
    config += ["--os", "linux", "--architecture", "amd64"]
    run(*config)
    push(f"oci:{layout}:img", ref)
    shutil.rmtree(bundle, ignore_errors=True)
    return ref


def push(src: str, ref: str) -> None:
    run(
        "skopeo",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        src,
        f"docker://{ref}",
    )


def tar_layer(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a raw tar (for hostile-layer tests) with exactly the given members."""
    import io

    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path
