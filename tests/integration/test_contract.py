"""Lambda's contract at its edges, through boto3 against a real server: what a function's
configuration may hold (environment, runtime, ephemeral storage), how large its code may
be, what its tracebacks show, and /tmp as storage of its own, apart from its memory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Server, deploy, make_zip, needs_root, remove_tree, start_server

pytestmark = [pytest.mark.integration, needs_root]

KINDS = {"forked": (), "fresh": ("--no-zygotes",)}


@pytest.fixture(scope="module", params=list(KINDS))
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per kind of instance (forked from a zygote, fresh) for the module."""
    root = tmp_path_factory.mktemp(f"contract-{request.param}")
    s = start_server(root / "data", root / "server.log", *KINDS[request.param])
    yield s
    s.stop()
    remove_tree(root)


def _error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    r = exc.value.response
    return r["ResponseMetadata"]["HTTPStatusCode"], r["Error"]["Code"], r["Error"]["Message"]


BAD_ENVIRONMENTS = {
    "10000-variables": ({f"VAR{i}": "v" for i in range(10_000)}, "4KB"),
    "key-with-equals": ({"A=B": "1"}, "regular expression pattern"),
    "200-KB-value": ({"BIG": "x" * 200_000}, "4KB"),
    "reserved-key": ({"AWS_REGION": "eu-west-1"}, "AWS_REGION"),
}


@pytest.mark.parametrize("label", list(BAD_ENVIRONMENTS))
def test_bad_environments_are_refused_at_create_and_update(node: Server, label: str) -> None:
    lam = node.lambda_client()
    variables, words = BAD_ENVIRONMENTS[label]
    with pytest.raises(ClientError) as exc:
        deploy(
            lam,
            f"env-{label}",
            {"h.py": "def handler(e, c):\n    return 1\n"},
            handler="h.handler",
            Environment={"Variables": variables},
        )
    status, code, message = _error(exc)
    assert (status, code) == (400, "InvalidParameterValueException")
    assert words in message
    name = f"env-ok-{label}"
    deploy(lam, name, {"h.py": "def handler(e, c):\n    return 1\n"}, handler="h.handler")
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName=name, Environment={"Variables": variables})
    assert _error(exc)[:2] == (400, "InvalidParameterValueException")
    assert "Environment" not in lam.get_function_configuration(FunctionName=name)


def test_a_zip_over_50_mb_is_413(node: Server) -> None:
    lam = node.lambda_client()
    big = make_zip({"h.py": "def handler(e, c):\n    return 1\n", "blob.bin": os.urandom(60 << 20)})
    with pytest.raises(ClientError) as exc:
        lam.create_function(
            FunctionName="too-big",
            Runtime="python3.11",
            Role="arn:aws:iam::000000000000:role/test",
            Handler="h.handler",
            Code={"ZipFile": big},
        )
    status, code, message = _error(exc)
    assert (status, code) == (413, "RequestEntityTooLargeException")
    assert "CreateFunction" in message


def test_a_runtime_the_node_cannot_serve_is_refused(node: Server) -> None:
    lam = node.lambda_client()
    with pytest.raises(ClientError) as exc:
        lam.create_function(
            FunctionName="py312",
            Runtime="python3.12",
            Role="arn:aws:iam::000000000000:role/test",
            Handler="h.handler",
            Code={"ZipFile": make_zip({"h.py": "def handler(e, c):\n    return 1\n"})},
        )
    status, code, message = _error(exc)
    assert (status, code) == (400, "InvalidParameterValueException")
    assert "python3.12 is not available on this node; available: python3.11" in message
    deploy(
        lam,
        "py311",
        {"h.py": "import os\ndef handler(e, c):\n    return os.environ['AWS_EXECUTION_ENV']\n"},
        handler="h.handler",
    )
    resp = lam.invoke(FunctionName="py311", Payload=b"{}")
    assert json.loads(resp["Payload"].read()) == "AWS_Lambda_python3.11"
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="py311", Runtime="python3.13")
    assert _error(exc)[:2] == (400, "InvalidParameterValueException")


def test_tracebacks_show_the_sandbox_paths_only(node: Server) -> None:
    lam = node.lambda_client()
    deploy(
        lam,
        "trace",
        {"h.py": "import json\ndef handler(e, c):\n    return json.loads('{nope')\n"},
        handler="h.handler",
    )
    resp = lam.invoke(FunctionName="trace", Payload=b"{}")
    err = json.loads(resp["Payload"].read())
    assert resp["FunctionError"] == "Unhandled"
    trace = "".join(err["stackTrace"])
    assert 'File "/var/task/h.py", line 3, in handler' in trace
    assert "/var/lang/lib/python3" in trace or '"/usr/lib/python3' in trace, trace
    for host_path in (str(node.data_dir), "/root/", "/work/", ".venv", "site-packages"):
        assert host_path not in trace, trace


WRITE_TMP = """
import errno, os
def handler(event, context):
    chunk = b"x" * (1 << 20)
    written = 0
    try:
        with open("/tmp/blob", "wb") as f:
            for _ in range(event["mb"]):
                f.write(chunk)
                written += 1
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return {"error": errno.errorcode.get(exc.errno), "written_mb": written}
    finally:
        if os.path.exists("/tmp/blob"):
            os.unlink("/tmp/blob")
    st = os.statvfs("/tmp")
    return {"written_mb": written, "size_mb": st.f_blocks * st.f_frsize >> 20}
"""


def test_tmp_is_ephemeral_storage_apart_from_memory(node: Server) -> None:
    lam = node.lambda_client()
    created = deploy(
        lam,
        "scratch",
        {"h.py": WRITE_TMP},
        handler="h.handler",
        MemorySize=128,
        Timeout=120,
        EphemeralStorage={"Size": 512},
    )
    assert created["EphemeralStorage"] == {"Size": 512}
    assert lam.get_function_configuration(FunctionName="scratch")["EphemeralStorage"] == {
        "Size": 512
    }
    # 100 MB in /tmp with 128 MB of memory: fine, /tmp is not memory.
    resp = lam.invoke(FunctionName="scratch", Payload=json.dumps({"mb": 100}).encode())
    body = json.loads(resp["Payload"].read())
    assert "FunctionError" not in resp, body
    assert body["written_mb"] == 100 and body["size_mb"] >= 512
    # 600 MB: the handler sees ENOSPC at its EphemeralStorage, and is not OOM-killed.
    resp = lam.invoke(FunctionName="scratch", Payload=json.dumps({"mb": 600}).encode())
    body = json.loads(resp["Payload"].read())
    assert "FunctionError" not in resp, body
    assert body["error"] == "ENOSPC" and 500 <= body["written_mb"] < 600, body
    # A larger size is honoured, and survives in the configuration.
    lam.update_function_configuration(FunctionName="scratch", EphemeralStorage={"Size": 1024})
    resp = lam.invoke(FunctionName="scratch", Payload=json.dumps({"mb": 600}).encode())
    body = json.loads(resp["Payload"].read())
    assert body["written_mb"] == 600 and body["size_mb"] >= 1024, body
