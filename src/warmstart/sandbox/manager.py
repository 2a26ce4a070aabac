"""SandboxManager: the spawner process, the cgroup pool and the root-filesystem layout."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import py_compile
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart.errors import SandboxError
from warmstart.kinds import QoSClass
from warmstart.lifecycle import Supervisor
from warmstart.sandbox import cgroups, guardian
from warmstart.sandbox.cgpool import Cgroup, CgroupPool, reap, set_best_effort
from warmstart.sandbox.ephemeral import EphemeralStorage

log = logging.getLogger(__name__)

# The runtime as it is copied into the sandbox: the zygote builds its children's roots
# with the same syscall wrappers the spawner uses (``syscalls`` is a standard-library leaf).
RUNTIME_FILES = ("bootstrap.py", "protocol.py", "zygote.py", "syscalls.py")
DEV_FILES = ("null", "zero", "full", "random", "urandom")
TASK_ROOT = "/var/task"
RUNTIME_ROOT = "/var/runtime"
# Where a sandbox sees the interpreter's prefix when it is not under /usr (as Lambda's
# /var/lang): tracebacks then name /var/lang/lib/python3.X/..., not a host directory.
LANG_ROOT = "/var/lang"
LOCK_WAIT_S = 10.0  # how long a starting worker waits for a dying one's data-dir lock
END_WAIT_S = 2.0  # how long a destroyed sandbox may take to end before its cgroup is polled
CGROUP_TOP = "warmstart"  # warmstart/<hash>/ls: latency-sensitive instances and zygotes
# Best-effort instances: warmstart-be/<hash>/, a subtree of its own at the hierarchy's
# root, where its lowest weight (and cpu.idle, if asked for) ranks it below every
# ordinary task on the host.
BE_CGROUP_TOP = "warmstart-be"
# In an image's root, warmstart's runtime sits at the top level (the image owns /var).
IMAGE_RUNTIME_ROOT = "/.warmstart-runtime"
# Top-level directories of an image that a sandbox gets fresh instead of from the image.
IMAGE_SKIP = frozenset({"dev", "proc", "sys", "tmp", "run"})


class Isolation(enum.Enum):
    LINUX = "linux"  # namespaces + chroot + cgroups
    PROCESS = "process"  # plain processes: NO isolation


@dataclass(frozen=True)
class RootLayout:
    """What a sandbox's root is made of: read-only binds, symlinks and the Python to run.

    The host layout binds the host's /usr, /lib... and runs the host's Python; an image
    layout binds the top-level directories of an image's root and runs the image's Python
    (with its site-packages, and honouring the image's environment).
    """

    mounts: tuple[tuple[str, str, str], ...]
    symlinks: tuple[tuple[str, str], ...]
    python: str
    runtime_root: str = RUNTIME_ROOT
    python_flags: tuple[str, ...] = ("-E", "-s", "-S")


@dataclass(frozen=True)
class SandboxSpec:
    code_dir: Path | None  # mounted at /var/task; None when the code is in the image
    env: dict[str, str]
    memory_mb: int
    network: str = "none"  # "none" (loopback only) or "host"
    extra_ro_mounts: tuple[tuple[str, str], ...] = ()
    qos_class: QoSClass = QoSClass.LS  # BE: a cgroup in the best-effort subtree
    layout: RootLayout | None = None  # None: the host layout
    workdir: str = TASK_ROOT  # the handler's directory (LAMBDA_TASK_ROOT)
    tmp_mb: int = 512  # /tmp: the function's EphemeralStorage.Size


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    output: str


@dataclass(eq=False)
class Sandbox:
    """A running sandbox: the worker's end of the runtime socket and how to control it."""

    id: str
    pid: int
    sock: socket.socket
    cgroup: Cgroup | None
    forked: bool = False  # forked from a zygote (vs. a fresh interpreter)
    # For the sandbox's life: our reference to the memfd its stdout/stderr go to (the
    # runtime empties it after each invocation), and the read end of the pipe on which
    # its parent says how it ended.  Read only once the runtime is found dead.
    output: int = -1
    exit_status: int = -1

    def output_tail(self, limit: int = 4096) -> bytes:
        """The last ``limit`` bytes the runtime wrote since it last sent a reply (all a
        runtime that died before it was ready wrote, or what a dying invocation wrote)."""
        if self.output < 0:
            return b""
        try:
            size = os.fstat(self.output).st_size
            return os.pread(self.output, min(size, limit), max(0, size - limit))
        except OSError:
            return b""

    async def exit_reason(self, timeout: float) -> str:
        """How the runtime ended ("exit status 3", "signal: killed"), as its parent
        reports it; "" when nobody reported within ``timeout`` seconds."""
        fd = self.exit_status
        if fd < 0:
            return ""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, ready)
        try:
            async with asyncio.timeout(timeout):
                await readable
            return os.read(fd, 256).decode(errors="replace")
        except (TimeoutError, OSError):
            return ""
        finally:
            loop.remove_reader(fd)

    def end_fd(self) -> int:
        """A new fd that reaches end of file once every process of the sandbox has ended
        (-1 if there is none: the sandbox has ended already, or has no pid namespace).

        A sandbox's processes share a pid namespace whose init goes last: when it exits,
        the kernel kills the rest and waits for them first.  A forked sandbox's init is
        ``pid`` itself: a pidfd on it polls readable once it has exited (and then reads
        as end of file here).  A fresh sandbox's init (the spawner's C2, whose host pid
        the worker does not know) holds the write end of the exit pipe and nobody else
        does: the pipe reaches end of file when it exits."""
        if self.cgroup is None:
            return -1
        if self.forked:
            try:
                return os.pidfd_open(self.pid)
            except OSError:
                return -1
        if self.exit_status < 0:
            return -1
        try:
            return os.dup(self.exit_status)
        except OSError:
            return -1

    def close_exit_fds(self) -> None:
        """Drop the output memfd and the exit pipe (the sandbox is being destroyed)."""
        for fd in (self.output, self.exit_status):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.output = self.exit_status = -1

    def freeze(self) -> None:
        if self.cgroup is not None:
            self.cgroup.freeze()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.cgroup is not None:
            self.cgroup.thaw()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)

    def memory_usage(self) -> int:
        if self.cgroup is not None:
            return self.cgroup.memory_usage()
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def memory_peak(self) -> int:
        return self.cgroup.memory_peak() if self.cgroup is not None else self.memory_usage()

    def oom_killed(self) -> bool:
        return self.cgroup.oom_killed() if self.cgroup is not None else False


async def _wait_eof(fd: int, timeout: float) -> None:
    """Wait until ``fd`` (a pidfd, or a pipe's read end) reaches end of file, or
    ``timeout`` seconds have passed; then close it.  A pidfd reads as EINVAL: that, too,
    means its process has ended."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            if os.read(fd, 256):
                return  # the exit report: the end of file follows
        except BlockingIOError:
            return
        except OSError:
            pass
        if not ended.done():
            ended.set_result(None)

    try:
        loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(timeout):
                await ended
        except TimeoutError:
            pass  # the pool's recycling polls the cgroup as before
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _command_result(raw: bytes, marker: str) -> CommandResult:
    text = raw.decode(errors="replace")
    head, sep, tail = text.rpartition(marker)
    if not sep:
        return CommandResult(-1, text)  # killed before the shell could report
    try:
        code = int(tail.strip() or "-1")
    except ValueError:
        code = -1
    return CommandResult(code, head)


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_python(rootfs: Path, path_env: str = "") -> str | None:
    """The first python3 (or python) on ``path_env`` inside ``rootfs``, as a path in it."""
    for name in ("python3", "python"):
        for d in (path_env or DEFAULT_PATH).split(":"):
            if not d.startswith("/"):
                continue
            candidate = f"{d.rstrip('/')}/{name}"
            if _exists_in(rootfs, candidate):
                return candidate
    return None


def _exists_in(rootfs: Path, path: str, depth: int = 0) -> bool:
    """Whether ``path`` exists inside ``rootfs``, resolving symlinks within it."""
    if depth > 16:
        return False
    parts = [p for p in path.split("/") if p]
    cur = "/"
    for i, part in enumerate(parts):
        host = os.path.join(str(rootfs), cur.lstrip("/"), part)
        if os.path.islink(host):
            target = os.readlink(host)
            rest = "/".join(parts[i + 1 :])
            base = target if target.startswith("/") else os.path.join(cur, target)
            return _exists_in(rootfs, os.path.normpath(os.path.join(base, rest)), depth + 1)
        if not os.path.lexists(host):
            return False
        cur = os.path.join(cur, part)
    return True


def _runtime_python() -> str:
    """The base interpreter (a venv's python is a symlink into the base prefix)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


class SandboxManager:
    def __init__(
        self,
        data_dir: Path,
        *,
        isolation: Isolation | None = None,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        uid: int = 65534,
        gid: int = 65534,
        pids_max: int = 256,
        tmp_mb: int = 512,
        cpu_quota: float | None = None,
        pool_size: int = 8,
        lock_dir: Path = Path("/run/warmstart"),
        be_sched_idle: bool = False,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self.data_dir = data_dir
        self.lock_wait_s = lock_wait_s
        # The best-effort subtree also in the kernel's idle class (QoSConfig.be_sched_idle).
        self.be_sched_idle = be_sched_idle
        self.uid, self.gid = uid, gid
        self.pids_max = pids_max
        self.tmp_bytes = tmp_mb << 20
        self.cpu_quota = cpu_quota
        self._requested = isolation
        self._cgroup_root = cgroup_root
        self._pool_size = pool_size
        self.isolation = Isolation.PROCESS
        self.pool: CgroupPool | None = None
        self.be_pool: CgroupPool | None = None  # best-effort instances (async events, jobs)
        self.driver: cgroups.CgroupDriver | None = None
        self.be_driver: cgroups.CgroupDriver | None = None  # joins cpuset too, where there is one
        self.reaped = 0
        self.runtime_dir = data_dir / "runtime"
        # Every sandbox mounts its root here, inside its own mount namespace (the host
        # sees an empty directory).  Not under the data dir: a zygote, unprivileged on
        # the host, must be able to walk to it, and the data dir may sit below a
        # private directory.
        digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
        self.root_mountpoint = lock_dir / "roots" / digest
        self.python = _runtime_python()
        self._spawner: subprocess.Popen[bytes] | None = None
        # The guardian (``warmstart.sandbox.guardian``) and the write end of its pipe:
        # when this process dies, the kernel closes it and the guardian sweeps our cgroups.
        self._guardian: subprocess.Popen[bytes] | None = None
        self._guardian_w = -1
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._closing = False
        self._refilling = False
        self._lock_dir = lock_dir
        self._lock_fd = -1
        # Cgroup refills and parks run in the background, owned here.
        self.tasks = Supervisor("sandboxes")
        self._parked: set[Cgroup] = set()  # free cgroups with a parent parked in them
        self._base_mounts: list[tuple[str, str, str]] = []
        self._symlinks: list[tuple[str, str]] = []
        # Instances' /tmp, on disk and apart from their memory (None: a tmpfs, as
        # without linux isolation or without mkfs.ext4).
        self.ephemeral: EphemeralStorage | None = None
        self.tmp_mb = tmp_mb

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def ls_parent(self) -> str:
        return f"{self.cgroup_parent()}/ls"

    @property
    def be_parent(self) -> str:
        """The best-effort subtree.  Not below ``cgroup_parent()``: a weight (and
        ``cpu.idle``) ranks a group only against its siblings, and there be/ would rank
        low against ls/ alone while the whole subtree competed as an equal with the worker
        itself and every other task on the host."""
        return f"{BE_CGROUP_TOP}/{self.cgroup_parent().split('/')[1]}"

    def cgroup_parent(self) -> str:
        """Our cgroup subtree: one per data dir, so two workers never reap each other."""
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        return f"{CGROUP_TOP}/{digest}"

    def _lock_path(self, digest: str) -> Path:
        return self._lock_dir / f"{digest}.lock"

    async def _take_ownership(self, wait_s: float = LOCK_WAIT_S) -> None:
        """One worker per data dir: hold a lock for as long as this manager lives.

        A worker killed with SIGKILL releases the lock only once the kernel has torn the
        process down -- with many threads, sockets and mounts that can take a moment
        after the kill -- so a restart waits up to ``wait_s`` for it before it says that
        another worker runs there."""
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        digest = self.cgroup_parent().split("/")[1]
        fd = os.open(self._lock_path(digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SandboxError(
                        f"another warmstart worker is running on {self.data_dir}"
                    ) from None
                if not waited:
                    log.warning(
                        "the data dir %s is locked by another worker; waiting up to %.0f s "
                        "for it to exit",
                        self.data_dir,
                        wait_s,
                    )
                    waited = True
                await asyncio.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.data_dir.resolve()}\n".encode())
        self._lock_fd = fd

    def _reap_abandoned(
        self, driver: cgroups.CgroupDriver, be_driver: cgroups.CgroupDriver
    ) -> None:
        """Reap subtrees of workers that are gone for good (their lock is free).

        Start-up reaps this data dir's own leftovers; this catches those of data dirs
        that will never start again (deleted test directories, say), in both the
        latency-sensitive and the best-effort tops.
        """
        own = self.cgroup_parent().split("/")[1]
        subtrees = [(driver, s) for s in driver.children(CGROUP_TOP)]
        subtrees += [(be_driver, s) for s in be_driver.children(BE_CGROUP_TOP)]
        for owner, sibling in subtrees:
            if sibling.split("/")[1] == own:
                continue
            path = self._lock_path(sibling.split("/")[1])
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its worker is alive
            try:
                killed = reap(owner, sibling)
                with contextlib.suppress(SandboxError):
                    owner.remove(sibling)
                log.info("reaped abandoned cgroups %s (%d process(es))", sibling, killed)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            finally:
                os.close(fd)

    async def start(self) -> None:
        await self.tasks.start()
        self.isolation = self._choose_isolation()
        self._install_runtime()
        if self.isolation is Isolation.LINUX:
            driver = cgroups.detect(self._cgroup_root)
            if driver is None:
                raise SandboxError(f"no usable cgroup hierarchy at {self._cgroup_root}")
            be_driver = driver.with_cpuset()
            await self._take_ownership(self.lock_wait_s)
            self._reap_abandoned(driver, be_driver)
            # Whatever a crashed worker left in our subtrees goes first, the BE parent
            # itself too: it may still carry that worker's CPU quota or cpuset.
            self.reaped = reap(driver, self.cgroup_parent())
            self.reaped += reap(be_driver, self.be_parent)
            with contextlib.suppress(SandboxError):
                be_driver.remove(self.be_parent)
            # Before the first cgroup is created: from here on, whatever we start in our
            # subtrees dies with this process, frozen or not.
            self._start_guardian()
            self.driver, self.be_driver = driver, be_driver
            # Two classes, two subtrees: latency-sensitive instances (and zygotes) under
            # warmstart/<hash>/ls/, best-effort ones under warmstart-be/<hash>/ at the
            # lowest CPU weight (which the QoS manager may cap further).
            self.pool = CgroupPool(driver, self.ls_parent, initial=self._pool_size)
            self.reaped += self.pool.start()
            self.be_pool = CgroupPool(be_driver, self.be_parent, initial=0)
            self.reaped += self.be_pool.start()
            set_best_effort(driver, BE_CGROUP_TOP, idle=self.be_sched_idle)
            set_best_effort(driver, self.be_pool.parent, idle=self.be_sched_idle)
            for d in (self._lock_dir, self._lock_dir / "roots", self.root_mountpoint):
                d.mkdir(exist_ok=True)
                d.chmod(0o755)
            self._base_mounts, self._symlinks = self._host_layout()
            ephemeral = EphemeralStorage(self.data_dir / "ephemeral", self.tasks)
            try:
                ephemeral.start((self.tmp_mb,))
                self.ephemeral = ephemeral
            except SandboxError as exc:
                log.warning("/tmp is a tmpfs charged to each instance's memory: %s", exc)
            log.info(
                "sandboxes: linux isolation, cgroup %s at %s (%s)",
                driver.version.value,
                self._cgroup_root,
                self.cgroup_parent(),
            )
        else:
            log.warning(
                "ISOLATION IS OFF: running functions as plain processes "
                "(no namespaces, no chroot, no cgroup limits). Run as root on Linux "
                "with cgroups for sandboxes."
            )
        self._start_spawner()
        if self.pool is not None:
            for cg in self.pool.free():
                await self._park(cg)

    def _choose_isolation(self) -> Isolation:
        if self._requested is not None:
            if self._requested is Isolation.LINUX and not self._linux_possible():
                raise SandboxError("linux isolation requested but needs root on Linux with cgroups")
            return self._requested
        return Isolation.LINUX if self._linux_possible() else Isolation.PROCESS

    def _linux_possible(self) -> bool:
        return (
            sys.platform.startswith("linux")
            and os.geteuid() == 0
            and cgroups.detect(self._cgroup_root) is not None
        )

    def _install_runtime(self) -> None:
        """Copy the runtime next to the data dir and byte-compile it (its bind is read-only)."""
        src = Path(__file__).resolve().parent.parent / "runtime"
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        for path in (src / name for name in RUNTIME_FILES):
            shutil.copyfile(path, self.runtime_dir / path.name)
            py_compile.compile(str(self.runtime_dir / path.name), doraise=True)
        for p in [self.runtime_dir, *self.runtime_dir.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    def _host_layout(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
        """Read-only binds of the host directories the Python runtime needs."""
        mounts: list[tuple[str, str, str]] = []
        links: list[tuple[str, str]] = []
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = Path("/") / top
            if p.is_symlink():
                links.append((os.readlink(p), f"/{top}"))
            elif p.is_dir():
                mounts.append((str(p), f"/{top}", "ro"))
        mounts += [("/usr", "/usr", "ro"), ("/etc", "/etc", "ro")]
        prefix = os.path.realpath(sys.base_prefix)
        if not prefix.startswith("/usr/"):
            # Also at its own path: the installer runs the host's path, and the
            # interpreter's RUNPATH names its shared library there.
            mounts.append((prefix, prefix, "ro"))
            mounts.append((prefix, LANG_ROOT, "ro"))
        mounts.append((str(self.runtime_dir), RUNTIME_ROOT, "ro"))
        mounts += [(f"/dev/{d}", f"/dev/{d}", "rw") for d in DEV_FILES]
        return mounts, links

    def image_layout(self, rootfs: Path, path_env: str = "") -> RootLayout:
        """The layout of a sandbox whose root is an image's (mounted) root filesystem.

        Each top-level entry of the image is bound read-only (symlinks stay symlinks);
        /dev, /proc, /tmp come fresh from the sandbox; warmstart's runtime is bound at
        IMAGE_RUNTIME_ROOT.  The Python is the image's: the first python3 on the image's
        PATH.
        """
        if self.isolation is not Isolation.LINUX:
            raise SandboxError(
                "container image functions need linux isolation (run as root on Linux)"
            )
        mounts: list[tuple[str, str, str]] = []
        links: list[tuple[str, str]] = []
        for entry in sorted(os.scandir(rootfs), key=lambda e: e.name):
            if entry.name in IMAGE_SKIP:
                continue
            if entry.is_symlink():
                links.append((os.readlink(entry.path), f"/{entry.name}"))
            elif entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
                mounts.append((entry.path, f"/{entry.name}", "ro"))
        mounts.append((str(self.runtime_dir), IMAGE_RUNTIME_ROOT, "ro"))
        mounts += [(f"/dev/{d}", f"/dev/{d}", "rw") for d in DEV_FILES]
        python = find_python(rootfs, path_env)
        if python is None:
            raise SandboxError(
                f"the image has no python3 on its PATH ({path_env or DEFAULT_PATH}): "
                "warmstart runs Python functions with the image's own interpreter"
            )
        return RootLayout(tuple(mounts), tuple(links), python, IMAGE_RUNTIME_ROOT, ("-s",))

    @property
    def host_layout(self) -> RootLayout:
        return RootLayout(tuple(self._base_mounts), tuple(self._symlinks), self.sandbox_python)

    @property
    def sandbox_python(self) -> str:
        """The interpreter as functions run it: under /var/lang when its prefix is not
        under /usr, so that it computes its prefix (and its frames' paths) from there."""
        prefix = os.path.realpath(sys.base_prefix)
        if (
            self.isolation is not Isolation.LINUX
            or prefix.startswith("/usr/")
            or not self.python.startswith(prefix + "/")
        ):
            return self.python
        return LANG_ROOT + self.python[len(prefix) :]

    @property
    def guardian_pid(self) -> int | None:
        return self._guardian.pid if self._guardian is not None else None

    def _start_guardian(self) -> None:
        """Start the guardian: it holds the read end of a pipe whose write end only this
        process holds (non-inheritable, so no child of ours gets it) and a duplicate of
        the data-dir lock, and sweeps our cgroup subtrees when the pipe reads EOF."""
        watch_r, watch_w = os.pipe()
        try:
            self._guardian = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-m",
                    "warmstart.sandbox.guardian",
                    "--watch-fd",
                    str(watch_r),
                    "--lock-fd",
                    str(self._lock_fd),
                    "--worker-pid",
                    str(os.getpid()),
                    "--cgroup-root",
                    str(self._cgroup_root),
                    "--subtree",
                    self.cgroup_parent(),
                    "--cpuset-subtree",
                    self.be_parent,
                ],
                pass_fds=[watch_r, self._lock_fd],
                stdin=subprocess.DEVNULL,
                # Its own session: Ctrl-C in our terminal, or a signal to our process
                # group, must not take it down with us.
                start_new_session=True,
            )
        except BaseException:
            os.close(watch_w)
            raise
        finally:
            os.close(watch_r)
        self._guardian_w = watch_w

    async def _release_guardian(self, *, stand_down: bool) -> None:
        """Hang up on the guardian and wait for it to exit; with ``stand_down``, tell it
        first that our sandboxes are gone (it then exits at once, touching nothing)."""
        if self._guardian_w >= 0:
            if stand_down:
                with contextlib.suppress(OSError):
                    os.write(self._guardian_w, guardian.STAND_DOWN)
            os.close(self._guardian_w)
            self._guardian_w = -1
        if self._guardian is not None:
            await asyncio.to_thread(self._guardian.wait)
            self._guardian = None

    def _start_spawner(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._spawner = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-m",
                "warmstart.sandbox.spawner",
                str(child.fileno()),
                str(os.getpid()),
            ],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child.close()
        parent.setblocking(False)
        self._sock = parent

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        """Stop the background work, the spawner and the cgroup pools; release the lock;
        stand the guardian down.  If a step failed, the guardian sweeps what is left
        instead (the lock is still ours then, so no new worker meets the sweep)."""
        try:
            await self._close()
        except BaseException:
            await self._release_guardian(stand_down=False)
            raise
        await self._release_guardian(stand_down=True)

    async def _close(self) -> None:
        self._closing = True  # requests to the spawner fail from here on
        if self.ephemeral is not None:
            self.ephemeral.close()
        await self.tasks.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._spawner is not None:
            self._spawner.kill()
            await asyncio.to_thread(self._spawner.wait)
            self._spawner = None
        if self.pool is not None:
            if self.be_pool is not None:
                await asyncio.to_thread(self.be_pool.close)
                self.be_pool = None
            await asyncio.to_thread(self.pool.close)
            if self.driver is not None:
                driver = self.driver
                await asyncio.to_thread(reap, driver, self.cgroup_parent(), quiet=True)
                with contextlib.suppress(SandboxError):
                    driver.remove(self.cgroup_parent())
                for owner, top in ((driver, CGROUP_TOP), (self.be_driver or driver, BE_CGROUP_TOP)):
                    if not owner.children(top):
                        with contextlib.suppress(SandboxError):
                            owner.remove(top)
            self.pool = None
        if self._lock_fd >= 0:
            # Clean up after ourselves while we still hold the lock.
            digest = self.cgroup_parent().split("/")[1]
            with contextlib.suppress(OSError):
                self._lock_path(digest).unlink()
            with contextlib.suppress(OSError):
                self.root_mountpoint.rmdir()
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- sandboxes -----------------------------------------------------------------------
    def _spec_for(
        self, spec: SandboxSpec, sandbox_id: str, cgroup: Cgroup | None
    ) -> dict[str, Any]:
        isolate = self.isolation is Isolation.LINUX
        layout = spec.layout or self.host_layout
        env = dict(spec.env)
        task_root = spec.workdir if isolate else str(spec.code_dir)
        runtime_dir = layout.runtime_root if isolate else str(self.runtime_dir)
        env["LAMBDA_TASK_ROOT"] = task_root
        env["LAMBDA_RUNTIME_DIR"] = runtime_dir
        code = (
            f"import sys; sys.path.insert(0, {runtime_dir!r}); import bootstrap; "
            "bootstrap.main(4)"  # the spawner's OUTPUT_FD
        )
        mounts = list(layout.mounts)
        if spec.code_dir is not None:
            mounts.append((str(spec.code_dir), TASK_ROOT, "ro"))
        mounts += [(src, dst, "ro") for src, dst in spec.extra_ro_mounts]
        return {
            "isolate": isolate,
            "root": str(self.root_mountpoint),
            "mounts": mounts,
            "symlinks": list(layout.symlinks),
            "tmp_bytes": spec.tmp_mb << 20,
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "cgroup_key": cgroup.rel if cgroup else "",
            "hostname": "warmstart",
            "network": spec.network,
            "uid": self.uid,
            "gid": self.gid,
            "argv": [layout.python, *layout.python_flags, "-c", code],
            "env": env,
            "cwd": task_root,
        }

    async def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox_id = self.new_sandbox_id()
        cgroup = None
        if self.pool is not None:
            cgroup = self.pool_for(spec.qos_class).acquire(
                self.limits_for(spec.memory_mb, spec.qos_class), self._parked
            )
            self._parked.discard(cgroup)  # its parked parent becomes this sandbox's C1
            self._maybe_refill()
        try:
            tmp = await self.take_tmp(spec.tmp_mb)
        except BaseException:
            if cgroup is not None:
                await self._recycle(cgroup)
            raise
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        output = os.memfd_create("warmstart-output", os.MFD_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            reply = await self._request(
                {"cmd": "spawn", "spec": self._spec_for(spec, sandbox_id, cgroup)},
                theirs.fileno(),
                output,
                status_w,
                *([tmp] if tmp >= 0 else []),
            )
            if "error" in reply:
                raise SandboxError(f"cannot create sandbox: {reply['error']}")
        except BaseException:
            ours.close()
            os.close(output)
            os.close(status_r)
            if cgroup is not None:
                await self._recycle(cgroup)
            raise
        finally:
            theirs.close()
            os.close(status_w)
            if tmp >= 0:
                os.close(tmp)  # the sandbox has its own reference now (or none: failed)
        ours.setblocking(False)
        return Sandbox(
            sandbox_id, int(reply["pid"]), ours, cgroup, output=output, exit_status=status_r
        )

    async def take_tmp(self, size_mb: int) -> int:
        """A fresh /tmp of ``size_mb`` MB (a detached mount tree the caller owns), or -1:
        the sandbox then mounts a tmpfs of that size."""
        if self.ephemeral is None:
            return -1
        return await self.ephemeral.take(size_mb)

    async def destroy(self, sandbox: Sandbox) -> None:
        # Opened before the runtime is told to go: until it has ended, the pid is its own.
        end = sandbox.end_fd()
        sandbox.sock.close()
        sandbox.close_exit_fds()
        if sandbox.cgroup is not None:
            if end >= 0:
                # Kill, then wait for the end to be reported rather than poll the
                # cgroup's member list (each read of cgroup.procs costs the event loop
                # ~0.1 ms, and a sandbox takes 5-20 ms to end: the kernel tears down its
                # namespaces and mounts).  The pool's recycling then finds it empty.
                with contextlib.suppress(SandboxError):
                    sandbox.cgroup.kill()
                await _wait_eof(end, END_WAIT_S)
            # Forks move their child in themselves; only fresh sandboxes want a parked parent.
            await self._recycle(sandbox.cgroup, repark=not sandbox.forked)
        else:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(sandbox.pid, sig)

    async def run(
        self,
        argv: list[str],
        *,
        mounts: list[tuple[str, str, str]],
        env: dict[str, str],
        memory_mb: int = 1024,
        network: str = "host",
        timeout: float = 600.0,
    ) -> CommandResult:
        """Run a command (an installer, say) in a sandbox and collect its output.

        ``mounts`` are (host path, sandbox path, "ro"|"rw").  Without isolation the
        command runs as a plain process and sandbox paths in argv are mapped back to
        host paths.
        """
        marker = "__warmstart_exit="
        script = ["/bin/sh", "-c", f'"$@"; echo "{marker}$?"', "sh", *argv]
        if self.isolation is not Isolation.LINUX:
            return await self._run_plain(script, mounts, env, marker, timeout)
        cgroup = None
        if self.pool is not None:
            cgroup = self.pool.acquire(
                cgroups.Limits(memory_mb << 20, self.pids_max * 4, None), self._parked
            )
            self._parked.discard(cgroup)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {
            "isolate": True,
            "root": str(self.root_mountpoint),
            "mounts": [*self._base_mounts, *mounts],
            "symlinks": self._symlinks,
            "tmp_bytes": self.tmp_bytes,
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "cgroup_key": cgroup.rel if cgroup else "",
            "hostname": "warmstart",
            "network": network,
            "uid": self.uid,
            "gid": self.gid,
            "argv": script,
            "env": env,
            "cwd": "/",
            "stdio": "socket",
        }
        try:
            reply = await self._request({"cmd": "spawn", "spec": spec}, theirs.fileno())
            theirs.close()
            if "error" in reply:
                raise SandboxError(f"cannot start {argv[0]}: {reply['error']}")
            ours.setblocking(False)
            loop = asyncio.get_running_loop()
            chunks: list[bytes] = []
            async with asyncio.timeout(timeout):
                while chunk := await loop.sock_recv(ours, 65536):
                    chunks.append(chunk)
        except TimeoutError:
            raise SandboxError(f"{argv[0]} timed out after {timeout:.0f}s") from None
        finally:
            theirs.close()
            ours.close()
            if cgroup is not None:
                await self._recycle(cgroup)
        return _command_result(b"".join(chunks), marker)

    async def _run_plain(
        self,
        script: list[str],
        mounts: list[tuple[str, str, str]],
        env: dict[str, str],
        marker: str,
        timeout: float,
    ) -> CommandResult:
        def host(arg: str) -> str:
            for src, dst, _ in sorted(mounts, key=lambda m: -len(m[1])):
                if arg == dst or arg.startswith(dst + "/"):
                    return src + arg[len(dst) :]
            return arg

        proc = await asyncio.create_subprocess_exec(
            *[host(a) for a in script],
            env={k: host(v) for k, v in env.items()},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxError(f"{script[4]} timed out after {timeout:.0f}s") from None
        return _command_result(out, marker)

    def limits_for(self, memory_mb: int, qos_class: QoSClass = QoSClass.LS) -> cgroups.Limits:
        """An instance's limits.  Best-effort instances get no CPU quota of their own: the
        QoS manager may cap their whole subtree (and cgroup v1 refuses a parent quota
        below a child's)."""
        quota = None if self.cpu_quota is None else int(self.cpu_quota * cgroups.CPU_PERIOD_US)
        be = qos_class is QoSClass.BE
        return cgroups.Limits(memory_mb << 20, self.pids_max, None if be else quota)

    async def _unpark(self, cgroup: Cgroup) -> None:
        """Send away the parked parent of a cgroup that a zygote's child will use."""
        if cgroup not in self._parked:
            return
        self._parked.discard(cgroup)
        with contextlib.suppress(SandboxError):
            await self._request({"cmd": "unpark", "key": cgroup.rel})

    def pool_for(self, qos_class: QoSClass) -> CgroupPool:
        pool = self.be_pool if qos_class is QoSClass.BE else self.pool
        if pool is None:
            raise SandboxError("no cgroup pool")
        return pool

    def acquire_unparked(
        self, limits: cgroups.Limits, qos_class: QoSClass = QoSClass.LS
    ) -> Cgroup:
        """A pooled cgroup for a process the caller moves in itself (a zygote's child)."""
        cg = self.pool_for(qos_class).acquire(limits, self._parked, inside=False)
        if cg in self._parked:
            self.tasks.spawn(self._unpark(cg), f"unpark {cg.rel}")
        return cg

    async def acquire_cgroup(
        self, limits: cgroups.Limits, qos_class: QoSClass = QoSClass.LS
    ) -> Cgroup:
        """A pooled cgroup, empty, for a process the caller starts itself (a zygote)."""
        cg = self.pool_for(qos_class).acquire(limits, self._parked, inside=False)
        await self._unpark(cg)
        return cg

    async def release_cgroup(self, cgroup: Cgroup, *, repark: bool = True) -> None:
        """Kill what runs in ``cgroup`` and return it to its pool (with a parked parent
        ready for a fresh sandbox, unless ``repark`` is False)."""
        await self._recycle(cgroup, repark=repark)

    async def spawn_zygote(self, spec: dict[str, Any], sock_fd: int) -> dict[str, Any]:
        """Ask the spawner to start a zygote (``Spawner.zygote``) talking on ``sock_fd``."""
        return await self._request({"cmd": "zygote", "spec": spec}, sock_fd)

    def new_sandbox_id(self) -> str:
        self._seq += 1
        return f"sb{self._seq}"

    async def _park(self, cgroup: Cgroup) -> None:
        """Have the spawner pre-join a parent process to this pooled cgroup."""
        try:
            await self._request(
                {"cmd": "park", "key": cgroup.rel, "cgroup_procs": cgroup.procs_files}
            )
            self._parked.add(cgroup)
        except SandboxError as exc:
            log.warning("cannot park a process in %s: %s", cgroup.rel, exc)

    async def _recycle(self, cgroup: Cgroup, *, repark: bool = True) -> None:
        self._parked.discard(cgroup)
        if self._closing:
            cgroup.kill()
            return
        pool = self.be_pool if self.be_pool is not None and self.be_pool.owns(cgroup) else self.pool
        if pool is not None and await pool.release(cgroup) and repark and pool is self.pool:
            await self._park(cgroup)

    async def _repark(self) -> None:
        self._parked.clear()  # they died with the old spawner
        if self.pool is not None:
            for cg in self.pool.free():
                await self._park(cg)

    def _maybe_refill(self) -> None:
        """Keep parked cgroups in stock: a cgroup created on demand costs a v1 join
        (an RCU grace period) on the invocation path."""
        if self.pool is None or self._refilling or self._closing:
            return
        if sum(1 for cg in self.pool.free() if cg in self._parked) >= self._pool_size // 2:
            return
        self._refilling = True
        self.tasks.spawn(self._refill(), "refill the cgroup pool")

    async def _refill(self) -> None:
        try:
            while (
                self.pool is not None
                and not self._closing
                and sum(1 for cg in self.pool.free() if cg in self._parked) < self._pool_size
            ):
                unparked = [cg for cg in self.pool.free() if cg not in self._parked]
                await self._park(unparked[0] if unparked else self.pool.grow())
        except SandboxError as exc:
            log.warning("cannot grow the cgroup pool: %s", exc)
        finally:
            self._refilling = False

    async def _request(self, msg: dict[str, Any], *fds: int) -> dict[str, Any]:
        async with self._lock:
            if self._closing:
                raise SandboxError("the sandbox manager is shutting down")
            if self._spawner is None or self._spawner.poll() is not None or self._sock is None:
                log.error("the spawner is gone; starting a new one")
                if self._sock is not None:
                    self._sock.close()
                self._start_spawner()
                # The parked parents died with the old spawner: park new ones.
                if self.pool is not None and msg.get("cmd") != "park":
                    self.tasks.spawn(self._repark(), "repark after a spawner restart")
            if self._sock is None:
                raise SandboxError("no spawner")
            loop = asyncio.get_running_loop()
            raw = json.dumps(msg).encode()
            try:
                socket.send_fds(self._sock, [raw], list(fds))
                async with asyncio.timeout(30):
                    data = await loop.sock_recv(self._sock, 65536)
            except (OSError, TimeoutError) as exc:
                self._kill_spawner()
                raise SandboxError(f"the spawner failed: {exc}") from exc
            if not data:
                self._kill_spawner()
                raise SandboxError("the spawner exited")
            result: dict[str, Any] = json.loads(data)
            return result

    def _kill_spawner(self) -> None:
        if self._spawner is not None:
            with contextlib.suppress(ProcessLookupError):
                self._spawner.kill()
            self._spawner.wait()
            self._spawner = None
