"""Plain gzip images made lazily mountable by a gzip index (``warmstart image index``).

The image stays as it was pushed (umoci's gzip layers, skopeo); the index is pushed next
to it in the real registry (Debian's docker-registry, which has no referrers API: the
``sha256-<hex>`` tag fallback), and a node deploying the image finds it and mounts the
image lazily instead of pulling it.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import httpx
import pytest

from tests import imagetools
from tests.conftest import Server, needs_root, wait_until
from tests.integration.test_image_functions import create_image_function, invoke

pytestmark = [pytest.mark.integration, needs_root]

ARTIFACT = "application/vnd.warmstart.gzip-index.v1"


def _copy(registry: Any, src: str, name: str) -> str:
    """The session's python image under a repository of its own (an index pushed next
    to it must not change what other tests deploy)."""
    ref = f"{registry.host}/{name}:1"
    imagetools.copy_image(src, ref)
    return ref


def _manifest_digest(registry: Any, ref: str) -> str:
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")
    r = httpx.head(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    r.raise_for_status()
    return str(r.headers["docker-content-digest"])


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _first_invocation(server_factory: Any, name: str, ref: str, n: int) -> tuple[Server, Any]:
    """A node deploys the image as function ``name`` and invokes it once (it must
    succeed); the node and the invocation's result."""
    server: Server = server_factory()
    lam = server.lambda_client()
    create_image_function(lam, name, ref)
    resp, body = invoke(lam, name, {"n": n})
    assert "FunctionError" not in resp, body
    return server, body


def _metrics(server: Server) -> str:
    with server.http() as http:
        return str(http.get("/metrics").text)


def test_indexed_plain_gzip_image_mounts_lazily(
    server_factory: Any, registry: Any, python_image: str
) -> None:
    ref = _copy(registry, python_image, "pyindexed")
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", ref, "--spacing", "1048576"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "indexed" in res.stdout and "sha256-" in res.stdout, res.stdout
    # Progress on stderr, a line per layer and stage (not a terminal).
    assert res.stderr.count(": done") >= 1, res.stderr

    # The registry has no referrers API: the fallback tag lists the artifact.
    subject = _manifest_digest(registry, ref)
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    r = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/sha256-{subject[7:]}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    r.raise_for_status()
    listed = [m for m in r.json()["manifests"] if m.get("artifactType") == ARTIFACT]
    assert len(listed) == 1
    r = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{listed[0]['digest']}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    artifact = r.json()
    assert artifact["subject"]["digest"] == subject
    assert artifact["artifactType"] == ARTIFACT

    server, body = _first_invocation(server_factory, "indexed", ref, 1)
    assert body == {"python": "/usr/bin/python3", "event": {"n": 1}}
    metrics = _metrics(server)
    assert _metric(metrics, "warmstart_image_indexed_mounts_total") == 1.0
    assert _metric(metrics, "warmstart_image_pulls_total") == 0.0
    image_bytes = sum(
        layer["size"]
        for layer in httpx.get(
            f"{registry.url}/v2/{repo}/manifests/1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        ).json()["layers"]
    )
    fetched = _metric(metrics, "warmstart_image_lazy_bytes_fetched_total")
    assert 0 < fetched < image_bytes

    # Indexing again replaces the artifact in the fallback tag (one, the newest).
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", ref], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    r = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/sha256-{subject[7:]}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    assert len([m for m in r.json()["manifests"] if m.get("artifactType") == ARTIFACT]) == 1


def test_an_image_without_an_index_is_pulled_in_full(
    server_factory: Any, registry: Any, python_image: str
) -> None:
    ref = _copy(registry, python_image, "pynoindex")
    server, _body = _first_invocation(server_factory, "plain", ref, 2)
    metrics = _metrics(server)
    assert _metric(metrics, "warmstart_image_pulls_total") == 1.0
    assert _metric(metrics, "warmstart_image_indexed_mounts_total") == 0.0


def test_index_of_an_estargz_only_image_is_refused(
    registry: Any, python_image: str, tmp_path: Any
) -> None:
    esgz = f"{registry.host}/pyesgz-index:1"
    subprocess.run(
        [".venv/bin/warmstart", "image", "convert", python_image, esgz],
        check=True,
        capture_output=True,
    )
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", esgz], capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "no plain gzip layers" in res.stderr


def test_index_cli_help_and_bad_spacing(registry: Any) -> None:
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--spacing" in res.stdout
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", f"{registry.host}/x:1", "--spacing", "10"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "--spacing" in res.stderr


def test_index_with_a_profile_prefetches_the_handlers_files(
    server_factory: Any, registry: Any, python_image: str
) -> None:
    """``--profile`` runs the handler once and names the files it opened in the index;
    the mount fetches their spans before the function starts."""
    ref = _copy(registry, python_image, "pyprofiled")
    res = subprocess.run(
        [".venv/bin/warmstart", "image", "index", ref, "--profile", "--handler", "app.handler"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "profile:" in res.stderr
    server, _body = _first_invocation(server_factory, "profiled", ref, 3)
    run = server.data_dir / "images" / "lazy" / "run"

    def stats() -> dict[str, Any]:
        [path] = run.glob("*.stats.json")
        found: dict[str, Any] = json.loads(path.read_text())
        return found

    # The stats file is rewritten every so often: wait for the prefetch's own record.
    wait_until(lambda: stats()["prefetch"]["done"], "the prefetch to be recorded", timeout=30)
    assert stats()["prefetch"]["chunks"] > 0, stats()
    assert stats()["verify_errors"] == 0


def test_a_registry_with_the_referrers_api_lists_the_index(
    server_factory: Any, registry: Any, python_image: str
) -> None:
    """Where the registry has the referrers API, the index is found through it: no
    fallback tag is written or read."""
    proxy = imagetools.ReferrersProxy(registry.url)
    try:
        ref = _copy(registry, python_image, "pyreferrers").replace(registry.host, proxy.host)
        res = subprocess.run(
            [".venv/bin/warmstart", "image", "index", ref], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        assert "referrers API" in res.stdout, res.stdout
        assert len(proxy.referrers) == 1
        subject = next(iter(proxy.referrers))[1]
        repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
        tag = httpx.get(f"{registry.url}/v2/{repo}/manifests/sha256-{subject[7:]}")
        assert tag.status_code == 404  # no fallback tag was written
        server, _body = _first_invocation(server_factory, "referred", ref, 4)
        metrics = _metrics(server)
        assert _metric(metrics, "warmstart_image_indexed_mounts_total") == 1.0
        assert proxy.fallback_reads == 0
    finally:
        proxy.close()


def test_a_broken_index_costs_the_lazy_start_not_the_function(
    server_factory: Any, registry: Any, python_image: str
) -> None:
    """An index artifact whose blobs are not indexes (damaged, or pushed by something
    else): the node says so in its log and /metrics and pulls the image in full."""
    import gzip as gz

    from warmstart.images import indexes
    from warmstart.images.gzindex import (
        INDEX_MEDIA_TYPE,
        LAYER_ANNOTATION,
        TOC_DIGEST_ANNOTATION,
        TOC_SIZE_ANNOTATION,
    )
    from warmstart.images.reference import Reference
    from warmstart.images.registry import OCI_MANIFEST, Descriptor, RegistryClient

    ref = _copy(registry, python_image, "pybroken")
    parsed = Reference.parse(ref)
    with RegistryClient() as client:
        manifest = client.resolve(parsed)
        junk = gz.compress(b"not an index at all")
        pushed = client.push_blob(parsed, junk)
        layers = [
            Descriptor(
                INDEX_MEDIA_TYPE,
                pushed.digest,
                pushed.size,
                {
                    LAYER_ANNOTATION: layer.digest,
                    TOC_SIZE_ANNOTATION: str(len(junk)),
                    TOC_DIGEST_ANNOTATION: pushed.digest,
                },
            )
            for layer in manifest.layers
        ]
        empty = client.push_blob(parsed, indexes.EMPTY_CONFIG)
        config = Descriptor(indexes.EMPTY_MEDIA_TYPE, empty.digest, empty.size)
        raw = indexes._artifact_manifest(manifest, config, layers)
        digest, api = client.push_referrer(parsed, raw, OCI_MANIFEST)
        assert not api
        indexes._update_fallback_tag(
            client, parsed, manifest.digest, Descriptor(OCI_MANIFEST, digest, len(raw))
        )
    server, _body = _first_invocation(server_factory, "broken", ref, 5)
    metrics = _metrics(server)
    assert _metric(metrics, "warmstart_image_index_failures_total") == 1.0
    assert _metric(metrics, "warmstart_image_pulls_total") == 1.0
    assert _metric(metrics, "warmstart_image_indexed_mounts_total") == 0.0
    assert "cannot be mounted" in server.log()
