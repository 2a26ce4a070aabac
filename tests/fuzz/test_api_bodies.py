"""The HTTP API's request bodies, headers and names (``api/lambda_api.py``, ``api/app.py``,
``api/images_api.py``) against the real application over a real worker: generated JSON of
the wrong types, huge numbers, deep nesting, unicode, missing and extra fields, invalid
names (trailing newlines too), broken base64 and zips, odd invocation headers.  Whatever
arrives, the answer is never a 5xx; every 4xx says what went wrong in Lambda's shape (an
``x-amzn-ErrorType`` header, a JSON body with a ``message``); and a request that succeeds
made nothing the API would have refused (a function name or handler that does not match
its pattern).

The worker is built once for the module.  Most examples stay in the control plane and
payload checks; those that run a sandbox target one small function deployed at the start
and have their own, small, example counts.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.apptools import AppClient, app_client
from tests.conftest import make_zip
from tests.fuzz import scaled
from warmstart.images.errors import InvalidReference
from warmstart.images.reference import Reference

pytestmark = pytest.mark.integration

ECHO = "echo"  # invoked: returns its event's type, never fails
CONFIGURED = "configured"  # updated, re-coded and throttled by the examples
MISSING = "missing-function"
ECHO_CODE = "def handler(event, context):\n    return type(event).__name__\n"
VALID_ZIP = base64.b64encode(make_zip({"handler.py": ECHO_CODE})).decode()
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
HANDLER = re.compile(r"[^\s]+\.[^\s.]+")
LAMBDA = "/2015-03-31/functions"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    with app_client(tmp_path_factory.mktemp("api-fuzz") / "data") as api:
        for name in (ECHO, CONFIGURED):
            body = {
                "FunctionName": name,
                "Handler": "handler.handler",
                "Code": {"ZipFile": VALID_ZIP},
            }
            created = api.post(LAMBDA, json=body)
            assert created.status_code == 201, created.text
        yield api


def check(response: Any) -> None:
    """Never a 5xx; a 4xx in Lambda's error shape; a success made only what is valid."""
    status = response.status_code
    where = f"{response.request.method} {response.request.url}"
    assert status < 500, f"{where}: {status} {response.text[:500]}"
    if 400 <= status < 500:
        assert response.headers.get("x-amzn-ErrorType"), f"{where}: {status} without a type"
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    elif response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict) and "FunctionName" in body:
            assert NAME.fullmatch(body["FunctionName"]), body
            if "Handler" in body:
                assert HANDLER.fullmatch(body["Handler"]), body


# -- generated values ------------------------------------------------------------------------
_HUGE = st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**4000, -1, 0, 2**31])
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    _HUGE,
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\n", "a\n", "é", "\u0000", "x" * 300, "handler.handler"]),
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def nested(depth: int, kind: str) -> str:
    """A JSON document nested ``depth`` levels deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


DEEP = st.builds(nested, st.sampled_from([3, 5000]), st.sampled_from(["list", "dict"]))
NAMES = st.one_of(
    st.sampled_from(
        [
            ECHO,
            CONFIGURED,
            MISSING,
            "",
            "a\n",
            f"{ECHO}\n",
            "x" * 65,
            "bad name",
            "é",
            "a/b",
            "a:b:c",
            f"{ECHO}:$LATEST",
            f"{ECHO}:7",
            "arn:aws:lambda:us-east-1:0:function:x",
            "arn:nothing",
            "%0A",
            "..",
            "ok-name_1",
        ]
    ),
    st.text(max_size=70),
)
# Image references that parse to nothing a registry would be asked for.
BAD_IMAGES = st.one_of(
    st.sampled_from(["", "Bad Ref", "a b:c", "UPPER/case", "x@sha256:nothex", "\n", "a:b:c:d"]),
    JSON.filter(lambda v: not isinstance(v, str)),
)
ZIPS = st.one_of(
    st.just(VALID_ZIP),
    st.sampled_from(
        ["", "not base64!", "QUJD", "QUJD\n", "é", "====", "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="]
    ),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    JSON,
)


@st.composite
def mutated(draw: st.DrawFn, template: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """A request body: ``template`` with keys dropped, replaced (by what ``fields``
    proposes for them, or anything) and added; or not an object at all."""
    kind = draw(st.sampled_from(["object"] * 6 + ["value", "deep", "junk"]))
    if kind == "value":
        return json.dumps(draw(JSON)).encode()
    if kind == "deep":
        return draw(DEEP).encode()
    if kind == "junk":
        return draw(st.binary(max_size=40))
    body = dict(template)
    for key in draw(st.lists(st.sampled_from(sorted(template)), max_size=3)):
        body.pop(key, None)
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4)):
        body[key] = draw(st.one_of(fields[key], JSON))
    body.update(draw(st.dictionaries(st.text(max_size=10), JSON, max_size=2)))
    return json.dumps(body).encode()


def reaches_a_registry(body: bytes) -> bool:
    """True if ``body`` names an image a registry would be asked for (the examples stay
    off the network)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    code = doc.get("Code")
    candidates = [
        doc.get("ImageUri"),
        doc.get("image"),
        code.get("ImageUri") if isinstance(code, dict) else None,
    ]
    for value in candidates:
        if isinstance(value, str):
            try:
                Reference.parse(value)
            except InvalidReference:
                continue
            return True
    return False


def path_of(name: str) -> str:
    return quote(name, safe="")


def names_a_kept_function(name: str) -> bool:
    """Whether `name` (plain, qualified or an ARN) may reach echo or configured."""
    base = name.rsplit("function:", 1)[-1].split(":")[0].strip()
    return base in (ECHO, CONFIGURED)


# -- the control plane -------------------------------------------------------------------------
_CONFIG_FIELDS: dict[str, Any] = {
    "Handler": st.sampled_from(["handler.handler", "a.b\n", "a", "a b.c", "x" * 200 + ".h"]),
    "Runtime": st.sampled_from(["python3.11", "python3.12", "python2.7", "", "java"]),
    "MemorySize": st.one_of(st.integers(0, 20000), _HUGE),
    "Timeout": st.one_of(st.integers(0, 1000), _HUGE),
    "Environment": st.one_of(
        st.fixed_dictionaries(
            {"Variables": st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4)}
        ),
        st.just({"Variables": {"A=B": "1"}}),
        st.just({"Variables": {"AWS_REGION": "x"}}),
        st.just({"Variables": {"BIG": "x" * 5000}}),
    ),
    "EphemeralStorage": st.one_of(st.fixed_dictionaries({"Size": st.one_of(st.integers(), _HUGE)})),
    "Description": st.text(max_size=30),
    "Role": st.text(max_size=30),
    "RevisionId": st.text(max_size=36),
    "Tags": st.one_of(
        st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
        st.just({"warmstart:qos": "nope"}),
        st.just({"warmstart:network": "everywhere"}),
    ),
}
_CREATE = {
    "FunctionName": "fuzz-created",
    "Runtime": "python3.11",
    "Role": "arn:aws:iam::000000000000:role/test",
    "Handler": "handler.handler",
    "Code": {"ZipFile": VALID_ZIP},
    "MemorySize": 128,
    "Timeout": 3,
    "Environment": {"Variables": {"GREETING": "hi"}},
    "EphemeralStorage": {"Size": 512},
}
_CREATE_FIELDS = {
    **_CONFIG_FIELDS,
    "FunctionName": NAMES,
    "PackageType": st.sampled_from(["Zip", "Image", "zip", ""]),
    "Code": st.one_of(
        st.fixed_dictionaries({"ZipFile": ZIPS}),
        st.fixed_dictionaries({"ImageUri": BAD_IMAGES}),
        st.just({}),
    ),
    "ImageConfig": JSON,
}


@given(mutated(_CREATE, _CREATE_FIELDS))
def test_create_function(client: AppClient, body: bytes) -> None:
    assume(not reaches_a_registry(body))
    response = client.post(LAMBDA, content=body)
    check(response)
    if response.status_code == 201:
        client.delete(f"{LAMBDA}/{path_of(response.json()['FunctionName'])}")


_UPDATE = {"Handler": "handler.handler", "MemorySize": 256, "Timeout": 5, "Description": "d"}


@given(mutated(_UPDATE, {**_CONFIG_FIELDS, "ImageConfig": JSON}))
def test_update_function_configuration(client: AppClient, body: bytes) -> None:
    check(client.put(f"{LAMBDA}/{CONFIGURED}/configuration", content=body))


_CODE_FIELDS = {
    "ZipFile": ZIPS,
    "ImageUri": BAD_IMAGES,
    "DryRun": JSON,
    "RevisionId": st.text(max_size=36),
    "Publish": JSON,
}


@given(mutated({"ZipFile": VALID_ZIP}, _CODE_FIELDS))
def test_update_function_code(client: AppClient, body: bytes) -> None:
    assume(not reaches_a_registry(body))
    check(client.put(f"{LAMBDA}/{CONFIGURED}/code", content=body))


@given(
    NAMES,
    mutated(
        {"ReservedConcurrentExecutions": 10},
        {"ReservedConcurrentExecutions": st.one_of(st.integers(-5, 2000), _HUGE)},
    ),
)
def test_put_function_concurrency(client: AppClient, name: str, body: bytes) -> None:
    if names_a_kept_function(name):
        name = CONFIGURED  # the echo function keeps its concurrency: it is invoked
    check(client.put(f"/2017-10-31/functions/{path_of(name)}/concurrency", content=body))


@given(
    NAMES,
    st.sampled_from(
        [
            "",
            "/configuration",
            "/code-download",
            "/logs",
            "/concurrency",
            "DELETE",
            "DELETE /concurrency",
        ]
    ),
)
def test_reads_and_deletes_by_name(client: AppClient, name: str, what: str) -> None:
    method, _, suffix = (
        what.rpartition(" ") if " " in what or what == "DELETE" else ("GET", "", what)
    )
    if suffix == "DELETE":
        suffix = ""
    if names_a_kept_function(name) and method == "DELETE":
        name = MISSING
    prefix = {
        "/logs": "/functions",
        "/concurrency": ("/2019-09-30/functions" if method == "GET" else "/2017-10-31/functions"),
    }.get(suffix, LAMBDA)
    check(client.request(method, f"{prefix}/{path_of(name)}{suffix}"))


@given(
    st.dictionaries(
        st.sampled_from(["Marker", "MaxItems", "FunctionVersion"]),
        st.one_of(st.text(max_size=12), st.sampled_from(["²", "٣", "9" * 5000, "-1", "0"])),
    )
)
def test_list_functions(client: AppClient, query: dict[str, str]) -> None:
    check(client.get(LAMBDA, params=query))


# -- versions and aliases ----------------------------------------------------------------------
_PUBLISH_FIELDS = {
    "CodeSha256": st.one_of(st.text(max_size=50), st.sampled_from(["", "="])),
    "RevisionId": st.text(max_size=36),
    "Description": st.one_of(st.text(max_size=30), st.just("x" * 300)),
}


@given(NAMES, mutated({"Description": "v"}, _PUBLISH_FIELDS))
def test_publish_version(client: AppClient, name: str, body: bytes) -> None:
    if names_a_kept_function(name):
        name = CONFIGURED  # versions of echo would pin its instances: it is invoked
    check(client.post(f"{LAMBDA}/{path_of(name)}/versions", content=body))


_VERSIONS = st.one_of(
    st.sampled_from(["1", "2", "$LATEST", "0", "-1", "", "9" * 20, "1.5", "é"]),
    st.text(max_size=6),
)
_ALIAS_NAMES = st.one_of(
    st.sampled_from(["live", "123", "", "a b", "x" * 129, "$LATEST", "é", "a\n"]),
    st.text(max_size=10),
)
_ALIAS_FIELDS = {
    "Name": _ALIAS_NAMES,
    "FunctionVersion": _VERSIONS,
    "Description": st.one_of(st.text(max_size=30), st.just("x" * 300)),
    "RevisionId": st.text(max_size=36),
    "RoutingConfig": st.one_of(
        st.fixed_dictionaries(
            {
                "AdditionalVersionWeights": st.dictionaries(
                    _VERSIONS,
                    st.one_of(st.floats(), st.integers(), _HUGE, st.text(max_size=3), JSON),
                    max_size=3,
                )
            }
        ),
        JSON,
    ),
}


@given(NAMES, mutated({"Name": "live", "FunctionVersion": "$LATEST"}, _ALIAS_FIELDS))
def test_create_alias(client: AppClient, name: str, body: bytes) -> None:
    if names_a_kept_function(name):
        name = CONFIGURED
    check(client.post(f"{LAMBDA}/{path_of(name)}/aliases", content=body))


@given(
    _ALIAS_NAMES,
    st.sampled_from(["GET", "PUT", "DELETE"]),
    mutated({"FunctionVersion": "$LATEST"}, _ALIAS_FIELDS),
)
def test_alias_operations(client: AppClient, alias: str, method: str, body: bytes) -> None:
    url = f"{LAMBDA}/{CONFIGURED}/aliases/{path_of(alias)}"
    check(client.request(method, url, content=body if method == "PUT" else None))


@given(
    NAMES,
    st.sampled_from(["/versions", "/aliases"]),
    st.dictionaries(
        st.sampled_from(["Marker", "MaxItems", "FunctionVersion", "Qualifier"]),
        st.one_of(st.text(max_size=12), st.sampled_from(["²", "9" * 5000, "-1", "0", "ALL"])),
    ),
)
def test_list_versions_and_aliases(
    client: AppClient, name: str, what: str, query: dict[str, str]
) -> None:
    check(client.get(f"{LAMBDA}/{path_of(name)}{what}", params=query))


# -- invocations -------------------------------------------------------------------------------
def _b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


BAD_CLIENT_CONTEXTS = st.one_of(
    st.sampled_from(["not base64!", "é", _b64("not json"), _b64(b"\xff\xfe"), "QQ"]),
    DEEP.map(_b64),
)
CLIENT_CONTEXTS = st.one_of(st.none(), BAD_CLIENT_CONTEXTS, JSON.map(lambda v: _b64(json.dumps(v))))
PAYLOADS = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    DEEP.map(str.encode),
    st.binary(max_size=40),
)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@st.composite
def control_invocations(draw: st.DrawFn) -> tuple[str, dict[str, str], dict[str, str], bytes]:
    """An Invoke that is refused or answered before any sandbox runs: a name that is not
    served, a qualifier other than $LATEST, a DryRun, an unknown type, or a client context
    that cannot be read."""
    name = draw(NAMES)
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        query["Qualifier"] = draw(st.sampled_from(["$LATEST", "1", "", "prod", "é"]))
    kind = draw(st.one_of(st.sampled_from(["RequestResponse", "Event", "DryRun"]), HEADER_TEXT))
    headers["X-Amz-Invocation-Type"] = kind
    headers["X-Amz-Log-Type"] = draw(st.one_of(st.sampled_from(["None", "Tail"]), HEADER_TEXT))
    context = draw(CLIENT_CONTEXTS)
    if name.split(":")[0] in (ECHO, CONFIGURED) and kind in ("RequestResponse", "Event"):
        if kind == "Event":
            name = MISSING
        else:
            context = draw(BAD_CLIENT_CONTEXTS)
    if context is not None:
        headers["X-Amz-Client-Context"] = context
    return name, query, headers, draw(PAYLOADS)


@given(control_invocations())
def test_invoke_control_plane(
    client: AppClient, call: tuple[str, dict[str, str], dict[str, str], bytes]
) -> None:
    name, query, headers, payload = call
    raw = {key: value.encode() for key, value in headers.items()}  # UTF-8, as some send
    response = client.post(
        f"{LAMBDA}/{path_of(name)}/invocations", params=query, headers=raw, content=payload
    )
    check(response)


@settings(max_examples=scaled(6))
@given(
    PAYLOADS,
    st.one_of(st.none(), JSON.map(lambda v: _b64(json.dumps(v)))),
    st.sampled_from(["None", "Tail"]),
)
def test_invoke_runs(client: AppClient, payload: bytes, context: str | None, log_type: str) -> None:
    headers = {"X-Amz-Log-Type": log_type}
    if context is not None:
        headers["X-Amz-Client-Context"] = context
    response = client.post(f"{LAMBDA}/{ECHO}/invocations", headers=headers, content=payload)
    check(response)
    assert response.status_code in (200, 400), response.text
    # The handler never fails: a 200 is its result, not an error of the runtime's.
    assert "X-Amz-Function-Error" not in response.headers, response.text


# -- the native API ----------------------------------------------------------------------------
@given(NAMES, PAYLOADS)
def test_run_control_plane(client: AppClient, name: str, payload: bytes) -> None:
    if name.split(":")[0] in (ECHO, CONFIGURED):
        name = MISSING
    check(client.post(f"/run/{path_of(name)}", content=payload))


@settings(max_examples=scaled(4))
@given(PAYLOADS)
def test_run_runs(client: AppClient, payload: bytes) -> None:
    response = client.post(f"/run/{ECHO}", content=payload)
    check(response)
    assert response.status_code in (200, 400), response.text


JOB_FUNCTIONS = st.one_of(NAMES.filter(lambda n: n.split(":")[0] not in (ECHO, CONFIGURED)), JSON)


@given(
    mutated(
        {"function": MISSING, "inputs": [1, {"a": 2}]},
        {"function": JOB_FUNCTIONS, "inputs": st.lists(JSON, max_size=4)},
    )
)
def test_submit_job_json(client: AppClient, body: bytes) -> None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and str(doc.get("function")).split(":")[0] in (ECHO, CONFIGURED):
        return  # a job that would run: not in this test
    check(client.post("/jobs", content=body))


@given(
    st.one_of(JOB_FUNCTIONS.map(str), st.none()),
    st.lists(st.one_of(PAYLOADS, st.just(b""), st.just(b"  ")), max_size=4),
    st.sampled_from(["application/x-ndjson", "text/plain", ""]),
)
def test_submit_job_json_lines(
    client: AppClient, function: str | None, lines: list[bytes], content_type: str
) -> None:
    query = {} if function is None else {"function": function}
    if function is not None and function.split(":")[0] in (ECHO, CONFIGURED):
        query["function"] = MISSING
    headers = {"content-type": content_type} if content_type else {}
    check(client.post("/jobs", params=query, headers=headers, content=b"\n".join(lines)))


# -- image operations --------------------------------------------------------------------------
_PREHEAT_FIELDS = {
    "image": BAD_IMAGES,
    "nodes": JSON,
    "selector": JSON,
    "parallelism": st.one_of(st.integers(), _HUGE),
    "timeoutSeconds": st.one_of(st.integers(), _HUGE, st.floats()),
    "backoffLimit": st.one_of(st.integers(), _HUGE),
    "ttlSecondsAfterFinished": st.one_of(st.integers(), _HUGE),
}


@given(mutated({"image": "Bad Ref"}, _PREHEAT_FIELDS))
def test_preheat(client: AppClient, body: bytes) -> None:
    assume(not reaches_a_registry(body))
    check(client.post("/images/preheat", content=body))


@given(NAMES, mutated({"image": "Bad Ref"}, {"image": BAD_IMAGES, "nodes": JSON, "selector": JSON}))
def test_image_cache_entry(client: AppClient, name: str, body: bytes) -> None:
    assume(not reaches_a_registry(body))
    check(client.put(f"/images/cache/{path_of(name)}", content=body))
    check(client.get(f"/images/cache/{path_of(name)}"))
