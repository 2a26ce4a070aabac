"""The spawner: a small single-threaded fork server that creates sandboxes.

The worker runs an asyncio HTTP server; forking that process (threads, sockets, a big
heap) for every sandbox would be slow and unsafe.  Instead the worker starts this
process once and sends it one request per sandbox over a unix socket: a JSON spec plus
the instance's end of a socketpair (SCM_RIGHTS).  For each request::

    spawner ──fork──▶ C1 (host pid ns)    joins the pooled cgroup, unshare(NS|UTS|IPC|PID[|NET])
                       └─fork──▶ C2       pid 1 of the new pid ns: builds the root from bind
                                          mounts, mounts /proc, brings lo up, chroots
                                 └─fork──▶ C3   drops to the sandbox uid, exec()s the runtime

* C1 exits once C2 exists; C2 is reparented to the spawner (a subreaper).
* C2 stays as the namespace's init.  It holds a reference to the runtime's socket and
  exits when the worker's end hangs up -- the worker died, or dropped the instance --
  and the kernel then kills the whole pid namespace.  So nothing outlives the worker
  except frozen instances (they cannot run), which the guardian
  (``warmstart.sandbox.guardian``) thaws and kills through their cgroups; and a crashed
  spawner takes no running sandbox with it.  C2 also reaps
  orphans, so a handler's children never pile up as zombies, and exits with the
  runtime's status.
* Every mount happens inside the new mount namespace, so the host never sees them and
  they vanish with the sandbox: there is nothing to unmount after a crash.
* Errors in C1/C2 are written to a pipe whose write end is close-on-exec; the spawner
  reads it to EOF, so an empty read means the runtime was exec()ed.
* A function's sandbox also gets fds from the worker: the memfd the runtime's
  stdout/stderr go to (fd 4 as well, so the runtime keeps using it), the write end of a
  pipe on which C2 says how the runtime ended ("exit status 3", "signal: killed") --
  the worker reads both when it finds the runtime dead, before it was ready or during
  an invocation -- and its /tmp, a
  detached mount tree (``sandbox/ephemeral.py``) that C2 attaches.

This module imports only the standard library, so the fork is cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from warmstart.runtime import syscalls as sc

MAX_REQUEST = 1 << 20


def _recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 8)
    if not msg:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(msg), fds


def _make_root(spec: dict[str, Any], tmp_fd: int = -1) -> None:
    """In C2: assemble the sandbox root under spec['root'] and chroot into it."""
    _build_root(spec, with_proc=True, tmp_fd=tmp_fd)
    os.chdir(spec["root"])
    os.chroot(".")
    os.chdir("/")


def _build_root(spec: dict[str, Any], *, with_proc: bool, tmp_fd: int = -1) -> None:
    """Assemble a root under spec['root'] in our (new, private) mount namespace.  /tmp is
    the worker's ephemeral storage when it sent one (``tmp_fd``, a detached mount
    tree), else a tmpfs of spec['tmp_bytes']."""
    root = spec["root"]
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", root, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755")
    for target, link in spec["symlinks"]:
        os.symlink(target, root + link)
    # Writable tmpfs directories owned by a given uid (a zygote's /var/packages, where its
    # child zygotes make mount points for the packages they add).
    for path, uid in spec.get("owned_dirs", ()):
        os.makedirs(root + path, exist_ok=True)
        sc.mount(
            "tmpfs",
            root + path,
            "tmpfs",
            sc.MS_NOSUID | sc.MS_NODEV,
            f"size=1m,mode=0755,uid={uid},gid={uid}",
        )
    for src, dst, mode in spec["mounts"]:
        path = root + dst
        if not os.path.exists(src):
            raise FileNotFoundError(f"mount source {src} does not exist")
        if os.path.isdir(src):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        sc.bind_mount(src, path, readonly=(mode == "ro"))
    os.makedirs(root + "/tmp", exist_ok=True)
    sc.mount_tmp(root + "/tmp", tmp_fd, spec["tmp_bytes"])
    os.makedirs(root + "/proc", exist_ok=True)
    if with_proc:
        sc.mount("proc", root + "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    for extra in spec.get("dirs", ()):
        os.makedirs(root + extra, exist_ok=True)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{root}/dev/{name}")
    sc.mount(None, root, None, sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV)


def _drop_privileges(spec: dict[str, Any]) -> None:
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


OUTPUT_FD = 4  # the worker's output memfd, as the runtime finds it (bootstrap.main)


def _exec_runtime(spec: dict[str, Any], inst_fd: int, out_fd: int = -1) -> None:
    # Out of the way of the fds they are about to become.
    inst_fd = fcntl.fcntl(inst_fd, fcntl.F_DUPFD, 10)
    if out_fd >= 0:
        out_fd = fcntl.fcntl(out_fd, fcntl.F_DUPFD, 10)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if spec.get("stdio") == "socket":  # a command: its output goes to the worker
        os.dup2(inst_fd, 1)
        os.dup2(inst_fd, 2)
    elif out_fd >= 0:  # a runtime: what it writes before it is ready survives it
        for fd in (1, 2, OUTPUT_FD):
            os.dup2(out_fd, fd)
    os.dup2(inst_fd, 3)
    os.set_inheritable(3, True)
    os.closerange(OUTPUT_FD + 1 if out_fd >= 0 else OUTPUT_FD, 65536)
    os.chdir(spec["cwd"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _fail(err_w: int, stage: str, exc: BaseException) -> None:
    try:
        os.write(err_w, f"{stage}: {exc}".encode()[:4000])
    finally:
        os._exit(127)


def _c2_init(
    spec: dict[str, Any], inst_fd: int, err_w: int, out_fd: int, status_fd: int, tmp_fd: int
) -> None:
    """pid 1 of the sandbox: build the root, start the runtime, then watch and reap.

    pid 1 keeps its own reference to the runtime's socket and exits as soon as the
    worker's end of it is closed -- the worker died or dropped the instance -- which
    makes the kernel kill everything in the pid namespace.  (A parent-death signal
    cannot do this: the kernel clears it when pid 1 drops its uid.)  It also exits
    when the runtime does, with the runtime's status, and reaps orphans meanwhile.
    """
    try:
        sc.set_name("ws-init")
        _make_root(spec, tmp_fd)
        sc.sethostname(spec["hostname"])
        if spec["network"] == "none":
            sc.loopback_up()
    except BaseException as exc:
        _fail(err_w, "sandbox setup", exc)
    runtime = os.fork()
    if runtime == 0:
        try:
            if status_fd >= 0:
                os.close(status_fd)
            _drop_privileges(spec)
            _exec_runtime(spec, inst_fd, out_fd)
        except BaseException as exc:
            _fail(err_w, "runtime exec", exc)
    os.close(err_w)
    if out_fd >= 0:
        os.close(out_fd)
    with contextlib.suppress(OSError):
        _drop_privileges(spec)
    pidfd = os.pidfd_open(runtime)
    poller = select.poll()
    poller.register(inst_fd, select.POLLRDHUP)  # hang-up only: the runtime reads the data
    poller.register(pidfd, select.POLLIN)
    while True:
        events = dict(poller.poll(1000))
        while True:  # reap orphans reparented to us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == runtime:
                if status_fd >= 0:
                    with contextlib.suppress(OSError):
                        os.write(status_fd, sc.describe_exit(status).encode())
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        if events.get(inst_fd, 0) & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            os._exit(0)  # the worker is gone: take the whole sandbox down


def _join_cgroup(procs_files: list[str]) -> None:
    for procs in procs_files:
        with open(procs, "w") as f:
            f.write("0")


def _c1(
    spec: dict[str, Any],
    inst_fd: int,
    err_w: int,
    joined: bool = False,
    out_fd: int = -1,
    status_fd: int = -1,
    tmp_fd: int = -1,
) -> None:
    """Host side of a new sandbox: joins the cgroup and creates the namespaces.

    Without isolation it simply exec()s the runtime in a new session, which then dies
    with the spawner (the parent-death signal set here survives exec).
    """
    try:
        sc.close_fds_except(inst_fd, err_w, out_fd, status_fd, tmp_fd)
        sc.set_name("ws-sandbox")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if spec["isolate"]:
            if not joined:
                _join_cgroup(spec["cgroup_procs"])
            flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWPID
            if spec["network"] == "none":
                flags |= sc.CLONE_NEWNET
            sc.unshare(flags)
        else:
            os.setsid()
            _exec_runtime(spec, inst_fd, out_fd)
    except BaseException as exc:
        _fail(err_w, "sandbox namespaces", exc)
    child = os.fork()
    if child == 0:
        _c2_init(spec, inst_fd, err_w, out_fd, status_fd, tmp_fd)
    # C1's work is done: pid 1 now lives on its own (reparented to the spawner, a
    # subreaper that lets the kernel reap it) and watches the worker's socket.
    os._exit(0)


def _parked_c1(procs_files: list[str], sock: socket.socket) -> None:
    """A C1 forked ahead of time that joins its cgroup, then waits for a spawn request.

    Moving a task between v1 cgroups waits for an RCU grace period (the kernel's
    cgroup_threadgroup_rwsem), which costs 5-20 ms here.  Parking one C1 per pooled
    cgroup pays that off the invocation path, and parking several in a row pays it once.
    """
    try:
        sc.close_fds_except(sock.fileno())
        sc.set_name("ws-parked")
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _join_cgroup(procs_files)
        req = _recv_request(sock)
    except BaseException:
        os._exit(1)
    if req is None:
        os._exit(0)
    spec, fds = req
    sock.close()
    if len(fds) not in (2, 4, 5):
        os._exit(1)
    _c1(
        spec,
        fds[0],
        fds[1],
        joined=True,
        out_fd=_at(fds, 2),
        status_fd=_at(fds, 3),
        tmp_fd=_at(fds, 4),
    )


def _at(fds: list[int], i: int) -> int:
    return fds[i] if i < len(fds) else -1


# What a zygote keeps while untrusted package code runs in it: just enough to build
# children (SETGID, SETUID, SETPCAP, NET_ADMIN for lo, SYS_ADMIN for namespaces/mounts).
ZYGOTE_CAPS = (6, 7, 8, 12, 21)


def _zygote_parent(spec: dict[str, Any], ctl_fd: int, err_w: int, up_w: int, go_r: int) -> None:
    """Z0: our code only.  Build the zygote's root as real root, move into a new user
    namespace (the spawner writes its uid map), then fork the zygote as pid 1 of fresh
    namespaces owned by that user namespace -- so every mount it inherits is locked
    read-only -- and exec the zygote runtime there.

    Exec, not just fork: the zygote must not carry this process's memory (earlier
    requests' environments).  The zygote is uid 0 only inside its namespace (the host
    sees spec['zygote_uid']), keeps a handful of capabilities there, and cannot create
    further user namespaces (seccomp).
    """
    try:
        sc.close_fds_except(ctl_fd, err_w, up_w, go_r)
        sc.set_name("ws-zygote0")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        _join_cgroup(spec["cgroup_procs"])
        sc.unshare(sc.CLONE_NEWNS)
        _build_root(spec, with_proc=False)
        os.setgroups([])  # before the user namespace: with setgroups=deny it is final
        sc.unshare(sc.CLONE_NEWUSER)
        os.write(up_w, b"U")
        if os.read(go_r, 1) != b"M":
            raise OSError("the spawner did not map our user namespace")
        os.close(up_w)
        os.close(go_r)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # credential changes reset it
        sc.unshare(
            sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET
        )
        sc.forbid_new_user_namespaces()
    except BaseException as exc:
        _fail(err_w, "zygote setup", exc)
    pid = os.fork()
    if pid == 0:
        try:
            root = spec["root"]
            # pivot_root refuses a locked new root: bind it onto itself first.
            sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)
            # proc in a user namespace needs a fully visible proc: mount it before the
            # host's goes away with the old root.
            sc.mount("proc", root + "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
            sc.enter_root(root)
            sc.sethostname(spec["hostname"])
            sc.loopback_up()
            sc.limit_capabilities(ZYGOTE_CAPS)
            err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 10)  # keep it off fd 3
            if ctl_fd != 3:
                os.dup2(ctl_fd, 3)
            os.set_inheritable(3, True)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            sc.close_fds_except(3, err_w)
            os.chdir("/")
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as exc:
            _fail(err_w, "zygote exec", exc)
    os.close(ctl_fd)
    os.close(err_w)
    while True:
        try:
            _pid, status = os.waitpid(pid, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


class Spawner:
    def __init__(self) -> None:
        self.parked: dict[str, tuple[int, socket.socket]] = {}

    def park(self, key: str, procs_files: list[str]) -> dict[str, Any]:
        self.unpark(key)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                _parked_c1(procs_files, theirs)
            finally:
                os._exit(1)
        theirs.close()
        self.parked[key] = (pid, ours)
        return {"ok": True}

    def unpark(self, key: str) -> None:
        entry = self.parked.pop(key, None)
        if entry is not None:
            entry[1].close()  # the parked C1 reads EOF and exits

    def spawn(
        self,
        spec: dict[str, Any],
        inst_fd: int,
        out_fd: int = -1,
        status_fd: int = -1,
        tmp_fd: int = -1,
    ) -> dict[str, Any]:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            parked = self.parked.pop(spec.get("cgroup_key") or "", None)
            pid = -1
            if parked is not None:
                pid, psock = parked
                try:
                    extra = [fd for fd in (out_fd, status_fd, tmp_fd) if fd >= 0]
                    socket.send_fds(
                        psock, [json.dumps(spec).encode()], [inst_fd, err_w, *extra]
                    )
                except OSError:
                    pid = -1  # it died (its cgroup was killed): fork a fresh one
                finally:
                    psock.close()
            if pid < 0:
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(err_r)
                        _c1(
                            spec,
                            inst_fd,
                            err_w,
                            out_fd=out_fd,
                            status_fd=status_fd,
                            tmp_fd=tmp_fd,
                        )
                    finally:
                        os._exit(127)
        finally:
            os.close(err_w)
        chunks = []
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(err_r)
        if chunks:
            return {"error": b"".join(chunks).decode(errors="replace")}
        return {"pid": pid}

    def zygote(self, spec: dict[str, Any], ctl_fd: int) -> dict[str, Any]:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        up_r, up_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                _zygote_parent(spec, ctl_fd, err_w, up_w, go_r)
            finally:
                os._exit(127)
        for fd in (err_w, up_w, go_r):
            os.close(fd)
        error = ""
        try:
            if os.read(up_r, 1) == b"U":
                uid, gid, sbx_uid, sbx_gid = (
                    spec["zygote_uid"],
                    spec["zygote_gid"],
                    spec["uid"],
                    spec["gid"],
                )
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
                with open(f"/proc/{pid}/uid_map", "w") as f:
                    f.write(f"0 {uid} 1\n{sbx_uid} {sbx_uid} 1\n")
                with open(f"/proc/{pid}/gid_map", "w") as f:
                    f.write(f"0 {gid} 1\n{sbx_gid} {sbx_gid} 1\n")
                os.write(go_w, b"M")
        except OSError as exc:
            error = f"zygote user namespace: {exc}"
        finally:
            os.close(up_r)
            os.close(go_w)
        chunks = []
        while chunk := os.read(err_r, 4096):
            chunks.append(chunk)
        os.close(err_r)
        if chunks or error:
            return {"error": error or b"".join(chunks).decode(errors="replace")}
        return {"pid": pid}

    def handle(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "zygote":
            if len(fds) != 1:
                return {"error": f"expected 1 fd, got {len(fds)}"}
            return self.zygote(req["spec"], fds[0])
        if cmd == "spawn":
            if len(fds) not in (1, 3, 4):
                return {"error": f"expected 1, 3 or 4 fds, got {len(fds)}"}
            return self.spawn(req["spec"], fds[0], _at(fds, 1), _at(fds, 2), _at(fds, 3))
        if cmd == "park":
            return self.park(req["key"], req["cgroup_procs"])
        if cmd == "unpark":
            self.unpark(req["key"])
            return {"ok": True}
        return {"error": f"unknown command {cmd!r}"}


def serve(sock: socket.socket) -> None:
    # Orphaned sandbox parents would otherwise be reparented to the host's init.
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    # Children are reaped by the kernel; C1 puts SIGCHLD back before anything exec()s.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spawner = Spawner()
    while True:
        req = _recv_request(sock)
        if req is None:
            return
        msg, fds = req
        try:
            reply = spawner.handle(msg, fds)
        except Exception as exc:  # the spawner must outlive any single bad request
            reply = {"error": f"spawner: {exc!r}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(json.dumps(reply).encode())


def main() -> None:
    sc.set_name("ws-spawner")
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The worker may have died before PDEATHSIG was set: then this process has been
    # reparented and its parent is no longer the worker.  (Comparing with pid 1 would be
    # wrong where the worker itself is pid 1, as in a container.)
    worker = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    if os.getppid() != worker:
        sys.exit(1)
    fd = int(sys.argv[1])
    serve(socket.socket(fileno=fd))


if __name__ == "__main__":
    main()
