"""The content store with a fake registry client at its seam: sharing, reference counts,
single-flight pulls, LRU garbage collection, crash recovery, verification of diff-ids."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warmstart.images.errors import DigestMismatch, ImageError, RegistryError, UnsafeLayer
from warmstart.images.reference import Reference
from warmstart.images.registry import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    RawManifest,
    manifest_from_raw,
)
from warmstart.images.store import IMAGE_SUFFIX, ImageStore
from warmstart.runtime import syscalls

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeRegistry:
    """Images in memory behind the two calls the store makes: resolve and stream_blob."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, ImageManifest] = {}
        self.resolves = 0
        self.downloads: Counter[str] = Counter()
        self.gate: dict[str, threading.Event] = {}  # digest → held until set
        self.fail: dict[str, BaseException] = {}  # digest → raised by the next download
        self.lock = threading.Lock()

    def layer(self, files: dict[str, bytes]) -> tuple[Descriptor, str, bytes]:
        raw = tar_of(files)
        blob = gzip.compress(raw, mtime=0)
        self.blobs[sha(blob)] = blob
        return Descriptor(LAYER_GZIP, sha(blob), len(blob), {}), sha(raw), raw

    def image(
        self,
        name: str,
        layers: list[tuple[Descriptor, str, bytes]],
        *,
        diff_ids: list[str] | None = None,
    ) -> str:
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["app.handler"], "Env": ["A=1"], "WorkingDir": "/var/task"},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": diff_ids or [diff for _, diff, _ in layers],
                },
            }
        ).encode()
        cfg = Descriptor(OCI_CONFIG, sha(config), len(config), {})
        raw = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": cfg.to_json(),
                "layers": [desc.to_json() for desc, _, _ in layers],
            }
        ).encode()
        ref = Reference.parse(f"registry.test/{name}")
        self.manifests[str(ref)] = manifest_from_raw(
            ref, RawManifest(raw, OCI_MANIFEST, sha(raw)), config
        )
        return str(ref)

    def resolve(self, ref: Reference, platform: str = "linux/amd64") -> ImageManifest:
        with self.lock:
            self.resolves += 1
        key = str(Reference(ref.registry, ref.repository, ref.tag, None))
        try:
            return self.manifests[key]
        except KeyError:
            raise RegistryError(f"registry.test: no {key}") from None

    def stream_blob(
        self, ref: Reference, digest: str, *, size: int | None = None
    ) -> Iterator[bytes]:
        with self.lock:
            self.downloads[digest] += 1
            error = self.fail.pop(digest, None)
        gate = self.gate.get(digest)
        if gate is not None:
            assert gate.wait(30), "test gate never opened"
        if error is not None:
            raise error
        data = self.blobs[digest]
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def make_store(tmp_path: Path, fake: FakeRegistry, budget: int = 1 << 40) -> ImageStore:
    return ImageStore(tmp_path / "store", fake, budget)  # type: ignore[arg-type]


def test_pull_unpacks_layers_bottom_to_top(tmp_path: Path, fake: FakeRegistry) -> None:
    base = fake.layer({"etc/os-release": b"debian", "usr/bin/python3": b"elf"})
    app = fake.layer({"var/task/app.py": b"def handler(e, c): return e\n"})
    ref = fake.image("fn:1", [base, app])
    store = make_store(tmp_path, fake)
    image = store.pull(ref)
    assert image.id == fake.manifests[ref].digest
    assert image.config.cmd == ["app.handler"]
    assert image.config.env_dict() == {"A": "1"}
    assert image.config.working_dir == "/var/task"
    assert [p.name for p in image.layer_dirs] == [base[1][7:], app[1][7:]]
    assert (image.layer_dirs[0] / "etc/os-release").read_bytes() == b"debian"
    assert (image.layer_dirs[1] / "var/task/app.py").exists()
    assert store.refcount(base[1]) == 1
    stats = store.stats()
    assert (stats.layers_pulled, stats.images, stats.layers) == (2, 1, 2)
    assert stats.bytes_downloaded == base[0].size + app[0].size
    assert stats.disk_bytes == len(base[2]) + len(app[2])
    assert list((tmp_path / "store/tmp").iterdir()) == []
    store.close()


def test_shared_layers_are_stored_once_and_counted(tmp_path: Path, fake: FakeRegistry) -> None:
    base = fake.layer({"lib/libc.so": b"c" * 1000})
    a = fake.image("a:1", [base, fake.layer({"a": b"a"})])
    b = fake.image("b:1", [base, fake.layer({"b": b"b"})])
    store = make_store(tmp_path, fake)
    store.pull(a)
    store.pull(b)
    assert fake.downloads[base[0].digest] == 1
    assert store.refcount(base[1]) == 2
    assert store.stats().layers_reused == 1
    assert store.remove(a)
    assert store.refcount(base[1]) == 1
    assert store.layer_dir(base[1]).is_dir()
    assert store.remove(b)
    assert store.refcount(base[1]) == 0
    assert not store.layer_dir(base[1]).exists()
    assert store.stats().layers == 0


def test_pull_by_digest_in_the_store_needs_no_registry(tmp_path: Path, fake: FakeRegistry) -> None:
    ref = fake.image("fn:1", [fake.layer({"f": b"x"})])
    store = make_store(tmp_path, fake)
    image = store.pull(ref)
    store.close()
    store = make_store(tmp_path, fake)  # the index survives a restart
    resolves = fake.resolves
    again = store.pull(image.ref)
    assert fake.resolves == resolves
    assert again.id == image.id and again.layer_dirs == image.layer_dirs
    assert store.get(ref) is not None and store.get(image.id) is not None
    assert [i.id for i in store.list_images()] == [image.id]
    assert store.get("registry.test/other:1") is None


def test_concurrent_pulls_of_one_layer_download_it_once(tmp_path: Path, fake: FakeRegistry) -> None:
    base = fake.layer({f"f{i}": b"x" * i for i in range(50)})
    first = fake.image("one:1", [base, fake.layer({"one": b"1"})])
    second = fake.image("two:1", [base, fake.layer({"two": b"2"})])
    store = make_store(tmp_path, fake)
    gate = fake.gate[base[0].digest] = threading.Event()
    results: dict[str, Any] = {}
    events: list[tuple[str, int, int]] = []

    def pull(ref: str, progress: Any = None) -> None:
        try:
            results[ref] = store.pull(ref, progress)
        except BaseException as exc:
            results[ref] = exc

    t1 = threading.Thread(target=pull, args=(first,))
    t1.start()
    deadline = time.monotonic() + 30
    while base[1] not in store.in_progress() and time.monotonic() < deadline:
        time.sleep(0.005)
    t2 = threading.Thread(target=pull, args=(second, lambda *e: events.append(e)))
    t2.start()
    while store.in_progress().get(base[1], 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert store.in_progress()[base[1]] == 1  # the second pull waits for the first
    gate.set()
    t1.join(30)
    t2.join(30)
    assert not isinstance(results[first], BaseException), results[first]
    assert not isinstance(results[second], BaseException), results[second]
    assert fake.downloads[base[0].digest] == 1
    assert results[first].layer_dirs[0] == results[second].layer_dirs[0]
    # the waiting pull saw the shared layer's progress and its completion
    assert (base[0].digest, base[0].size, base[0].size) in events


def test_a_waiter_retries_when_the_pull_it_waited_for_failed(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    base = fake.layer({"f": b"x"})
    ref = fake.image("fn:1", [base])
    store = make_store(tmp_path, fake)
    gate = fake.gate[base[0].digest] = threading.Event()
    fake.fail[base[0].digest] = RegistryError("connection reset")
    errors: list[BaseException] = []
    images: list[Any] = []

    def pull() -> None:
        try:
            images.append(store.pull(ref))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 30
    while base[1] not in store.in_progress() and time.monotonic() < deadline:
        time.sleep(0.005)
    threads[1].start()
    while store.in_progress().get(base[1], 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(30)
    assert [type(e) for e in errors] == [RegistryError]
    assert len(images) == 1
    assert fake.downloads[base[0].digest] == 2


def test_progress_events(tmp_path: Path, fake: FakeRegistry) -> None:
    big = fake.layer({"blob": os.urandom(200_000)})
    small = fake.layer({"s": b"s"})
    ref = fake.image("fn:1", [big, small])
    store = make_store(tmp_path, fake)
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def progress(digest: str, done: int, size: int) -> None:
        with lock:
            events.append((digest, done, size))

    store.pull(ref, progress)
    for desc, _, _ in (big, small):
        mine = [(done, size) for digest, done, size in events if digest == desc.digest]
        assert mine[0] == (0, desc.size)
        assert mine[-1] == (desc.size, desc.size)
        assert [done for done, _ in mine] == sorted(done for done, _ in mine)
        assert sum(1 for done, size in mine if done == size) == 1
    assert len([e for e in events if e[0] == big[0].digest]) > 3  # bytes, not just layers
    # pulling again reports every layer as done at once
    events.clear()
    store.pull(ref, progress)
    assert sorted(events) == sorted(
        [(big[0].digest, big[0].size, big[0].size), (small[0].digest, small[0].size, small[0].size)]
    )


def test_lru_eviction_within_the_budget(tmp_path: Path, fake: FakeRegistry) -> None:
    shared = fake.layer({"shared": b"s" * 10_000})
    refs = [
        fake.image(f"img{i}:1", [shared, fake.layer({f"own{i}": bytes([i]) * 30_000})])
        for i in range(4)
    ]
    one_image = len(shared[2]) + len(tar_of({"own0": b"0" * 30_000}))
    own_layer = one_image - len(shared[2])
    budget = len(shared[2]) + 2 * own_layer + own_layer // 2  # room for two images' own layers
    store = make_store(tmp_path, fake, budget)
    images = [store.pull(refs[0]), store.pull(refs[1])]
    assert store.stats().images == 2
    store.pull(refs[0])  # refs[0] is now the most recently used
    store.acquire(images[1].id)  # pinned: never evicted
    images.append(store.pull(refs[2]))
    # over budget: refs[0] is least recently used among the unpinned ones
    kept = {i.id for i in store.list_images()}
    assert kept == {images[1].id, images[2].id}
    assert not images[0].layer_dirs[1].exists()
    assert images[0].layer_dirs[0].exists()  # the shared layer is still referenced
    assert store.disk_bytes() <= budget
    # with everything else pinned, a new image may exceed the budget rather than fail
    store.acquire(images[2].id)
    last = store.pull(refs[3])
    assert store.get(last.id) is not None
    assert store.disk_bytes() > budget
    with pytest.raises(ImageError, match="in use"):
        store.remove(images[1].id)
    store.release(images[1].id)
    store.release(images[2].id)
    freed = store.gc()
    assert freed > 0
    assert store.disk_bytes() <= budget
    assert store.stats().gc_layers_removed >= 2


def test_wrong_diff_id_is_never_published(tmp_path: Path, fake: FakeRegistry) -> None:
    layer = fake.layer({"f": b"x"})
    ref = fake.image("fn:1", [layer], diff_ids=["sha256:" + "0" * 64])
    store = make_store(tmp_path, fake)
    with pytest.raises(DigestMismatch, match="diff"):
        store.pull(ref)
    assert store.stats().layers == 0
    assert list((tmp_path / "store/layers").iterdir()) == []
    assert list((tmp_path / "store/tmp").iterdir()) == []


def test_download_errors_and_unsafe_layers_leave_nothing_behind(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    ok = fake.layer({"f": b"x" * 100_000})
    ref = fake.image("fn:1", [ok])
    store = make_store(tmp_path, fake)
    fake.fail[ok[0].digest] = DigestMismatch("blob hashes to something else")
    with pytest.raises(DigestMismatch):
        store.pull(ref)
    assert list((tmp_path / "store/layers").iterdir()) == []
    assert list((tmp_path / "store/tmp").iterdir()) == []

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../escape")
        tf.addfile(info, io.BytesIO(b""))
    blob = gzip.compress(buf.getvalue())
    fake.blobs[sha(blob)] = blob
    evil = fake.image(
        "evil:1", [(Descriptor(LAYER_GZIP, sha(blob), len(blob), {}), sha(buf.getvalue()), b"")]
    )
    with pytest.raises(UnsafeLayer):
        store.pull(evil)
    assert list((tmp_path / "store/layers").iterdir()) == []
    assert list((tmp_path / "store/tmp").iterdir()) == []
    assert not (tmp_path / "store/escape").exists()
    store.pull(ref)  # the store still works afterwards
    assert store.stats().layers == 1


def test_start_up_removes_crash_leftovers(tmp_path: Path, fake: FakeRegistry) -> None:
    a = fake.layer({"a": b"a"})
    b = fake.layer({"b": b"b"})
    ref_a = fake.image("a:1", [a])
    ref_b = fake.image("b:1", [b])
    store = make_store(tmp_path, fake)
    store.pull(ref_a)
    image_b = store.pull(ref_b)
    store.close()
    root = tmp_path / "store"
    dead = root / "tmp" / "999999999.1-deadbeef"  # no such pid
    (dead / "layer").mkdir(parents=True)
    reused = root / "tmp" / f"{os.getpid()}.1-cafe"  # our pid, but an older process's
    reused.mkdir()
    stat_fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    live = root / "tmp" / f"{os.getpid()}.{stat_fields[19]}-beef"  # this process: in use
    live.mkdir()
    (root / "layers" / ("f" * 64)).mkdir()  # unpacked but never indexed
    remove_layer(image_b.layer_dirs[0])  # indexed but gone
    store = make_store(tmp_path, fake)
    assert not dead.exists()
    assert not reused.exists()
    assert live.exists()
    assert not (root / "layers" / ("f" * 64)).exists()
    assert store.get(ref_b) is None
    assert store.get(ref_a) is not None
    assert store.pull(ref_b).layer_dirs[0].is_dir()


def remove_layer(directory: Path) -> None:
    """Delete a stored layer behind the store's back, whichever its format: the image
    (unmounted first) or the unpacked directory."""
    image = directory.with_name(directory.name + IMAGE_SUFFIX)
    if image.exists():
        if syscalls.is_mount_point(str(directory)):
            syscalls.umount(str(directory), syscalls.MNT_DETACH)
        image.unlink()
    shutil.rmtree(directory)


def test_mount_needs_its_layers(tmp_path: Path, fake: FakeRegistry) -> None:
    ref = fake.image("fn:1", [fake.layer({"a": b"a"})])
    store = make_store(tmp_path, fake)
    image = store.pull(ref)
    remove_layer(image.layer_dirs[0])
    with pytest.raises(ImageError, match="missing"):
        store.mount_rootfs(image, tmp_path / "root")
    assert store.remove(image.id)  # not left pinned by the failed mount


def test_kept_blobs_are_stored_and_collected(tmp_path: Path, fake: FakeRegistry) -> None:
    layer = fake.layer({"f": b"x" * 1000})
    ref = fake.image("fn:1", [layer])
    store = ImageStore(tmp_path / "store", fake, 1 << 40, keep_blobs=True)  # type: ignore[arg-type]
    store.pull(ref)
    blob = tmp_path / "store/blobs/sha256" / layer[0].digest[7:]
    assert blob.read_bytes() == fake.blobs[layer[0].digest]
    store.remove(ref)
    assert not blob.exists()


def test_a_pinned_image_survives_gc_and_restarts_until_unpinned(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    refs = [fake.image(f"img{i}:1", [fake.layer({f"own{i}": bytes([i]) * 30_000})]) for i in range(3)]
    one = len(tar_of({"own0": b"0" * 30_000}))
    store = make_store(tmp_path, fake, one * 2 + one // 2)  # room for two images
    pinned = store.pull(refs[0])
    store.pin("cache-a", pinned.id, refs[0])
    with pytest.raises(ImageError, match="not in the store"):
        store.pin("cache-b", "sha256:" + "1" * 64, "x")
    store.close()
    # The pin is persistent: a new process (a restarted node) honours it.
    store = make_store(tmp_path, fake, one * 2 + one // 2)
    assert [(p.name, p.image_id, p.ref) for p in store.pins()] == [
        ("cache-a", pinned.id, refs[0])
    ]
    others = [store.pull(refs[1]), store.pull(refs[2])]
    # Over budget: the least recently used image goes -- the pinned one is older, but kept.
    kept = {i.id for i in store.list_images()}
    assert kept == {pinned.id, others[1].id}
    with pytest.raises(ImageError, match="pinned by cache-a"):
        store.remove(pinned.id)
    # Re-pinning a name to another image and dropping the old pin (a moved tag).
    store.pin("cache-a", others[1].id, refs[2])
    assert store.unpin("cache-a", keep=others[1].id) == 1
    assert {p.image_id for p in store.pins()} == {others[1].id}
    store.pull(refs[1])  # the old pinned image is an ordinary LRU candidate again
    assert {i.id for i in store.list_images()} == {others[0].id, others[1].id}
    assert store.unpin("cache-a") == 1
    assert store.pins() == []
    store.close()
