"""Deployer access checks without a registry: the header's forms, the credential record
that will not show its secret, the policy, the cache of successes (a fake clock, a fake
probe at the registry seam), and how ``warmstart deploy`` gathers the credentials."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from warmstart.cli import main as cli
from warmstart.errors import InvalidParameter
from warmstart.images.access import (
    AccessChecker,
    AccessPolicy,
    CredentialKind,
    RegistryCredential,
)
from warmstart.images.errors import ImageAccessDenied, ImageNotFound
from warmstart.images.reference import Reference


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the header ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        f"Basic {b64('alice:s3cret')}",
        f"basic   {b64('alice:s3cret')}  ",
        b64("alice:s3cret"),  # bare, as in a Docker config.json "auth"
    ],
)
def test_basic_forms(value: str) -> None:
    cred = RegistryCredential.from_header(value)
    assert cred == RegistryCredential(CredentialKind.BASIC, "alice", "s3cret")
    assert cred.authorization() == f"Basic {b64('alice:s3cret')}"


def test_a_password_may_hold_colons_and_be_empty() -> None:
    assert RegistryCredential.from_header(b64("u:a:b:")).secret == "a:b:"
    assert RegistryCredential.from_header(b64("u:")).secret == ""


def test_bearer_form() -> None:
    cred = RegistryCredential.from_header("Bearer eyJhbGciOi.J9x-_~+/=")
    assert cred.kind is CredentialKind.BEARER
    assert cred.authorization() == "Bearer eyJhbGciOi.J9x-_~+/="


@pytest.mark.parametrize(
    "value,why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Digest abc", "unknown scheme"),
        ("Basic not*base64", "not base64"),
        (f"Basic {b64('no-colon')}", "no ':'"),
        (f"Basic {b64(':pw')}", "user name"),
        ("Bearer two words", "token"),
        ("Bearer tok;en", "token"),
        ("Basic " + base64.b64encode(b"u:\xff").decode(), "UTF-8"),
        ("x" * 9000, "longer than"),
    ],
)
def test_malformed_headers_are_refused_without_echoing_them(value: str, why: str) -> None:
    with pytest.raises(InvalidParameter, match="X-Warmstart-Registry-Auth must be") as err:
        RegistryCredential.from_header(value)
    assert why in str(err.value)
    for secret in value.split()[1:] or value.split():
        assert secret not in str(err.value)


def test_the_secret_never_shows_in_repr_or_str() -> None:
    cred = RegistryCredential.basic("alice", "s3cret")
    token = RegistryCredential.bearer("tok3n")
    for text in (repr(cred), str(cred), repr(token), f"{token}", repr([cred])):
        assert "s3cret" not in text and "alice" not in text and "tok3n" not in text
    assert repr(cred) == "RegistryCredential(basic, <hidden>)"


# -- the checker ---------------------------------------------------------------------------
REF = Reference.parse("registry.example:5000/team/app:1")
OTHER_REPO = Reference.parse("registry.example:5000/team/other:1")
ALICE = RegistryCredential.basic("alice", "s3cret")
BOB = RegistryCredential.basic("bob", "hunter2")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """The probe seam: alice may pull the ``allowed`` repositories, nobody else anything;
    records each call."""

    def __init__(self, allowed: tuple[str, ...] = ("team/app",)) -> None:
        self.allowed = allowed
        self.calls: list[tuple[str, RegistryCredential | None]] = []
        self.gate: threading.Event | None = None  # set: each call waits for it
        self.entered = threading.Event()

    def __call__(self, ref: Reference, credential: RegistryCredential | None) -> None:
        self.calls.append((ref.repository, credential))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if ref.tag == "missing":
            raise ImageNotFound(f"{ref}: no such image")
        if credential != ALICE or ref.repository not in self.allowed:
            raise ImageAccessDenied(f"registry refused the credentials given for {ref.repository}")


def checker(
    policy: AccessPolicy | None = None,
) -> tuple[AccessChecker, Registry, Clock]:
    registry, clock = Registry(), Clock()
    return AccessChecker(registry, policy, clock=clock), registry, clock


def run(go: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(go())


def test_a_success_is_remembered_for_the_ttl_per_repository_and_credential() -> None:
    access, registry, clock = checker(AccessPolicy(ttl_s=60))

    async def go() -> None:
        await access.check(REF, ALICE)
        await access.check(REF, ALICE)
        assert len(registry.calls) == 1
        clock.now += 59.9
        await access.check(REF, RegistryCredential.basic("alice", "s3cret"))  # equal value
        assert len(registry.calls) == 1
        clock.now += 0.2  # expired
        await access.check(REF, ALICE)
        assert len(registry.calls) == 2
        # Another repository, or another credential, is its own check.
        with pytest.raises(ImageAccessDenied):
            await access.check(OTHER_REPO, ALICE)
        with pytest.raises(ImageAccessDenied):
            await access.check(REF, BOB)
        assert len(registry.calls) == 4

    run(go)
    stats = access.statistics()
    assert (stats.checks, stats.cache_hits, stats.denied, stats.remembered) == (4, 2, 2, 1)


def test_refusals_are_not_remembered_and_say_who_has_no_access() -> None:
    access, registry, _ = checker()

    async def go() -> None:
        for _ in range(2):
            with pytest.raises(ImageAccessDenied) as err:
                await access.check(REF, BOB)
            message = str(err.value)
            assert "deployer has no access" in message and str(REF) in message
            assert "hunter2" not in message and "bob" not in message
            assert isinstance(err.value, InvalidParameter)  # a 400 for the API

    run(go)
    assert len(registry.calls) == 2


def test_a_ttl_of_zero_checks_every_deploy() -> None:
    access, registry, _ = checker(AccessPolicy(ttl_s=0))

    async def go() -> None:
        for _ in range(3):
            await access.check(REF, ALICE)

    run(go)
    assert len(registry.calls) == 3


def test_without_credentials_the_policy_decides() -> None:
    open_node, registry, _ = checker(AccessPolicy(require_deployer_credentials=False))
    strict, strict_registry, _ = checker(AccessPolicy(require_deployer_credentials=True))

    async def go() -> None:
        await open_node.check(REF, None)  # the node's own credentials will pull it
        assert registry.calls == []
        with pytest.raises(ImageAccessDenied, match="requires the deployer's own") as err:
            await strict.check(REF, None)  # checked anonymously: not public
        assert "X-Warmstart-Registry-Auth" in str(err.value)
        assert strict_registry.calls == [("team/app", None)]
        # Credentials given are checked whatever the policy.
        with pytest.raises(ImageAccessDenied):
            await open_node.check(REF, BOB)

    run(go)


def test_a_missing_image_passes_through() -> None:
    access, _, _ = checker()

    async def go() -> None:
        with pytest.raises(ImageNotFound):
            await access.check(REF.with_tag("missing"), ALICE)

    run(go)


def test_a_burst_of_deploys_makes_one_check() -> None:
    access, registry, _ = checker()
    registry.gate = threading.Event()

    async def go() -> None:
        burst = [asyncio.create_task(access.check(REF, ALICE)) for _ in range(5)]
        assert await asyncio.to_thread(registry.entered.wait, 10)  # the first is held there
        registry.gate.set()
        await asyncio.gather(*burst)

    run(go)
    assert len(registry.calls) == 1
    assert access.statistics().cache_hits == 4


def test_the_cache_keeps_a_keyed_hash_not_the_credential() -> None:
    a, _, _ = checker()
    b, _, _ = checker()
    fp = a.fingerprint(ALICE)
    assert fp == a.fingerprint(RegistryCredential.basic("alice", "s3cret"))
    assert fp != a.fingerprint(BOB) and fp != a.fingerprint(None)
    assert fp != b.fingerprint(ALICE)  # a key of its own per checker (per process)
    assert "s3cret" not in fp and "alice" not in fp
    # Basic alice:x and a bearer token "x" with user "alice" can never collide.
    assert a.fingerprint(RegistryCredential.bearer("s3cret")) != fp


def test_the_cache_stays_bounded() -> None:
    repos = ("r0", "r1", "r2", "r3")
    registry, clock = Registry(allowed=repos), Clock()
    access = AccessChecker(registry, AccessPolicy(ttl_s=60), clock=clock, max_remembered=2)
    refs = [Reference.parse(f"registry.example:5000/{r}:1") for r in repos]

    async def go() -> None:
        for ref in refs:
            await access.check(ref, ALICE)
        assert access.statistics().remembered == 2
        await access.check(refs[3], ALICE)  # the newest are kept
        assert len(registry.calls) == 4
        await access.check(refs[0], ALICE)  # the oldest went
        assert len(registry.calls) == 5

    run(go)


# -- the CLI's side: warmstart deploy --image ... --registry-* ------------------------------
def deploy_args(*extra: str) -> argparse.Namespace:
    return cli._parser("deploy").parse_args(
        ["deploy", "--name", "f", "--endpoint", "http://127.0.0.1:8080", *extra]
    )


IMAGE = ["--image", "registry.example:5000/team/app:1"]


def test_cli_reads_a_password_or_a_token_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    args = deploy_args(*IMAGE, "--registry-user", "alice", "--registry-password-stdin")
    assert cli._registry_auth(args) == {"X-Warmstart-Registry-Auth": ALICE.authorization()}
    monkeypatch.setattr("sys.stdin", io.StringIO("tok3n\r\n"))
    args = deploy_args(*IMAGE, "--registry-token-stdin")
    assert cli._registry_auth(args) == {"X-Warmstart-Registry-Auth": "Bearer tok3n"}
    assert cli._registry_auth(deploy_args(*IMAGE)) == {}


def test_cli_sends_the_docker_config_entry_of_the_images_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {"registry.example:5000": {"auth": b64("alice:s3cret")}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    args = deploy_args(*IMAGE, "--registry-docker-config")
    assert cli._registry_auth(args) == {"X-Warmstart-Registry-Auth": ALICE.authorization()}
    other = deploy_args("--image", "elsewhere.example/app:1", "--registry-docker-config")
    with pytest.raises(cli.CLIError, match=r"no credentials for elsewhere\.example"):
        cli._registry_auth(other)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--registry-user", "alice"], "never taken on the command line"),
        (["--registry-password-stdin"], "needs --registry-user"),
        (["--registry-token-stdin", "--registry-docker-config"], "give one of"),
    ],
)
def test_cli_refuses_unclear_credential_flags(flags: list[str], message: str) -> None:
    with pytest.raises(cli.CLIError, match=message):
        cli._registry_auth(deploy_args(*IMAGE, *flags))


def test_cli_credential_flags_are_for_images_only(tmp_path: Path) -> None:
    args = deploy_args(str(tmp_path), "--registry-token-stdin")
    with pytest.raises(cli.CLIError, match="for --image deployments"):
        cli._deploy(args)


def test_cli_warns_before_sending_credentials_over_plain_http(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("tok3n\n"))
    args = deploy_args(*IMAGE, "--registry-token-stdin", "--endpoint", "http://10.0.0.5:8080")
    cli._registry_auth(args)
    assert "over plain HTTP" in capsys.readouterr().err


# -- cluster mode: the header never leaves the node it was sent to --------------------------
def test_a_forwarded_invocation_does_not_carry_registry_credentials() -> None:
    from types import SimpleNamespace

    from warmstart.api.forwarding import ForwardingMiddleware
    from warmstart.worker.settings import Settings

    sent_headers: list[list[tuple[bytes, bytes]]] = []

    async def forward(
        host: str, port: int, method: str, target: str, headers: Any, body: Any, *a: Any, **k: Any
    ) -> Any:
        sent_headers.append(list(headers))
        async for _ in body:
            pass
        return SimpleNamespace(status=200, headers=[], body=b"{}")

    rec = SimpleNamespace(config=SimpleNamespace(timeout_s=3))
    node = SimpleNamespace(
        name="n1",
        worker=SimpleNamespace(get=lambda name: rec, settings=Settings()),
        place=lambda rec: SimpleNamespace(local=False, url="http://10.0.0.2:8080", node="n2"),
        peers=SimpleNamespace(forward=forward),
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the call should have been forwarded")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/2015-03-31/functions/f/invocations",
        "headers": [
            (b"content-length", b"2"),
            (b"x-warmstart-registry-auth", ALICE.authorization().encode()),
            (b"x-amz-client-context", b"e30="),
        ],
    }
    messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        pass

    asyncio.run(ForwardingMiddleware(app, node)(scope, receive, send))  # type: ignore[arg-type]
    [headers] = sent_headers
    names = [k for k, _ in headers]
    assert b"x-amz-client-context" in names  # other headers do go
    assert b"x-warmstart-registry-auth" not in names
    assert all(b"s3cret" not in v and ALICE.authorization().encode() != v for _, v in headers)
