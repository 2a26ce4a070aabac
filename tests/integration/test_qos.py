"""The node QoS manager against real cgroups: reclaimed capacity, BE suppression,
eviction with requeue, and the views of it (GET /node, /metrics, warmstart top)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, deploy, has_cgroup_v1, needs, needs_root, wait_until

pytestmark = [pytest.mark.integration, needs_root]

needs_v1_cpu = needs(has_cgroup_v1("cpu/cpu.cfs_quota_us"), "needs the cgroup v1 cpu controller")

SLEEPER = "import time\ndef handler(event, context):\n    time.sleep(event.get('sleep', 0))\n    return 'done'\n"


def _be_cpu_dir(server: Server, controller: str = "cpu") -> Path:
    digest = hashlib.sha256(str(server.data_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/sys/fs/cgroup") / controller / "warmstart-be" / digest


def _node(server: Server) -> dict[str, Any]:
    with server.http() as http:
        node: dict[str, Any] = http.get("/node").json()
        return node


@needs_v1_cpu
def test_reclaimed_capacity_and_be_suppression(server: Server) -> None:
    wait_until(lambda: _node(server).get("usage"), "the first QoS tick")
    node = _node(server)
    assert node["qos"] is True
    assert node["capacity"]["cpus"] >= 1 and node["capacity"]["memory_bytes"] > 0
    for key in ("node_cpu", "ls_cpu", "be_cpu", "system_cpu", "node_memory"):
        assert node["usage"][key] >= 0
    assert node["reclaimed"]["stale"] is False
    assert 0 <= node["reclaimed"]["cpu_cores"] <= node["capacity"]["cpus"]
    # Zero when the host is busy with other work: nothing idle to lend.
    assert 0 <= node["be_cpu_limit_cores"] <= node["capacity"]["cpus"]
    # By default BE's lowest weight alone keeps it behind LS: the limit is computed and
    # reported, not written as a quota.  The BE subtree has the lowest weight, and so
    # does its top (warmstart-be/), which competes with every other task on the host.
    assert node["be_cpu_policy"] == "none"
    assert int((_be_cpu_dir(server) / "cpu.cfs_quota_us").read_text()) == -1
    for d in (_be_cpu_dir(server), _be_cpu_dir(server).parent):
        assert int((d / "cpu.shares").read_text()) == 2
        if (d / "cpu.idle").exists():
            assert (d / "cpu.idle").read_text().strip() == "0"
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert "warmstart_reclaimed_cpu_cores" in metrics and "warmstart_be_cpu_limit_cores" in metrics


@needs_v1_cpu
def test_quota_policy_caps_be_with_a_short_period(server_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "qos.json"
    config.write_text(json.dumps({"be_cpu_policy": "quota", "be_cfs_period_us": 20_000}))
    server: Server = server_factory("--qos-config", str(config))
    wait_until(lambda: _node(server).get("be_cpu_limit_cores") is not None, "a BE CPU limit")
    d = _be_cpu_dir(server)
    wait_until(lambda: int((d / "cpu.cfs_quota_us").read_text()) > 0, "a BE CPU quota")
    assert int((d / "cpu.cfs_period_us").read_text()) == 20_000
    quota = int((d / "cpu.cfs_quota_us").read_text())
    # The limit per 20 ms, never below the floor that keeps suppressed BE moving.
    assert 0.1 * 20_000 <= quota <= 20_000 * _node(server)["capacity"]["cpus"]
    assert _node(server)["be_cpu_limit_cores"] >= 0.1


CPUS = "import os\ndef handler(event, context):\n    return sorted(os.sched_getaffinity(0))\n"


@needs(
    has_cgroup_v1("cpuset/cpuset.cpus") and (os.cpu_count() or 1) >= 2,
    "needs the cgroup v1 cpuset controller and two CPUs",
)
def test_cpuset_policy_confines_best_effort_instances(server_factory: Any, tmp_path: Path) -> None:
    """With no CPU to lend (threshold 0), BE keeps its minimum of one core: the highest
    numbered, where its instances run; LS instances keep every core."""
    config = tmp_path / "qos.json"
    config.write_text(
        json.dumps(
            {
                "be_cpu_policy": "cpuset",
                "be_cpu_suppress_threshold": 0.0,
                "headroom_exempt_cores": 0.0,
            }
        )
    )
    server: Server = server_factory("--qos-config", str(config))
    lam = server.lambda_client()
    deploy(lam, "cpus", {"handler.py": CPUS})
    last = (os.cpu_count() or 1) - 1
    wait_until(lambda: _node(server).get("be_cpuset") == str(last), f"BE confined to CPU {last}")
    assert (_be_cpu_dir(server, "cpuset") / "cpuset.cpus").read_text().strip() == str(last)
    with server.http() as http:
        ls_cpus = http.post("/run/cpus", content=b"{}").json()
        job_id = http.post("/jobs", json={"function": "cpus", "inputs": [{}]}).json()["JobId"]
        wait_until(lambda: http.get(f"/jobs/{job_id}").json()["status"] == "completed", "the job")
        result = http.get(f"/jobs/{job_id}/results").json()["results"][0]
    assert result["status"] == "succeeded", result
    assert result["result"] == [last]
    assert len(ls_cpus) == os.cpu_count()


@needs(has_cgroup_v1("cpu/cpu.idle"), "needs cpu.idle in the cgroup v1 cpu controller")
def test_best_effort_in_the_idle_class_when_asked(server_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "qos.json"
    config.write_text(json.dumps({"be_sched_idle": True}))
    server: Server = server_factory("--qos-config", str(config))
    for d in (_be_cpu_dir(server), _be_cpu_dir(server).parent):
        assert (d / "cpu.idle").read_text().strip() == "1"
        # 2 written; an idle group reads back the kernel's idle weight.
        assert int((d / "cpu.shares").read_text()) <= 3
    server.stop()
    # A worker that does not want it puts the shared top back into the ordinary class.
    plain: Server = server_factory(data_dir=tmp_path / "plain")
    for d in (_be_cpu_dir(plain), _be_cpu_dir(plain).parent):
        assert (d / "cpu.idle").read_text().strip() == "0"
        assert int((d / "cpu.shares").read_text()) == 2


@needs_v1_cpu
def test_without_qos_nothing_is_squeezed(server_factory: Any, tmp_path: Path) -> None:
    """Even with the quota policy configured, a worker without QoS writes no quota: its
    manager still samples the node (GET /node shows usage) but enforces nothing."""
    config = tmp_path / "qos.json"
    config.write_text(json.dumps({"be_cpu_policy": "quota"}))
    server: Server = server_factory("--no-qos", "--qos-config", str(config))
    first = wait_until(lambda: _node(server).get("usage"), "the first QoS tick")
    # A different sample: the next tick has begun, so the first one has finished.
    wait_until(lambda: _node(server)["usage"] != first, "the second QoS tick")
    assert _node(server)["qos"] is False
    assert _node(server)["be_cpu_limit_cores"] is None
    assert int((_be_cpu_dir(server) / "cpu.cfs_quota_us").read_text()) == -1


def test_memory_pressure_evicts_best_effort_work_and_requeues_it(
    server_factory: Any, tmp_path: Path
) -> None:
    config = tmp_path / "qos.json"
    # Thresholds far below this node's memory use: any running BE instance is evicted.
    config.write_text(json.dumps({"memory_evict_upper": 0.001, "memory_evict_lower": 0.0}))
    server: Server = server_factory("--qos-config", str(config))
    deploy(server.lambda_client(), "slow", {"handler.py": SLEEPER}, Timeout=60)
    with server.http() as http:
        job_id = http.post("/jobs", json={"function": "slow", "inputs": [{"sleep": 5}]}).json()[
            "JobId"
        ]
    wait_until(lambda: _node(server)["evictions"] >= 1, "an eviction")
    with server.http() as http:
        item = http.get(f"/jobs/{job_id}/results").json()["results"][0]
    # Nothing is lost: the evicted item is pending again and no attempt was spent on it.
    assert item["status"] == "pending" and item["attempts"] == 0
    assert "evicting best-effort" in server.log()


def test_latency_sensitive_starts_take_memory_from_best_effort_work(
    server_factory: Any,
) -> None:
    """Best-effort work holding the node's memory budget does not make a synchronous call
    a 429: the running best-effort instance is evicted (its work requeued, no attempt
    spent) and runs again once there is room."""
    server: Server = server_factory("--memory-budget-mb", "400")
    lam = server.lambda_client()
    deploy(lam, "batch", {"handler.py": SLEEPER}, Timeout=60, MemorySize=256)
    deploy(lam, "api", {"handler.py": SLEEPER}, Timeout=60, MemorySize=256)
    with server.http() as http:
        job_id = http.post("/jobs", json={"function": "batch", "inputs": [{"sleep": 3}]}).json()[
            "JobId"
        ]
    wait_until(lambda: _node(server)["best_effort_running"] >= 1, "a running BE instance")
    resp = lam.invoke(FunctionName="api", Payload=b"{}")
    assert resp["StatusCode"] == 200 and "FunctionError" not in resp
    assert resp["Payload"].read() == b'"done"'
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert "warmstart_be_evictions_for_ls_memory_total 1.0" in metrics, metrics[-2000:]
    assert "latency-sensitive work needs the memory" in server.log()

    def finished() -> dict[str, Any] | None:
        with server.http() as http:
            item: dict[str, Any] = http.get(f"/jobs/{job_id}/results").json()["results"][0]
        return item if item["status"] == "succeeded" else None

    # The evicted item runs again (the idle LS instance makes room for it) and succeeds
    # on its first counted attempt.
    item = wait_until(finished, "the requeued item to succeed", 120)
    assert item["attempts"] == 1
    # With only latency-sensitive reservations over the budget, the call is refused.
    deploy(lam, "big", {"handler.py": SLEEPER}, Timeout=60, MemorySize=512)
    with pytest.raises(lam.exceptions.TooManyRequestsException):
        lam.invoke(FunctionName="big", Payload=b"{}")


READER = """import os
def handler(event, context):
    path = '/tmp/data'
    with open(path, 'wb') as f:
        f.write(os.urandom(24 << 20))
    with open(path, 'rb') as f:
        f.read()
    return open('/proc/self/oom_score_adj').read().strip()
"""


@needs(has_cgroup_v1("memory/memory.limit_in_bytes"), "needs the cgroup v1 memory controller")
def test_memory_qos_caps_be_prefers_it_for_oom_and_reclaims_idle_cache(
    server_factory: Any, tmp_path: Path
) -> None:
    config = tmp_path / "qos.json"
    config.write_text(json.dumps({"idle_reclaim_after_s": 1, "idle_reclaim_min_cache_mb": 1}))
    server: Server = server_factory("--qos-config", str(config), "--freeze-after-ms", "0")
    lam = server.lambda_client()
    deploy(lam, "reader", {"handler.py": READER}, Timeout=60, MemorySize=256)
    # The BE subtree is capped at what the QoS manager computes (v1: limit + soft limit 0).
    wait_until(lambda: _node(server).get("be_memory_cap_bytes"), "a BE memory cap")
    be_memory = _be_cpu_dir(server, "memory")
    wait_until(
        lambda: int((be_memory / "memory.limit_in_bytes").read_text())
        == _node(server)["be_memory_cap_bytes"],
        "the cap written to the BE subtree",
    )
    assert (be_memory / "memory.soft_limit_in_bytes").read_text().strip() == "0"
    # A best-effort instance is the OOM killer's first choice; a latency-sensitive one is not.
    with server.http() as http:
        event_id = http.post(
            "/2015-03-31/functions/reader/invocations",
            headers={"X-Amz-Invocation-Type": "Event"},
            content=b"{}",
        ).headers["x-amzn-RequestId"]

        def be_result() -> Any:
            body = http.get(f"/events/{event_id}").json()
            return body if body.get("status") == "succeeded" else None

        assert wait_until(be_result, "the Event invocation")["result"] == "1000"
    resp = lam.invoke(FunctionName="reader", Payload=b"{}")
    assert resp["Payload"].read() == b'"0"'
    # The idle (frozen) instance's page cache is reclaimed in the background.
    wait_until(
        lambda: _node(server).get("page_cache_reclaimed_bytes", 0) >= 8 << 20,
        "the idle instance's page cache to be reclaimed",
        60,
    )
    with server.http() as http:
        metrics = http.get("/metrics").text
    assert "warmstart_page_cache_reclaimed_bytes_total" in metrics
    assert "warmstart_be_memory_cap_bytes" in metrics


def test_top_shows_the_node(server: Server) -> None:
    wait_until(lambda: _node(server).get("usage"), "the first QoS tick")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "warmstart.cli.main",
            "top",
            "--iterations",
            "1",
            "--endpoint",
            server.url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    for word in ("reclaimed", "best-effort", "latency-sensitive", "queue depth", "evictions"):
        assert word in out.stdout


def test_a_crashed_workers_best_effort_subtree_is_reaped(
    server_factory: Any, tmp_path: Path
) -> None:
    """warmstart-be/<hash> outlives a worker SIGKILLed together with its guardian (as a
    unit manager's stop of a crashed service may do); the next worker on the host reaps
    it (its lock is free), and a clean stop leaves no cgroup behind in either top."""
    import signal

    from tests.conftest import cgroup_dirs
    from tests.integration.test_faults import guardian_pid

    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first: Server = server_factory(data_dir=first_dir)
    deploy(first.lambda_client(), "slow", {"handler.py": SLEEPER}, Timeout=60)
    with first.http() as http:
        http.post("/jobs", json={"function": "slow", "inputs": [{"sleep": 30}]})
    wait_until(lambda: _node(first)["best_effort_running"] >= 1, "a running BE instance")
    assert any("/warmstart-be/" in d for d in cgroup_dirs(first_dir))
    os.kill(guardian_pid(first), signal.SIGKILL)  # else it sweeps them: test_faults
    first.stop(signal.SIGKILL)
    assert any("/warmstart-be/" in d for d in cgroup_dirs(first_dir))
    second: Server = server_factory(data_dir=second_dir)
    assert cgroup_dirs(first_dir) == []
    assert any("/warmstart-be/" in d for d in cgroup_dirs(second_dir))
    second.stop()
    assert cgroup_dirs(second_dir) == []
