"""What a node keeps: finished events and jobs expire, queued and running ones stay;
function logs rotate and stay readable."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.conftest import Server, deploy, wait_until

pytestmark = [pytest.mark.integration]

ECHO = """
import time
def handler(event, context):
    print("handling", event)
    time.sleep(event.get("sleep", 0))
    return event
"""


def test_finished_work_expires_while_queued_and_running_work_stays(server_factory: Any) -> None:
    # A retention of 1.8 s (the loop then passes every 0.18 s); no QoS, so each event
    # below has a best-effort slot of its own.
    server: Server = server_factory(
        "--event-retention-hours", "0.0005", "--no-qos", "--be-concurrency", "4"
    )
    lam = server.lambda_client()
    for name in ("quick", "held", "slow"):
        deploy(lam, name, {"handler.py": ECHO}, Timeout=120)
    # No concurrency at all: its event is refused a start, again and again, and waits.
    lam.put_function_concurrency(FunctionName="held", ReservedConcurrentExecutions=0)

    def event(name: str, payload: bytes) -> str:
        resp = lam.invoke(FunctionName=name, InvocationType="Event", Payload=payload)
        return str(resp["ResponseMetadata"]["RequestId"])

    held = event("held", b"{}")
    slow = event("slow", b'{"sleep": 600}')
    quick = event("quick", b'{"x": 1}')
    with server.http() as http:
        wait_until(
            lambda: http.get(f"/events/{quick}").json().get("status") == "succeeded",
            "the quick event to succeed",
        )
        job = http.post("/jobs", json={"function": "quick", "inputs": [{"x": 2}, {"x": 3}]})
        job_id = job.json()["JobId"]
        wait_until(
            lambda: http.get(f"/jobs/{job_id}").json().get("status") == "completed",
            "the job to complete",
        )

        # Both were queued before the quick event finished: by the time it expires,
        # they are older than the retention, and still there.
        gone = wait_until(
            lambda: (r := http.get(f"/events/{quick}")).status_code == 404 and r,
            "the finished event to expire",
        )
        assert "expired" in gone.json()["message"]
        for pending in (held, slow):
            r = http.get(f"/events/{pending}")
            assert r.status_code == 200 and r.json()["status"] == "pending", r.text

        gone = wait_until(
            lambda: (r := http.get(f"/jobs/{job_id}")).status_code == 404 and r,
            "the finished job to expire",
        )
        assert job_id in gone.json()["message"]
        assert http.get(f"/jobs/{job_id}/results").status_code == 404
        assert http.get("/node").json()["queue_depth"] == 2  # held and slow


def test_function_logs_rotate_and_stay_readable(server_factory: Any) -> None:
    server: Server = server_factory("--function-log-max-mb", "0.002")  # ~2 KB a file
    lam = server.lambda_client()
    deploy(lam, "chatty", {"handler.py": ECHO})
    for i in range(40):
        resp = lam.invoke(FunctionName="chatty", Payload=f'{{"n": {i}}}'.encode(), LogType="Tail")
        tail = base64.b64decode(resp["LogResult"])
        assert f"handling {{'n': {i}}}".encode() in tail
    logs = server.data_dir / "logs"
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("chatty.")) == [
        "chatty.log",
        "chatty.log.1",
    ]
    assert (logs / "chatty.log").stat().st_size <= int(0.002 * (1 << 20))
    with server.http() as http:
        text = http.get("/functions/chatty/logs").text
    assert "handling {'n': 39}" in text and "handling {'n': 0}" not in text
