"""Zygote processes, seen from the host: start one, fork sandboxes from it, stop it.

The in-sandbox half is ``warmstart/runtime/zygote.py``; the spawner builds the zygote's
sandbox (``Spawner.zygote``).  A fork, from the worker's side::

    worker ── {"op": "fork"} + the child's socket end (SCM_RIGHTS) ──▶ zygote
    child  ── "H" + SCM_CREDENTIALS ──▶ worker        (the kernel translates the pid)
    worker: writes that pid into a pooled cgroup's cgroup.procs files
    worker ── setup frame + read-only detached mount trees (open_tree) ──▶ child
    child:  attaches them, pivot_roots, drops privileges, imports the handler
    child  ── {"type": "ready"} ──▶ worker            (from here: the ordinary protocol)

The worker never passes the zygote a path or a directory fd, and function code or
environment never passes through the zygote.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmstart.errors import SandboxError
from warmstart.kinds import QoSClass
from warmstart.lifecycle import Supervisor
from warmstart.runtime import syscalls as sc
from warmstart.runtime.protocol import encode
from warmstart.sandbox import Sandbox
from warmstart.sandbox.cgroups import Limits
from warmstart.sandbox.manager import TASK_ROOT
from warmstart.sandbox.memory import MemoryUse, memory_of

if TYPE_CHECKING:
    from warmstart.sandbox.cgpool import Cgroup
    from warmstart.sandbox.manager import RootLayout, SandboxManager, SandboxSpec

log = logging.getLogger(__name__)

CREDS = struct.Struct("iII")
SPARE_MEMORY_MB = 128  # a spare's limit until it is given a function (and its MemorySize)
# How long the spares a cold start took wait to be replaced, unless half the stock is
# gone (a burst: replaced at once, or the next cold starts find none): replacing them (a fork of the zygote, the new child's namespaces and
# mounts, cgroup writes) takes CPU that the cold start needs, on a machine that may have
# two cores; and the spares a burst takes meanwhile are forked again together.
SPARE_REFILL_DELAY_S = 0.05


@dataclass(eq=False)
class Spare:
    """A forked child, already in its own cgroup, waiting for a function."""

    pid: int
    sock: socket.socket
    cgroup: Cgroup
    exit_status: int = -1  # read end of the pipe on which the zygote reports its end

    def close(self) -> None:
        self.sock.close()
        if self.exit_status >= 0:
            os.close(self.exit_status)
            self.exit_status = -1


@dataclass(eq=False)
class Zygote:
    id: str
    packages: tuple[tuple[str, str], ...]  # (host dir, sandbox path)
    ctl: socket.socket
    cgroup: Cgroup | None
    pid: int = 0  # the zygote process on the host
    imported: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    spares: list[Spare] = field(default_factory=list)
    filling: bool = False
    low: asyncio.Event = field(default_factory=asyncio.Event)  # refill now, no delay

    def memory(self) -> MemoryUse | None:
        return memory_of(self.pid) if self.pid else None


async def _recvmsg(
    sock: socket.socket, size: int, ancsize: int, timeout: float
) -> tuple[bytes, list[Any]]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            try:
                msg, anc, _flags, _addr = sock.recvmsg(size, ancsize, socket.MSG_CMSG_CLOEXEC)
                return msg, anc
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()

            def wake(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(fd)


class _Unsafe(SandboxError):
    """A zygote that imported its packages without probing them first found one that
    started threads or opened sockets (or it died importing): start it again, probing."""


def _creds_pid(anc: list[Any]) -> int:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)  # nobody should send us descriptors here
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return int(CREDS.unpack(data[: CREDS.size])[0])
    return 0


class ZygoteLauncher:
    """Starts and forks zygotes on behalf of a SandboxManager (through its public surface:
    pooled cgroups, the spawner's ``zygote`` request, sandbox ids).  Spare children are
    forked in the background under ``tasks``, the zygote cache's supervisor."""

    def __init__(
        self,
        manager: SandboxManager,
        tasks: Supervisor,
        *,
        uid: int = 200000,
        gid: int = 200000,
        memory_mb: int = 2048,
        spares: int = 4,
    ) -> None:
        self.m = manager
        self.tasks = tasks
        self.spares = spares  # forked children kept waiting per zygote
        self.uid, self.gid = uid, gid
        self.memory_mb = memory_mb
        self._seq = 0

    def _layout(
        self, packages: tuple[tuple[str, str], ...]
    ) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
        host = self.m.host_layout
        mounts = [*host.mounts, *((src, dst, "ro") for src, dst in packages)]
        layout = {"binds": [dst for _, dst, _ in mounts], "symlinks": list(host.symlinks)}
        return mounts, layout

    async def start(
        self,
        packages: tuple[tuple[str, str], ...],
        preload: list[str],
        timeout: float = 300.0,
        *,
        image: RootLayout | None = None,
        image_env: dict[str, str] | None = None,
    ) -> Zygote:
        """Start a zygote that imports ``preload``: in the host layout with ``packages``
        bound under /var/packages, or inside an image's root (``image``: its layout, with
        its own Python and site-packages; ``image_env``: the image's environment).

        The zygote imports without probing first; if a package turns out unsafe to
        keep in a fork server (or the zygote dies importing), it starts again, probing
        each package in a throwaway child (see ``warmstart.runtime.zygote``)."""
        try:
            return await self._start(packages, preload, timeout, image, image_env, probe=False)
        except _Unsafe as exc:
            log.info("restarting a zygote with probes: %s", exc)
        return await self._start(packages, preload, timeout, image, image_env, probe=True)

    async def _start(
        self,
        packages: tuple[tuple[str, str], ...],
        preload: list[str],
        timeout: float,
        image: RootLayout | None,
        image_env: dict[str, str] | None,
        *,
        probe: bool,
    ) -> Zygote:
        m = self.m
        if m.pool is None:
            raise SandboxError("zygotes need linux isolation")
        self._seq += 1
        if image is None:
            mounts, layout = self._layout(packages)
            python, flags = m.host_layout.python, ["-E", "-s", "-S"]
            runtime_root = "/var/runtime"
            owned = [["/var/packages", self.uid]]
            symlinks = list(m.host_layout.symlinks)
        else:
            mounts = list(image.mounts)
            symlinks = list(image.symlinks)
            layout = {"binds": [dst for _, dst, _ in mounts], "symlinks": symlinks}
            python, flags, runtime_root = image.python, list(image.python_flags), image.runtime_root
            owned = []  # the image owns /var: an image zygote grows no child zygotes
        cgroup = await m.acquire_cgroup(Limits(self.memory_mb << 20, m.pids_max, None))
        code = f"import sys; sys.path.insert(0, {runtime_root!r}); import zygote; zygote.main()"
        spec = {
            "root": str(m.root_mountpoint),
            "mounts": mounts,
            "symlinks": symlinks,
            "dirs": ["/.c"],
            "owned_dirs": owned,
            "tmp_bytes": 16 << 20,
            "cgroup_procs": cgroup.procs_files,
            "hostname": "warmstart-zygote",
            "uid": m.uid,
            "gid": m.gid,
            "zygote_uid": self.uid,
            "zygote_gid": self.gid,
            "argv": [python, *flags, "-c", code],
            "env": {
                **(image_env or {}),
                "PATH": (image_env or {}).get("PATH") or "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "HOME": "/tmp",
                "LAMBDA_TASK_ROOT": "/var/task",
                "WARMSTART_PRELOAD": ",".join(preload),
                "WARMSTART_PROBE": "1" if probe else "0",
                "WARMSTART_PATH": ":".join(dst for _, dst in packages),
                "WARMSTART_LAYOUT": json.dumps(layout),
            },
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            reply = await m.spawn_zygote(spec, theirs.fileno())
            theirs.close()
            if "error" in reply:
                raise SandboxError(f"cannot start a zygote: {reply['error']}")
            ours.setblocking(False)
            msg, anc = await _recvmsg(ours, 1 << 16, socket.CMSG_SPACE(CREDS.size), timeout)
            if not msg:
                what = "the zygote exited while importing its packages"
                raise SandboxError(what) if probe else _Unsafe(what)
            hello = json.loads(msg)
            if not hello.get("ready"):
                if hello.get("unsafe") and not probe:
                    raise _Unsafe(hello["unsafe"])
                raise SandboxError(f"the zygote failed: {hello.get('error') or hello}")
        except BaseException:
            theirs.close()
            ours.close()
            await m.release_cgroup(cgroup)
            raise
        zygote = Zygote(
            f"zy{self._seq}",
            packages,
            ours,
            cgroup,
            _creds_pid(anc),
            tuple(hello.get("imported", ())),
            dict(hello.get("skipped", {})),
        )
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._on_ctl, zygote)
        if self.spares:
            self.tasks.spawn(self.refill(zygote), f"spares of {zygote.id}")
        if zygote.skipped:
            log.info("zygote %s left out: %s", zygote.id, zygote.skipped)
        return zygote

    async def start_child(
        self,
        parent: Zygote,
        extra: tuple[tuple[str, str], ...],
        preload: list[str],
        timeout: float = 300.0,
    ) -> Zygote:
        """A zygote forked from ``parent``: it shares the parent's imported modules
        (copy-on-write) and adds ``extra`` packages, attached as read-only trees
        (imported without probes first, as in ``start``)."""
        try:
            return await self._start_child(parent, extra, preload, timeout, probe=False)
        except _Unsafe as exc:
            log.info("restarting a child zygote of %s with probes: %s", parent.id, exc)
        return await self._start_child(parent, extra, preload, timeout, probe=True)

    async def _start_child(
        self,
        parent: Zygote,
        extra: tuple[tuple[str, str], ...],
        preload: list[str],
        timeout: float,
        *,
        probe: bool,
    ) -> Zygote:
        m = self.m
        if not parent.alive:
            raise SandboxError(f"zygote {parent.id} is gone")
        self._seq += 1
        cgroup = m.acquire_unparked(Limits(self.memory_mb << 20, m.pids_max, None))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        trees: list[int] = []
        try:
            trees = [sc.clone_tree_readonly(src) for src, _ in extra]
            msg = {
                "op": "zygote",
                "mounts": [dst for _, dst in extra],
                "preload": preload,
                "probe": probe,
            }
            try:
                async with parent.lock:
                    socket.send_fds(
                        parent.ctl, [json.dumps(msg).encode()], [theirs.fileno(), *trees]
                    )
            except OSError as exc:
                parent.alive = False
                raise SandboxError(f"zygote {parent.id} is gone: {exc}") from exc
            finally:
                theirs.close()
                for fd in trees:
                    os.close(fd)
            raw, anc = await _recvmsg(ours, 1 << 16, socket.CMSG_SPACE(CREDS.size), 10.0)
            pid = _creds_pid(anc)
            if not raw or pid <= 0:
                raise SandboxError(f"zygote {parent.id} could not start a child zygote")
            await asyncio.to_thread(cgroup.driver.add, cgroup.rel, pid)
            ours.send(b"go")
            raw, anc = await _recvmsg(ours, 1 << 16, socket.CMSG_SPACE(CREDS.size), timeout)
            if not raw:
                what = "the child zygote exited while importing its packages"
                raise SandboxError(what) if probe else _Unsafe(what)
            hello = json.loads(raw)
            if not hello.get("ready"):
                if hello.get("unsafe") and not probe:
                    raise _Unsafe(hello["unsafe"])
                raise SandboxError(f"the child zygote failed: {hello.get('error')}")
        except BaseException:
            ours.close()
            await m.release_cgroup(cgroup, repark=False)
            raise
        zygote = Zygote(
            f"zy{self._seq}",
            (*parent.packages, *extra),
            ours,
            cgroup,
            pid,
            tuple(hello.get("imported", ())),
            dict(hello.get("skipped", {})),
        )
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_ctl, zygote)
        if self.spares:
            self.tasks.spawn(self.refill(zygote), f"spares of {zygote.id}")
        return zygote

    def _on_ctl(self, zygote: Zygote) -> None:
        """The zygote never speaks after its hello: readable means it is gone."""
        try:
            data = zygote.ctl.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            zygote.alive = False
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(zygote.ctl.fileno())

    async def stop(self, zygote: Zygote) -> None:
        zygote.alive = False
        for spare in zygote.spares:
            spare.close()  # the child reads EOF instead of a setup and exits
            await self.m.release_cgroup(spare.cgroup, repark=False)
        zygote.spares.clear()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(zygote.ctl.fileno())
        zygote.ctl.close()
        if zygote.cgroup is not None:
            await self.m.release_cgroup(zygote.cgroup)

    async def _spare(
        self, zygote: Zygote, timeout: float = 10.0, qos_class: QoSClass = QoSClass.LS
    ) -> Spare:
        """Fork a child and move it into a pooled cgroup; it then waits for its setup."""
        spares = await self._spares(zygote, 1, timeout, qos_class)
        return spares[0]

    async def _spares(
        self, zygote: Zygote, n: int, timeout: float = 10.0, qos_class: QoSClass = QoSClass.LS
    ) -> list[Spare]:
        """Fork ``n`` children, then move them into pooled cgroups, one after the other.

        Moving a task into a v1 cgroup can wait 10-20 ms for an RCU grace period when it
        comes alone; moves right after another skip it (0.1-0.3 ms).  So spares are
        made ahead of time, and several at once: after a burst of cold starts has taken
        them all, the next ones are back in stock after one grace period, not one each.
        """
        m = self.m
        forked: list[Spare] = []
        try:
            for _ in range(n):
                forked.append(await self._fork_child(zygote, timeout, qos_class))
            # In a thread: the writes can block for an RCU grace period, and the event
            # loop has invocations to serve meanwhile.
            await asyncio.to_thread(_join_cgroups, forked)
        except BaseException as exc:
            for spare in forked:
                spare.close()
                await m.release_cgroup(spare.cgroup, repark=False)
            if isinstance(exc, (OSError, TimeoutError)):
                raise SandboxError(f"fork from zygote {zygote.id} failed: {exc}") from exc
            raise
        return forked

    async def _fork_child(self, zygote: Zygote, timeout: float, qos_class: QoSClass) -> Spare:
        """Have the zygote fork a child; it says hello and waits to be moved to its cgroup
        (the caller moves it, or releases the cgroup and closes the spare on failure)."""
        m = self.m
        if not zygote.alive:
            raise SandboxError(f"zygote {zygote.id} is gone")
        cgroup = m.acquire_unparked(m.limits_for(SPARE_MEMORY_MB, qos_class), qos_class)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        # The zygote, the child's parent, writes how the child ended on this pipe.
        status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            try:
                async with zygote.lock:
                    socket.send_fds(
                        zygote.ctl, [b'{"op": "fork"}'], [theirs.fileno(), status_w]
                    )
            except OSError as exc:
                zygote.alive = False
                raise SandboxError(f"zygote {zygote.id} is gone: {exc}") from exc
            finally:
                theirs.close()
                os.close(status_w)
            msg, anc = await _recvmsg(ours, 1, socket.CMSG_SPACE(CREDS.size), timeout)
            pid = _creds_pid(anc)
            if msg != b"H" or pid <= 0:
                zygote.alive = False  # a zygote that cannot fork is of no use
                raise SandboxError(f"zygote {zygote.id} did not fork")
        except BaseException as exc:
            ours.close()
            os.close(status_r)
            await m.release_cgroup(cgroup, repark=False)
            if isinstance(exc, (OSError, TimeoutError)):
                raise SandboxError(f"fork from zygote {zygote.id} failed: {exc}") from exc
            raise
        return Spare(pid, ours, cgroup, status_r)

    async def refill(self, zygote: Zygote, delay: float = 0.0) -> None:
        """Keep ``spares`` forked children waiting in the zygote's stock (after ``delay``
        seconds, cut short when ``zygote.low`` is set)."""
        if zygote.filling:
            return
        zygote.filling = True
        try:
            if delay > 0 and not zygote.low.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await zygote.low.wait()
            zygote.low.clear()
            while zygote.alive and len(zygote.spares) < self.spares and not self.m.closing:
                zygote.spares += await self._spares(zygote, self.spares - len(zygote.spares))
        except SandboxError as exc:
            log.warning("cannot fork a spare from zygote %s: %s", zygote.id, exc)
        finally:
            zygote.filling = False

    async def fork(self, zygote: Zygote, spec: SandboxSpec) -> Sandbox:
        """A sandbox for ``spec``: a spare child of ``zygote`` (or a new one), set up."""
        m = self.m
        spare = None
        # Spares sit in latency-sensitive cgroups.
        while zygote.spares and spec.qos_class is QoSClass.LS:
            candidate = zygote.spares.pop(0)
            if _still_waiting(candidate.sock):
                spare = candidate
                break
            candidate.close()
            await m.release_cgroup(candidate.cgroup, repark=False)
        if self.spares:
            if len(zygote.spares) <= self.spares // 2:
                zygote.low.set()
            self.tasks.spawn(
                self.refill(zygote, SPARE_REFILL_DELAY_S), f"spares of {zygote.id}"
            )
        if spare is None:
            spare = await self._spare(zygote, qos_class=spec.qos_class)
        trees: list[int] = []
        # Its stdout/stderr: ours to read should it die before it is ready.
        output = os.memfd_create("warmstart-output", os.MFD_CLOEXEC)
        tmp = -1
        try:
            tmp = await m.take_tmp(spec.tmp_mb)
            spare.cgroup.set_limits(
                m.limits_for(spec.memory_mb, spec.qos_class), new_tenant=False
            )
            have = {dst for _, dst in zygote.packages}
            mounts = [] if spec.code_dir is None else [(str(spec.code_dir), TASK_ROOT)]
            mounts += [(src, dst) for src, dst in spec.extra_ro_mounts if dst not in have]
            trees = [sc.clone_tree_readonly(src) for src, _ in mounts]
            setup = {
                "env": spec.env,
                "mounts": [dst for _, dst in mounts],
                "hostname": "warmstart",
                "tmp_bytes": spec.tmp_mb << 20,
                "tmp_tree": tmp >= 0,
                "uid": m.uid,
                "gid": m.gid,
                "cwd": spec.workdir,
            }
            frame = encode(json.dumps(setup).encode())
            # A stream socket may take only part of a large setup: send the rest after.
            fds = [output, *([tmp] if tmp >= 0 else []), *trees]
            sent = socket.send_fds(spare.sock, [frame], fds)
            if sent < len(frame):
                await asyncio.get_running_loop().sock_sendall(spare.sock, frame[sent:])
        except BaseException as exc:
            spare.close()
            os.close(output)
            await m.release_cgroup(spare.cgroup, repark=False)
            if isinstance(exc, OSError):
                raise SandboxError(f"fork from zygote {zygote.id} failed: {exc}") from exc
            raise
        finally:
            for fd in trees:
                os.close(fd)
            if tmp >= 0:
                os.close(tmp)
        return Sandbox(
            m.new_sandbox_id(),
            spare.pid,
            spare.sock,
            spare.cgroup,
            forked=True,
            output=output,
            exit_status=spare.exit_status,
        )


def _join_cgroups(spares: list[Spare]) -> None:
    for spare in spares:
        spare.cgroup.driver.add(spare.cgroup.rel, spare.pid)


def _still_waiting(sock: socket.socket) -> bool:
    """A spare that is alive has sent its hello and waits: nothing to read, no EOF."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def top_level_modules(directory: Path) -> list[str]:
    """The importable top-level names an installed distribution provides."""
    names = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name.startswith(("_", ".")) or name.endswith((".dist-info", ".egg-info", ".data")):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.append(name)
        elif entry.suffix == ".py":
            names.append(entry.stem)
    return names
