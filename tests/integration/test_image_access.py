"""Tenant safety: an image cached on a node is used only for a deployer who may pull it.

Real registries on loopback: one behind token authentication (``imagetools.TokenServer``
grants pulls per user and repository: alice may pull ``private/*``, bob only ``bobs/*``,
anyone ``public/*``, the node everything), one behind htpasswd Basic authentication with
two users.  The node pulls with its own credentials (its Docker config); deployers send
theirs in ``X-Warmstart-Registry-Auth`` -- from boto3 through an event hook, from the CLI
through ``--registry-user`` and stdin.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests import imagetools
from tests.conftest import Server, needs_root, wait_until
from tests.imagetools import TokenServer

pytestmark = [pytest.mark.integration, needs_root]

HEADER = "X-Warmstart-Registry-Auth"
NODE = ("node", "n0de-pw")
ALICE = ("alice", "s3cret")
BOB = ("bob", "hunter2")
SECRETS = [NODE[1], ALICE[1], BOB[1]]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def as_deployer(lam: Any, auth: str) -> Any:
    """A boto3 Lambda client whose image deploys carry ``auth`` (the documented hook)."""

    def add_registry_auth(request: Any, **_: Any) -> None:
        request.headers[HEADER] = auth

    for op in ("CreateFunction", "UpdateFunctionCode", "UpdateFunctionConfiguration"):
        lam.meta.events.register(f"before-sign.lambda.{op}", add_registry_auth)
    return lam


def create(lam: Any, name: str, uri: str) -> dict[str, Any]:
    out: dict[str, Any] = lam.create_function(
        FunctionName=name,
        PackageType="Image",
        Code={"ImageUri": uri},
        Role="arn:aws:iam::000000000000:role/test",
    )
    return out


def refused(call: Any) -> str:
    """Run ``call``; it must fail as a deploy of an image the caller may not use does."""
    with pytest.raises(ClientError) as err:
        call()
    error = err.value.response["Error"]
    assert error["Code"] == "InvalidParameterValueException", error
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message: str = error["Message"]
    assert message.startswith("Access denied to image"), message
    return message


def copy(src: str, dst: str) -> str:
    imagetools.run(
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--dest-creds",
        ":".join(NODE),
        f"docker://{src}",
        f"docker://{dst}",
    )
    return dst


def node_docker_config(path: Path, *hosts: str) -> Path:
    """A Docker config holding the node's credentials for ``hosts``."""
    path.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(":".join(NODE).encode()).decode()
    (path / "config.json").write_text(json.dumps({"auths": {h: {"auth": auth} for h in hosts}}))
    return path


def metric(server: Server, name: str) -> float:
    with server.http() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(f"warmstart_{name} "):
                return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="module")
def small_app(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer image whose CMD names a handler, in the open registry."""
    return imagetools.build_image(
        tmp_path_factory.mktemp("tenant-image"),
        [{"var/task/app.py": "def handler(event, context):\n    return 'ok'\n"}],
        ref=f"{registry.host}/tenant-app:1",
        cmd=["app.handler"],
    )


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, small_app: str
) -> Iterator[tuple[Any, TokenServer]]:
    root = tmp_path_factory.mktemp("tenant-token-registry")
    tokens = TokenServer(
        root,
        {
            NODE[0]: (NODE[1], ("*",)),
            ALICE[0]: (ALICE[1], ("private/*",)),
            BOB[0]: (BOB[1], ("bobs/*",)),
        },
        public=("public/*",),
    )
    reg = imagetools.start_registry(root / "reg", auth_yaml=tokens.auth_yaml())
    for repo in ("private/app", "public/app", "bobs/app"):
        copy(small_app, f"{reg.host}/{repo}:1")
    yield reg, tokens
    reg.stop()
    tokens.close()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, small_app: str) -> Iterator[Any]:
    import bcrypt

    root = tmp_path_factory.mktemp("tenant-basic-registry")
    (root / "htpasswd").write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, password in (NODE, ALICE, BOB)
        )
    )
    reg = imagetools.start_registry(
        root / "reg",
        auth_yaml=f"  htpasswd:\n    realm: warmstart-test\n    path: {root / 'htpasswd'}\n",
    )
    copy(small_app, f"{reg.host}/app:1")
    yield reg
    reg.stop()


def test_a_cached_image_is_used_only_for_a_deployer_who_may_pull_it(
    server_factory: Any,
    token_registry: tuple[Any, TokenServer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    reg, tokens = token_registry
    private, public = f"{reg.host}/private/app:1", f"{reg.host}/public/app:1"
    monkeypatch.setenv("DOCKER_CONFIG", str(node_docker_config(tmp_path / "docker", reg.host)))
    server: Server = server_factory(
        "--require-deployer-credentials",
        "--registry-access-ttl",
        "3600",
        "--image-pull",
        "full",
        "--log-level",
        "debug",
    )
    alice = as_deployer(server.lambda_client(), basic(*ALICE))
    bob = as_deployer(server.lambda_client(), basic(*BOB))
    anonymous = server.lambda_client()

    # Alice deploys the private image; the node pulls it (with its own credentials).
    create(alice, "a1", private)
    wait_until(lambda: metric(server, "image_pulls_total") == 1, "the image to be pulled")
    assert tokens.asked_by(ALICE[0]) == 1

    # Every byte of it is on the node now, yet bob may not use it...
    message = refused(lambda: create(bob, "b1", private))
    assert "the deployer has no access" in message and private in message
    refused(lambda: bob.update_function_code(FunctionName="a1", ImageUri=private))
    refused(
        lambda: bob.update_function_configuration(
            FunctionName="a1", ImageConfig={"Command": ["app.handler"]}
        )
    )
    # ...nor anyone without credentials on a node that requires them.
    message = refused(lambda: create(anonymous, "n1", private))
    assert "requires the deployer's own registry credentials" in message
    assert [f["FunctionName"] for f in alice.list_functions()["Functions"]] == ["a1"]
    # Bob's refusals were each asked of the registry (refusals are not remembered).
    assert tokens.asked_by(BOB[0]) == 3

    # A public image needs no credentials; bob's own repository is his to deploy.
    create(anonymous, "p1", public)
    create(bob, "b2", f"{reg.host}/bobs/app:1")

    # Within the TTL alice's deploys of the repository ask the registry nothing more.
    create(alice, "a2", private)
    alice.update_function_code(FunctionName="a1", ImageUri=private)
    alice.update_function_configuration(FunctionName="a1", ImageConfig={"Command": ["app.handler"]})
    assert tokens.asked_by(ALICE[0]) == 1
    assert metric(server, "image_access_cache_hits_total") == 3
    assert metric(server, "image_access_denied_total") == 4
    assert metric(server, "image_pulls_total") == 1  # nothing was pulled again

    log = server.log()
    # The checks are in the (debug) log, the credentials they used are not.
    assert f"HEAD http://{reg.host}/v2/private/app/manifests/1" in log
    for secret in [*SECRETS, basic(*ALICE).split()[1], basic(*BOB).split()[1]]:
        assert secret not in log


def test_cli_deploy_with_the_deployers_registry_credentials(
    server_factory: Any,
    token_registry: tuple[Any, TokenServer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    reg, _ = token_registry
    private = f"{reg.host}/private/app:1"
    monkeypatch.setenv("DOCKER_CONFIG", str(node_docker_config(tmp_path / "node", reg.host)))
    server: Server = server_factory("--require-deployer-credentials")

    def deploy(name: str, *flags: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        # --no-wait: the image (no python3) is about access, not about running.
        cmd = [".venv/bin/warmstart", "deploy", "--image", private, "--name", name, "--no-wait"]
        return subprocess.run(
            [*cmd, "--endpoint", server.url, *flags],
            input=stdin,
            capture_output=True,
            text=True,
        )

    res = deploy("cli-bob", "--registry-user", BOB[0], "--registry-password-stdin", stdin="hunter2")
    assert res.returncode == 2
    assert "InvalidParameterValueException: Access denied to image" in res.stderr
    assert "the deployer has no access" in res.stderr and "hunter2" not in res.stderr
    res = deploy(
        "cli-alice", "--registry-user", ALICE[0], "--registry-password-stdin", stdin="s3cret\n"
    )
    assert res.returncode == 0, res.stderr
    assert "created cli-alice" in res.stdout
    # The same from the deployer's own Docker config (their login, not the node's).
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "alice"))
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "config.json").write_text(
        json.dumps({"auths": {reg.host: {"auth": basic(*ALICE).split()[1]}}})
    )
    res = deploy("cli-alice", "--registry-docker-config")  # exists: UpdateFunctionCode
    assert res.returncode == 0, res.stderr
    assert "updated cli-alice" in res.stdout
    assert "s3cret" not in server.log() and "hunter2" not in server.log()


def test_basic_auth_registry_and_the_single_tenant_default(
    server_factory: Any, basic_registry: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """htpasswd knows users, not repositories: alice and bob may both pull; an unknown
    user or a wrong password may not.  Without --require-deployer-credentials a deploy
    without credentials is the node's own, as on a single-tenant node."""
    image = f"{basic_registry.host}/app:1"
    monkeypatch.setenv(
        "DOCKER_CONFIG", str(node_docker_config(tmp_path / "docker", basic_registry.host))
    )
    server: Server = server_factory("--registry-access-ttl", "0")
    create(server.lambda_client(), "node-own", image)
    create(as_deployer(server.lambda_client(), basic(*ALICE)), "alice", image)
    create(as_deployer(server.lambda_client(), basic(*BOB)), "bob", image)
    for auth in (basic("bob", "wrong"), basic("mallory", BOB[1])):
        stranger = as_deployer(server.lambda_client(), auth)
        message = refused(lambda: create(stranger, "x", image))  # noqa: B023 (called here)
        assert "the deployer has no access" in message
    # A malformed header is a clear 400 that does not echo it.
    with pytest.raises(ClientError) as err:
        create(as_deployer(server.lambda_client(), "Basic not*base64"), "y", image)
    assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
    assert "X-Warmstart-Registry-Auth must be" in err.value.response["Error"]["Message"]
    assert "not*base64" not in err.value.response["Error"]["Message"]
    assert metric(server, "image_access_checks_total") == 4  # TTL 0: every deploy checked
    assert metric(server, "image_access_cache_hits_total") == 0
