"""The zygote: a runtime that has already imported packages and forks new instances.

It runs as pid 1 of its own namespaces, as uid 0 of its own user namespace (an
unprivileged uid on the host), with a few capabilities, under a seccomp filter that
forbids new user namespaces, inside a root of locked read-only mounts (see the
spawner).  It imports the packages named in ``WARMSTART_PRELOAD`` and then serves
``fork`` requests on fd 3.  It never sees function code, payloads or environments: those
go from the worker straight to each child.

A package whose import starts threads or opens sockets must stay out (a fork keeps
neither).  By default the zygote imports each package itself and checks after each one:
when one of them broke that rule, the zygote says so instead of ready and exits, and the
worker starts it again in probing mode (``WARMSTART_PROBE=1``), where each package is
first imported in a throwaway child and left out if it fails, starts threads or opens
sockets.  Probing imports everything twice; the common case, where every package is
safe, imports once, which halves the time until a new package set's zygote is ready.

A forked child, still privileged inside the user namespace:

1. tells the worker its pid with SCM_CREDENTIALS (the kernel translates it into the
   worker's pid namespace, and the worker moves it into its pooled cgroup);
2. unshares mount, UTS, IPC and network namespaces (it is already pid 1 of a new pid
   namespace: the zygote unshares CLONE_NEWPID before forking and steps back after);
3. builds ``/.c``: a tmpfs with recursive binds of the zygote's locked read-only
   mounts (/usr, /etc, the interpreter, the runtime, the packages, /dev files), mounts
   /proc there, pivot_roots into it and brings loopback up -- all of it as a spare,
   before any function is assigned;
4. receives from the worker its environment and detached read-only mount trees (its
   code, any extra packages, its /tmp) as file descriptors, and attaches them;
5. makes its root read-only, drops every capability and becomes the sandbox uid with
   no_new_privs;
6. runs the ordinary runtime loop (bootstrap.Runtime) on its socket.

Each ``fork`` request also brings the write end of a pipe the worker reads: the zygote,
the child's parent, keeps it while the child lives and writes there how the child ended
("exit status 3", "signal: killed") -- the only way the worker can learn why a runtime
died, before it was ready or during an invocation.

Standard library only.  The zygote and its children share one trust domain: a
malicious package imported here could reach every instance forked from it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib  # noqa: F401  # the runtime imports it for each handler: here, once for all forks
import json
import os
import signal
import socket
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from warmstart.runtime import bootstrap
    from warmstart.runtime import syscalls as sc
    from warmstart.runtime.protocol import HEADER, encode
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bootstrap  # children run it without importing anything
    import syscalls as sc
    from protocol import HEADER, encode

CTL_FD = 3
CHILD_ROOT = "/.c"
_ctl_fd = CTL_FD  # this zygote's control socket (a child zygote's is elsewhere)
_exit_pipes: dict[int, int] = {}  # child pid -> where to say how it ended


def _reap(_signum: int = 0, _frame: object = None) -> None:
    """SIGCHLD: reap every child that ended; report each instance's end to the worker."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = _exit_pipes.pop(pid, -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, sc.describe_exit(status).encode())
            os.close(fd)


def _recv_ctl(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    msg, fds, flags, _ = socket.recv_fds(sock, 1 << 16, 16, socket.MSG_CMSG_CLOEXEC)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        return {"op": "invalid"}, []
    return (json.loads(msg) if msg else None), fds


class Unsafe(Exception):
    """A package imported without probing started threads or opened sockets: this
    process must not fork instances (the worker restarts the zygote, probing)."""


def _unsafe() -> str:
    """Why this process can no longer fork safely ('' when it can)."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return "starts threads"
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:") and int(fd) != _ctl_fd:
            return "opens sockets"
    return ""


def _probe(module: str) -> str:
    """Import ``module`` in a throwaway child; '' when it is safe to pre-import."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        verdict = ""
        try:
            __import__(module)
            verdict = _unsafe()
        except BaseException as exc:
            verdict = f"import failed: {type(exc).__name__}: {exc}"[:300]
        os.write(w, verdict.encode() or b"ok")
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    with contextlib.suppress(ChildProcessError):  # already reaped where SIGCHLD is ignored
        os.waitpid(pid, 0)
    return "" if out == b"ok" else (out.decode(errors="replace") or "probe died")


def preload(modules: list[str], probe: bool = True) -> tuple[list[str], dict[str, str]]:
    """Import ``modules``: each first in a probe child (``probe``), or straight away,
    checking after each one (``Unsafe`` when one started threads or opened sockets)."""
    imported, skipped = [], {}
    for module in modules:
        if probe:
            verdict = _probe(module)
            if verdict:
                skipped[module] = verdict
                continue
        try:
            __import__(module)
            imported.append(module)
        except BaseException as exc:  # as the probe would have found
            if not probe and not isinstance(exc, Exception):  # exit(), say: start over
                raise Unsafe(f"{module} raised {type(exc).__name__}") from exc
            skipped[module] = f"import failed: {type(exc).__name__}: {exc}"[:300]
        if not probe and (verdict := _unsafe()):
            raise Unsafe(f"{module} {verdict}")
    return imported, skipped


def _probing(value: object) -> bool:
    return value in ("1", True)


def main() -> None:
    sc.set_name("ws-zygote")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS threads in a fork server
    layout: dict[str, Any] = json.loads(os.environ.pop("WARMSTART_LAYOUT"))
    extra = [p for p in os.environ.get("WARMSTART_PATH", "").split(":") if p]
    sys.path[0:0] = extra
    modules = [m for m in os.environ.get("WARMSTART_PRELOAD", "").split(",") if m]
    ctl = socket.socket(fileno=CTL_FD)
    try:
        imported, skipped = preload(modules, _probing(os.environ.pop("WARMSTART_PROBE", "1")))
    except Unsafe as exc:
        ctl.sendall(json.dumps({"ready": False, "unsafe": str(exc)}).encode())
        os._exit(1)
    signal.signal(signal.SIGCHLD, _reap)
    serve(ctl, layout, imported, skipped)


# Source the compiler sees once in the zygote (see ``serve``): most of Python's syntax.
_WARM_UP = """
import os, sys as _s
from os import path as p
@staticmethod
def f(a, /, b=1, *c, d: int = 2, **e) -> dict:
    global g
    x = [i for i in a if i] + list({i: j for i, j in e.items()}) + [*{1, 2}]
    y = (lambda q: q ** 2)(len(x)) if x else f"{a!r:>{b}}"
    try:
        with open(p.join("a", "b")) as h, h:
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        del x
    while b > 0 and not c or d is None:
        b -= 1
        continue
    return {"y": y, **e}
async def h(z):
    async with z as w:
        async for v in w:
            await v
    yield [v async for v in z]
class C(dict, metaclass=type):
    "doc"
    __slots__ = ("a",)
    k: int = 0
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
"""
_WARM_UP_MATCH = """
match f:
    case [1, *rest] | {"k": rest}:
        pass
    case C(a=1) if rest:
        pass
"""


def serve(
    ctl: socket.socket, layout: dict[str, Any], imported: list[str], skipped: dict[str, str]
) -> None:
    """Say ready, then fork instances -- or child zygotes -- until the worker hangs up."""
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # Every instance compiles its handler's source (its code directory is read-only, so
    # no .pyc is ever written there).  The compiler sets itself up on first use, which
    # costs a fresh fork ~1.2 ms of page faults and initialisation; done once here, it is
    # shared by every child (~0.15 ms left for a small handler).
    for source in (_WARM_UP, _WARM_UP_MATCH):
        with contextlib.suppress(SyntaxError):  # an image's older Python, say
            compile(source, "<zygote warm-up>", "exec")
    gc.collect()
    gc.freeze()  # keep the collector from touching (copying) inherited objects in children
    ctl.sendall(json.dumps({"ready": True, "imported": imported, "skipped": skipped}).encode())
    while True:
        msg, fds = _recv_ctl(ctl)
        if msg is None:
            os._exit(0)  # the worker closed the control socket
        op = msg.get("op")
        if op == "fork" and len(fds) in (1, 2):
            # SIGCHLD waits until the child's pipe is on record: it may die at once.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                sc.unshare(sc.CLONE_NEWPID)  # our next child starts a new pid namespace
                try:
                    pid = os.fork()
                    if pid == 0:
                        ctl.detach()
                        _child(fds[0], layout)
                finally:
                    sc.setns(pidns, sc.CLONE_NEWPID)
                if len(fds) == 2:
                    _exit_pipes[pid] = fds.pop()  # kept (not closed below) while it lives
            except OSError:
                pass  # the worker sees the socket close without a hello
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        elif op == "zygote" and len(fds) == 1 + len(msg.get("mounts", ())):
            try:
                if os.fork() == 0:
                    ctl.detach()
                    os.close(pidns)
                    _child_zygote(fds[0], fds[1:], msg, layout)
            except OSError:
                pass
        for fd in fds:
            os.close(fd)


def _child_zygote(
    ctl_fd: int, trees: list[int], msg: dict[str, Any], layout: dict[str, Any]
) -> None:
    """A zygote forked from this one: it keeps everything already imported, attaches the
    packages the worker sends (read-only trees), imports them, and serves on its own."""
    global _ctl_fd
    _ctl_fd = ctl_fd
    ctl = socket.socket(fileno=ctl_fd)
    _exit_pipes.clear()  # our parent's children's: closed just below
    try:
        sc.close_fds_except(ctl_fd, *trees)
        # Say hello (the kernel adds our pid) and wait until the worker has moved us into
        # a cgroup of our own: what we import must not be charged to -- or frozen with --
        # our parent.
        ctl.sendall(b'{"hello": true}')
        if ctl.recv(16) != b"go":
            os._exit(1)
        sc.unshare(sc.CLONE_NEWNS)  # its extra packages are its own
        mounts: list[str] = msg["mounts"]
        for dst, tree in zip(mounts, trees, strict=True):
            os.makedirs(dst, exist_ok=True)  # /var/packages is the zygotes' own tmpfs
            sc.attach_tree(tree, dst)
            os.close(tree)
        sys.path[0:0] = mounts
        layout = {**layout, "binds": [*layout["binds"], *mounts]}
        imported, skipped = preload(list(msg.get("preload", ())), _probing(msg.get("probe", True)))
    except BaseException as exc:
        reply: dict[str, Any] = {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
        if isinstance(exc, Unsafe):
            reply["unsafe"] = str(exc)
        with contextlib.suppress(OSError):
            ctl.sendall(json.dumps(reply).encode())
        os._exit(1)
    try:
        serve(ctl, layout, imported, skipped)
    finally:
        os._exit(1)


def _recv_setup(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    head, fds, flags, _ = socket.recv_fds(sock, HEADER.size, 64, socket.MSG_CMSG_CLOEXEC)
    if flags & socket.MSG_CTRUNC or len(head) == 0:
        raise OSError("no setup message from the worker")
    while len(head) < HEADER.size:
        more = sock.recv(HEADER.size - len(head))
        if not more:
            raise OSError("the worker hung up")
        head += more
    meta_len, payload_len, logs_len = HEADER.unpack(head)
    body = b""
    need = meta_len + payload_len + logs_len
    while len(body) < need:
        more = sock.recv(need - len(body))
        if not more:
            raise OSError("the worker hung up")
        body += more
    return json.loads(body[:meta_len]), fds


def _child(fd: int, layout: dict[str, Any]) -> None:
    output = -1
    try:
        sc.close_fds_except(fd)  # our parent's exit pipes too: they are not ours
        sc.set_name("ws-spare")  # until a function is assigned
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        sock = socket.socket(fileno=fd)
        creds = struct.pack("iII", os.getpid(), os.getuid(), os.getgid())
        sock.sendmsg([b"H"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        # As a spare, ahead of any function: everything that does not depend on the
        # setup -- namespaces, the root with its binds, /proc, pivot_root, loopback --
        # so that only the function's own mounts and the drop of privileges are left
        # for the cold start itself.
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET)
        root = CHILD_ROOT
        sc.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755")
        for target, link in layout["symlinks"]:
            os.symlink(target, root + link)
        for path in layout["binds"]:
            dst = root + path
            if os.path.isdir(path):
                os.makedirs(dst, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
            sc.mount(path, dst, None, sc.MS_BIND | sc.MS_REC)  # copies stay locked read-only
        for name in ("proc", "tmp"):
            os.makedirs(f"{root}/{name}", exist_ok=True)
        sc.mount("proc", root + "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            if not os.path.lexists(f"{root}/dev/{name}"):
                os.symlink(target, f"{root}/dev/{name}")
        # From here our root is the tmpfs (still writable: mount points for the setup's
        # trees are made in it; it turns read-only once they are attached).
        sc.enter_root(root)
        sc.loopback_up()
        setup, trees = _recv_setup(sock)
        if not trees:
            raise OSError("no output memfd from the worker")
        output = trees.pop(0)  # the worker's memfd for our stdout/stderr
        tmp = trees.pop(0) if setup.get("tmp_tree") else -1  # our /tmp, on disk
        for std in (1, 2):
            os.dup2(output, std)
        sc.set_name("ws-instance")
        for target, tree in zip(setup["mounts"], trees, strict=True):
            os.makedirs(target, exist_ok=True)
            sc.attach_tree(tree, target)
            os.close(tree)
        sc.mount_tmp("/tmp", tmp, setup["tmp_bytes"])
        sc.mount(
            None, "/", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
        )
        sc.sethostname(setup["hostname"])
        sc.drop_to(setup["uid"], setup["gid"])
        os.environ.clear()
        os.environ.update(setup["env"])
        os.chdir(setup.get("cwd", "/var/task"))
    except BaseException as exc:
        err = {
            "errorType": "Runtime.SandboxError",
            "errorMessage": f"forked sandbox setup failed: {exc}",
            "stackTrace": [],
        }
        try:
            os.write(fd, encode(b'{"type": "init_error"}', json.dumps(err).encode()))
        finally:
            os._exit(1)
    try:
        bootstrap.Runtime(fd, output).run()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
