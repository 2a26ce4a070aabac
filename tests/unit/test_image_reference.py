"""Image references and the registry client's pure parsing helpers."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from warmstart.errors import InvalidParameter, NotFound
from warmstart.images.credentials import DockerCredentials
from warmstart.images.errors import AuthError, ImageNotFound, InvalidReference
from warmstart.images.reference import DOCKER_HUB, Reference, check_digest
from warmstart.images.registry import (
    _merge_ranges,
    _parse_content_range,
    _parse_multipart,
    parse_challenge,
    select_platform,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "shown"),
    [
        ("127.0.0.1:5000/fn:1", "127.0.0.1:5000", "fn", "1", None, "127.0.0.1:5000/fn:1"),
        (
            "python:3.11",
            DOCKER_HUB,
            "library/python",
            "3.11",
            None,
            "docker.io/library/python:3.11",
        ),
        ("python", DOCKER_HUB, "library/python", "latest", None, "docker.io/library/python:latest"),
        ("user/app", DOCKER_HUB, "user/app", "latest", None, "docker.io/user/app:latest"),
        (
            "docker.io/python:3",
            DOCKER_HUB,
            "library/python",
            "3",
            None,
            "docker.io/library/python:3",
        ),
        ("index.docker.io/a/b", DOCKER_HUB, "a/b", "latest", None, "docker.io/a/b:latest"),
        ("localhost/fn", "localhost", "fn", "latest", None, "localhost/fn:latest"),
        ("localhost:5000/a/b/c:v1.2_3", "localhost:5000", "a/b/c", "v1.2_3", None, None),
        ("[::1]:5000/fn:1", "[::1]:5000", "fn", "1", None, "[::1]:5000/fn:1"),
        ("ghcr.io/org/img@" + D, "ghcr.io", "org/img", None, D, "ghcr.io/org/img@" + D),
        ("ghcr.io/org/img:t@" + D, "ghcr.io", "org/img", "t", D, "ghcr.io/org/img:t@" + D),
        ("reg.example.com/my-app__x.y:1", "reg.example.com", "my-app__x.y", "1", None, None),
    ],
)
def test_parse(
    text: str,
    registry: str,
    repository: str,
    tag: str | None,
    digest: str | None,
    shown: str | None,
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert str(ref) == (shown or text)
    assert Reference.parse(str(ref)) == ref  # the printed form parses back to the same


@pytest.mark.parametrize(
    "text",
    [
        "",
        " python",
        "Python:3",
        "repo:tag with space",
        "repo:",
        "repo@sha256:abc",
        "repo@md5:" + "0" * 32,
        "repo@sha256:" + "A" * 64,
        "a/../b",
        "host:5000/",
        "host:5000/UPPER",
        "repo:-tag",
        "re//po",
        "-repo",
        "repo:" + "t" * 129,
    ],
)
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidReference):
        Reference.parse(text)


def test_invalid_reference_is_an_invalid_parameter() -> None:
    with pytest.raises(InvalidParameter):
        Reference.parse("NOT VALID")


def test_with_digest_and_tag() -> None:
    ref = Reference.parse("127.0.0.1:5000/fn:1")
    assert str(ref.with_digest(D)) == f"127.0.0.1:5000/fn:1@{D}"
    assert ref.with_digest(D).reference == D
    assert ref.reference == "1"
    assert str(ref.with_tag("2")) == "127.0.0.1:5000/fn:2"
    with pytest.raises(InvalidReference):
        ref.with_digest("sha256:../../etc/passwd")
    with pytest.raises(InvalidReference):
        ref.with_tag("bad tag")


@pytest.mark.parametrize(
    "digest",
    ["sha256:" + "0" * 63, "sha256:" + "0" * 64 + "\n", "sha256:/../" + "0" * 60, "0" * 64, 5],
)
def test_check_digest_refuses_anything_loose(digest: object) -> None:
    with pytest.raises(InvalidReference):
        check_digest(digest)  # type: ignore[arg-type]
    assert check_digest("sha512:" + "f" * 128).startswith("sha512:")


# -- registry helpers --------------------------------------------------------------------
def test_merge_ranges() -> None:
    assert _merge_ranges([(10, 20), (0, 5), (5, 8), (15, 30), (40, 40), (50, 60)]) == [
        (0, 8),
        (10, 30),
        (50, 60),
    ]


def test_content_range() -> None:
    assert _parse_content_range("bytes 10-19/100") == (10, 20)
    assert _parse_content_range("bytes 0-0/*") == (0, 1)
    assert _parse_content_range("bytes */100") is None
    assert _parse_content_range(None) is None


def test_multipart_uses_content_range_lengths() -> None:
    boundary = "XyZ"
    part_a = b"--XyZ" + b"\r\n--XyZ--"  # data that contains the boundary itself
    body = (
        b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-13/100"
        b"\r\n\r\n" + part_a + b"\r\n--XyZ\r\nContent-Range: bytes 50-52/100\r\n\r\nabc"
        b"\r\n--XyZ--\r\n"
    )
    assert _parse_multipart(body, boundary) == [(0, part_a), (50, b"abc")]
    with pytest.raises(ValueError):
        _parse_multipart(b"--XyZ\r\nContent-Range: bytes 0-99/100\r\n\r\nshort", boundary)


def test_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_docker_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "127.0.0.1:5000": {"auth": base64.b64encode(b"alice:s3:cret").decode()},
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"bob:pw").decode()},
                    "https://ghcr.io": {"username": "carol", "password": "tok"},
                    "empty.example": {},
                },
                "credsStore": "desktop",
            }
        )
    )
    assert DockerCredentials(path).static() == {
        "127.0.0.1:5000": ("alice", "s3:cret"),
        DOCKER_HUB: ("bob", "pw"),
        "ghcr.io": ("carol", "tok"),
    }
    assert DockerCredentials(tmp_path / "missing.json").static() == {}
    path.write_text('{"auths": {"h": {"auth": "not base64!"}}}')
    with pytest.raises(AuthError):
        DockerCredentials(path).static()
    path.write_text("{not json")
    with pytest.raises(AuthError):
        DockerCredentials(path).static()


def _entry(os_: str, arch: str, variant: str | None = None, n: int = 1) -> dict[str, object]:
    platform = {"os": os_, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + f"{n:064x}",
        "size": 100 + n,
        "platform": platform,
    }


def test_select_platform() -> None:
    index = {
        "manifests": [
            _entry("unknown", "unknown", n=1),  # an attestation manifest
            _entry("linux", "arm64", "v8", n=2),
            _entry("linux", "amd64", n=3),
            _entry("linux", "arm", "v7", n=4),
        ]
    }
    assert select_platform(index, "linux/amd64", "x").size == 103
    assert select_platform(index, "linux/arm64", "x").size == 102
    assert select_platform(index, "linux/arm/v7", "x").size == 104
    with pytest.raises(ImageNotFound, match="linux/amd64"):
        select_platform(index, "linux/s390x", "x")
    # The API and the CLI see a missing image as the common NotFound.
    with pytest.raises(NotFound):
        select_platform(index, "linux/s390x", "x")
