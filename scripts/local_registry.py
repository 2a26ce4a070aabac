"""A local OCI registry with an example function image in it, for trying warmstart's image
commands (``bash scripts/local-registry``, which installs what this needs, runs it).

    start (default)  start Debian's docker-registry on 127.0.0.1:PORT (storage and log
                     under DIR), build the example image if it is missing or its handler
                     changed, push it, print the commands to try; idempotent
    stop             stop that registry (its storage stays; ``--purge`` removes it)
    status           say whether it runs and what it holds

The image is a Debian bookworm root with python3 (made once by debootstrap and cached,
~35 s) and ``examples/hello/hello.py`` in /var/task; its CMD names the handler. Building
and pushing reuse the test suite's tooling (tests/imagetools.py: umoci, skopeo).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import imagetools  # noqa: E402

HANDLER = REPO / "examples" / "hello" / "hello.py"
REPOSITORY, TAG = "hello", "1"
PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"


def _pid(root: Path) -> int | None:
    """The pid of the registry this script started under ``root``, if it still runs."""
    try:
        pid = int((root / "registry.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # The pid may have been reused: it must be docker-registry serving our config.
    if b"docker-registry" in cmdline[0] and str(root / "config.yml").encode() in cmdline:
        return pid
    return None


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/", timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False


def _has_image(url: str, stamp: Path, want: str) -> bool:
    try:
        r = httpx.head(
            f"{url}/v2/{REPOSITORY}/manifests/{TAG}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            timeout=5,
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and stamp.exists() and stamp.read_text() == want


def start(root: Path, port: int) -> int:
    host = f"127.0.0.1:{port}"
    url = f"http://{host}"
    if _pid(root) is None:
        if _answers(url):
            print(
                f"local-registry: something else already serves a registry on {host}; "
                "stop it or pick another --port",
                file=sys.stderr,
            )
            return 2
        print(f"starting docker-registry on {host} (storage {root / 'data'})", flush=True)
        try:
            reg = imagetools.start_registry(root, port=port, log_level="info", detached=True)
        except RuntimeError as exc:
            print(f"local-registry: {exc}", file=sys.stderr)
            return 2
        (root / "registry.pid").write_text(str(reg.proc.pid))
    else:
        print(f"docker-registry already runs on {host} (pid {_pid(root)})", flush=True)
    ref = f"{host}/{REPOSITORY}:{TAG}"
    # Rebuilt when the handler or the image's shape changes.
    want = hashlib.sha256(HANDLER.read_bytes() + PATH_ENV.encode()).hexdigest()
    stamp = root / "hello-image.sha256"
    if _has_image(url, stamp, want):
        print(f"{ref} is there already", flush=True)
    else:
        print("building the example image (the first time debootstrap takes ~35 s)", flush=True)
        t0 = time.monotonic()
        work = root / "build"
        imagetools.build_image(
            work,
            [imagetools.base_rootfs(), {"var/task/hello.py": HANDLER.read_text()}],
            ref=ref,
            cmd=["hello.handler"],
            workingdir="/var/task",
            env=[PATH_ENV],
        )
        shutil.rmtree(work, ignore_errors=True)
        stamp.write_text(want)
        print(f"pushed {ref} in {time.monotonic() - t0:.1f} s", flush=True)
    ws = ".venv/bin/warmstart"
    print(
        f"""
registry  {url}   (log {root / "registry.log"}; stop: bash scripts/local-registry stop)
image     {ref}   (Debian bookworm + python3; CMD hello.handler from examples/hello)

With a server running (.venv/bin/warmstart serve), try:
  {ws} deploy --image {ref} --name hello-image
  {ws} invoke hello-image '{{"name": "image"}}'
  {ws} image convert {ref} {ref}-esgz --profile     # eStargz, lazily loadable
  {ws} deploy --image {ref}-esgz --name hello-lazy
  {ws} invoke hello-lazy '{{"name": "lazy"}}'
  {ws} image pull {ref}     # preheat a node's store (same --data-dir as serve)"""
    )
    return 0


def stop(root: Path, purge: bool) -> int:
    pid = _pid(root)
    if pid is None:
        print("local-registry: not running")
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _pid(root) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid(root) is not None:
            os.kill(pid, signal.SIGKILL)
        print(f"stopped docker-registry (pid {pid})")
    (root / "registry.pid").unlink(missing_ok=True)
    if purge:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
    return 0


def status(root: Path, port: int) -> int:
    pid = _pid(root)
    if pid is None:
        print("local-registry: not running")
        return 1
    url = f"http://127.0.0.1:{port}"
    try:
        repos = httpx.get(f"{url}/v2/_catalog", timeout=5).json().get("repositories", [])
    except (httpx.HTTPError, ValueError):
        repos = []
    print(f"docker-registry pid {pid} on {url}, storage {root / 'data'}: {', '.join(repos)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/local-registry",
        description="A local OCI registry on loopback with an example function image in it.",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("start", "stop", "status"),
        default="start",
        help="what to do (default %(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("WARMSTART_REGISTRY_PORT") or 5000),
        help="the loopback port (default $WARMSTART_REGISTRY_PORT, else 5000)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("WARMSTART_REGISTRY_DIR") or "/var/tmp/warmstart-registry"),
        help="the registry's storage, config, log and pid file "
        "(default $WARMSTART_REGISTRY_DIR, else /var/tmp/warmstart-registry)",
    )
    p.add_argument("--purge", action="store_true", help="with stop: also remove --dir (off)")
    args = p.parse_args(argv)
    root = args.dir.resolve()
    if args.action == "stop":
        return stop(root, args.purge)
    if args.action == "status":
        return status(root, args.port)
    return start(root, args.port)


if __name__ == "__main__":
    sys.exit(main())
