"""Thin ctypes wrappers for the Linux calls Python 3.11's ``os`` lacks, and the mount table.

A leaf: standard library only.  It belongs to the runtime because the zygote, inside a
sandbox, builds its children's roots with it (it is copied there with the rest of the
runtime); on the host the spawner uses it between fork and exec, and the image side uses
``mounts``/``unmount`` for its overlay and FUSE roots.  Every failure raises OSError with
the errno and the call that failed, never asserts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import socket
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def bind_mount(source: str, target: str, *, readonly: bool) -> None:
    """Bind ``source`` on ``target``; read-only binds need a second, remount call."""
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def unmount(target: str) -> bool:
    """Unmount ``target``; detach it lazily if it is busy (gone from the tree at once,
    torn down when its last user lets go).  False when it was not a mount point."""
    try:
        umount(target)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a mount point (any more)
            return False
        if exc.errno != errno.EBUSY:
            raise
        umount(target, MNT_DETACH)
    return True


# -- the mount table -----------------------------------------------------------------------
class MountEntry:
    """One line of /proc/self/mountinfo (paths unescaped)."""

    __slots__ = ("fstype", "mount_point", "source", "super_options")

    def __init__(self, mount_point: str, fstype: str, source: str, super_options: str) -> None:
        self.mount_point = mount_point
        self.fstype = fstype
        self.source = source
        self.super_options = super_options  # per-superblock options (overlay: lowerdir=...)

    def __repr__(self) -> str:
        return f"MountEntry({self.mount_point!r}, {self.fstype!r})"


def unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as ``\\ooo`` (octal)."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        octal = text[i + 1 : i + 4]
        if text[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo text: ``id parent major:minor root mount-point options
    [optional fields...] - fstype source super-options``."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        entries.append(
            MountEntry(
                unescape_mountinfo(fields[4]),
                tail[0],
                unescape_mountinfo(tail[1]),
                unescape_mountinfo(tail[2]),
            )
        )
    return entries


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount in this process's mount namespace, in mount order."""
    with open(mountinfo) as f:
        return parse_mountinfo(f.read())


def is_mount_point(path: str) -> bool:
    """Whether ``path`` is a mount point.  Reads the table rather than stat()ing the path,
    so a FUSE mount whose daemon died (stat fails with ENOTCONN) still counts."""
    return any(m.mount_point == path for m in mounts())


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def set_name(name: str) -> None:
    """Name the process as ps/top show it (comm, at most 15 bytes)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def loopback_up() -> None:
    """Bring ``lo`` up in a fresh network namespace (it starts down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


# -- loop devices (ephemeral storage, layer images) -----------------------------------------
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16
# struct loop_config: fd, block_size, struct loop_info64 (232 bytes), 8 reserved u64.
_LOOP_CONFIG = struct.Struct("=II232x64x")
_LO_FLAGS_OFFSET = 8 + 52  # loop_config.info.lo_flags


def attach_loop(image: str | os.PathLike[str], *, read_only: bool = False) -> tuple[str, int]:
    """Attach ``image`` to a free loop device (direct I/O, autoclear): its path and an
    open fd of it.  Autoclear detaches the device when its last user goes, so the caller
    keeps the fd until the filesystem on it is mounted."""
    backing = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        flags = _LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO
        if read_only:
            flags |= LO_FLAGS_READ_ONLY
        config = bytearray(_LOOP_CONFIG.size)
        struct.pack_into("=II", config, 0, backing, 0)
        struct.pack_into("=I", config, _LO_FLAGS_OFFSET, flags)
        mode = os.O_RDONLY if read_only else os.O_RDWR
        for _attempt in range(8):  # another process may take the free device first
            with open("/dev/loop-control", "rb") as ctl:
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            loop = os.open(device, mode | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop, _LOOP_CONFIGURE, bytes(config))
            except OSError as exc:
                os.close(loop)
                if exc.errno == errno.EBUSY:
                    continue
                raise
            return device, loop
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(backing)


# -- the new mount API, namespaces and capabilities (zygotes) ------------------------------
_libc.syscall.restype = ctypes.c_long
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_NR_CAPSET = 126
_NR_PIVOT_ROOT = 155
_NR_OPEN_TREE = 428
_NR_MOVE_MOUNT = 429
_NR_MOUNT_SETATTR = 442


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall(nr: int, what: str, *args: object) -> int:
    conv: list[object] = []
    for a in args:
        if a is None:
            conv.append(ctypes.c_void_p(None))
        elif isinstance(a, int):
            conv.append(ctypes.c_long(a))
        elif isinstance(a, str):
            conv.append(ctypes.c_char_p(os.fsencode(a)))
        else:
            conv.append(a)
    result = int(_libc.syscall(ctypes.c_long(nr), *conv))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _syscall(_NR_PIVOT_ROOT, "pivot_root", new_root, put_old)


def enter_root(root: str) -> None:
    """pivot_root into ``root`` and detach the old root (a chroot can be escaped by a
    process that holds CAP_SYS_CHROOT, as a zygote does in its user namespace)."""
    os.chdir(root)
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir("/")


def clone_tree_readonly(path: str) -> int:
    """A detached, read-only copy of the mount tree at ``path``, as a file descriptor
    that can be sent to another process and attached there with ``attach_tree``."""
    fd = _syscall(
        _NR_OPEN_TREE,
        f"open_tree {path}",
        AT_FDCWD,
        path,
        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
    )
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    try:
        _syscall(
            _NR_MOUNT_SETATTR,
            f"mount_setattr {path}",
            fd,
            "",
            AT_EMPTY_PATH | AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def clone_tree(path: str) -> int:
    """A detached copy of the mount at ``path`` as it is (writable if it is), as a file
    descriptor for ``attach_tree``; it keeps the filesystem mounted while it lives."""
    return _syscall(
        _NR_OPEN_TREE, f"open_tree {path}", AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    )


def attach_tree(fd: int, target: str) -> None:
    _syscall(
        _NR_MOVE_MOUNT, f"move_mount {target}", fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH
    )


def mount_tmp(target: str, tree_fd: int, size_bytes: int) -> None:
    """A sandbox's /tmp at ``target``: the ephemeral filesystem handed over as a detached
    mount tree (``tree_fd``, closed here), or a tmpfs of ``size_bytes`` without one."""
    if tree_fd >= 0:
        attach_tree(tree_fd, target)
        os.close(tree_fd)
    else:
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_bytes},mode=1777")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def limit_capabilities(keep: tuple[int, ...]) -> None:
    """Shrink the bounding set (so exec() cannot grant more) and the current sets."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    mask = sum(1 << c for c in keep)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    header = _CapHeader(0x20080522, 0)
    _syscall(_NR_CAPSET, "capset", ctypes.byref(header), ctypes.byref(data))


def drop_to(uid: int, gid: int) -> None:
    """Give up every capability for good, become uid/gid, and forbid regaining privileges."""
    for cap in range(last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # 0 -> non-0 clears the permitted and effective sets
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def forbid_new_user_namespaces() -> None:
    """A seccomp filter (inherited, irremovable): no CLONE_NEWUSER in unshare()/clone(),
    ENOSYS for clone3() (its flags live in memory where BPF cannot look; libc falls back
    to clone), and only the x86_64 ABI."""
    allow, errno_ret, kill = 0x7FFF0000, 0x00050000, 0x80000000
    eperm, enosys = 1, 38
    prog = [
        (0x20, 0, 0, 4),  # A = arch
        (0x15, 1, 0, 0xC000003E),  # x86_64?
        (0x06, 0, 0, kill),
        (0x20, 0, 0, 0),  # A = syscall nr
        (0x35, 0, 1, 0x40000000),  # x32 ABI?
        (0x06, 0, 0, errno_ret | eperm),
        (0x15, 0, 1, 435),  # clone3
        (0x06, 0, 0, errno_ret | enosys),
        (0x15, 2, 0, 272),  # unshare
        (0x15, 1, 0, 56),  # clone
        (0x06, 0, 0, allow),
        (0x20, 0, 0, 16),  # A = low 32 bits of args[0]
        (0x45, 0, 1, CLONE_NEWUSER),
        (0x06, 0, 0, errno_ret | eperm),
        (0x06, 0, 0, allow),
    ]
    arr = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), arr)
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp"
    )


def close_fds_except(*keep: int) -> None:
    """Close every fd >= 3 not in ``keep`` (never an empty range: CPython turns
    closerange(a, a) into close_range(a, ~0))."""
    low = 3
    for fd in sorted(k for k in set(keep) if k >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def describe_exit(status: int) -> str:
    """A wait status in the words Lambda uses: "exit status 3", "signal: killed"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.strsignal(sig) or f"signal {sig}"
        except ValueError:
            name = f"signal {sig}"
        return f"signal: {name.lower()}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
