"""The merged tree of a layer stack, without FUSE: whiteouts, opaque directories, links,
attributes, lookups and listings, answered by :class:`Tree` in plain records."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import cast

import pytest

from tests.conftest import IS_ROOT, needs
from tests.lazyfs_blobs import BASE, MTIME, UPPER, Member, blob_layer, make_local_layer
from warmstart.images.errors import EStargzError, ImageError
from warmstart.images.estargz import parse_toc
from warmstart.images.lazyfs.chunks import ChunkCache
from warmstart.images.lazyfs.layers import WHITEOUT, DirLayer, Layer, TOCLayer, local_xattrs
from warmstart.images.lazyfs.sources import BlobSource
from warmstart.images.lazyfs.tree import BLOCK_SIZE, ROOT_INODE, Node, Tree


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache")


def walk(tree: Tree, path: str) -> Node | None:
    """The node at a merged path, name by name, as the kernel looks it up."""
    node: Node | None = tree.root
    for name in path.split("/") if path else ():
        if node is None or not node.is_dir:
            return None
        node = tree.child(node, name)
    return node


def at(tree: Tree, path: str) -> Node:
    node = walk(tree, path)
    assert node is not None, path
    return node


def listing(tree: Tree, path: str) -> list[str]:
    return tree.listing(at(tree, path))


def stack(tmp_path: Path, cache: ChunkCache, *layers: list[Member]) -> Tree:
    """A tree of eStargz layers made of ``layers`` (the first is the bottom)."""
    built: list[Layer] = [
        blob_layer(tmp_path, f"layer{i}", members, cache)[0] for i, members in enumerate(layers)
    ]
    return Tree(built)


def test_upper_layers_delete_replace_and_hide_what_is_below(
    tmp_path: Path, cache: ChunkCache
) -> None:
    tree = stack(tmp_path, cache, BASE, UPPER)
    assert listing(tree, "") == ["dev", "etc", "local-gone.txt", "local-opq", "opq", "usr"]
    assert listing(tree, "etc") == ["config"]  # .wh.gone.txt deleted the lower file
    assert walk(tree, "etc/gone.txt") is None
    config = tree.attributes(at(tree, "etc/config"))  # the upper file wins, whole
    assert (stat.S_IMODE(config.mode), config.uid, config.gid) == (0o600, 0, 0)
    assert config.size == len(b"upper config\n")
    assert config.mtime_ns == MTIME * 1_000_000_000
    assert listing(tree, "opq") == ["new.txt"]  # .wh..wh..opq hides old.txt
    assert stat.S_IMODE(tree.attributes(at(tree, "opq")).mode) == 0o750
    assert walk(tree, "doomed") is None and walk(tree, "doomed/inner.txt") is None
    # Lower layers add to a directory both have.
    assert listing(tree, "usr/lib") == ["big.bin", "caps", "empty", "python3"]
    assert at(tree, "usr/lib/python3/mod.py").layer == 1
    assert at(tree, "usr/lib/big.bin").layer == 0


def test_whiteout_names_and_odd_names_never_resolve(tmp_path: Path, cache: ChunkCache) -> None:
    tree = stack(tmp_path, cache, BASE, UPPER)
    etc = at(tree, "etc")
    for name in (".wh.gone.txt", ".wh.config", "", ".", "..", "config/x", "absent"):
        assert tree.child(etc, name) is None, name
    assert tree.child(tree.root, ".wh.doomed") is None
    assert walk(tree, "etc/config/more") is None  # a file has no children


def test_directory_link_counts_follow_the_merged_subdirectories(
    tmp_path: Path, cache: ChunkCache
) -> None:
    tree = stack(tmp_path, cache, BASE, UPPER)
    assert tree.attributes(at(tree, "usr")).nlink == 2 + 2  # bin, lib
    assert tree.attributes(at(tree, "usr/lib")).nlink == 2 + 1  # python3 from the upper
    assert tree.attributes(tree.root).nlink == 2 + 5  # doomed is gone
    attrs = tree.attributes(at(tree, "usr"))
    assert stat.S_ISDIR(attrs.mode) and attrs.size == BLOCK_SIZE
    assert attrs.blksize == BLOCK_SIZE and attrs.blocks == BLOCK_SIZE // 512


def test_a_directory_whited_out_and_recreated_hides_its_old_contents(
    tmp_path: Path, cache: ChunkCache
) -> None:
    lower = [Member("d", "dir"), Member("d/old.txt", data=b"old\n")]
    upper = [Member(".wh.d"), Member("d", "dir", mode=0o700), Member("d/new.txt", data=b"new")]
    tree = stack(tmp_path, cache, lower, upper)
    assert listing(tree, "d") == ["new.txt"]
    assert stat.S_IMODE(tree.attributes(at(tree, "d")).mode) == 0o700


def test_a_file_over_a_directory_ends_the_merge_and_the_other_way_round(
    tmp_path: Path, cache: ChunkCache
) -> None:
    lower = [
        Member("x", "dir"),
        Member("x/a", data=b"a"),
        Member("y", data=b"a file below"),
    ]
    upper = [Member("x", data=b"a file above"), Member("y", "dir"), Member("y/b", data=b"b")]
    tree = stack(tmp_path, cache, lower, upper)
    assert not at(tree, "x").is_dir and walk(tree, "x/a") is None
    assert at(tree, "y").is_dir and listing(tree, "y") == ["b"]


def test_hard_links_share_an_inode_and_symlinks_keep_their_target(
    tmp_path: Path, cache: ChunkCache
) -> None:
    tree = stack(tmp_path, cache, BASE)
    tool, again = at(tree, "usr/bin/tool"), at(tree, "usr/bin/tool-again")
    assert tool is again and tool.ino != ROOT_INODE
    attrs = tree.attributes(tool)
    assert attrs.nlink == 2 and attrs.size == 20
    assert (stat.S_IMODE(attrs.mode), attrs.uid, attrs.gid) == (0o4755, 1000, 1000)
    sh = at(tree, "usr/bin/sh")
    assert sh.entry.target == b"tool"
    link = tree.attributes(sh)
    assert stat.S_ISLNK(link.mode) and link.size == len(b"tool")
    null = tree.attributes(at(tree, "dev/null"))
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    sda = tree.attributes(at(tree, "dev/sda"))
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0) and sda.gid == 6
    assert stat.S_ISFIFO(tree.attributes(at(tree, "dev/fifo")).mode)
    assert at(tree, "usr/lib/caps").entry.xattrs == {
        b"user.note": b"hello",
        b"security.x": b"\x00\x01",
    }
    assert tree.get(tool.ino) is tool


def test_big_files_know_where_their_chunks_start(tmp_path: Path, cache: ChunkCache) -> None:
    layer, _ = blob_layer(tmp_path, "base", BASE, cache, chunk_size=64 << 10)
    tree = Tree([layer])
    node = at(tree, "usr/lib/big.bin")
    assert node.starts == [i * (64 << 10) for i in range(5)]
    assert [c.chunk_offset for c in node.entry.chunks] == node.starts


def test_landmarks_are_not_part_of_the_image(tmp_path: Path, cache: ChunkCache) -> None:
    members = [Member("app", "dir"), Member("app/main.py", data=b"x")]
    layer, _ = blob_layer(tmp_path, "app", members, cache, prioritized=2)
    assert layer.toc.prefetch_end is not None
    tree = Tree([layer])
    assert listing(tree, "") == ["app"]
    assert walk(tree, ".prefetch.landmark") is None


def test_hostile_toc_entries_stay_inside_and_dangling_hardlinks_are_hidden(
    tmp_path: Path, cache: ChunkCache
) -> None:
    members = [
        Member("../../escape.txt", data=b"climbed\n"),
        Member("a/b/c.txt", data=b"parents implied\n"),
        Member("link-to-nothing", "hardlink", link="missing"),
        Member("link-loop-1", "hardlink", link="link-loop-2"),
        Member("link-loop-2", "hardlink", link="link-loop-1"),
    ]
    tree = stack(tmp_path, cache, members)
    assert listing(tree, "") == ["a", "escape.txt"]
    assert at(tree, "escape.txt").entry.size == len(b"climbed\n")
    assert stat.S_IMODE(tree.attributes(at(tree, "a")).mode) == 0o755  # implied parent
    assert listing(tree, "a/b") == ["c.txt"]


def test_an_unpacked_layer_with_verbatim_whiteouts_and_hard_links(
    tmp_path: Path, cache: ChunkCache
) -> None:
    root = tmp_path / "unpacked"
    (root / "etc").mkdir(parents=True)
    (root / "etc/.wh.config").write_bytes(b"")
    (root / "opq").mkdir()
    (root / "opq/.wh..wh..opq").write_bytes(b"")
    (root / "opq/mine.txt").write_bytes(b"mine\n")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/local.txt").write_bytes(b"local\n")
    os.link(root / "usr/lib/local.txt", root / "usr/lib/local-link.txt")
    base, _ = blob_layer(tmp_path, "base", BASE, cache)
    tree = Tree([base, DirLayer(root)])
    assert listing(tree, "etc") == ["gone.txt"]
    assert listing(tree, "opq") == ["mine.txt"]
    local, link = at(tree, "usr/lib/local.txt"), at(tree, "usr/lib/local-link.txt")
    assert local is link and tree.attributes(local).nlink == 2
    assert local.entry.local == str(root / "usr/lib/local.txt")
    assert "local.txt" in listing(tree, "usr/lib") and "big.bin" in listing(tree, "usr/lib")


@needs(IS_ROOT, "mknod and trusted.* xattrs need root")
def test_an_unpacked_layer_with_overlayfs_whiteouts(tmp_path: Path, cache: ChunkCache) -> None:
    root = make_local_layer(tmp_path / "local")
    local = DirLayer(root)
    assert local.entry("local-gone.txt") is WHITEOUT  # a 0/0 character device
    assert local.opaque("local-opq")  # trusted.overlay.opaque=y
    base, _ = blob_layer(tmp_path, "base", BASE, cache)
    tree = Tree([base, local])
    assert walk(tree, "local-gone.txt") is None
    assert listing(tree, "local-opq") == ["mine.txt"]
    assert b"trusted.overlay.opaque" not in local_xattrs(str(root / "local-opq"))


def test_an_empty_stack_and_a_missing_layer_directory_are_refused() -> None:
    with pytest.raises(ImageError):
        Tree([])
    with pytest.raises(ImageError):
        DirLayer(Path("/nonexistent/layer"))


def test_unknown_inodes_are_enoent(tmp_path: Path, cache: ChunkCache) -> None:
    tree = stack(tmp_path, cache, BASE)
    with pytest.raises(FileNotFoundError) as info:
        tree.get(12345)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("name", [".wh.", "d/.wh.", ".wh..", ".wh..."])
def test_a_whiteout_that_names_no_entry_hides_nothing(
    tmp_path: Path, cache: ChunkCache, name: str
) -> None:
    # ".wh." at the top used to make the layer's root opaque: every lower layer vanished
    lower = [Member("d", "dir", mode=0o755), Member("d/kept.txt", data=b"kept\n")]
    tree = stack(tmp_path, cache, lower, [Member(name, data=b"")])
    assert listing(tree, "") == ["d"]
    assert listing(tree, "d") == ["kept.txt"]


def test_hard_links_in_a_directory_a_later_entry_replaced_are_gone(
    tmp_path: Path, cache: ChunkCache
) -> None:
    # these TOCs used to fail to load (KeyError) instead of mounting
    tree = stack(
        tmp_path,
        cache,
        [Member("b/c", "hardlink", link="missing"), Member("b", data=b"y")],
    )
    assert listing(tree, "") == ["b"] and not at(tree, "b").is_dir
    tree = stack(
        tmp_path,
        cache,
        [
            Member("a", data=b"x"),
            Member("b", "hardlink", link="a"),
            Member("b/c", "hardlink", link="missing"),
        ],
    )
    assert listing(tree, "") == ["a", "b"] and not at(tree, "b").is_dir


def test_toc_times_and_ids_the_kernel_cannot_take(tmp_path: Path) -> None:
    toc = parse_toc(
        json.dumps(
            {
                "version": 1,
                "entries": [{"name": "old", "type": "dir", "modtime": "0001-01-01T00:00:00Z"}],
            }
        ).encode(),
        100,
    )
    layer = TOCLayer(toc, cast(BlobSource, None))
    assert layer.entries["old"].mtime_ns == 0  # Go's zero time is 1970, as when unpacked
    for field_, value in (("uid", 1 << 32), ("gid", (1 << 32) - 1), ("devMajor", 1 << 40)):
        doc = {"version": 1, "entries": [{"name": "c", "type": "char", field_: value}]}
        with pytest.raises(EStargzError, match=field_):
            parse_toc(json.dumps(doc).encode(), 100)
    doc = {"version": 1, "entries": [{"name": "f", "type": "dir", "xattrs": {"user.a": "\x80"}}]}
    with pytest.raises(EStargzError, match="not base64"):
        parse_toc(json.dumps(doc).encode(), 100)
