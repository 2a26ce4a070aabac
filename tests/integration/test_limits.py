"""Payload limits against a real ``warmstart serve`` and real sandboxes: oversized
requests are refused with 413 before they are buffered (and before any handler runs),
oversized results are ``Function.ResponseSizeTooLarge`` and the worker never holds them.

The worker's memory is read from /proc as the server process's peak resident set
(VmHWM): a body the worker buffered would raise it by the body's size at least.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Server, deploy, needs_root, wait_until

pytestmark = [pytest.mark.integration, needs_root]

MB = 1 << 20

ECHO = """
def handler(event, context):
    print("CALLED")
    if isinstance(event, dict) and "size" in event:
        return "x" * event["size"]
    return len(event) if isinstance(event, str) else event
"""

# A handler that talks to the worker behind the runtime's back: it announces a 200 MB
# result on the runtime's socket and starts sending it.
ROGUE = """
import gc, json, os, struct

def handler(event, context):
    runtime = next(o for o in gc.get_objects() if type(o).__name__ == "Runtime")
    meta = json.dumps({"type": "result"}).encode()
    os.write(runtime.fd, struct.pack("!III", len(meta), 200 << 20, 0) + meta)
    block = b"x" * (1 << 20)
    for _ in range(200):
        os.write(runtime.fd, block)
    return "never read"
"""


def peak_rss(server: Server) -> int:
    """The server process's peak resident set so far, in bytes."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert m is not None
    return int(m.group(1)) * 1024


def function_log(server: Server, name: str) -> str:
    with server.http() as http:
        return http.get(f"/functions/{name}/logs").text


def too_large_count(server: Server, limit: str) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    m = re.search(rf'^warmstart_requests_too_large_total{{limit="{limit}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    """A body of ``total`` bytes sent chunked (no Content-Length)."""
    block = b"x" * size
    sent = 0
    while sent < total:
        yield block[: min(size, total - sent)]
        sent += size


def test_a_sync_payload_over_6mb_is_refused_before_the_handler(server: Server, lam: Any) -> None:
    deploy(lam, "echo", {"handler.py": ECHO}, MemorySize=256)
    payload = json.dumps("x" * (7 * MB)).encode()
    with pytest.raises(ClientError) as err:
        lam.invoke(FunctionName="echo", Payload=payload)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert err.value.response["Error"]["Code"] == "RequestTooLargeException"
    assert err.value.response["Error"]["Message"] == (
        "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    )
    assert isinstance(err.value, lam.exceptions.RequestTooLargeException)
    assert "CALLED" not in function_log(server, "echo")
    # At the limit it runs.
    at_limit = json.dumps("x" * (6 * MB - 2)).encode()
    assert len(at_limit) == 6 * MB
    resp = lam.invoke(FunctionName="echo", Payload=at_limit)
    assert "FunctionError" not in resp and json.loads(resp["Payload"].read()) == 6 * MB - 2
    assert too_large_count(server, "invoke") == 1


def test_oversized_bodies_are_not_buffered_with_or_without_a_length(
    server: Server, lam: Any
) -> None:
    deploy(lam, "echo", {"handler.py": ECHO})
    before = peak_rss(server)
    big = 100 * MB
    with server.http() as http:
        for path in ("/2015-03-31/functions/echo/invocations", "/run/echo"):
            r = http.post(path, content=b"x" * big)  # Content-Length: refused unread
            assert r.status_code == 413, r.text
            assert r.headers["x-amzn-errortype"] == "RequestTooLargeException"
            r = http.post(path, content=chunks(big))  # chunked: counted, cut at the limit
            assert r.status_code == 413, r.text
            assert r.headers["x-amzn-errortype"] == "RequestTooLargeException"
        assert http.post("/run/echo", content=b'"ok"').json() == 2  # the node serves on
    grown = peak_rss(server) - before
    assert grown < 50 * MB, f"the worker's peak RSS grew by {grown >> 20} MB"
    assert function_log(server, "echo").count("CALLED") == 1
    assert too_large_count(server, "invoke") == 4


def test_an_event_payload_over_256kb_is_refused(server: Server, lam: Any) -> None:
    deploy(lam, "echo", {"handler.py": ECHO})
    with pytest.raises(ClientError) as err:
        lam.invoke(
            FunctionName="echo", InvocationType="Event", Payload=json.dumps("x" * 300_000)
        )
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert err.value.response["Error"]["Code"] == "RequestTooLargeException"
    assert "smaller than 262144 bytes" in err.value.response["Error"]["Message"]
    ok = lam.invoke(FunctionName="echo", InvocationType="Event", Payload=json.dumps("x" * 200_000))
    assert ok["StatusCode"] == 202
    wait_until(lambda: "CALLED" in function_log(server, "echo"), "the queued event to run")
    assert too_large_count(server, "event") == 1


def test_the_event_limit_is_a_node_setting(server_factory: Any) -> None:
    server = server_factory("--max-event-bytes", str(MB))
    lam = server.lambda_client()
    deploy(lam, "echo", {"handler.py": ECHO})
    ok = lam.invoke(FunctionName="echo", InvocationType="Event", Payload=json.dumps("x" * 900_000))
    assert ok["StatusCode"] == 202
    with pytest.raises(ClientError) as err:
        lam.invoke(FunctionName="echo", InvocationType="Event", Payload=json.dumps("x" * MB))
    assert "smaller than 1048576 bytes" in err.value.response["Error"]["Message"]


def test_a_result_over_6mb_is_response_size_too_large_and_the_instance_serves_on(
    server: Server, lam: Any
) -> None:
    deploy(lam, "echo", {"handler.py": ECHO}, MemorySize=256)
    assert lam.invoke(FunctionName="echo", Payload=b'{"size": 1}')["StatusCode"] == 200
    resp = lam.invoke(FunctionName="echo", Payload=json.dumps({"size": 10 * MB}).encode())
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    body = json.loads(resp["Payload"].read())
    assert body["errorType"] == "Function.ResponseSizeTooLarge"
    assert body["errorMessage"] == (
        f"Response payload size ({10 * MB + 2} bytes) exceeded maximum allowed payload "
        "size (6291556 bytes)."
    )
    again = lam.invoke(FunctionName="echo", Payload=b'{"size": 3}')
    assert json.loads(again["Payload"].read()) == "xxx"
    # The runtime refused to send it: the same instance serves the next call.
    assert again["ResponseMetadata"]["HTTPHeaders"]["x-warmstart-start"] == "warm"
    with server.http() as http:
        r = http.post("/run/echo", json={"size": 7 * MB})
        assert r.status_code == 502
        assert r.json()["errorType"] == "Function.ResponseSizeTooLarge"


def test_a_runtime_that_sends_200mb_anyway_is_not_read(server: Server, lam: Any) -> None:
    deploy(lam, "rogue", {"handler.py": ROGUE})
    deploy(lam, "echo", {"handler.py": ECHO})
    before = peak_rss(server)
    resp = lam.invoke(FunctionName="rogue", Payload=b"{}")
    assert resp["FunctionError"] == "Unhandled"
    body = json.loads(resp["Payload"].read())
    assert body["errorType"] == "Function.ResponseSizeTooLarge"
    assert f"({200 * MB} bytes)" in body["errorMessage"]
    grown = peak_rss(server) - before
    assert grown < 50 * MB, f"the worker's peak RSS grew by {grown >> 20} MB"
    # The instance was destroyed (its socket was mid-frame); the function starts afresh.
    again = lam.invoke(FunctionName="rogue", Payload=b"{}")
    assert json.loads(again["Payload"].read())["errorType"] == "Function.ResponseSizeTooLarge"
    assert again["ResponseMetadata"]["HTTPHeaders"]["x-warmstart-start"] != "warm"
    assert json.loads(lam.invoke(FunctionName="echo", Payload=b'"ok"')["Payload"].read()) == 2


def _job_done(server: Server, job_id: str) -> dict[str, Any]:
    with server.http() as http:

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
            return job if job["status"] == "completed" else None

        return wait_until(done, f"job {job_id} to complete", 120)


def test_job_inputs_and_results_are_bounded(server_factory: Any) -> None:
    server = server_factory("--max-job-bytes", "1000000")
    deploy(server.lambda_client(), "echo", {"handler.py": ECHO})
    with server.http() as http:
        whole = http.post("/jobs", json={"function": "echo", "inputs": ["x" * 200_000] * 6})
        assert whole.status_code == 413 and "1000000 bytes" in whole.json()["message"]
        lines = b"\n".join([b'"x"'] * 10 + [json.dumps("x" * 300_000).encode()])
        item = http.post(
            "/jobs?function=echo", content=lines, headers={"Content-Type": "application/x-ndjson"}
        )
        assert item.status_code == 413 and "input line 11" in item.json()["message"]
        item = http.post("/jobs", json={"function": "echo", "inputs": [1, "x" * 300_000]})
        assert item.status_code == 413 and "inputs[1]" in item.json()["message"]
        chunked = http.post(
            "/jobs?function=echo",
            content=chunks(2_000_000),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert chunked.status_code == 413
        assert http.get("/jobs").json()["jobs"] == []
        # A result is kept only within the Event limit too.
        job = http.post(
            "/jobs", json={"function": "echo", "inputs": [{"size": 10}, {"size": 300_000}]}
        ).json()
        done = _job_done(server, job["JobId"])
        assert (done["succeeded"], done["failed"]) == (1, 1)
        results = http.get(f"/jobs/{job['JobId']}/results").json()["results"]
    assert results[0]["result"] == "x" * 10
    assert results[1]["status"] == "failed"
    assert results[1]["result"]["errorType"] == "Function.ResponseSizeTooLarge"
    assert "(262144 bytes)" in results[1]["result"]["errorMessage"]
    assert too_large_count(server, "job") == 2
    assert too_large_count(server, "job_input") == 2


def test_control_plane_bodies_are_bounded(server: Server, lam: Any) -> None:
    deploy(lam, "echo", {"handler.py": ECHO})
    with server.http() as http:
        r = http.put(
            "/2015-03-31/functions/echo/configuration",
            content=chunks(2 * MB),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 413
        assert r.headers["x-amzn-errortype"] == "RequestEntityTooLargeException"
        assert "UpdateFunctionConfiguration" in r.json()["message"]
        r = http.post("/images/preheat", content=b"x" * (1 * MB))
        assert r.status_code == 413
    assert lam.get_function_configuration(FunctionName="echo")["Handler"] == "handler.handler"
