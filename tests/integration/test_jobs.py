"""Batch jobs: durable, at least once, with results and progress; the CLI follows them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, deploy, has_cgroup_v1, needs, needs_root, wait_until

pytestmark = [pytest.mark.integration]

SQUARE = """
import time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        raise ValueError("bad input %s" % event["x"])
    return event["x"] ** 2
"""


def _wait_done(server: Server, job_id: str, timeout: float = 60) -> dict[str, Any]:
    with server.http() as http:

        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
            return job if job["status"] == "completed" else None

        return wait_until(done, f"job {job_id} to complete", timeout)


def test_job_runs_every_input_and_keeps_results(server: Server, lam: Any) -> None:
    deploy(lam, "square", {"handler.py": SQUARE})
    inputs = [{"x": i} for i in range(20)] + [{"x": 99, "fail": True}]
    with server.http() as http:
        r = http.post("/jobs", json={"function": "square", "inputs": inputs})
        assert r.status_code == 202
        job_id = r.json()["JobId"]
        job = _wait_done(server, job_id)
        assert (job["total"], job["succeeded"], job["failed"]) == (21, 20, 1)
        results = http.get(f"/jobs/{job_id}/results").json()["results"]
    assert [r["result"] for r in results[:20]] == [i * i for i in range(20)]  # JSON values
    failed = results[20]
    assert failed["status"] == "failed" and failed["attempts"] == 3  # retried like Lambda
    assert failed["result"]["errorMessage"] == "bad input 99"


def test_bad_job_requests(server: Server, lam: Any) -> None:
    deploy(lam, "square", {"handler.py": SQUARE})
    with server.http() as http:
        assert http.post("/jobs", json={"function": "nope", "inputs": [{}]}).status_code == 404
        assert http.post("/jobs", json={"function": "square", "inputs": []}).status_code == 400
        bad = http.post(
            "/jobs?function=square",
            content=b'{"x": 1}\nnot json\n',
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert bad.status_code == 400 and "line 2" in bad.json()["message"]
        assert http.get("/jobs/no-such-job").status_code == 404


def test_jobs_survive_a_killed_worker(server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = server_factory(data_dir=data_dir)
    deploy(first.lambda_client(), "square", {"handler.py": SQUARE}, Timeout=10)
    with first.http() as http:
        job_id = http.post(
            "/jobs",
            json={"function": "square", "inputs": [{"x": i, "sleep": 0.2} for i in range(30)]},
        ).json()["JobId"]
        # Killed part-way: some items have finished, most have not.

        def started() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(f"/jobs/{job_id}").json()
            return job if job["succeeded"] >= 1 else None

        job = wait_until(started, "the job's first result")
        assert job["status"] == "running" and job["succeeded"] < 30
    first.stop(signal.SIGKILL)
    second = server_factory(data_dir=data_dir)
    job = _wait_done(second, job_id)
    assert job["succeeded"] == 30 and job["failed"] == 0  # nothing lost


def test_cli_submits_and_follows_a_job(server: Server, lam: Any, tmp_path: Path) -> None:
    deploy(lam, "square", {"handler.py": SQUARE})
    lines = tmp_path / "inputs.jsonl"
    lines.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(5)))
    cli = [sys.executable, "-m", "warmstart.cli.main"]
    out = subprocess.run(
        [*cli, "job", "submit", "square", str(lines), "--wait", "--endpoint", server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "5 succeeded, 0 failed" in out.stdout
    job_id = out.stdout.split()[1].rstrip(":")
    res = subprocess.run(
        [*cli, "job", "results", job_id, "--endpoint", server.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["index"], r["status"], r["result"]) for r in lines] == [
        (i, "succeeded", i * i) for i in range(5)
    ]


@needs_root
@needs(has_cgroup_v1("cpu/cpu.shares"), "needs the cgroup v1 cpu controller")
def test_best_effort_work_runs_in_its_own_cgroup_subtree(server: Server, lam: Any) -> None:
    """Event invocations and job items run in the BE subtree: lowest CPU weight, idle class."""
    where = "import os\ndef handler(e, c):\n    return open('/proc/self/cgroup').read()\n"
    deploy(lam, "where", {"handler.py": where})
    with server.http() as http:
        ls_cgroups = http.post("/run/where", content=b"{}").json()
        job_id = http.post("/jobs", json={"function": "where", "inputs": [{}]}).json()["JobId"]
        _wait_done(server, job_id)
        be_cgroups = http.get(f"/jobs/{job_id}/results").json()["results"][0]["result"]

    def controller(text: str, name: str) -> str:
        return next(ln for ln in text.splitlines() if f":{name}:" in ln).split(":", 2)[2]

    ls_cpu, be_cpu = controller(ls_cgroups, "cpu"), controller(be_cgroups, "cpu")
    assert ls_cpu.startswith("/warmstart/") and "/ls/" in ls_cpu
    # BE hangs off the hierarchy's root: a weight ranks a group only among its siblings,
    # and there those are the ordinary tasks of the host (the worker among them).
    assert be_cpu.startswith("/warmstart-be/")
    be_parent = Path("/sys/fs/cgroup/cpu" + be_cpu).parent
    for d in (be_parent, be_parent.parent):
        assert int((d / "cpu.shares").read_text()) == 2
    if Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists():
        # BE instances join the cpuset controller (for the cpuset policy); LS ones do not.
        assert controller(be_cgroups, "cpuset") == be_cpu
        assert controller(ls_cgroups, "cpuset") == "/"
