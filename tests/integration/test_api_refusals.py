"""Malformed requests the API once answered with a 500 (or accepted): each is now a 4xx
in Lambda's error shape -- an ``x-amzn-ErrorType`` header and a JSON ``message``.  Found
by ``tests/fuzz/test_api_bodies.py``; here as plain cases, against the real app."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apptools import AppClient, app_client
from tests.conftest import make_zip

pytestmark = pytest.mark.integration

LAMBDA = "/2015-03-31/functions"
CODE = base64.b64encode(make_zip({"handler.py": "def handler(e, c):\n    return 1\n"})).decode()
DEEP = "[" * 10_000 + "]" * 10_000  # deeper than json's recursion limit


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    with app_client(Path(tmp_path_factory.mktemp("refusals")) / "data") as client:
        body = {"FunctionName": "fn", "Handler": "handler.handler", "Code": {"ZipFile": CODE}}
        assert client.post(LAMBDA, json=body).status_code == 201
        yield client


def refused(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-amzn-ErrorType"] == error_type
    body: dict[str, Any] = response.json()
    assert isinstance(body["message"], str) and body["message"]
    return body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", LAMBDA),
        ("PUT", f"{LAMBDA}/fn/configuration"),
        ("PUT", f"{LAMBDA}/fn/code"),
        ("PUT", "/2017-10-31/functions/fn/concurrency"),
        ("POST", "/jobs"),
        ("POST", "/images/preheat"),
        ("PUT", "/images/cache/entry"),
    ],
)
def test_a_body_nested_too_deeply_is_a_400(api: AppClient, method: str, path: str) -> None:
    refused(api.request(method, path, content=DEEP), 400, "InvalidParameterValueException")


def test_a_job_line_nested_too_deeply_is_a_400(api: AppClient) -> None:
    response = api.post("/jobs", params={"function": "fn"}, content=f"1\n{DEEP}\n".encode())
    assert "line 2" in refused(response, 400, "InvalidParameterValueException")["message"]


def test_a_client_context_nested_too_deeply_is_a_400(api: AppClient) -> None:
    context = base64.b64encode(DEEP.encode()).decode()
    response = api.post(
        f"{LAMBDA}/fn/invocations", headers={"X-Amz-Client-Context": context}, content=b"{}"
    )
    refused(response, 400, "InvalidParameterValueException")


def test_a_payload_nested_too_deeply_is_invalid_request_content(api: AppClient) -> None:
    """The runtime parses the event: a RecursionError there ended the runtime (an
    unexplained Runtime.ExitError); it is the caller's malformed JSON."""
    response = api.post(f"{LAMBDA}/fn/invocations", content=DEEP.encode())
    refused(response, 400, "InvalidRequestContentException")
    # and the function still answers
    assert api.post(f"{LAMBDA}/fn/invocations", content=b"{}").json() == 1


@pytest.mark.parametrize("handler", [["handler.handler"], 7, None, {"a": 1}, "handler.handler\n"])
def test_a_handler_that_is_not_one_is_a_400(api: AppClient, handler: Any) -> None:
    response = api.put(f"{LAMBDA}/fn/configuration", content=json.dumps({"Handler": handler}))
    refused(response, 400, "InvalidParameterValueException")
    assert api.get(f"{LAMBDA}/fn/configuration").json()["Handler"] == "handler.handler"


@pytest.mark.parametrize("name", ["new\n", "new%0A"])
def test_a_function_name_with_a_trailing_newline_is_a_400(api: AppClient, name: str) -> None:
    body = {"FunctionName": name, "Handler": "handler.handler", "Code": {"ZipFile": CODE}}
    refused(api.post(LAMBDA, json=body), 400, "InvalidParameterValueException")


@pytest.mark.parametrize("marker", ["²", "9" * 5000, "-1", "x"])
def test_a_marker_this_api_did_not_return_is_a_400(api: AppClient, marker: str) -> None:
    refused(api.get(LAMBDA, params={"Marker": marker}), 400, "InvalidParameterValueException")
    assert api.get(LAMBDA, params={"Marker": "0"}).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", f"{LAMBDA}//configuration", 404),
        ("POST", "/run/", 404),
        ("DELETE", f"{LAMBDA}/fn/configuration", 405),
    ],
)
def test_a_path_no_operation_serves_is_refused_in_the_same_shape(
    api: AppClient, method: str, path: str, status: int
) -> None:
    refused(api.request(method, path), status, "UnknownOperationException")
