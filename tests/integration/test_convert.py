"""``convert_image`` against the real registry: every layer compression, layers that are
eStargz already, prioritized files, progress, and failures (corrupt layer, dead registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest
import zstandard

from tests import imagetools
from warmstart.images import estargz
from warmstart.images.convert import ConvertEvent, convert_image, is_estargz_layer
from warmstart.images.errors import CorruptLayer, ImageNotFound, RegistryError
from warmstart.images.estargz import TOC_DIGEST_ANNOTATION, read_chunk, read_toc
from warmstart.images.reference import Reference
from warmstart.images.registry import OCI_CONFIG, OCI_MANIFEST, Descriptor, RegistryClient

pytestmark = pytest.mark.integration

TAR = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture(scope="module")
def client() -> Iterator[RegistryClient]:
    c = RegistryClient()
    yield c
    c.close()


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o755
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def push_image(client: RegistryClient, ref: str, layers: list[tuple[bytes, str, str]]) -> Reference:
    """Push an OCI image of ``(blob, media type, diff-id)`` layers to ``ref``."""
    r = Reference.parse(ref)
    descs = []
    for blob, media_type, _ in layers:
        d = client.push_blob(r, blob)
        descs.append(Descriptor(media_type, d.digest, d.size))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["app.handler"]},
            "rootfs": {"type": "layers", "diff_ids": [diff for _, _, diff in layers]},
        }
    ).encode()
    c = client.push_blob(r, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor(OCI_CONFIG, c.digest, c.size).to_json(),
        "layers": [d.to_json() for d in descs],
    }
    client.push_manifest(r, json.dumps(manifest).encode(), OCI_MANIFEST)
    return r


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_files(client: RegistryClient, ref: Reference, desc: Descriptor) -> dict[str, bytes]:
    """Every regular file of an eStargz layer, read chunk by chunk through its TOC."""
    blob = client.get_blob(ref, desc.digest, max_bytes=1 << 30)
    toc = read_toc(lambda s, e: blob[s:e], len(blob), desc.annotations[TOC_DIGEST_ANNOTATION])
    return {
        e.name: b"".join(read_chunk(blob[c.offset : c.end_offset], c) for c in toc.chunks(e.name))
        for e in toc.entries
        if e.type == "reg" and e.name not in estargz.LANDMARK_NAMES
    }


def test_converts_plain_gzip_and_zstd_layers(registry: Any, client: RegistryClient) -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: several chunks
    plain = make_tar({"bin/tool": big})
    zipped = make_tar({"etc/conf": b"gzip layer\n"})
    zstd = make_tar({"etc/other": b"zstd layer\n"})
    src = push_image(
        client,
        f"{registry.host}/mixed:1",
        [
            (plain, TAR, sha(plain)),
            (gzip.compress(zipped), TAR + "+gzip", sha(zipped)),
            (zstandard.ZstdCompressor().compress(zstd), TAR + "+zstd", sha(zstd)),
        ],
    )
    events: list[ConvertEvent] = []
    dst = Reference.parse(f"{registry.host}/mixed:esgz")
    digest = convert_image(client, src, dst, progress=events.append)
    out = client.resolve(dst)
    assert out.digest == digest and out.media_type == OCI_MANIFEST
    assert all(is_estargz_layer(d) for d in out.layers)
    assert read_files(client, dst, out.layers[0]) == {"bin/tool": big}
    assert read_files(client, dst, out.layers[1]) == {"etc/conf": b"gzip layer\n"}
    assert read_files(client, dst, out.layers[2]) == {"etc/other": b"zstd layer\n"}
    for desc, diff_id in zip(out.layers, out.diff_ids, strict=True):
        plain_tar = gzip.decompress(client.get_blob(dst, desc.digest, max_bytes=1 << 30))
        assert diff_id == sha(plain_tar)
        assert desc.annotations[estargz.UNCOMPRESSED_SIZE_ANNOTATION] == str(len(plain_tar))
    assert out.config_json["config"] == {"Cmd": ["app.handler"]}
    for i, desc in enumerate(client.resolve(src).layers):
        mine = [e for e in events if e.index == i]
        stages = [e.stage for e in mine]
        # Each stage once or more, in order; bytes of the source layer only grow.
        assert sorted(set(stages), key=stages.index) == ["fetch", "convert", "push", "done"]
        assert stages == sorted(stages, key=["fetch", "convert", "push", "done"].index)
        assert all(e.size == desc.size and e.total == 3 for e in mine)
        fetched = [e.done for e in mine if e.stage == "fetch"]
        assert fetched == sorted(fetched) and fetched[-1] == desc.size
        assert mine[-1].done == desc.size
    # The 10 MB layer reports while it converts, not only when it starts.
    assert len([e for e in events if e.index == 0 and e.stage == "convert" and e.done]) >= 5


def test_estargz_layers_are_kept_unless_reprioritized(
    registry: Any, client: RegistryClient
) -> None:
    files = make_tar({"a": b"A" * 5000, "b": b"B" * 5000})
    src = push_image(
        client, f"{registry.host}/keep:1", [(gzip.compress(files), TAR + "+gzip", sha(files))]
    )
    once = Reference.parse(f"{registry.host}/keep:esgz")
    convert_image(client, src, once)
    first = client.resolve(once)
    twice = Reference.parse(f"{registry.host}/keep:esgz2")
    convert_image(client, once, twice)
    again = client.resolve(twice)
    assert [d.digest for d in again.layers] == [d.digest for d in first.layers]
    assert again.diff_ids == first.diff_ids
    # A prioritized list rewrites the layer so the files come first.
    ordered = Reference.parse(f"{registry.host}/keep:ordered")
    convert_image(client, once, ordered, prioritized=["b"])
    layer = client.resolve(ordered).layers[0]
    blob = client.get_blob(ordered, layer.digest)
    toc = read_toc(lambda s, e: blob[s:e], len(blob), layer.annotations[TOC_DIGEST_ANNOTATION])
    assert [e.name for e in toc.entries[:2]] == ["b", estargz.PREFETCH_LANDMARK]
    assert toc.prefetch_end is not None


def test_python_image_converts(registry: Any, python_image: str, client: RegistryClient) -> None:
    dst = Reference.parse(f"{registry.host}/python:converted")
    convert_image(client, Reference.parse(python_image), dst)
    out = client.resolve(dst)
    src = client.resolve(Reference.parse(python_image))
    assert len(out.layers) == len(src.layers)
    assert out.config_json["config"] == src.config_json["config"]
    files = read_files(client, dst, out.layers[-1])
    assert "def handler" in files["var/task/app.py"].decode()


def test_corrupt_layer_is_refused(registry: Any, client: RegistryClient) -> None:
    garbage = gzip.compress(b"not a tar archive at all" * 100)
    src = push_image(client, f"{registry.host}/corrupt:1", [(garbage, TAR + "+gzip", sha(b""))])
    dst = Reference.parse(f"{registry.host}/corrupt:esgz")
    with pytest.raises(CorruptLayer):
        convert_image(client, src, dst)
    with pytest.raises(ImageNotFound):
        client.resolve(dst)
    truncated = gzip.compress(make_tar({"x": os.urandom(100_000)}))[:50_000]
    src = push_image(client, f"{registry.host}/corrupt:2", [(truncated, TAR + "+gzip", sha(b""))])
    with pytest.raises(CorruptLayer):
        convert_image(client, src, dst)


def test_dead_registry(tmp_path: Any) -> None:
    port = imagetools.free_port()
    with RegistryClient(retries=1, timeout=2, backoff=0.01) as c, pytest.raises(RegistryError):
        convert_image(
            c,
            Reference.parse(f"127.0.0.1:{port}/gone:1"),
            Reference.parse(f"127.0.0.1:{port}/gone:2"),
        )
