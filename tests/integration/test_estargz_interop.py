"""eStargz both ways against the reference implementation (stargz-snapshotter).

- Images converted by ``ctr-remote image convert --estargz --oci`` (in a private
  containerd) are read by warmstart's reader, every chunk verified.
- Images converted by warmstart are read by the reference library (every chunk through
  its verifiers), unpacked by containerd (diff-ids checked, TOC parsed by
  ``ctr-remote image get-toc-digest``) and lazily mounted by the reference snapshotter.

The reference library and snapshotter are built from Debian's
golang-github-containerd-stargz-snapshotter-dev (``tests/integration/estargz_ref``);
without Go those checks skip (and fail under ``WARMSTART_TEST_STRICT``), the
``ctr-remote`` ones still run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import imagetools
from tests.conftest import needs_root, needs_tools, remove_tree, require
from warmstart.images import estargz
from warmstart.images.convert import convert_image
from warmstart.images.errors import EStargzError
from warmstart.images.estargz import TOC_DIGEST_ANNOTATION, read_chunk, read_toc
from warmstart.images.reference import Reference
from warmstart.images.registry import ImageManifest, RegistryClient

pytestmark = [pytest.mark.integration, needs_root, needs_tools("containerd", "ctr-remote")]

PRIORITIZED = ["usr/bin/python3.11", "usr/lib/python3.11/os.py", "var/task/app.py"]


@pytest.fixture(scope="module")
def snapshotter(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[imagetools.StargzSnapshotter | None]:
    root = tmp_path_factory.mktemp("stargz")
    snap = imagetools.start_stargz_snapshotter(root)
    yield snap
    if snap is not None:
        snap.stop()
    remove_tree(root)


@pytest.fixture(scope="module")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, snapshotter: imagetools.StargzSnapshotter | None
) -> Iterator[imagetools.Containerd]:
    plugins = snapshotter.plugin_toml() if snapshotter is not None else ""
    root = tmp_path_factory.mktemp("containerd")
    ctd = imagetools.start_containerd(root, snapshotter_plugins=plugins)
    yield ctd
    ctd.stop()
    remove_tree(root)


@pytest.fixture(scope="module")
def client() -> Iterator[RegistryClient]:
    c = RegistryClient()
    yield c
    c.close()


@pytest.fixture(scope="module")
def warmstart_image(registry: Any, python_image: str, client: RegistryClient) -> str:
    """``python_image`` converted by warmstart, with a few prioritized files."""
    dst = f"{registry.host}/python:ws-esgz"
    convert_image(
        client, Reference.parse(python_image), Reference.parse(dst), prioritized=PRIORITIZED
    )
    return dst


def _layers(client: RegistryClient, ref: str) -> tuple[Reference, ImageManifest]:
    r = Reference.parse(ref)
    return r, client.resolve(r)


def _tar_members(blob: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            out[estargz.normalize_name(ti.name)] = (ti, f.read() if f is not None else None)
    return out


# -- reference output, warmstart reader ----------------------------------------------------------
def test_reader_parses_reference_output(
    client: RegistryClient, ctr_remote_python_image: str
) -> None:
    ref, manifest = _layers(client, ctr_remote_python_image)
    multi_chunk = 0
    for desc in manifest.layers:
        toc_digest = desc.annotations[TOC_DIGEST_ANNOTATION]

        def read_range(start: int, end: int, digest: str = desc.digest) -> bytes:
            return client.fetch_ranges(ref, digest, [(start, end)])[0]

        toc = read_toc(read_range, desc.size, toc_digest)
        assert toc.entries[0].name == estargz.NO_PREFETCH_LANDMARK
        blob = client.get_blob(ref, desc.digest, max_bytes=1 << 30)
        members = _tar_members(blob)
        regular = 0
        for e in toc.entries:
            if e.type == "chunk" or e.name in estargz.LANDMARK_NAMES:
                continue
            ti, data = members[e.name]
            # The TOC agrees with the tar headers it describes.
            assert e.type == {"dir": "dir", "sym": "symlink", "lnk": "hardlink"}.get(
                "dir" if ti.isdir() else "sym" if ti.issym() else "lnk" if ti.islnk() else "",
                e.type,
            )
            assert (e.mode, e.uid, e.gid) == (ti.mode & 0o7777, ti.uid, ti.gid), e.name
            assert e.mtime == int(ti.mtime), e.name
            if ti.issym():
                assert e.link_name == ti.linkname
            if e.type == "reg" and e.size:
                chunks = toc.chunks(e.name)
                multi_chunk += len(chunks) > 1
                got = b"".join(read_chunk(blob[c.offset : c.end_offset], c) for c in chunks)
                assert got == data, e.name
                regular += 1
        assert regular == sum(
            1
            for name, (ti, data) in members.items()
            if ti.isreg() and data and name not in estargz.LANDMARK_NAMES | {estargz.TOC_NAME}
        )
        with pytest.raises(EStargzError):
            read_toc(read_range, desc.size, "sha256:" + "0" * 64)
    assert multi_chunk > 0  # python3.11 is larger than the 4 MiB default chunk


# -- warmstart output, reference reader ----------------------------------------------------------
def _fetch_layers(client: RegistryClient, ref_text: str, dest: Path) -> list[tuple[Path, Any]]:
    ref, manifest = _layers(client, ref_text)
    out = []
    for i, desc in enumerate(manifest.layers):
        path = dest / f"layer-{i}"
        client.fetch_blob(ref, desc.digest, path)
        out.append((path, desc))
    return out


def test_reference_library_verifies_warmstart_blobs(
    client: RegistryClient, warmstart_image: str, tmp_path: Path
) -> None:
    checker = imagetools.build_reference_tool("check")
    require(checker, "Go or the reference eStargz library is not installed")
    layers = _fetch_layers(client, warmstart_image, tmp_path)
    for path, desc in layers:
        res = subprocess.run(
            [str(checker), str(path), desc.annotations[TOC_DIGEST_ANNOTATION]],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["files"] > 0
    # The check can fail: a blob with one damaged chunk is refused.
    path, desc = layers[0]
    blob = bytearray(path.read_bytes())
    toc = read_toc(lambda s, e: bytes(blob[s:e]), len(blob))
    victim = toc.chunks("usr/bin/python3.11")[0]
    forged = io.BytesIO()
    with gzip.GzipFile(fileobj=forged, mode="wb", mtime=0) as gz:
        gz.write(b"\0" * victim.chunk_size)
    member = forged.getvalue()
    assert len(member) < victim.end_offset - victim.offset
    blob[victim.offset : victim.offset + len(member)] = member
    bad = tmp_path / "damaged"
    bad.write_bytes(bytes(blob))
    res = subprocess.run(
        [str(checker), str(bad), desc.annotations[TOC_DIGEST_ANNOTATION]],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "python3.11" in res.stderr


def test_containerd_unpacks_warmstart_image(
    client: RegistryClient,
    warmstart_image: str,
    containerd: imagetools.Containerd,
    tmp_path: Path,
) -> None:
    _, manifest = _layers(client, warmstart_image)
    ns = ["--namespace", "unpack"]
    # A plain pull unpacks every layer and checks it against the config's diff-ids.
    containerd.ctr(*ns, "image", "pull", "--plain-http", warmstart_image)
    for desc in manifest.layers:
        out = containerd.ctr(*ns, "image", "get-toc-digest", desc.digest).strip()
        assert out == desc.annotations[TOC_DIGEST_ANNOTATION]
        dumped = json.loads(
            containerd.ctr(*ns, "image", "get-toc-digest", "--dump-toc", desc.digest)
        )
        assert dumped["version"] == 1 and dumped["entries"]
    target = tmp_path / "rootfs"
    target.mkdir()
    containerd.ctr(*ns, "image", "mount", warmstart_image, str(target))
    try:
        for name in ("usr/bin/python3.11", "usr/lib/python3.11/os.py"):
            assert (target / name).read_bytes() == (imagetools.base_rootfs() / name).read_bytes()
        assert "def handler" in (target / "var/task/app.py").read_text()
    finally:
        containerd.ctr(*ns, "image", "unmount", "--rm", str(target))


def test_reference_snapshotter_lazily_mounts_warmstart_image(
    client: RegistryClient,
    warmstart_image: str,
    containerd: imagetools.Containerd,
    snapshotter: imagetools.StargzSnapshotter | None,
) -> None:
    require(snapshotter, "Go or the reference stargz snapshotter library is not installed")
    require(Path("/dev/fuse").exists(), "needs FUSE (/dev/fuse)")
    _, manifest = _layers(client, warmstart_image)
    ns = ["--namespace", "lazy"]
    containerd.ctr(
        *ns, "image", "rpull", "--plain-http", "--snapshotter", "stargz", warmstart_image
    )
    # Lazily pulled: no layer blob was downloaded into containerd's content store.
    listing = containerd.ctr(*ns, "content", "ls").splitlines()[1:]
    stored = {line.split()[0] for line in listing if line.strip()}
    assert manifest.config.digest in stored
    assert not stored & {desc.digest for desc in manifest.layers}
    mounts = snapshotter.fuse_mounts()
    assert len(mounts) >= len(manifest.layers), snapshotter.log()
    found: dict[str, bytes] = {}
    for mount in mounts:
        for name in ("usr/bin/python3.11", "var/task/app.py"):
            if (mount / name).is_file():
                found[name] = (mount / name).read_bytes()
    python = (imagetools.base_rootfs() / "usr/bin/python3.11").read_bytes()
    assert hashlib.sha256(found["usr/bin/python3.11"]).digest() == hashlib.sha256(python).digest()
    assert b"def handler" in found["var/task/app.py"]
