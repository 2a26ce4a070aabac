"""The FUSE side: the pyfuse3 operations that serve the merged tree read-only.

Lookups, attributes, directory listings and xattrs are answered from memory (the
:class:`~.tree.Tree`); a read of an eStargz file asks the :class:`~.fetcher.Fetcher` for
the chunks it covers and answers from the chunk cache; a file of an unpacked layer is
read from disk. Since an image never changes, the kernel may keep every attribute,
directory entry, negative lookup and page of file data for a day.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3

from warmstart.images.errors import FetchError
from warmstart.images.lazyfs.fetcher import Fetcher
from warmstart.images.lazyfs.layers import Layer, TOCLayer, local_xattrs
from warmstart.images.lazyfs.planning import chunks_covering
from warmstart.images.lazyfs.tree import BLOCK_SIZE, Attributes, Node, Tree

log = logging.getLogger(__name__)

# The image is immutable while mounted: let the kernel keep every answer this long.
CACHE_TIMEOUT = 24 * 3600.0


def mount_options(allow_other: bool) -> set[str]:
    opts = {
        "fsname=warmstart-lazy",
        "subtype=warmstart",
        "ro",
        "nodev",  # device nodes are metadata; opening one must not reach a host device
        "nosuid",
        "noatime",
        "default_permissions",  # the kernel checks modes, as on any filesystem
    }
    if allow_other:
        opts.add("allow_other")
    return opts


def entry_attributes(attrs: Attributes) -> pyfuse3.EntryAttributes:
    """The tree's answer in pyfuse3's terms, cacheable by the kernel for a day."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = attrs.ino
    a.generation = 0
    a.entry_timeout = CACHE_TIMEOUT
    a.attr_timeout = CACHE_TIMEOUT
    a.st_mode = attrs.mode
    a.st_nlink = attrs.nlink
    a.st_uid = attrs.uid
    a.st_gid = attrs.gid
    a.st_rdev = attrs.rdev
    a.st_size = attrs.size
    a.st_blksize = attrs.blksize
    a.st_blocks = attrs.blocks
    a.st_atime_ns = attrs.mtime_ns
    a.st_mtime_ns = attrs.mtime_ns
    a.st_ctime_ns = attrs.mtime_ns
    return a


def _handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn unexpected exceptions into EIO with a log line: an exception escaping a
    pyfuse3 handler would end the whole mount. An OSError keeps its errno."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass(slots=True)
class _Handle:
    node: Node
    fd: int = -1  # unpacked layers: the real file


class LazyFS(pyfuse3.Operations):
    """The pyfuse3 operations of the merged, read-only tree."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, layers: Sequence[Layer], fetcher: Fetcher) -> None:
        super().__init__()
        self.layers = layers
        self.tree = Tree(layers)
        self.fetcher = fetcher
        self.cache = fetcher.cache
        self.stats = fetcher.stats
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        # How many references the kernel holds to each inode (lookups and readdir
        # entries it was given, minus what ``forget`` gave back).
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    @property
    def toc_layers(self) -> list[TOCLayer]:
        return [layer for layer in self.layers if isinstance(layer, TOCLayer)]

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self._attrs.get(node.ino)
        if attrs is None:
            attrs = self._attrs[node.ino] = entry_attributes(self.tree.attributes(node))
        return attrs

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = CACHE_TIMEOUT
        return a

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.tree.get(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._referenced(parent)
        if name == b"..":
            return self._referenced(self.tree.get(parent.parent))
        node = self.tree.child(parent, os.fsdecode(name))
        return self._referenced(node) if node is not None else self._negative()

    def _referenced(self, node: Node) -> pyfuse3.EntryAttributes:
        """``node``'s attributes, handed to the kernel: one more reference to it."""
        self._lookups[node.ino] = self._lookups.get(node.ino, 0) + 1
        return self._attributes(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel let go of inodes: those with no reference left (and no open
        handle) are dropped from memory.  Must not raise."""
        open_inodes = {h.node.ino for h in self._handles.values()}
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino not in open_inodes and self.tree.drop(ino):
                self._attrs.pop(ino, None)
                self.stats.add(inodes_forgotten=1)

    @property
    def inodes(self) -> int:
        """Inodes held in memory now."""
        return len(self.tree.nodes)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self.tree.get(inode))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.tree.get(inode)
        if node.entry.kind != stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.tree.get(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.tree.get(fh)
        names = self.tree.listing(d)
        for i in range(start_id, len(names) + 2):
            if i == 0:
                name, attrs = b".", self._attributes(d)
            elif i == 1:
                name, attrs = b"..", self._attributes(self.tree.get(d.parent))
            else:
                child = self.tree.child(d, names[i - 2])
                assert child is not None
                name, attrs = os.fsencode(names[i - 2]), self._attributes(child)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break
            if i >= 2:  # an entry the kernel took counts as a lookup ("." and ".." do not)
                self._lookups[attrs.st_ino] = self._lookups.get(attrs.st_ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        return None

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.tree.get(inode)
        if node.entry.kind != stat.S_IFREG:
            raise pyfuse3.FUSEError(errno.EACCES)
        self.fetcher.touch()
        handle = _Handle(node)
        if node.entry.local:
            handle.fd = os.open(node.entry.local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = handle.node
        self.fetcher.touch()
        if handle.fd >= 0:
            return os.pread(handle.fd, size, off)
        end = min(off + size, node.entry.size)
        if off >= end:
            return b""
        layer = self.layers[node.layer]
        assert isinstance(layer, TOCLayer)
        needed = chunks_covering(node.entry.chunks, node.starts, off, end)
        for attempt in range(2):
            try:
                await self.fetcher.ensure(layer, needed)
            except FetchError as exc:
                self.stats.add(read_errors=1)
                log.error(
                    "read of /%s (%d bytes at %d) failed, answering EIO: %s",
                    node.path,
                    size,
                    off,
                    exc,
                )
                raise pyfuse3.FUSEError(errno.EIO) from None
            data = self.cache.read_span(needed, off, end)
            if data is not None:
                return data
            if attempt == 0:
                log.warning("chunk of /%s vanished from the cache; fetching again", node.path)
        self.stats.add(read_errors=1)
        log.error("read of /%s failed, answering EIO: the chunk cache lost it twice", node.path)
        raise pyfuse3.FUSEError(errno.EIO)

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node.entry.xattrs is None:
            node.entry.xattrs = local_xattrs(node.entry.local)
        return node.entry.xattrs

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(self.tree.get(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self._xattrs(self.tree.get(inode)))

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = sum(t.uncompressed_size for t in self.toc_layers) // BLOCK_SIZE
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s
