"""Lazy mounts end to end: a Debian + Python image converted to eStargz, pushed to the real
registry (Debian's docker-registry), mounted by the ``lazyfs`` daemon through
``LazyMounts``, and run with ``chroot``. Faults are real: kill -9 of the daemon, the
registry stopped mid-read, a blob corrupted in the registry's own storage."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import imagetools
from tests.conftest import needs, needs_root
from warmstart.images.convert import convert_image
from warmstart.images.errors import ImageError
from warmstart.images.estargz import TOC_DIGEST_ANNOTATION, read_toc, write_estargz
from warmstart.images.lazymount import (
    BackgroundFetch,
    LayerSource,
    LazyMounts,
    MountSpec,
    RegistrySettings,
    is_mounted,
)
from warmstart.images.reference import Reference
from warmstart.images.registry import RegistryClient

pytestmark = [
    pytest.mark.integration,
    needs_root,
    needs(Path("/dev/fuse").exists(), "needs FUSE (/dev/fuse)"),
]

NO_BACKGROUND = BackgroundFetch(enabled=False)


@dataclass
class LazyImage:
    ref: Reference
    layers: tuple[LayerSource, ...]
    blob_bytes: int

    def spec(self, background: BackgroundFetch = NO_BACKGROUND) -> MountSpec:
        return MountSpec(self.layers, background=background)


def _image_layers(client: RegistryClient, ref: Reference) -> LazyImage:
    manifest = client.resolve(ref)
    layers = tuple(
        LayerSource.estargz(str(ref), d.digest, d.annotations[TOC_DIGEST_ANNOTATION], d.size)
        for d in manifest.layers
    )
    return LazyImage(ref, layers, sum(d.size for d in manifest.layers))


@pytest.fixture(scope="module")
def client() -> Iterator[RegistryClient]:
    with RegistryClient() as c:
        yield c


@pytest.fixture(scope="module")
def lazy_python(registry: Any, python_image: str, client: RegistryClient) -> LazyImage:
    """The python image converted to eStargz by warmstart's converter."""
    dst = Reference.parse(f"{registry.host}/python-lazy:1")
    convert_image(client, Reference.parse(python_image), dst)
    return _image_layers(client, dst)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[LazyMounts]:
    lm = LazyMounts(
        tmp_path / "lazy", registry=RegistrySettings(retries=1, timeout=5), stop_timeout=20
    )
    yield lm
    lm.close()
    lm.recover()


def _chroot(mnt: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("chroot") or "/usr/sbin/chroot", str(mnt), "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_python_runs_from_a_lazy_mount_reading_a_fraction_of_the_image(
    mounts: LazyMounts, lazy_python: LazyImage
) -> None:
    started = time.monotonic()
    mnt = mounts.mount(lazy_python.spec())
    ready = time.monotonic() - started
    assert is_mounted(mnt) and mounts.alive(mnt)
    t0 = time.monotonic()
    res = _chroot(mnt, "pass")
    first_run = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    after_pass = mounts.stats(mnt, fresh=True)
    res = _chroot(mnt, "import json; print(1)")
    assert (res.returncode, res.stdout) == (0, "1\n"), res.stderr
    stats = mounts.stats(mnt, fresh=True)
    assert stats["alive"] and stats["ready"] and stats["prefetch"]["done"]
    assert 0 < stats["bytes_fetched"] < lazy_python.blob_bytes // 4
    assert stats["requests"] >= 1 and stats["chunks_cached"] >= 1
    assert mounts.stats()["mounted"] == 1
    print(
        f"\nlazy python image: {lazy_python.blob_bytes} blob bytes; mount→ready {ready:.3f} s "
        f"(daemon: TOCs {stats['toc_seconds']:.3f} s, {stats['toc_bytes']} bytes); "
        f"chroot python3 -c pass {first_run:.3f} s, "
        f"{after_pass['bytes_fetched'] - after_pass['toc_bytes']} chunk bytes in "
        f"{after_pass['requests']} requests; after import json: {stats['bytes_fetched']} bytes "
        f"({100 * stats['bytes_fetched'] / lazy_python.blob_bytes:.1f}% of the image)"
    )


def test_mount_is_shared_per_image_and_background_fetches_the_rest(
    mounts: LazyMounts, lazy_python: LazyImage
) -> None:
    spec = lazy_python.spec(BackgroundFetch(enabled=True, concurrency=2, batch_bytes=4 << 20))
    mnt = mounts.mount(spec)
    assert mounts.mount(spec) == mnt  # a second user gets the same daemon
    for _ in range(1200):
        stats = mounts.stats(mnt, fresh=True)
        if stats.get("background", {}).get("done"):
            break
        time.sleep(0.1)
    assert stats["background"]["done"], stats
    assert stats["background"]["cached_bytes"] == stats["background"]["total_bytes"]
    fetched = stats["bytes_fetched"]
    res = _chroot(mnt, "import json, email, http.client; print(2)")
    assert res.stdout == "2\n", res.stderr
    assert (
        mounts.stats(mnt, fresh=True)["bytes_fetched"] == fetched
    )  # everything came from the cache


def _walk(root: Path) -> int:
    """stat every name under ``root`` (what ``find -ls`` does); how many there were."""
    n = 0
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
            n += 1
    return n


def _drop_dentries_and_inodes() -> None:
    """Make the kernel evict unused dentries and inodes (a FUSE mount then gets FORGETs)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_forgotten_inodes_leave_the_daemons_memory(
    mounts: LazyMounts, lazy_python: LazyImage
) -> None:
    """A walk of the whole tree makes an inode per file in the daemon; once the kernel
    forgets them they go, so walking it again (and again) holds no more than once."""
    mnt = mounts.mount(lazy_python.spec())
    baseline = mounts.stats(mnt, fresh=True)["inodes"]
    names = _walk(mnt)
    walked = mounts.stats(mnt, fresh=True)
    assert names > 1000 and walked["inodes"] > names // 2, (names, walked["inodes"])
    highs = []
    for _ in range(2):
        _drop_dentries_and_inodes()
        # The kernel sends its FORGETs in batches, after the eviction: poll.
        for _ in range(100):
            after_drop = mounts.stats(mnt, fresh=True)
            if after_drop["inodes"] < walked["inodes"] // 2:
                break
            time.sleep(0.1)
        # Directories stay (they are few); the files' inodes went back.
        assert after_drop["inodes"] < walked["inodes"] // 2, (after_drop, walked["inodes"])
        assert after_drop["inodes_forgotten"] > 0
        print(f"\nwalked {names} names: {walked['inodes']} inodes; after a drop {after_drop['inodes']}")
        assert _walk(mnt) == names  # the same tree, the same answers
        highs.append(mounts.stats(mnt, fresh=True)["inodes"])
    assert highs[0] == highs[1] == walked["inodes"], (highs, walked["inodes"], baseline)
    # Inode numbers are stable across a forget: the kernel sees the same file.
    probe = mnt / "usr/bin/python3"
    before = os.stat(probe).st_ino
    _drop_dentries_and_inodes()
    assert os.stat(probe).st_ino == before
    res = _chroot(mnt, "import json; print(4)")
    assert res.stdout == "4\n", res.stderr


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "sha256").glob("*/*"))


def test_chunk_cache_is_trimmed_while_the_mount_runs(
    tmp_path: Path, lazy_python: LazyImage
) -> None:
    """The trimmer keeps the chunk cache within its budget under a live mount; reads of
    trimmed chunks fetch them again and get the right bytes."""
    budget = 256 << 10
    lm = LazyMounts(
        tmp_path / "lazy",
        registry=RegistrySettings(retries=1, timeout=5),
        stop_timeout=20,
        cache_budget_bytes=budget,
        trim_interval=0.1,
        keep_recent_s=0,
    )
    try:
        mnt = lm.mount(lazy_python.spec())
        code = "import json, email.parser, http.client; print(json.dumps([5]))"
        assert _chroot(mnt, code).stdout == "[5]\n"
        first = lm.stats(mnt, fresh=True)["bytes_fetched"]
        deadline = time.monotonic() + 30
        while _cache_bytes(lm.cache_dir) > budget and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cache_bytes(lm.cache_dir) <= budget and lm.trimmed_bytes > 0
        assert is_mounted(mnt) and lm.alive(mnt)
        # Drop the page cache too, so the kernel asks the daemon again.
        _drop_dentries_and_inodes()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        res = _chroot(mnt, code)
        assert res.stdout == "[5]\n", res.stderr
        again = lm.stats(mnt, fresh=True)
        assert again["bytes_fetched"] > first  # trimmed chunks came back from the registry
        assert again["read_errors"] == 0
    finally:
        lm.close()
        lm.recover()


def test_killed_daemon_is_noticed_and_remounted_on_next_use(
    mounts: LazyMounts, lazy_python: LazyImage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="warmstart.images.lazymount")
    spec = lazy_python.spec()
    mnt = mounts.mount(spec)
    assert _chroot(mnt, "print(3)").stdout == "3\n"
    pid = mounts.pid(mnt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not mounts.alive(mnt):
            break
        time.sleep(0.05)
    assert not mounts.alive(mnt)
    with pytest.raises(OSError) as info:  # cached entries still answer; new lookups cannot
        os.stat(mnt / "usr/never-looked-up")
    assert info.value.errno == errno.ENOTCONN
    assert mounts.mount(spec) == mnt
    assert mounts.pid(mnt) != pid
    res = _chroot(mnt, "import json; print(4)")
    assert res.stdout == "4\n", res.stderr
    stats = mounts.stats(mnt, fresh=True)
    assert stats["remounts"] == 1
    assert stats["toc_bytes"] == 0  # the TOCs came from the cache this time
    assert any("exited with signal SIGKILL; remounting" in r.getMessage() for r in caplog.records)


def test_recover_detaches_mounts_left_by_a_crashed_worker(
    tmp_path: Path, lazy_python: LazyImage
) -> None:
    root = tmp_path / "lazy"
    crashed = LazyMounts(root, registry=RegistrySettings(retries=1, timeout=5))
    dead = crashed.mount(lazy_python.spec())
    other = crashed.mount(MountSpec(lazy_python.layers[:1], background=NO_BACKGROUND))
    os.kill(crashed.pid(dead) or 0, signal.SIGKILL)  # one daemon died, one lives on
    live_pid = crashed.pid(other)
    restarted = LazyMounts(root, registry=RegistrySettings(retries=1, timeout=5))
    recovered = restarted.recover()
    assert sorted(recovered) == sorted([dead, other])
    assert not is_mounted(dead) and not is_mounted(other)
    # The detached live daemon notices its mount is gone and exits on its own.
    for _ in range(200):
        if not crashed.alive(other):
            break
        time.sleep(0.05)
    assert not crashed.alive(other), f"daemon {live_pid} still running"
    assert restarted.recover() == []
    mnt = restarted.mount(lazy_python.spec())
    assert _chroot(mnt, "print(5)").stdout == "5\n"
    restarted.close()


def test_registry_gone_mid_read_gives_eio_then_the_right_bytes(
    mounts: LazyMounts, lazy_python: LazyImage, registry: Any
) -> None:
    mnt = mounts.mount(lazy_python.spec())
    assert _chroot(mnt, "print(6)").stdout == "6\n"
    base = imagetools.base_rootfs()
    victim = next(
        p
        for p in sorted((base / "usr/lib/python3.11/email").glob("*.py"))
        if p.stat().st_size > 20_000
    )
    rel = victim.relative_to(base)
    registry.stop()
    try:
        with pytest.raises(OSError) as info:
            (mnt / rel).read_bytes()
        assert info.value.errno == errno.EIO
    finally:
        registry.restart()
    assert (mnt / rel).read_bytes() == victim.read_bytes()
    log = (mounts.run_dir / f"{lazy_python.spec().key()}.log").read_text()
    assert f"read of /{rel}" in log and "answering EIO" in log
    assert mounts.stats(mnt, fresh=True)["read_errors"] >= 1


def _small_image(
    registry: Any, client: RegistryClient, name: str, prioritized: list[str] | None = None
) -> tuple[LazyImage, Any]:
    files = {
        "app/hello.txt": b"hello from a lazy layer\n",
        "app/data.bin": hashlib.sha256(b"x").digest() * 4096,
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for n, data in files.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw.seek(0)
    blob = io.BytesIO()
    layer = write_estargz(raw, blob, prioritized=prioritized)
    ref = Reference.parse(f"{registry.host}/{name}:1")
    client.push_blob(ref, blob.getvalue(), layer.digest)
    spec = LayerSource.estargz(str(ref), layer.digest, layer.toc_digest, layer.size)
    toc = read_toc(lambda s, e: blob.getvalue()[s:e], layer.size, layer.toc_digest)
    return LazyImage(ref, (spec,), layer.size), toc


def test_chunk_corrupted_in_the_registry_gives_eio(
    mounts: LazyMounts, registry: Any, client: RegistryClient
) -> None:
    image, toc = _small_image(registry, client, "corrupt-me")
    digest = image.layers[0].digest
    stored = (
        registry.root / "data/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    )
    original = stored.read_bytes()
    victim = toc.chunks("app/data.bin")[0]
    fake = gzip.compress(b"\0" * victim.chunk_size, mtime=0)
    assert len(fake) <= victim.end_offset - victim.offset
    corrupt = bytearray(original)
    corrupt[victim.offset : victim.offset + len(fake)] = fake
    stored.write_bytes(bytes(corrupt))
    try:
        mnt = mounts.mount(MountSpec(image.layers, background=NO_BACKGROUND, read_ahead=0))
        with pytest.raises(OSError) as info:
            (mnt / "app/data.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert (mnt / "app/hello.txt").read_bytes() == b"hello from a lazy layer\n"
        log = (mounts.run_dir / f"{image.spec().key()}.log").read_text()
        assert "expected sha256:" in log and "read of /app/data.bin" in log
        assert mounts.stats(mnt, fresh=True)["verify_errors"] >= 1
    finally:
        stored.write_bytes(original)


def test_wrong_toc_digest_fails_the_mount_and_leaves_nothing_mounted(
    mounts: LazyMounts, registry: Any, client: RegistryClient
) -> None:
    image, _ = _small_image(registry, client, "wrong-toc")
    bad = LayerSource.estargz(
        image.layers[0].ref, image.layers[0].digest, "sha256:" + "0" * 64, image.layers[0].size
    )
    spec = MountSpec((bad,), background=NO_BACKGROUND)
    with pytest.raises(ImageError, match="TOC digest mismatch"):
        mounts.mount(spec)
    assert not is_mounted(mounts.mnt_dir / spec.key())


def test_missing_blob_fails_the_mount_clearly(mounts: LazyMounts, registry: Any) -> None:
    spec = MountSpec(
        (
            LayerSource.estargz(
                f"{registry.host}/nothing:1", "sha256:" + "1" * 64, "sha256:" + "2" * 64
            ),
        ),
        background=NO_BACKGROUND,
    )
    with pytest.raises(ImageError, match=r"lazy mount of .* failed"):
        mounts.mount(spec)
    assert not is_mounted(mounts.mnt_dir / spec.key())


def test_daemon_unmounts_itself_when_its_worker_dies(tmp_path: Path) -> None:
    """A worker killed without unmounting: its daemons notice and unmount themselves."""
    import sys

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        tf.addfile(info, io.BytesIO(b"hello\n"))
    raw.seek(0)
    blob = tmp_path / "layer.blob"
    with open(blob, "wb") as out:
        layer = write_estargz(raw, out)
    worker = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from warmstart.images.lazymount import LayerSource, LazyMounts, MountSpec\n"
        f"lm = LazyMounts(Path({str(tmp_path / 'lazy')!r}), stats_interval=0.1)\n"
        f"spec = MountSpec((LayerSource.blob_file({str(blob)!r}, {layer.toc_digest!r}),))\n"
        "print(lm.mount(spec), flush=True)\n"
        "os._exit(0)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", worker], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    mnt = Path(res.stdout.strip())
    for _ in range(400):
        if not is_mounted(mnt):
            break
        time.sleep(0.05)
    assert not is_mounted(mnt)
    log = next((tmp_path / "lazy/run").glob("*.log")).read_text()
    assert "is gone: unmounting" in log


def test_prioritized_files_from_the_writer_are_prefetched_at_mount(
    mounts: LazyMounts, registry: Any, client: RegistryClient
) -> None:
    image, toc = _small_image(registry, client, "prioritized", prioritized=["app/data.bin"])
    assert toc.prefetch_end is not None
    mnt = mounts.mount(MountSpec(image.layers, background=NO_BACKGROUND, read_ahead=0))
    # The prioritized files stream in right after the mount is up, unasked.
    deadline = time.monotonic() + 30
    while not (stats := mounts.stats(mnt, fresh=True))["prefetch"]["done"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["prefetch"]["chunks"] >= 1
    before = stats["bytes_fetched"]
    assert (mnt / "app/data.bin").read_bytes() == hashlib.sha256(b"x").digest() * 4096
    assert mounts.stats(mnt, fresh=True)["bytes_fetched"] == before
    assert (mnt / "app/hello.txt").read_bytes() == b"hello from a lazy layer\n"
    assert mounts.stats(mnt, fresh=True)["bytes_fetched"] > before


@pytest.fixture(scope="module")
def ctr_remote_python(ctr_remote_python_image: str, client: RegistryClient) -> LazyImage:
    """The python image converted by the reference implementation (``ctr-remote image
    convert --estargz`` in a private containerd)."""
    return _image_layers(client, Reference.parse(ctr_remote_python_image))


def test_image_converted_by_ctr_remote_mounts_lazily(
    mounts: LazyMounts, ctr_remote_python: LazyImage
) -> None:
    mnt = mounts.mount(ctr_remote_python.spec())
    res = _chroot(mnt, "import json; print(7)")
    assert (res.returncode, res.stdout) == (0, "7\n"), res.stderr
    base = imagetools.base_rootfs()
    for rel in ("usr/lib/python3.11/os.py", "etc/os-release", "usr/lib/os-release"):
        assert (mnt / rel).read_bytes() == (base / rel).read_bytes()
    assert b"def handler" in (mnt / "var/task/app.py").read_bytes()
    assert os.readlink(mnt / "usr/bin/python3") == os.readlink(base / "usr/bin/python3")
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(base))  # landmark hidden
    stats = mounts.stats(mnt, fresh=True)
    assert 0 < stats["bytes_fetched"] < ctr_remote_python.blob_bytes // 4
