"""Gzip indexes in a registry: ``warmstart image index REF`` and the lookup at mount.

An image's indexes travel as one OCI artifact in the image's own repository: a manifest
with ``artifactType`` :data:`~warmstart.images.gzindex.ARTIFACT_TYPE`, the empty config,
one index blob per gzip layer (its descriptor annotated with the layer's digest) and the
image manifest as ``subject``. Registries with the OCI referrers API list it under the
image's digest; for those without (Debian's docker-registry 2.8), the pusher keeps the
``sha256-<hex>`` tag of the image digest pointing at an index of referrers, as the OCI
distribution spec's fallback says. The image itself is not touched: clients that know
nothing of indexes pull it as before.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart.images.convert import is_estargz_layer
from warmstart.images.errors import ImageError, ImageNotFound
from warmstart.images.gzindex import (
    ARTIFACT_TYPE,
    DEFAULT_SPACING,
    INDEX_MEDIA_TYPE,
    LAYER_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    TOC_SIZE_ANNOTATION,
    build_index,
)
from warmstart.images.reference import Reference
from warmstart.images.registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageManifest,
    RegistryClient,
    _artifact_descriptors,
    referrers_tag,
)

log = logging.getLogger(__name__)

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
GZIP_LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)


@dataclass(frozen=True)
class IndexEvent:
    """Progress of one layer: ``stage`` is "fetch", "index", "push" or "done" (``index``
    of ``total`` layers, bottom first; ``done`` of ``size`` compressed bytes)."""

    stage: str
    index: int
    total: int
    digest: str
    done: int = 0
    size: int = 0


@dataclass(frozen=True)
class IndexResult:
    """What ``index_image`` pushed."""

    manifest: str  # the image manifest indexed
    artifact: str  # the index artifact's manifest digest
    layers: dict[str, Descriptor]  # layer digest -> its index blob
    referrers_api: bool  # the registry lists referrers itself (no fallback tag)
    index_bytes: int
    image_bytes: int


def indexable(desc: Descriptor) -> bool:
    """A gzip layer that is not eStargz already (an eStargz layer mounts lazily as is)."""
    return desc.media_type in GZIP_LAYER_TYPES and not is_estargz_layer(desc)


def _artifact_manifest(
    subject: ImageManifest, config: Descriptor, layers: list[Descriptor]
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
        "subject": {
            "mediaType": subject.media_type or OCI_MANIFEST,
            "digest": subject.digest,
            "size": len(subject.raw),
        },
        "annotations": {
            "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        },
    }
    return json.dumps(doc, indent=2).encode()


def _update_fallback_tag(
    client: RegistryClient, ref: Reference, subject: str, entry: Descriptor
) -> None:
    """Add ``entry`` to the referrers index under the subject's ``sha256-<hex>`` tag
    (creating it), dropping older indexes of ours: the newest index wins."""
    tag = referrers_tag(subject)
    try:
        current = client.fetch_manifest(ref, tag).json()
    except ImageNotFound:
        current = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    kept = [
        m
        for m in current.get("manifests") or []
        if isinstance(m, dict) and m.get("artifactType") != ARTIFACT_TYPE
    ]
    kept.append({**entry.to_json(), "artifactType": ARTIFACT_TYPE})
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept}
    client.push_manifest(ref.with_tag(tag), json.dumps(doc, indent=2).encode(), OCI_INDEX)


def index_image(
    client: RegistryClient,
    ref: Reference,
    *,
    spacing: int = DEFAULT_SPACING,
    prioritized: list[str] | None = None,
    progress: Callable[[IndexEvent], None] | None = None,
    platform: str = "linux/amd64",
    workdir: Path | None = None,
) -> IndexResult:
    """Index every plain gzip layer of ``ref`` and push the indexes next to the image."""
    manifest = client.resolve(ref, platform)
    total = len(manifest.layers)
    todo = [i for i, d in enumerate(manifest.layers) if indexable(d)]
    if not todo:
        raise ImageError(
            f"image {ref} has no plain gzip layers to index "
            "(eStargz layers mount lazily without one)"
        )

    def report(stage: str, index: int, done: int = 0) -> None:
        if progress is not None:
            desc = manifest.layers[index]
            progress(IndexEvent(stage, index, total, desc.digest, done, desc.size))

    blobs: dict[str, Descriptor] = {}
    index_bytes = 0
    with tempfile.TemporaryDirectory(prefix="warmstart-index-", dir=workdir) as tmp:
        for i in todo:
            desc = manifest.layers[i]
            path = Path(tmp) / f"layer-{i}"
            report("fetch", i)
            client.fetch_blob(ref, desc.digest, path, lambda n, i=i: report("fetch", i, n))  # type: ignore[misc]
            report("index", i)
            with open(path, "rb") as f:
                blob = build_index(
                    f,
                    desc.digest,
                    desc.size,
                    spacing=spacing,
                    prioritized=prioritized or (),
                    progress=lambda n, i=i: report("index", i, n),  # type: ignore[misc]
                )
            path.unlink()
            report("push", i, desc.size)
            pushed = client.push_blob(ref, blob.blob)
            blobs[desc.digest] = Descriptor(
                INDEX_MEDIA_TYPE,
                pushed.digest,
                pushed.size,
                {
                    LAYER_ANNOTATION: desc.digest,
                    TOC_SIZE_ANNOTATION: str(blob.toc_size),
                    TOC_DIGEST_ANNOTATION: blob.toc_digest,
                },
            )
            index_bytes += pushed.size
            report("done", i, desc.size)
            log.info("layer %s indexed: %d bytes of index", desc.digest, pushed.size)
    empty = client.push_blob(ref, EMPTY_CONFIG)
    config = Descriptor(EMPTY_MEDIA_TYPE, empty.digest, empty.size)
    raw = _artifact_manifest(manifest, config, list(blobs.values()))
    digest, api = client.push_referrer(ref, raw, OCI_MANIFEST)
    if not api:
        _update_fallback_tag(
            client, ref, manifest.digest, Descriptor(OCI_MANIFEST, digest, len(raw))
        )
    return IndexResult(
        manifest=manifest.digest,
        artifact=digest,
        layers=blobs,
        referrers_api=api,
        index_bytes=index_bytes,
        image_bytes=sum(d.size for d in manifest.layers),
    )


def _toc_of(desc: Descriptor) -> tuple[int, str] | None:
    """(size, digest) of an index blob's TOC member, from its descriptor's annotations."""
    try:
        size = int(desc.annotations.get(TOC_SIZE_ANNOTATION, ""))
    except ValueError:
        return None
    digest = desc.annotations.get(TOC_DIGEST_ANNOTATION, "")
    if not 0 < size <= desc.size or not digest.startswith("sha256:"):
        return None
    return size, digest


def toc_of(desc: Descriptor) -> tuple[int, str]:
    """(size, digest) of the TOC member of an index blob ``find_index`` returned."""
    found = _toc_of(desc)
    assert found is not None
    return found


def find_index(
    client: RegistryClient, ref: Reference, manifest: ImageManifest
) -> dict[str, Descriptor] | None:
    """The index blob of every indexable layer of ``manifest``, from the newest index
    artifact whose subject it is; None if there is none (or it misses a layer)."""
    found = client.referrers(ref, manifest.digest, ARTIFACT_TYPE)
    if found is None:
        try:
            tagged = client.fetch_manifest(ref, referrers_tag(manifest.digest))
        except ImageNotFound:
            return None
        found = _artifact_descriptors(tagged.json(), ARTIFACT_TYPE, f"{ref} referrers tag")
    for desc in reversed(found):
        try:
            artifact = client.fetch_manifest(ref, desc.digest).json()
        except ImageNotFound:
            continue
        subject = artifact.get("subject")
        if not isinstance(subject, dict) or subject.get("digest") != manifest.digest:
            log.warning("index %s of %s names another subject: ignored", desc.digest, ref)
            continue
        if artifact.get("artifactType") != ARTIFACT_TYPE:
            continue
        layers: dict[str, Descriptor] = {}
        for raw in artifact.get("layers") or []:
            d = Descriptor.from_json(raw, f"index {desc.digest}")
            layer = d.annotations.get(LAYER_ANNOTATION, "")
            if d.media_type == INDEX_MEDIA_TYPE and layer and _toc_of(d) is not None:
                layers[layer] = d
        if all(d.digest in layers for d in manifest.layers if indexable(d)):
            return layers
        log.warning("index %s of %s misses layers: ignored", desc.digest, ref)
    return None
