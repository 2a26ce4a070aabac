"""Convert an image in a registry to eStargz (``warmstart image convert SRC DST``).

Each layer is fetched, decompressed (gzip, zstd or plain tar) and rewritten by
:func:`~warmstart.images.estargz.write_estargz`; the new blobs, a config whose
``rootfs.diff_ids`` name the new uncompressed layers, and an OCI manifest whose layer
descriptors carry the TOC digest and uncompressed size annotations are pushed to DST.

Downloads run ahead in a thread pool and uploads run behind, so the network overlaps
with the (CPU-bound) conversion of the layer in between.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from warmstart.images.errors import ImageError, ImageNotFound
from warmstart.images.estargz import TOC_DIGEST_ANNOTATION, write_estargz
from warmstart.images.reference import Reference
from warmstart.images.registry import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    RegistryClient,
)
from warmstart.images.unpack import compression_of, decompress_stream

log = logging.getLogger(__name__)

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_GZIP_LAYER_TYPES = frozenset({OCI_LAYER_GZIP, "application/vnd.docker.image.rootfs.diff.tar.gzip"})


@dataclass(frozen=True)
class ConvertEvent:
    """Progress of one layer: ``stage`` is "fetch", "convert", "push" or "done"
    (``index`` of ``total`` layers, bottom first); ``done`` of ``size`` bytes of the
    source layer (compressed) went through the stage so far."""

    stage: str
    index: int
    total: int
    digest: str  # the source layer's digest
    done: int = 0
    size: int = 0


# A converting layer reports its progress after each this many source bytes.
PROGRESS_STEP = 1 << 20


class _Counted(io.RawIOBase):
    """A raw file that calls ``seen(bytes read so far)`` every ``PROGRESS_STEP`` bytes."""

    def __init__(self, raw: BinaryIO, seen: Callable[[int], None]) -> None:
        self.raw, self.seen, self.count, self.next_report = raw, seen, 0, PROGRESS_STEP

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.count += n
            if self.count >= self.next_report:
                self.next_report = self.count + PROGRESS_STEP
                self.seen(self.count)
        return n or 0

    def close(self) -> None:
        self.raw.close()
        super().close()


Progress = Callable[[ConvertEvent], None]


def is_estargz_layer(desc: Descriptor) -> bool:
    """True for a gzip layer whose descriptor pins a TOC: already lazily pullable."""
    return desc.media_type in _GZIP_LAYER_TYPES and bool(
        desc.annotations.get(TOC_DIGEST_ANNOTATION)
    )


def _check_convertible(desc: Descriptor) -> None:
    if "foreign" in desc.media_type or "nondistributable" in desc.media_type:
        raise ImageError(f"layer {desc.digest} is non-distributable ({desc.media_type})")
    if compression_of(desc.media_type) is None:
        raise ImageError(f"layer {desc.digest} has an unknown media type {desc.media_type!r}")


def build_config(config_json: dict[str, Any], diff_ids: list[str]) -> bytes:
    """The image config with its layers' uncompressed digests replaced."""
    config = dict(config_json)
    rootfs = dict(config.get("rootfs") or {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = list(diff_ids)
    config["rootfs"] = rootfs
    return json.dumps(config, separators=(",", ":"), sort_keys=False).encode()


def build_manifest(
    config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None
) -> bytes:
    """An OCI image manifest for the converted image."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()


def _blob_present(client: RegistryClient, ref: Reference, desc: Descriptor) -> bool:
    try:
        return client.blob_size(ref, desc.digest) == desc.size
    except ImageNotFound:
        return False


def convert_image(
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    *,
    prioritized: Sequence[str] | None = None,
    progress: Progress | None = None,
    platform: str = "linux/amd64",
    workdir: Path | None = None,
    chunk_size: int | None = None,
) -> str:
    """Rewrite image ``src`` as eStargz, push it as ``dst`` and return the manifest digest.

    ``prioritized`` lists paths (relative to the image root, in first-use order) to put
    before each layer's prefetch landmark. Layers that are already eStargz are kept as they
    are, unless ``prioritized`` is given (they are then rewritten to carry the new order).
    Temporary blobs live under ``workdir`` (default: the system temporary directory).
    """
    manifest = client.resolve(src, platform)
    diff_ids = manifest.diff_ids
    total = len(manifest.layers)
    for desc in manifest.layers:
        if prioritized or not is_estargz_layer(desc):
            _check_convertible(desc)

    def report(stage: str, index: int, done: int = 0) -> None:
        if progress is not None:
            desc = manifest.layers[index]
            progress(ConvertEvent(stage, index, total, desc.digest, done, desc.size))

    with (
        tempfile.TemporaryDirectory(prefix="warmstart-convert-", dir=workdir) as tmp,
        ThreadPoolExecutor(max_workers=3, thread_name_prefix="convert-net") as net,
    ):
        tmpdir = Path(tmp)

        def fetch(index: int) -> Path:
            desc = manifest.layers[index]
            report("fetch", index)
            path = tmpdir / f"src-{index}"
            client.fetch_blob(src, desc.digest, path, lambda n: report("fetch", index, n))
            return path

        def copy_as_is(index: int) -> Descriptor:
            desc = manifest.layers[index]
            if not _blob_present(client, dst, desc):
                path = fetch(index)
                client.push_blob(dst, path, desc.digest)
                path.unlink()
            report("done", index, desc.size)
            return Descriptor(OCI_LAYER_GZIP, desc.digest, desc.size, dict(desc.annotations))

        def push(index: int, path: Path, desc: Descriptor) -> Descriptor:
            source_size = manifest.layers[index].size
            report("push", index, source_size)
            client.push_blob(dst, path, desc.digest)
            path.unlink()
            report("done", index, source_size)
            return desc

        fetches: dict[int, Future[Path]] = {}
        results: list[Future[Descriptor]] = []
        new_diff_ids = list(diff_ids)
        for index, desc in enumerate(manifest.layers):
            if prioritized or not is_estargz_layer(desc):
                fetches[index] = net.submit(fetch, index)
        for index, desc in enumerate(manifest.layers):
            if index not in fetches:
                results.append(net.submit(copy_as_is, index))
                continue
            src_path = fetches.pop(index).result()
            report("convert", index)
            out_path = tmpdir / f"estargz-{index}"
            counted = _Counted(
                open(src_path, "rb", buffering=0),  # noqa: SIM115 (closed with the stream)
                lambda n, index=index: report("convert", index, n),  # type: ignore[misc]
            )
            with (
                decompress_stream(counted, desc.media_type) as stream,  # type: ignore[arg-type]
                open(out_path, "wb") as out,
            ):
                kwargs: dict[str, Any] = {"prioritized": prioritized}
                if chunk_size:
                    kwargs["chunk_size"] = chunk_size
                layer = write_estargz(stream, out, **kwargs)
            src_path.unlink()
            new_diff_ids[index] = layer.diff_id
            new_desc = Descriptor(OCI_LAYER_GZIP, layer.digest, layer.size, layer.annotations())
            results.append(net.submit(push, index, out_path, new_desc))
            log.info(
                "layer %d/%d %s -> %s (%d -> %d bytes)",
                index + 1,
                total,
                desc.digest,
                layer.digest,
                desc.size,
                layer.size,
            )
        layers = [f.result() for f in results]

    config_raw = build_config(manifest.config_json, new_diff_ids)
    config = client.push_blob(dst, config_raw)
    config = Descriptor(OCI_CONFIG, config.digest, config.size)
    raw = build_manifest(config, layers, _manifest_annotations(manifest))
    return client.push_manifest(dst, raw, OCI_MANIFEST)


def _manifest_annotations(manifest: ImageManifest) -> dict[str, str]:
    try:
        doc = json.loads(manifest.raw)
    except ValueError:
        return {}
    found = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}
