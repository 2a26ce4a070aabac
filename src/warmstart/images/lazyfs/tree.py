"""The merged tree: a layer stack (bottom → top) as one read-only tree of inodes.

It merges as overlayfs would: the topmost layer holding a name decides its type, a
whiteout deletes the name below, an opaque directory hides the directory below, a
non-directory ends the merge; directories are merged lazily, on first use. Hard links
of one layer share an inode. :meth:`Tree.attributes` answers in a plain
:class:`Attributes` record, which the FUSE layer (:mod:`.fs`) converts.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from warmstart.images.errors import ImageError
from warmstart.images.lazyfs.layers import WHITEOUT_PREFIX, Layer, LEntry, join_path

# FUSE's root inode number is fixed by the protocol (FUSE_ROOT_ID).
ROOT_INODE = 1
BLOCK_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` says about one inode of the merged tree."""

    ino: int
    mode: int  # file type and permission bits
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int  # 512-byte units
    mtime_ns: int  # also reported as atime and ctime: the image never changes


@dataclass(slots=True, eq=False)
class Node:
    """An inode of the merged view. Directories are merged lazily, on first use."""

    ino: int
    entry: LEntry
    layer: int  # index of the layer that provides it (its topmost)
    path: str  # merged path (for a hard-linked file: the first name seen)
    parent: int = ROOT_INODE  # directories
    below: tuple[int, ...] = ()  # directories: the layers merged into it, top → bottom
    kids: dict[str, int] = field(default_factory=dict)  # name → ino, 0 = absent
    listing: list[str] | None = None
    starts: list[int] = field(default_factory=list)  # chunk offsets in the file

    @property
    def is_dir(self) -> bool:
        return self.entry.kind == stat.S_IFDIR


class Tree:
    """The merge of a layer stack (``layers[0]`` is the bottom), one node per inode.

    Resolving a name walks the parent's contributing layers top → bottom: the first
    layer holding the name decides its type; a whiteout, a non-directory, or an opaque
    directory stops the walk, so lower layers only add to directories.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = layers
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[Hashable, int] = {}
        below: list[int] = []
        top: LEntry | None = None
        top_layer = 0
        for li in range(len(layers) - 1, -1, -1):
            root = layers[li].entry("")
            if not isinstance(root, LEntry) or root.kind != stat.S_IFDIR:
                continue
            if top is None:
                top, top_layer = root, li
            below.append(li)
            if layers[li].opaque(""):
                break
        if top is None:
            raise ImageError("no layer has a root directory")
        self.root = Node(ROOT_INODE, top, top_layer, "", below=tuple(below))
        self.nodes[self.root.ino] = self.root
        self._by_key[("dir", "")] = self.root.ino
        self._next_ino = ROOT_INODE + 1

    def get(self, ino: int) -> Node:
        """The node of an inode number handed out before; ENOENT for any other."""
        node = self.nodes.get(ino)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, f"no inode {ino}")
        return node

    def child(self, parent: Node, name: str) -> Node | None:
        cached = parent.kids.get(name)
        if cached is not None:
            if not cached:
                return None
            known = self.nodes.get(cached)
            if known is not None:
                return known
            # Dropped since (``drop``): made again, under the same inode number.
        node = self._resolve(parent, name)
        parent.kids[name] = node.ino if node is not None else 0
        return node

    def _resolve(self, parent: Node, name: str) -> Node | None:
        if not name or name in (".", "..") or "/" in name or name.startswith(WHITEOUT_PREFIX):
            return None
        path = join_path(parent.path, name)
        top: LEntry | None = None
        top_layer = -1
        below: list[int] = []
        for li in parent.below:
            layer = self.layers[li]
            found = layer.entry(path)
            if found is None:
                continue
            if not isinstance(found, LEntry):
                break
            if top is None:
                top, top_layer = found, li
                if found.kind != stat.S_IFDIR:
                    break
            elif found.kind != stat.S_IFDIR:
                break
            below.append(li)
            if layer.opaque(path):
                break
        if top is None:
            return None
        key: Hashable = ("dir", path) if top.kind == stat.S_IFDIR else (top_layer, top.ident)
        ino = self._by_key.get(key)
        if ino is not None and ino in self.nodes:
            return self.nodes[ino]
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
        node = Node(ino, top, top_layer, path, parent=parent.ino, below=tuple(below))
        if top.chunks:
            node.starts = [c.chunk_offset for c in top.chunks]
        self.nodes[ino] = node
        self._by_key[key] = ino
        return node

    def drop(self, ino: int) -> bool:
        """Forget a file's node (the kernel holds no reference to it any more): what a
        long-lived mount keeps stays bounded by what is in use, not by what was ever
        looked up.  Its inode number stays reserved for its key, so a later lookup makes
        the same inode again.  Directories stay (their children name them as parent, and
        they are few); returns whether the node went."""
        node = self.nodes.get(ino)
        if node is None or node.is_dir or ino == ROOT_INODE:
            return False
        del self.nodes[ino]
        return True

    def listing(self, d: Node) -> list[str]:
        """The names in directory ``d``, sorted (whiteouts and hidden names left out)."""
        if d.listing is None:
            seen: dict[str, None] = {}
            for li in d.below:
                for name in self.layers[li].names(d.path):
                    seen.setdefault(name)
            d.listing = sorted(n for n in seen if self.child(d, n) is not None)
        return d.listing

    def attributes(self, node: Node) -> Attributes:
        e = node.entry
        if node.is_dir:
            # 2 (itself and its entry in the parent) + each subdirectory's "..".
            subdirs = sum(1 for n in self.listing(node) if self._is_dir_child(node, n))
            nlink, size = 2 + subdirs, BLOCK_SIZE
        else:
            nlink, size = max(1, e.nlink), e.size
        return Attributes(
            ino=node.ino,
            mode=e.kind | e.perm,
            nlink=nlink,
            uid=e.uid,
            gid=e.gid,
            rdev=e.rdev,
            size=size,
            blksize=BLOCK_SIZE,
            blocks=(size + 511) // 512,
            mtime_ns=e.mtime_ns,
        )

    def _is_dir_child(self, d: Node, name: str) -> bool:
        child = self.child(d, name)
        return child is not None and child.is_dir
