"""Docker logins: config.json entries and credential helpers run as Docker runs them.

The helpers here are real executables on PATH speaking the helpers' protocol (server URL
on stdin, ``{"Username", "Secret"}`` on stdout, "credentials not found" and a non-zero
exit when they hold nothing); each records the server URL it was asked for.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmstart.images.credentials import (
    DOCKER_HUB_SERVER,
    IDENTITY_TOKEN_USER,
    DockerCredentials,
    Login,
)
from warmstart.images.errors import AuthError
from warmstart.images.reference import DOCKER_HUB

# A helper: answers from a JSON file of server URL -> [user, secret]; logs each question.
HELPER = """#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> "{log}"
exec python3 -c '
import json, sys
known = json.load(open(sys.argv[1]))
server = sys.argv[2]
if server not in known:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = known[server]
print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
' "{store}" "$server"
"""


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield bin_dir


def make_helper(bin_dir: Path, name: str, known: dict[str, list[str]]) -> Path:
    """``docker-credential-<name>``; returns the file it logs questions to."""
    store = bin_dir / f"{name}.json"
    store.write_text(json.dumps(known))
    log = bin_dir / f"{name}.log"
    exe = bin_dir / f"docker-credential-{name}"
    exe.write_text(HELPER.format(log=log, store=store))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return log


def write_config(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_creds_store_answers_for_every_host(tmp_path: Path, helpers: Path) -> None:
    log = make_helper(
        helpers,
        "vault",
        {"reg.example:5000": ["alice", "s3cret"], DOCKER_HUB_SERVER: ["bob", "pw"]},
    )
    # Docker leaves an empty auths entry for hosts whose login is in the store.
    logins = DockerCredentials(
        write_config(tmp_path, {"auths": {"reg.example:5000": {}}, "credsStore": "vault"})
    )
    assert logins.get("reg.example:5000") == Login("alice", "s3cret")
    assert logins.get(DOCKER_HUB) == Login("bob", "pw")  # asked by its v1 index URL
    assert logins.get("other.example") is None  # "not found": anonymous
    assert log.read_text().split() == ["reg.example:5000", DOCKER_HUB_SERVER, "other.example"]
    # Answers are kept: no second run for the same host.
    assert logins.get("reg.example:5000") == Login("alice", "s3cret")
    assert logins.helper_runs == 3
    logins.forget("reg.example:5000")
    assert logins.get("reg.example:5000") == Login("alice", "s3cret")
    assert logins.helper_runs == 4


def test_cred_helpers_win_over_the_store_and_the_file(tmp_path: Path, helpers: Path) -> None:
    make_helper(helpers, "store", {"a.example": ["from-store", "1"]})
    ecr_log = make_helper(helpers, "ecr", {"a.example": ["from-ecr", "2"]})
    path = write_config(
        tmp_path,
        {
            "auths": {"b.example": {"auth": base64.b64encode(b"from-file:3").decode()}},
            "credsStore": "store",
            "credHelpers": {"https://a.example": "ecr"},
        },
    )
    logins = DockerCredentials(path)
    assert logins.get("a.example") == Login("from-ecr", "2")
    assert ecr_log.read_text().split() == ["a.example"]
    # The store has nothing for b.example: the file's entry is used.
    assert logins.get("b.example") == Login("from-file", "3")
    # Explicit logins win over everything.
    explicit = DockerCredentials(path, overrides={"a.example": ("me", "pw")})
    assert explicit.get("a.example") == Login("me", "pw")


def test_identity_tokens(tmp_path: Path, helpers: Path) -> None:
    make_helper(helpers, "tok", {"t.example": [IDENTITY_TOKEN_USER, "refresh-me"]})
    logins = DockerCredentials(write_config(tmp_path, {"credHelpers": {"t.example": "tok"}}))
    login = logins.get("t.example")
    assert login is not None and login.identity_token and login.secret == "refresh-me"
    path = write_config(tmp_path, {"auths": {"i.example": {"identitytoken": "abc"}}})
    assert DockerCredentials(path).get("i.example") == Login(IDENTITY_TOKEN_USER, "abc")


def test_helper_failures_are_clear_errors(tmp_path: Path, helpers: Path) -> None:
    missing = DockerCredentials(write_config(tmp_path, {"credsStore": "nowhere"}))
    with pytest.raises(AuthError, match=r"docker-credential-nowhere .* not installed"):
        missing.get("x.example")
    broken = helpers / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'keyring locked' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(AuthError, match=r"exit 3\): keyring locked"):
        DockerCredentials(write_config(tmp_path, {"credsStore": "broken"})).get("x.example")
    garbage = helpers / "docker-credential-garbage"
    garbage.write_text("#!/bin/sh\necho hello\n")
    garbage.chmod(0o755)
    with pytest.raises(AuthError, match="other than"):
        DockerCredentials(write_config(tmp_path, {"credsStore": "garbage"})).get("x.example")
    slow = helpers / "docker-credential-slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    hung = DockerCredentials(write_config(tmp_path, {"credsStore": "slow"}), helper_timeout=0.5)
    with pytest.raises(AuthError, match="no answer"):
        hung.get("x.example")


@pytest.mark.parametrize(
    "config",
    [
        {"credsStore": "../../bin/sh"},
        {"credsStore": 7},
        {"credHelpers": {"a.example": "x/y"}},
        {"credHelpers": ["a.example"]},
        [],
    ],
)
def test_bad_helper_names_are_refused(tmp_path: Path, config: object) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(AuthError):
        DockerCredentials(path)
