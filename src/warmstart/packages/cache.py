"""InstallCache: resolve a function's requirements once, install each version once.

Layout under ``<data>/packages``::

    <name>-<version>-<key>/      one installed distribution (``uv pip install --no-deps
                                 --target``), byte-compiled, read-only, bind-mounted
                                 read-only into every sandbox that needs it
    .tmp-*                       an install in progress (renamed into place when it
                                 succeeded; removed at start-up after a crash)
    .locks/<dir>.lock            a file lock, so two workers never install the same thing
    .uv-cache/                   the installer's download cache

Resolving and installing run *inside a sandbox* (uid 65534, memory and pids limits, only
the target and cache directories writable): building an sdist runs its setup.py, and a
setup.py is code.  uv is used for both steps: on this machine it installs numpy from a warm
cache in ~0.1 s against ~2.6 s for pip (docs/benchmarks.md).

What the installer reaches is the operator's choice, not the caller's: requirements.txt is
checked first (``requirements.py``: no options that name an index, links, hosts or other
files, no URLs), uv runs with the operator's settings only (its configuration files off, an
environment of our own), and the sandbox's network is loopback plus the egress proxy
(``egress.py``), which refuses host-local and private destinations.  When the installer
fails, the caller learns which package and no more; what uv said goes to the node's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import InvalidParameter, PlatformError
from warmstart.packages.egress import SOCKET_NAME, EgressPolicy, open_egress
from warmstart.packages.requirements import parse_requirements
from warmstart.sandbox import CommandResult, SandboxManager

log = logging.getLogger(__name__)

PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+_-]+)$")
MAX_REQUIREMENTS = 64 * 1024


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, order=True)
class Pin:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def parse_pins(text: str) -> list[Pin]:
    pins = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN_RE.match(line.split(";", 1)[0].strip())
        if m is None:
            raise ValueError(f"not a pin: {line!r}")
        pins.append(Pin(_norm(m.group(1)), m.group(2)))
    return sorted(set(pins))


class InstallCache:
    def __init__(
        self,
        root: Path,
        sandboxes: SandboxManager,
        *,
        python: str,
        index_url: str | None = None,
        find_links: Iterable[Path] = (),
        offline: bool = False,
        memory_mb: int = 2048,
        allow_requirement_sources: bool = False,
        allow_hosts: Iterable[str] = (),
    ) -> None:
        self.root = root
        self.sandboxes = sandboxes
        self.python = python
        self.index_url = index_url
        self.find_links = [p.resolve() for p in find_links]
        self.offline = offline
        self.memory_mb = memory_mb
        self.allow_requirement_sources = allow_requirement_sources
        self.egress = EgressPolicy.for_installer(index_url, allow_hosts)
        self.uv = _find_uv()
        self._locks: dict[str, asyncio.Lock] = {}
        self.installs = 0  # installs actually run (not served from the cache)
        root.mkdir(parents=True, exist_ok=True)
        (root / ".locks").mkdir(exist_ok=True)
        self.cache_dir = root / ".uv-cache"
        self.cache_dir.mkdir(exist_ok=True)
        os.chown(self.cache_dir, sandboxes.uid, sandboxes.gid)
        # The relay runs as the sandbox's user: a copy it can read, whatever the umask
        # of the tree warmstart is installed in.
        self.relay = root / ".egress-relay.py"
        shutil.copyfile(Path(__file__).with_name("relay.py"), self.relay)
        self.relay.chmod(0o644)
        for partial in root.glob(".tmp-*"):
            shutil.rmtree(partial, ignore_errors=True)

    # -- identity ------------------------------------------------------------------------
    def _source_key(self) -> str:
        """What else decides which bytes an install produces (index, wheelhouse, python)."""
        h = hashlib.sha256()
        h.update(
            f"{sys.version_info[:2]}|{self.index_url}|{self.find_links}|{self.python}".encode()
        )
        return h.hexdigest()[:12]

    def path(self, pin: Pin) -> Path:
        return self.root / f"{pin.name}-{pin.version}-{self._source_key()}"

    def installed(self, pin: Pin) -> bool:
        return self.path(pin).is_dir()

    # -- running the installer -------------------------------------------------------------
    def _uv_args(self) -> list[str]:
        args = ["--python", self.python, "--cache-dir", "/var/uv-cache", "--no-progress", "--quiet"]
        if self.index_url:
            args += ["--index-url", self.index_url]
        for i, _ in enumerate(self.find_links):
            args += ["--find-links", f"/var/wheels/{i}"]
        if self.offline:
            args += ["--offline"]
        return args

    def _mounts(self, work: Path, target: str, egress: Path) -> list[tuple[str, str, str]]:
        mounts = [
            (self.uv, "/opt/warmstart/uv", "ro"),
            (str(self.relay), "/opt/warmstart/relay.py", "ro"),
            (str(egress), "/run/egress", "ro"),
            (str(self.cache_dir), "/var/uv-cache", "rw"),
            (str(work), target, "rw"),
        ]
        mounts += [(str(p), f"/var/wheels/{i}", "ro") for i, p in enumerate(self.find_links)]
        return mounts

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "UV_NO_CONFIG": "1",
            "SSL_CERT_DIR": "/etc/ssl/certs",
        }

    async def _run_uv(self, uv_args: list[str], work: Path, target: str) -> CommandResult:
        """uv in a sandbox whose only way out is an egress proxy with the node's policy."""
        async with open_egress(self.egress) as (_proxy, egress):
            return await self.sandboxes.run(
                [
                    self.python,
                    "-I",
                    "/opt/warmstart/relay.py",
                    "/run/egress/" + SOCKET_NAME,
                    "--",
                    "/opt/warmstart/uv",
                    *uv_args,
                    *self._uv_args(),
                ],
                mounts=self._mounts(work, target, egress),
                env=self._env(),
                memory_mb=self.memory_mb,
                network="none",
            )

    async def resolve(self, requirements: str) -> list[Pin]:
        """Resolve requirements.txt to exact versions (InvalidParameter when impossible)."""
        if len(requirements) > MAX_REQUIREMENTS:
            raise InvalidParameter("requirements.txt is too large")
        reqs = parse_requirements(requirements, allow_sources=self.allow_requirement_sources)
        if not reqs.text.strip():
            return []
        work = Path(tempfile.mkdtemp(prefix=".tmp-resolve-", dir=self.root))
        try:
            (work / "requirements.in").write_text(reqs.text)
            os.chown(work, self.sandboxes.uid, self.sandboxes.gid)
            result = await self._run_uv(
                [
                    "pip",
                    "compile",
                    "/work/requirements.in",
                    "--no-header",
                    "--no-annotate",
                    "-o",
                    "/work/requirements.txt",
                ],
                work,
                "/work",
            )
            if result.exit_code != 0:
                log.warning("resolving requirements.txt failed: %s", result.output.strip())
                named = _first_named(reqs.names, result.output)
                raise InvalidParameter(
                    f"requirements.txt: {named} could not be resolved from the configured "
                    "index (the node's log has the installer's output)"
                    if named
                    else "requirements.txt could not be resolved from the configured index "
                    "(the node's log has the installer's output)"
                )
            try:
                return parse_pins((work / "requirements.txt").read_text())
            except (OSError, ValueError) as exc:
                raise PlatformError(f"the resolver wrote no usable pins: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def install(self, pins: Iterable[Pin], parallel: int = 4) -> list[Path]:
        """Make sure every pin is installed; returns their directories."""
        pins = list(pins)
        sem = asyncio.Semaphore(parallel)

        async def one(pin: Pin) -> Path:
            async with sem:
                return await self._install_one(pin)

        return list(await asyncio.gather(*(one(p) for p in pins)))

    async def _install_one(self, pin: Pin) -> Path:
        final = self.path(pin)
        if final.is_dir():
            return final
        lock = self._locks.setdefault(final.name, asyncio.Lock())
        async with lock:
            if final.is_dir():
                return final
            lock_file = open(self.root / ".locks" / f"{final.name}.lock", "w")  # noqa: SIM115
            try:
                await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
                if final.is_dir():  # another worker installed it meanwhile
                    return final
                await self._run_install(pin, final)
            finally:
                lock_file.close()
        return final

    async def _run_install(self, pin: Pin, final: Path) -> None:
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            os.chown(work, self.sandboxes.uid, self.sandboxes.gid)
            log.info("installing %s into the install cache", pin)
            result = await self._run_uv(
                [
                    "pip",
                    "install",
                    "--no-deps",
                    "--compile-bytecode",
                    "--link-mode",
                    "copy",
                    "--target",
                    "/target",
                    str(pin),
                ],
                work,
                "/target",
            )
            if result.exit_code != 0:
                log.warning("installing %s failed: %s", pin, result.output.strip())
                raise InvalidParameter(
                    f"requirements.txt: {pin} could not be installed from the configured "
                    "index (the node's log has the installer's output)"
                )
            _seal(work)
            work.rename(final)
            self.installs += 1
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def statistics(self) -> dict[str, int]:
        dirs = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return {"packages": len(dirs), "installs": self.installs}


def _seal(directory: Path) -> None:
    """Root-owned and read-only: what the sandbox user wrote can no longer change."""
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                os.lchown(p, 0, 0)
                if not os.path.islink(p):
                    mode = os.lstat(p).st_mode
                    os.chmod(p, (mode | 0o444 | (0o111 if mode & 0o111 else 0)) & ~0o222)
    os.chown(directory, 0, 0)
    os.chmod(directory, 0o555)


def _first_named(names: Iterable[str], output: str) -> str | None:
    """The first of the caller's own requirements the installer's output mentions (the
    caller wrote those names: saying one back tells nothing about the index).  A name
    matches however its separators are spelt (``a-b``, ``a_b`` in a file name...)."""
    text = output.lower()
    for name in names:
        spelt = r"[-_.]".join(re.escape(part) for part in name.split("-"))
        if re.search(rf"(?<![a-z0-9]){spelt}(?![a-z0-9]|[-_.][a-z])", text):
            return name
    return None


def _find_uv() -> str:
    try:
        import uv

        path = uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        path = shutil.which("uv") or ""
    if not path:
        raise PlatformError("the uv installer is missing (pip install uv)")
    return os.path.realpath(path)
