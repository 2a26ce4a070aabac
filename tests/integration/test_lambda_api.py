"""The whole Lambda API surface through boto3, against a real server and real sandboxes."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import Server, deploy, make_zip, needs_root, wait_until

pytestmark = [pytest.mark.integration]

HELLO = """
import os
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    print("got", event)
    return {
        "event": event, "count": COUNT,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory": context.memory_limit_in_mb,
        "request_id": context.aws_request_id,
        "arn": context.invoked_function_arn,
        "remaining": context.get_remaining_time_in_millis(),
        "env": os.environ.get("GREETING"),
    }
"""


def _invoke(lam: Any, name: str, event: Any, **kw: Any) -> tuple[dict[str, Any], Any]:
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kw)
    return resp, json.loads(resp["Payload"].read())


def test_function_lifecycle(lam: Any) -> None:
    created = deploy(
        lam,
        "life",
        {"handler.py": HELLO},
        MemorySize=256,
        Timeout=5,
        Environment={"Variables": {"GREETING": "hi"}},
        Description="d",
    )
    assert created["FunctionName"] == "life"
    assert created["MemorySize"] == 256 and created["Timeout"] == 5
    assert created["FunctionArn"].endswith(":function:life")
    assert created["Environment"] == {"Variables": {"GREETING": "hi"}}

    got = lam.get_function(FunctionName="life")
    assert got["Configuration"]["Handler"] == "handler.handler"
    assert got["Code"]["Location"].startswith("http")
    names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    assert names == ["life"]
    assert lam.get_function_configuration(FunctionName="life")["Description"] == "d"

    resp, body = _invoke(lam, "life", {"a": 1}, LogType="Tail")
    assert resp["StatusCode"] == 200
    assert "FunctionError" not in resp
    assert resp["ExecutedVersion"] == "$LATEST"
    assert body["event"] == {"a": 1}
    assert body["function_name"] == "life"
    assert body["memory"] == 256
    assert body["env"] == "hi"
    assert body["arn"].endswith(":function:life")
    assert 0 < body["remaining"] <= 5000
    logs = base64.b64decode(resp["LogResult"]).decode()
    assert "START RequestId:" in logs and "got {'a': 1}" in logs and "REPORT RequestId:" in logs
    assert len(base64.b64decode(resp["LogResult"])) <= 4096

    conf = lam.update_function_configuration(
        FunctionName="life", MemorySize=512, Environment={"Variables": {"GREETING": "hey"}}
    )
    assert conf["MemorySize"] == 512
    _, body = _invoke(lam, "life", {})
    assert body["memory"] == 512 and body["env"] == "hey"

    new_code = HELLO.replace('"env": os.environ.get("GREETING")', '"env": "v2"')
    upd = lam.update_function_code(FunctionName="life", ZipFile=make_zip({"handler.py": new_code}))
    assert upd["CodeSha256"] != created["CodeSha256"]
    assert upd["RevisionId"] != created["RevisionId"]
    _, body = _invoke(lam, "life", {})
    assert body["env"] == "v2"

    assert (
        lam.put_function_concurrency(FunctionName="life", ReservedConcurrentExecutions=3)[
            "ReservedConcurrentExecutions"
        ]
        == 3
    )
    assert lam.get_function(FunctionName="life")["Concurrency"] == {
        "ReservedConcurrentExecutions": 3
    }
    assert lam.get_function_concurrency(FunctionName="life")["ReservedConcurrentExecutions"] == 3
    lam.delete_function_concurrency(FunctionName="life")
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="life")

    lam.delete_function(FunctionName="life")
    with pytest.raises(ClientError) as err:
        lam.get_function(FunctionName="life")
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_invocation_types_and_errors(lam: Any, server: Server) -> None:
    deploy(lam, "kinds", {"handler.py": HELLO})
    resp = lam.invoke(FunctionName="kinds", InvocationType="DryRun")
    assert resp["StatusCode"] == 204
    resp = lam.invoke(FunctionName="kinds", InvocationType="Event", Payload=b'{"async": true}')
    assert resp["StatusCode"] == 202
    # The queued event runs in the background and shows up in the function's log; its
    # request id is the event's, which GET /events/<id> follows to its result.
    event_id = resp["ResponseMetadata"]["RequestId"]
    with server.http() as http:
        wait_until(
            lambda: "'async': True" in http.get("/functions/kinds/logs").text,
            "the Event invocation to run",
        )
        wait_until(
            lambda: http.get(f"/events/{event_id}").json()["status"] == "succeeded",
            "the Event invocation's outcome",
        )
        event = http.get(f"/events/{event_id}").json()
    assert event["function"] == "kinds"
    assert event["result"]["event"] == {"async": True}

    with pytest.raises(ClientError) as err:
        lam.invoke(FunctionName="nope", Payload=b"{}")
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"

    with pytest.raises(ClientError) as err:
        deploy(lam, "kinds", {"handler.py": HELLO})
    assert err.value.response["Error"]["Code"] == "ResourceConflictException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409

    for bad in ({"MemorySize": 20000}, {"Timeout": 901}, {"Runtime": "nodejs18.x"}):
        with pytest.raises(ClientError) as err:
            kwargs: dict[str, Any] = {"Runtime": "python3.11", **bad}
            lam.create_function(
                FunctionName="bad",
                Role="r",
                Handler="handler.handler",
                Code={"ZipFile": make_zip({"handler.py": HELLO})},
                **kwargs,
            )
        assert err.value.response["Error"]["Code"] == "InvalidParameterValueException", bad
    with pytest.raises(ClientError) as err:
        lam.create_function(
            FunctionName="bad",
            Runtime="python3.11",
            Role="r",
            Handler="nodot",
            Code={"ZipFile": make_zip({"handler.py": HELLO})},
        )
    assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
    with pytest.raises(ClientError) as err:
        lam.create_function(
            FunctionName="bad",
            Runtime="python3.11",
            Role="r",
            Handler="handler.handler",
            Code={"ZipFile": make_zip({"handler.py": HELLO})},
            Environment={"Variables": {"AWS_REGION": "x"}},
        )
    assert err.value.response["Error"]["Code"] == "InvalidParameterValueException"
    with pytest.raises(ClientError) as err:
        lam.update_function_configuration(FunctionName="kinds", Timeout=5, RevisionId="stale")
    assert err.value.response["Error"]["Code"] == "PreconditionFailedException"


def test_function_names_as_arns(lam: Any) -> None:
    arn = deploy(lam, "arny", {"handler.py": HELLO})["FunctionArn"]
    _resp, body = _invoke(lam, arn, {"x": 1})
    assert body["event"] == {"x": 1}
    assert lam.get_function(FunctionName=arn)["Configuration"]["FunctionName"] == "arny"
    _, body = _invoke(lam, "arny:$LATEST", {"y": 2})
    assert body["event"] == {"y": 2}


def test_reserved_concurrency_zero_throttles(lam: Any) -> None:
    deploy(lam, "zero", {"handler.py": HELLO})
    lam.put_function_concurrency(FunctionName="zero", ReservedConcurrentExecutions=0)
    with pytest.raises(ClientError) as err:
        _invoke(lam, "zero", {})
    assert err.value.response["Error"]["Code"] == "TooManyRequestsException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429


def test_concurrency_queue_then_429(server_factory: Any) -> None:
    server = server_factory("--queue-depth", "1")
    lam = server.lambda_client()
    slow = "import time\ndef handler(event, context):\n    time.sleep(event.get('s', 0))\n    return 'ok'\n"
    deploy(lam, "slow", {"handler.py": slow}, Timeout=30)
    lam.put_function_concurrency(FunctionName="slow", ReservedConcurrentExecutions=1)
    _invoke(lam, "slow", {})  # warm one instance
    results: list[Any] = []

    def call() -> None:
        try:
            _, body = _invoke(server.lambda_client(), "slow", {"s": 1.5})
            results.append(body)
        except ClientError as exc:
            results.append(exc.response["Error"]["Code"])

    def busy() -> float:
        with server.http() as http:
            return float(http.get("/node").json()["instances"]["busy"])

    # The one instance is busy for 1.5 s; the next call waits in the queue (depth 1) and
    # the one after it is refused, in whichever order those two arrive.
    threads = [threading.Thread(target=call) for _ in range(3)]
    threads[0].start()
    wait_until(lambda: busy() == 1, "the first call to hold the instance")
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == ["TooManyRequestsException", "ok", "ok"]


def test_update_code_drops_no_request(lam: Any, server: Server) -> None:
    """Invocations running during UpdateFunctionCode finish on the old code; none fail."""
    code = "import time\nV = {v}\ndef handler(event, context):\n    time.sleep(event.get('s', 0))\n    return V\n"
    deploy(lam, "roll", {"handler.py": code.format(v=1)}, Timeout=30)
    results: list[Any] = []
    errors: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        client = server.lambda_client()
        while not stop.is_set():
            resp, body = _invoke(client, "roll", {"s": 0.05})
            if "FunctionError" in resp:
                errors.append(body)
            results.append(body)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 8, "calls on the first revision")
    lam.update_function_code(
        FunctionName="roll", ZipFile=make_zip({"handler.py": code.format(v=2)})
    )
    # The callers go on for a while on the new revision before they stop.
    wait_until(lambda: results.count(2) >= 8, "calls on the second revision")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {1, 2}
    assert results[-1] == 2
    _, body = _invoke(lam, "roll", {})
    assert body == 2


def test_warm_and_cold_headers_and_metrics(server: Server, lam: Any) -> None:
    deploy(lam, "hdr", {"handler.py": HELLO})
    with server.http() as http:
        first = http.post("/run/hdr", content=b'{"n": 1}')
        second = http.post("/run/hdr", content=b'{"n": 2}')
        assert first.status_code == 200 and second.status_code == 200
        # A cold start forks from a zygote when the import cache is on (root, Linux).
        kind = "fork" if http.get("/healthz").json()["zygotes"] else "cold"
        assert first.headers["X-Warmstart-Start"] == kind
        assert second.headers["X-Warmstart-Start"] == "warm"
        assert float(second.headers["X-Warmstart-Duration-Ms"]) > 0
        assert second.json()["count"] == 2  # the same instance served both
        metrics = http.get("/metrics").text
        assert (
            'warmstart_invocations_total{function="hdr",outcome="success",version="$LATEST"} 2.0'
            in metrics
        )
        assert (
            f'warmstart_starts_total{{function="hdr",kind="{kind}",version="$LATEST"}} 1.0'
            in metrics
        )
        assert "warmstart_invocation_duration_seconds_bucket" in metrics
        assert (
            'warmstart_instances{state="idle"}' in metrics
            or 'warmstart_instances{state="frozen"}' in metrics
        )
        health = http.get("/healthz").json()
        assert health["status"] == "ok"


@needs_root
def test_frozen_instance_is_thawed(server_factory: Any) -> None:
    server = server_factory("--freeze-after-ms", "0")
    lam = server.lambda_client()
    deploy(lam, "frz", {"handler.py": HELLO})
    with server.http() as http:
        assert http.post("/run/frz", content=b"{}").json()["count"] == 1
        states = [i["state"] for i in http.get("/instances").json()["instances"]]
        assert states == ["frozen"]
        resp = http.post("/run/frz", content=b"{}")
        assert resp.headers["X-Warmstart-Start"] == "warm"
        assert resp.json()["count"] == 2


@needs_root
@pytest.mark.parametrize("freeze_after_ms", ["0", "60000"])
def test_killed_idle_instance_is_replaced(server_factory: Any, freeze_after_ms: str) -> None:
    """GET /instances names each idle instance's processes; SIGKILL them and the next call
    starts a new instance: one the worker had not yet seen die (a frozen instance dies
    when it is thawed) never reads the request, and the call goes to another."""
    server = server_factory("--freeze-after-ms", freeze_after_ms)
    lam = server.lambda_client()
    deploy(lam, "victim", {"handler.py": HELLO})
    with server.http() as http:
        assert http.post("/run/victim", content=b"{}").json()["count"] == 1
        (idle,) = http.get("/instances").json()["instances"]
        assert idle["function"] == "victim" and idle["pids"]
        for pid in idle["pids"]:
            os.kill(pid, signal.SIGKILL)
        resp = http.post("/run/victim", content=b"{}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Warmstart-Start"] != "warm"
        assert resp.json()["count"] == 1  # a new instance
        assert not set(idle["pids"]) & {
            pid for i in http.get("/instances").json()["instances"] for pid in i["pids"]
        }


def test_state_survives_restart(server_factory: Any, tmp_path: Any) -> None:
    server = server_factory()
    lam = server.lambda_client()
    deploy(lam, "keep", {"handler.py": HELLO})
    _invoke(lam, "keep", {})
    server.stop()
    again = server_factory(data_dir=server.data_dir)
    _, body = _invoke(again.lambda_client(), "keep", {"after": "restart"})
    assert body["event"] == {"after": "restart"}


@needs_root
def test_handler_cache_budget_evicts_least_recently_used(server_factory: Any) -> None:
    """Idle instances beyond the cache's memory budget are evicted, oldest first."""
    server = server_factory("--freeze-after-ms", "0", "--cache-budget-mb", "1")
    lam = server.lambda_client()
    deploy(lam, "old", {"handler.py": HELLO})
    deploy(lam, "new", {"handler.py": HELLO})
    _invoke(lam, "old", {})
    _invoke(lam, "new", {})
    with server.http() as http:

        def idle_functions() -> list[str]:
            return [i["function"] for i in http.get("/instances").json()["instances"]]

        wait_until(lambda: len(idle_functions()) <= 1, "the eviction", timeout=10)
        assert "old" not in idle_functions()
        assert "warmstart_evictions_total" in http.get("/metrics").text
    # An evicted function simply starts again.
    _resp, body = _invoke(lam, "old", {"again": True})
    assert body["event"] == {"again": True}
