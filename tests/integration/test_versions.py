"""Published versions and weighted aliases through boto3, against a real server and real
sandboxes: PublishVersion and its preconditions, qualifiers on every operation that takes
one, aliases and their routing, per-version instances, logs and metrics, and an alias's
weights shifted under continuous load."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.conftest import Server, deploy, make_zip, needs_root, wait_until

pytestmark = [pytest.mark.integration]

CODE = """
import os
INSTANCE = os.urandom(8).hex()  # one per instance (pids are the sandbox's own)
def handler(event, context):
    return {"code": CODE_VERSION, "version": context.function_version,
            "env": os.environ.get("AWS_LAMBDA_FUNCTION_VERSION"),
            "arn": context.invoked_function_arn, "instance": INSTANCE}
"""


def code(tag: str) -> dict[str, str]:
    return {"handler.py": f"CODE_VERSION = {tag!r}\n" + CODE}


def invoke(lam: Any, name: str, event: Any = None, **kw: Any) -> tuple[dict[str, Any], Any]:
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event or {}).encode(), **kw)
    return resp, json.loads(resp["Payload"].read())


def error_of(call: Any, **kw: Any) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as err:
        call(**kw)
    r = err.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"], r["Error"]["Message"]


def metrics(server: Server) -> str:
    with server.http() as http:
        return http.get("/metrics").text


def test_publish_versions_and_qualified_operations(server: Server, lam: Any) -> None:
    created = deploy(lam, "ver", code("one"), MemorySize=128)

    # Preconditions: a CodeSha256 or RevisionId that is not $LATEST's refuses the publish.
    status, kind, message = error_of(lam.publish_version, FunctionName="ver", CodeSha256="abc")
    assert (status, kind) == (400, "InvalidParameterValueException")
    assert created["CodeSha256"] in message
    status, kind, _ = error_of(lam.publish_version, FunctionName="ver", RevisionId="nope")
    assert (status, kind) == (412, "PreconditionFailedException")

    v1 = lam.publish_version(
        FunctionName="ver",
        CodeSha256=created["CodeSha256"],
        RevisionId=created["RevisionId"],
        Description="first",
    )
    assert v1["Version"] == "1" and v1["FunctionArn"].endswith(":function:ver:1")
    assert v1["Description"] == "first" and v1["CodeSha256"] == created["CodeSha256"]
    # Nothing changed since version 1: publishing again gives version 1 back.
    assert lam.publish_version(FunctionName="ver")["Version"] == "1"

    lam.update_function_code(FunctionName="ver", ZipFile=make_zip(code("two")))
    lam.update_function_configuration(FunctionName="ver", MemorySize=256)
    v2 = lam.publish_version(FunctionName="ver")
    assert v2["Version"] == "2" and v2["MemorySize"] == 256
    lam.update_function_code(FunctionName="ver", ZipFile=make_zip(code("three")))

    listed = lam.list_versions_by_function(FunctionName="ver")["Versions"]
    assert [v["Version"] for v in listed] == ["$LATEST", "1", "2"]
    assert listed[0]["FunctionArn"].endswith(":function:ver:$LATEST")
    page = lam.list_versions_by_function(FunctionName="ver", MaxItems=2)
    assert [v["Version"] for v in page["Versions"]] == ["$LATEST", "1"]
    rest = lam.list_versions_by_function(FunctionName="ver", Marker=page["NextMarker"])
    assert [v["Version"] for v in rest["Versions"]] == ["2"] and "NextMarker" not in rest
    every = lam.list_functions(FunctionVersion="ALL")["Functions"]
    assert [f["Version"] for f in every] == ["$LATEST", "1", "2"]
    assert [f["Version"] for f in lam.list_functions()["Functions"]] == ["$LATEST"]

    # Published versions are immutable snapshots: $LATEST moved on, they did not.
    got = lam.get_function(FunctionName="ver", Qualifier="1")
    assert got["Configuration"]["Version"] == "1"
    assert got["Configuration"]["MemorySize"] == 128
    assert got["Configuration"]["FunctionArn"].endswith(":function:ver:1")
    zipped = httpx.get(got["Code"]["Location"], timeout=30).content
    assert zipped and b"CODE_VERSION = 'one'" in _unzip(zipped)
    assert lam.get_function_configuration(FunctionName="ver:2")["MemorySize"] == 256
    arn = v2["FunctionArn"]
    assert lam.get_function_configuration(FunctionName=arn)["Version"] == "2"
    assert lam.get_function(FunctionName="ver")["Configuration"]["Version"] == "$LATEST"
    latest = lam.get_function_configuration(FunctionName="ver", Qualifier="$LATEST")
    assert latest["Version"] == "$LATEST"

    # Invoke: each qualifier runs its own code; the response says which version ran.
    for qualifier, tag in (("1", "one"), ("2", "two"), ("$LATEST", "three"), (None, "three")):
        kw = {"Qualifier": qualifier} if qualifier else {}
        resp, body = invoke(lam, "ver", LogType="Tail", **kw)
        version = qualifier or "$LATEST"
        assert resp["ExecutedVersion"] == version
        assert body["code"] == tag and body["version"] == version and body["env"] == version
        log = base64.b64decode(resp["LogResult"]).decode()
        assert f"Version: {version}\n" in log
    resp, body = invoke(lam, "ver:1")
    assert resp["ExecutedVersion"] == "1" and body["arn"].endswith(":function:ver:1")

    text = metrics(server)
    assert 'warmstart_invocations_total{function="ver",outcome="success",version="1"}' in text
    assert 'warmstart_starts_total{function="ver",kind=' in text and 'version="2"' in text

    # Qualifiers that name nothing, or nothing valid.
    assert error_of(lam.invoke, FunctionName="ver", Qualifier="7")[:2] == (
        404,
        "ResourceNotFoundException",
    )
    assert error_of(lam.get_function, FunctionName="ver", Qualifier="nosuch")[0] == 404
    assert error_of(lam.get_function, FunctionName="ver:1", Qualifier="2")[0] == 400
    # Function-wide changes take no qualifier but $LATEST, as Lambda.
    status, kind, _ = error_of(
        lam.update_function_configuration, FunctionName="ver:1", MemorySize=512
    )
    assert (status, kind) == (400, "InvalidParameterValueException")
    status, _, _ = error_of(
        lam.put_function_concurrency, FunctionName="ver:2", ReservedConcurrentExecutions=1
    )
    assert status == 400
    lam.update_function_configuration(FunctionName="ver:$LATEST", Description="d")

    # DeleteFunction with a qualifier: one version; never $LATEST alone.
    status, kind, message = error_of(lam.delete_function, FunctionName="ver", Qualifier="$LATEST")
    assert (status, kind) == (400, "InvalidParameterValueException")
    assert "cannot be deleted without deleting the function" in message
    lam.delete_function(FunctionName="ver", Qualifier="2")
    assert error_of(lam.get_function, FunctionName="ver", Qualifier="2")[0] == 404
    assert error_of(lam.delete_function, FunctionName="ver", Qualifier="2")[0] == 404
    # Numbers are never given twice: the next version is 3, though 2 is gone.
    assert lam.publish_version(FunctionName="ver")["Version"] == "3"
    resp, body = invoke(lam, "ver", Qualifier="1")
    assert body["code"] == "one"

    # Publish with the deploy, as Lambda's CreateFunction and UpdateFunctionCode offer.
    updated = lam.update_function_code(
        FunctionName="ver", ZipFile=make_zip(code("four")), Publish=True
    )
    assert updated["Version"] == "4" and updated["FunctionArn"].endswith(":function:ver:4")
    made = deploy(lam, "ver-published", code("one"), Publish=True)
    assert made["Version"] == "1"
    assert invoke(lam, "ver-published", Qualifier="1")[1]["code"] == "one"

    # Deleting the function deletes its versions and aliases.
    lam.create_alias(FunctionName="ver", Name="live", FunctionVersion="1")
    lam.delete_function(FunctionName="ver")
    deploy(lam, "ver", code("again"))
    assert [
        v["Version"] for v in lam.list_versions_by_function(FunctionName="ver")["Versions"]
    ] == ["$LATEST"]
    assert lam.list_aliases(FunctionName="ver")["Aliases"] == []
    assert lam.publish_version(FunctionName="ver")["Version"] == "1"


def _unzip(data: bytes) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read("handler.py")


def _two_versions(lam: Any, name: str, files: Any = code, **kw: Any) -> None:
    deploy(lam, name, files("one"), **kw)
    assert lam.publish_version(FunctionName=name)["Version"] == "1"
    lam.update_function_code(FunctionName=name, ZipFile=make_zip(files("two")))
    assert lam.publish_version(FunctionName=name)["Version"] == "2"


def test_aliases_and_their_routing(server: Server, lam: Any) -> None:
    _two_versions(lam, "al")
    alias = lam.create_alias(
        FunctionName="al", Name="live", FunctionVersion="1", Description="prod"
    )
    assert alias["AliasArn"].endswith(":function:al:live")
    assert (alias["FunctionVersion"], alias["Description"]) == ("1", "prod")
    assert "RoutingConfig" not in alias
    assert lam.get_alias(FunctionName="al", Name="live")["RevisionId"] == alias["RevisionId"]
    assert error_of(lam.create_alias, FunctionName="al", Name="live", FunctionVersion="2")[:2] == (
        409,
        "ResourceConflictException",
    )

    # What Lambda refuses: names that are numbers, versions that do not exist, more than
    # one extra version, weights out of [0, 1], $LATEST in a split.
    refused = [
        ({"Name": "123", "FunctionVersion": "1"}, 400),
        ({"Name": "bad name", "FunctionVersion": "1"}, 400),
        ({"Name": "x", "FunctionVersion": "9"}, 404),
        (
            {
                "Name": "x",
                "FunctionVersion": "1",
                "RoutingConfig": {"AdditionalVersionWeights": {"9": 0.5}},
            },
            404,
        ),
        (
            {
                "Name": "x",
                "FunctionVersion": "1",
                "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.1, "3": 0.1}},
            },
            400,
        ),
        (
            {
                "Name": "x",
                "FunctionVersion": "1",
                "RoutingConfig": {"AdditionalVersionWeights": {"2": 1.5}},
            },
            400,
        ),
        (
            {
                "Name": "x",
                "FunctionVersion": "1",
                "RoutingConfig": {"AdditionalVersionWeights": {"1": 0.5}},
            },
            400,
        ),
        (
            {
                "Name": "x",
                "FunctionVersion": "$LATEST",
                "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}},
            },
            400,
        ),
    ]
    for kw, status in refused:
        with server.http() as http:
            r = http.post("/2015-03-31/functions/al/aliases", json=kw)
        assert r.status_code == status, (kw, r.text)
        kind = "ResourceNotFoundException" if status == 404 else "InvalidParameterValueException"
        assert r.headers["x-amzn-ErrorType"] == kind, (kw, r.text)
    status, kind, _ = error_of(
        lam.create_alias,
        FunctionName="al",
        Name="y",
        FunctionVersion="1",
        RoutingConfig={"AdditionalVersionWeights": {"$LATEST": 0.5}},
    )
    assert status == 400  # boto3 may refuse it itself; the server does too

    # An alias is a qualifier like a version: reads and invocations follow it.
    conf = lam.get_function_configuration(FunctionName="al", Qualifier="live")
    assert conf["Version"] == "1" and conf["FunctionArn"].endswith(":function:al:live")
    resp, body = invoke(lam, "al:live")
    assert resp["ExecutedVersion"] == "1" and body["code"] == "one"
    assert body["arn"].endswith(":function:al:live")
    resp = lam.invoke(FunctionName="al", Qualifier="live", InvocationType="DryRun")
    assert resp["StatusCode"] == 204 and resp["ExecutedVersion"] == "1"

    # UpdateAlias with a stale RevisionId is refused; with the current one it applies.
    assert error_of(
        lam.update_alias, FunctionName="al", Name="live", FunctionVersion="2", RevisionId="old"
    )[:2] == (412, "PreconditionFailedException")
    split = lam.update_alias(
        FunctionName="al",
        Name="live",
        RevisionId=alias["RevisionId"],
        RoutingConfig={"AdditionalVersionWeights": {"2": 0.5}},
    )
    assert split["RoutingConfig"] == {"AdditionalVersionWeights": {"2": 0.5}}
    assert split["RevisionId"] != alias["RevisionId"] and split["FunctionVersion"] == "1"
    seen = Counter(invoke(lam, "al", Qualifier="live")[0]["ExecutedVersion"] for _ in range(60))
    assert set(seen) == {"1", "2"}, seen  # each has 1 - 2**-60 odds of showing up

    lam.create_alias(FunctionName="al", Name="canary", FunctionVersion="2")
    lam.create_alias(FunctionName="al", Name="edge", FunctionVersion="$LATEST")
    names = [a["Name"] for a in lam.list_aliases(FunctionName="al")["Aliases"]]
    assert names == ["canary", "edge", "live"]
    only_2 = lam.list_aliases(FunctionName="al", FunctionVersion="2")["Aliases"]
    assert [a["Name"] for a in only_2] == ["canary", "live"]
    page = lam.list_aliases(FunctionName="al", MaxItems=2)
    assert len(page["Aliases"]) == 2 and page["NextMarker"]
    resp, body = invoke(lam, "al", Qualifier="edge")
    assert resp["ExecutedVersion"] == "$LATEST" and body["code"] == "two"

    # A version an alias routes to cannot be deleted; an alias is not deleted by
    # DeleteFunction.
    status, kind, message = error_of(lam.delete_function, FunctionName="al", Qualifier="2")
    assert (status, kind) == (409, "ResourceConflictException") and "canary" in message
    status, _, message = error_of(lam.delete_function, FunctionName="al", Qualifier="live")
    assert status == 400 and "aliases" in message
    lam.delete_alias(FunctionName="al", Name="canary")
    lam.update_alias(
        FunctionName="al",
        Name="live",
        FunctionVersion="1",
        RoutingConfig={"AdditionalVersionWeights": {}},
    )
    assert "RoutingConfig" not in lam.get_alias(FunctionName="al", Name="live")
    lam.delete_function(FunctionName="al", Qualifier="2")
    assert error_of(lam.get_alias, FunctionName="al", Name="canary")[0] == 404
    assert error_of(lam.delete_alias, FunctionName="al", Name="canary")[0] == 404
    assert error_of(lam.invoke, FunctionName="al", Qualifier="canary")[0] == 404

    # Event invocations through an alias run the version it routed them to.
    resp = lam.invoke(FunctionName="al", Qualifier="live", InvocationType="Event", Payload=b"{}")
    assert resp["StatusCode"] == 202
    event_id = resp["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    with server.http() as http:
        wait_until(
            lambda: http.get(f"/events/{event_id}").json()["status"] == "succeeded",
            "the event to run",
            timeout=60,
        )
        result = http.get(f"/events/{event_id}").json()["result"]
    assert result["version"] == "1" and result["code"] == "one"


def test_versions_keep_their_instances_across_updates_of_latest(server: Server, lam: Any) -> None:
    _two_versions(lam, "pools")
    _, first = invoke(lam, "pools", Qualifier="1")
    _, latest = invoke(lam, "pools")
    assert first["instance"] != latest["instance"]  # one instance per version
    # A new revision of $LATEST retires $LATEST's instances, not version 1's.
    lam.update_function_configuration(FunctionName="pools", Description="new revision")
    resp, again = invoke(lam, "pools", Qualifier="1")
    assert again["instance"] == first["instance"]
    assert resp["ResponseMetadata"]["HTTPHeaders"]["x-warmstart-start"] == "warm"
    with server.http() as http:
        instances = http.get("/instances").json()["instances"]
    assert {i["version"] for i in instances if i["function"] == "pools"} >= {"1"}


def test_reserved_concurrency_caps_all_versions_together(server: Server, lam: Any) -> None:
    gate = socket.socket()
    gate.bind(("127.0.0.1", 0))
    gate.listen(8)
    gate.settimeout(60)
    port = gate.getsockname()[1]
    _two_versions(lam, "capped", _gated, Tags={"warmstart:network": "host"}, Timeout=60)
    lam.put_function_concurrency(FunctionName="capped", ReservedConcurrentExecutions=1)
    results: list[Any] = []
    held = threading.Thread(
        target=lambda: results.append(invoke(lam, "capped", {"port": port}, Qualifier="1"))
    )
    held.start()
    conn, _ = gate.accept()  # version 1's invocation is running, holding the only slot
    try:
        # Version 2 cannot start an instance while version 1 holds the function's slot:
        # it queues, and runs once version 1's invocation ends.
        other: list[Any] = []
        waiting = threading.Thread(
            target=lambda: other.append(invoke(lam, "capped", {}, Qualifier="2"))
        )
        waiting.start()
        with server.http() as http:
            wait_until(
                lambda: http.get("/node").json()["waiting_invocations"] == 1,
                "version 2's invocation to queue",
            )
        assert other == []
    finally:
        conn.sendall(b"go")
        conn.close()
    held.join(60)
    waiting.join(60)
    gate.close()
    assert results[0][0]["ExecutedVersion"] == "1"
    assert other and other[0][0]["ExecutedVersion"] == "2"


def _gated(tag: str) -> dict[str, str]:
    """A handler that, given a port, connects to it and returns once the test sends."""
    return {
        "handler.py": f"CODE_VERSION = {tag!r}\n"
        + """
import socket
def handler(event, context):
    if event.get("port"):
        with socket.create_connection(("127.0.0.1", event["port"]), timeout=300) as s:
            s.settimeout(300)
            s.recv(16)
    return {"code": CODE_VERSION, "version": context.function_version}
"""
    }


def test_shifting_an_alias_under_load_fails_nothing(server: Server, lam: Any) -> None:
    gate = socket.socket()
    gate.bind(("127.0.0.1", 0))
    gate.listen(8)
    gate.settimeout(60)
    port = gate.getsockname()[1]
    _two_versions(lam, "shift", _gated, Tags={"warmstart:network": "host"}, Timeout=300)
    lam.create_alias(FunctionName="shift", Name="live", FunctionVersion="1")

    # An invocation in flight when the alias moves keeps the version it started on.
    inflight: list[Any] = []
    slow = threading.Thread(
        target=lambda: inflight.append(invoke(lam, "shift", {"port": port}, Qualifier="live"))
    )
    slow.start()
    conn, _ = gate.accept()  # the handler of version 1 is running now

    stop = threading.Event()
    outcomes: list[tuple[str, str]] = []
    failures: list[BaseException] = []

    def client() -> None:
        own = server.lambda_client()
        while not stop.is_set():
            try:
                resp, body = invoke(own, "shift", {}, Qualifier="live")
                assert "FunctionError" not in resp, body
                outcomes.append((resp["ExecutedVersion"], body["version"]))
            except BaseException as exc:  # reported below
                failures.append(exc)
                return

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()

    def settle(after: int) -> None:
        """Wait until the clients have made ``after`` more invocations."""
        goal = len(outcomes) + after
        wait_until(lambda: len(outcomes) >= goal or bool(failures), "more invocations", timeout=120)

    try:
        for weight in (0.0, 0.1, 0.5, 1.0):
            settle(20)
            lam.update_alias(
                FunctionName="shift",
                Name="live",
                RoutingConfig={"AdditionalVersionWeights": {"2": weight}},
            )
        settle(20)
        lam.update_alias(
            FunctionName="shift",
            Name="live",
            FunctionVersion="2",
            RoutingConfig={"AdditionalVersionWeights": {}},
        )
        mark = len(outcomes)
        settle(20)
    finally:
        # The slow invocation, in flight through every move of the alias, ends now.
        conn.sendall(b"go")
        conn.close()
        slow.join(120)
        stop.set()
        for t in clients:
            t.join(120)
        gate.close()
    assert failures == []
    assert inflight and inflight[0][0]["ExecutedVersion"] == "1"
    assert inflight[0][1] == {"code": "one", "version": "1"}
    assert all(executed in ("1", "2") and executed == ran for executed, ran in outcomes)
    assert {v for v, _ in outcomes} == {"1", "2"}
    # After the repoint every invocation that started later ran version 2 (a few that
    # were in flight at the switch may still report 1).
    assert Counter(v for v, _ in outcomes[mark + 3 :]) == Counter({"2": len(outcomes[mark + 3 :])})


SIX = """
import sys
PRELOADED = "six" in sys.modules
import six
CODE_VERSION = {tag!r}
def handler(event, context):
    return {{"code": CODE_VERSION, "preloaded": PRELOADED, "six": six.__version__}}
"""


@needs_root
def test_versions_with_the_same_packages_share_zygotes_and_installs(server_factory: Any) -> None:
    server: Server = server_factory("--zygote-after", "1")
    lam = server.lambda_client()

    def files(tag: str) -> dict[str, str]:
        return {"handler.py": SIX.format(tag=tag), "requirements.txt": "six\n"}

    _two_versions(lam, "shared", files)
    installs = _metric(server, "warmstart_package_installs_total")
    assert installs == 1  # six, once: version 2's deploy found it installed
    first = lam.invoke(FunctionName="shared", Qualifier="1", Payload=b"{}")
    assert json.loads(first["Payload"].read())["code"] == "one"
    # The first start asked for a zygote with six; once it lives, version 2 forks from it.
    with server.http() as http:
        wait_until(
            lambda: any(
                "six" in " ".join(z["packages"]) and z.get("alive", True)
                for z in http.get("/zygotes").json()["zygotes"]
            ),
            "a zygote with six",
            timeout=120,
        )
    forks = _metric(server, "warmstart_zygote_forks_total")
    resp = lam.invoke(FunctionName="shared", Qualifier="2", Payload=b"{}")
    body = json.loads(resp["Payload"].read())
    assert body["code"] == "two" and body["preloaded"] is True
    assert resp["ResponseMetadata"]["HTTPHeaders"]["x-warmstart-start"] == "fork"
    assert _metric(server, "warmstart_zygote_forks_total") == forks + 1
    assert _metric(server, "warmstart_package_installs_total") == installs


def _metric(server: Server, name: str) -> float:
    for line in metrics(server).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_versions_and_aliases_survive_a_restart(server_factory: Any) -> None:
    server: Server = server_factory()
    lam = server.lambda_client()
    _two_versions(lam, "kept")
    lam.delete_function(FunctionName="kept", Qualifier="2")
    lam.create_alias(
        FunctionName="kept",
        Name="live",
        FunctionVersion="1",
    )
    server.stop()
    server = server_factory(data_dir=server.data_dir)
    lam = server.lambda_client()
    versions = lam.list_versions_by_function(FunctionName="kept")["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1"]
    assert lam.get_alias(FunctionName="kept", Name="live")["FunctionVersion"] == "1"
    _, body = invoke(lam, "kept", Qualifier="live")
    assert body["code"] == "one"
    lam.update_function_code(FunctionName="kept", ZipFile=make_zip(code("three")))
    assert lam.publish_version(FunctionName="kept")["Version"] == "3"  # 2 stays used


def test_the_cli_publishes_lists_and_moves_aliases(server: Server, lam: Any) -> None:
    def warmstart(*args: str) -> str:
        env = dict(os.environ, WARMSTART_ENDPOINT=server.url)
        out = subprocess.run(
            [sys.executable, "-m", "warmstart.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    deploy(lam, "cli", code("one"))
    assert warmstart("publish", "cli", "--description", "first").startswith("cli version 1 ")
    lam.update_function_code(FunctionName="cli", ZipFile=make_zip(code("two")))
    assert warmstart("publish", "cli").startswith("cli version 2 ")
    made = json.loads(warmstart("alias", "cli", "live", "1", "--weight", "2=0.25"))
    assert made["RoutingConfig"] == {"AdditionalVersionWeights": {"2": 0.25}}
    moved = json.loads(warmstart("alias", "cli", "live", "2", "--weight", "none"))
    assert moved["FunctionVersion"] == "2" and "RoutingConfig" not in moved
    assert json.loads(warmstart("invoke", "cli:live"))["code"] == "two"
    lines = warmstart("versions", "cli").splitlines()
    assert [line.split("\t")[0] for line in lines[1:4]] == ["$LATEST", "1", "2"]
    assert lines[2].endswith("\tfirst") and lines[4] == "alias live\t-> 2"
