"""Full pulls from the real registry into the content store, mounted with real overlayfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.conftest import needs_root
from warmstart.images.errors import DigestMismatch, ImageError
from warmstart.images.reference import Reference
from warmstart.images.registry import OCI_CONFIG, OCI_MANIFEST, RegistryClient
from warmstart.images.store import Image, ImageStore

pytestmark = [pytest.mark.integration, needs_root]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    c = RegistryClient(docker_config=Path("/nonexistent.json"), retries=2, backoff=0.01)
    yield c
    c.close()


@pytest.fixture
def store(tmp_path: Path, client: RegistryClient) -> Iterator[ImageStore]:
    s = ImageStore(tmp_path / "store", client, 10 << 30)
    yield s
    for target, _ in s.mounted():
        s.unmount(Path(target))
    s.close()


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Mount:
    def __init__(self, store: ImageStore, image: Image, target: Path) -> None:
        self.store, self.image, self.target = store, image, target

    def __enter__(self) -> Path:
        self.store.mount_rootfs(self.image, self.target)
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.store.unmount(self.target)


def test_pull_mount_and_run_python(store: ImageStore, python_image: str, tmp_path: Path) -> None:
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def progress(digest: str, done: int, size: int) -> None:
        with lock:
            events.append((digest, done, size))

    t0 = time.perf_counter()
    image = store.pull(python_image, progress)
    elapsed = time.perf_counter() - t0
    print(f"\nfull pull of {python_image}: {elapsed:.2f} s, {image.size / 1e6:.1f} MB compressed")
    assert image.config.cmd == ["app.handler"]
    assert image.config.working_dir == "/var/task"
    for layer in image.manifest.layers:
        mine = [(d, s) for g, d, s in events if g == layer.digest]
        assert mine[-1] == (layer.size, layer.size)
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)
    big = image.manifest.layers[0]
    assert len([e for e in events if e[0] == big.digest]) > 10  # byte progress, not one event

    root = tmp_path / "root"
    with Mount(store, image, root):
        assert mounted(root)
        out = subprocess.run(
            ["chroot", str(root), "/usr/bin/python3", "-c", "import sys, json; print(sys.version)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("3.")
        assert (root / "var/task/app.py").read_text().startswith("import sys")
        with pytest.raises(OSError):
            (root / "new-file").write_text("read-only")
        # nothing an image brings may be setuid, nor a device
        su = root / "usr/bin/su"
        if su.exists():
            assert not su.stat().st_mode & 0o6000
        modes = [p.lstat().st_mode for p in (root / "dev").iterdir()]
        assert not any(stat.S_ISCHR(m) or stat.S_ISBLK(m) for m in modes)
        with pytest.raises(Exception, match="in use"):
            store.remove(image.id)
    assert not mounted(root)
    assert store.stats().layers_pulled == 2


def test_concurrent_pulls_download_each_blob_once(store: ImageStore, python_image: str) -> None:
    images: list[Image] = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            images.append(store.pull(python_image))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len({i.id for i in images}) == 1
    stats = store.stats()
    assert stats.layers_pulled == 2
    assert stats.bytes_downloaded == images[0].size  # every blob exactly once
    assert stats.layers_reused == 4


def _push_image(client: RegistryClient, ref: Reference, layers: list[tuple[bytes, str]]) -> str:
    """Push (compressed blob, media type) layers plus a config; returns the reference."""
    descriptors = []
    diff_ids = []
    for blob, media_type in layers:
        d = client.push_blob(ref, blob)
        descriptors.append({"mediaType": media_type, "digest": d.digest, "size": d.size})
        if media_type.endswith("+gzip"):
            raw = gzip.decompress(blob)
        elif media_type.endswith("+zstd"):
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
        else:
            raw = blob
        diff_ids.append(sha(raw))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    cfg = client.push_blob(ref, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
            "layers": descriptors,
        }
    ).encode()
    client.push_manifest(ref, manifest, OCI_MANIFEST)
    return str(ref)


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """Entries: (name, data) files, (name/, None) directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZS = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"


def test_whiteouts_and_gzip_zstd_plain_layers_in_the_mounted_root(
    store: ImageStore, client: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    lower = _tar(
        [
            ("etc/", None),
            ("etc/deleted", b"gone"),
            ("etc/kept", b"kept"),
            ("cache/", None),
            ("cache/old-1", b"1"),
            ("cache/old-2", b"2"),
            ("tree/", None),
            ("tree/leaf", b"leaf"),
        ]
    )
    upper = _tar(
        [
            ("etc/.wh.deleted", b""),
            ("cache/.wh..wh..opq", b""),
            ("cache/new", b"new"),
            (".wh.tree", b""),
        ]
    )
    third = _tar([("etc/added", b"third layer")])
    ref = Reference.parse(f"{registry.host}/whiteouts-{uuid.uuid4().hex[:6]}:1")
    _push_image(
        client,
        ref,
        [
            (gzip.compress(lower), GZ),
            (zstandard.ZstdCompressor().compress(upper), ZS),
            (third, TAR),
        ],
    )
    image = store.pull(str(ref))
    with Mount(store, image, tmp_path / "root") as root:
        assert sorted(os.listdir(root / "etc")) == ["added", "kept"]
        assert sorted(os.listdir(root / "cache")) == ["new"]
        assert not (root / "tree").exists()
        assert (root / "etc/kept").read_text() == "kept"
        assert (root / "etc/added").read_text() == "third layer"


def test_gc_removes_unreferenced_layers_and_respects_the_budget(
    client: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    refs = []
    for name in ("a", "b", "c"):
        ref = Reference.parse(f"{registry.host}/gc-{name}-{uuid.uuid4().hex[:6]}:1")
        shared = _tar([("shared/lib", b"L" * 50_000)])
        own = _tar([(f"{name}/data", os.urandom(100_000))])
        refs.append(
            _push_image(
                client, ref, [(gzip.compress(shared, mtime=0), GZ), (gzip.compress(own), GZ)]
            )
        )
    shared_size = len(_tar([("shared/lib", b"L" * 50_000)]))
    own_size = len(_tar([("a/data", b"x" * 100_000)]))
    store = ImageStore(tmp_path / "store", client, shared_size + 2 * own_size)
    try:
        a = store.pull(refs[0])
        b = store.pull(refs[1])
        with Mount(store, a, tmp_path / "root-a"):
            c = store.pull(refs[2])  # over budget: b is evicted (a is mounted)
            assert store.get(b.id) is None
            assert not b.layer_dirs[1].exists()
            assert a.layer_dirs[1].exists() and c.layer_dirs[1].exists()
            assert b.layer_dirs[0] == a.layer_dirs[0] and a.layer_dirs[0].exists()
            assert store.refcount(store.get(a.id).diff_ids[0]) == 2  # type: ignore[union-attr]
        assert store.remove(refs[0])
        assert not a.layer_dirs[1].exists()
        assert a.layer_dirs[0].exists()  # still used by c
        assert store.remove(refs[2])
        assert list((tmp_path / "store/layers").iterdir()) == []
        assert store.stats().disk_bytes == 0
    finally:
        store.close()


def test_a_corrupt_blob_in_the_registry_fails_the_pull_cleanly(
    store: ImageStore, client: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    ref = Reference.parse(f"{registry.host}/corrupt-{uuid.uuid4().hex[:6]}:1")
    good = gzip.compress(_tar([("f", os.urandom(300_000))]))
    _push_image(client, ref, [(good, GZ)])
    hexd = sha(good)[7:]
    stored = registry.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    damaged = bytearray(good)
    damaged[-20] ^= 0xFF  # inside the gzip trailer: every byte before it still unpacks
    stored.write_bytes(bytes(damaged))
    try:
        with pytest.raises(DigestMismatch):
            store.pull(str(ref))
        assert list((store.root / "layers").iterdir()) == []
        assert list((store.root / "tmp").iterdir()) == []
        assert store.stats().layers == 0
    finally:
        stored.write_bytes(good)
    assert store.pull(str(ref)).layer_dirs[0].is_dir()


def test_another_process_never_collects_a_mounted_image(
    store: ImageStore, client: RegistryClient, registry: Any, tmp_path: Path
) -> None:
    """A second store on the same root (as the CLI beside the worker) knows nothing of the
    first one's pins; the mount table still protects what is mounted."""
    base = gzip.compress(_tar([("base/lib", b"shared" * 1000)]), mtime=0)
    refs = []
    for name in ("mounted", "idle"):
        ref = Reference.parse(f"{registry.host}/two-{name}-{uuid.uuid4().hex[:6]}:1")
        own = gzip.compress(_tar([(f"{name}/file", name.encode())]))
        refs.append(_push_image(client, ref, [(base, GZ), (own, GZ)]))
    mounted_image = store.pull(refs[0])
    idle = store.pull(refs[1])
    other = ImageStore(store.root, client, 10 << 30)
    try:
        with Mount(store, mounted_image, tmp_path / "root") as root:
            with pytest.raises(ImageError, match="in use"):
                other.remove(mounted_image.id)
            other.gc(budget_bytes=0)
            assert other.get(mounted_image.id) is not None
            assert other.get(idle.id) is None  # not mounted: evicted
            assert all(d.is_dir() for d in mounted_image.layer_dirs)
            assert not idle.layer_dirs[1].exists()
            assert (root / "mounted/file").read_text() == "mounted"
            assert (root / "base/lib").read_bytes() == b"shared" * 1000
        other.gc(budget_bytes=0)
        assert other.get(mounted_image.id) is None
        assert list((store.root / "layers").iterdir()) == []
    finally:
        other.close()


@pytest.mark.parametrize("layer_format", ["squashfs", "dirs"])
def test_layer_formats_survive_a_restart_and_collection(
    tmp_path: Path, client: RegistryClient, python_image: str, layer_format: str
) -> None:
    """Layers as squashfs images are loop-mounted when pulled, unmounted when the store
    closes (no overlay using them), mounted again by the next user of the store, and
    unmounted and deleted when collected; unpacked layers are plain directories.  The
    same image runs from either."""
    from warmstart.images.store import IMAGE_SUFFIX

    root = tmp_path / "store"
    first = ImageStore(root, client, 10 << 30, layer_format=layer_format)
    image = first.pull(python_image)
    images = [d.with_name(d.name + IMAGE_SUFFIX) for d in image.layer_dirs]
    if layer_format == "squashfs":
        assert all(p.is_file() for p in images)
        assert all(mounted(d) for d in image.layer_dirs)
    else:
        assert not any(p.exists() for p in images)
        assert not any(mounted(d) for d in image.layer_dirs)
    first.close()
    assert not any(mounted(d) for d in image.layer_dirs)

    second = ImageStore(root, client, 10 << 30, layer_format=layer_format)
    again = second.get(python_image)
    assert again is not None and again.id == image.id
    target = tmp_path / "root"
    with Mount(second, again, target):
        out = subprocess.run(
            ["chroot", str(target), "/usr/bin/python3", "-c", "import json; print(7)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout == "7\n", out.stderr
    assert second.remove(python_image)
    assert not any(p.exists() for p in images)
    assert not any(d.exists() or mounted(d) for d in image.layer_dirs)
    second.close()
