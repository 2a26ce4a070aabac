"""Preheat jobs on the in-memory etcd (whose contract is checked against real etcd): which
nodes a job is for, pull slots, retries with backoff, timeouts, a node that dies or
restarts mid-pull, completion and the finished job's lease, deletion."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from warmstart.cluster.etcd import MemoryEtcd
from warmstart.cluster.membership import Member
from warmstart.cluster.preheat import ENTRIES, JOBS, SLOTS, PreheatJobs, PreheatSpec
from warmstart.errors import InvalidParameter
from warmstart.images.errors import ImageNotFound, RegistryError
from warmstart.images.preheat import ByteProgress, Pulled
from warmstart.lifecycle import Supervisor

IMAGE = "registry.test/app:1"
DIGEST = "sha256:" + "a" * 64


class Cluster:
    """The live nodes as every node sees them (membership stands in)."""

    def __init__(self, etcd: MemoryEtcd) -> None:
        self.etcd = etcd
        self.members: dict[str, Member] = {}

    async def alive(self, name: str) -> bool:
        return name in self.members


class View:
    def __init__(self, cluster: Cluster, name: str, lease: int) -> None:
        self.cluster = cluster
        self.name = name
        self.lease = lease

    def live(self) -> list[Member]:
        return [self.cluster.members[n] for n in sorted(self.cluster.members)]


class FakePuller:
    """Pulls that report half their bytes, wait for ``gate`` (if set), then finish; the
    next ``errors`` are raised first, one per attempt."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.errors: list[BaseException] = []
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self.started = asyncio.Event()

    async def pull(self, ref: str, progress: ByteProgress | None = None) -> Pulled:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            if progress is not None:
                progress(500, 1000)
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.running -= 1
        if progress is not None:
            progress(1000, 1000)
        return Pulled(DIGEST, 1000)


class Node:
    def __init__(self, cluster: Cluster, name: str, puller: FakePuller, labels: dict[str, str]):
        self.cluster, self.name, self.puller, self.labels = cluster, name, puller, labels
        self.tasks = Supervisor(name, drain_timeout=1.0)
        self.jobs: PreheatJobs | None = None
        self.view: View | None = None

    async def start(self) -> PreheatJobs:
        etcd = self.cluster.etcd
        self.view = View(self.cluster, self.name, await etcd.grant(6))
        self.cluster.members[self.name] = Member(self.name, f"http://{self.name}", self.labels)
        await self.tasks.start()
        self.jobs = PreheatJobs(
            etcd,
            self.view,
            self.puller,
            self.tasks,
            alive=self.cluster.alive,
            progress_interval_s=0.01,
            tick_s=0.05,
            retry_base_s=0.01,
        )
        self.tasks.loop("watch", self.jobs.watch)
        self.tasks.loop("run", self.jobs.run)
        return self.jobs

    async def crash(self) -> None:
        """Dies as kill -9 would: its lease lapses, its tasks stop without a word."""
        assert self.view is not None
        self.cluster.members.pop(self.name, None)
        self.cluster.etcd.expire(self.view.lease)
        await self.tasks.close()


@asynccontextmanager
async def cluster_of(
    *names: str, labels: dict[str, dict[str, str]] | None = None
) -> AsyncIterator[tuple[MemoryEtcd, dict[str, Node]]]:
    etcd = MemoryEtcd()
    cluster = Cluster(etcd)
    nodes = {n: Node(cluster, n, FakePuller(), (labels or {}).get(n, {})) for n in names}
    for node in nodes.values():
        await node.start()
    try:
        yield etcd, nodes
    finally:
        for node in nodes.values():
            await node.tasks.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


async def until(predicate: Callable[[], Any], what: str) -> Any:
    for _ in range(4000):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def status(jobs: PreheatJobs, job_id: str) -> dict[str, Any]:
    got = await jobs.get(job_id)
    assert got is not None
    return got


async def finished(jobs: PreheatJobs, job_id: str) -> dict[str, Any]:
    for _ in range(4000):
        got = await status(jobs, job_id)
        if got["completionTime"] is not None:
            return got
        await asyncio.sleep(0.005)
    raise AssertionError(f"job {job_id} never finished: {got}")


def spec(**body: Any) -> PreheatSpec:
    return PreheatSpec.from_json({"image": IMAGE, **body})


# -- the spec --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "image is required"),
        ({"image": "UPPER/case"}, "not a valid image reference.*invalid repository"),
        ({"image": IMAGE, "nodes": ["a"], "selector": {"k": "v"}}, "not both"),
        ({"image": IMAGE, "nodes": []}, "non-empty list"),
        ({"image": IMAGE, "nodes": ["Bad_Name"]}, "not a node name"),
        ({"image": IMAGE, "selector": {"k": 1}}, "string value"),
        ({"image": IMAGE, "parallelism": 0}, "parallelism must be"),
        ({"image": IMAGE, "timeoutSeconds": "10"}, "timeoutSeconds must be"),
        ({"image": IMAGE, "backoffLimit": -1}, "backoffLimit must be"),
        ({"image": IMAGE, "ttlSecondsAfterFinished": True}, "ttlSecondsAfterFinished must"),
        ({"image": IMAGE, "replicas": 3}, "unknown field"),
        ([IMAGE], "JSON object"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(InvalidParameter, match=message):
        PreheatSpec.from_json(body)


def test_defaults_and_a_selector_written_as_text() -> None:
    s = spec(selector="zone=a, disk=ssd")
    assert s.selection.selector == {"zone": "a", "disk": "ssd"}
    assert (s.parallelism, s.timeout_s, s.backoff_limit, s.ttl_s) == (None, 600, 3, 86400)


# -- which nodes -------------------------------------------------------------------------------
def test_a_job_is_for_every_live_node_or_those_it_selects() -> None:
    async def body() -> None:
        labels = {"n1": {"zone": "a"}, "n2": {"zone": "b"}, "n3": {"zone": "a"}}
        async with cluster_of("n1", "n2", "n3", labels=labels) as (_etcd, nodes):
            jobs = nodes["n1"].jobs
            assert jobs is not None
            every = await jobs.create(spec())
            assert every["desired"] == 3 and sorted(every["nodes"]) == ["n1", "n2", "n3"]
            zone_a = await jobs.create(spec(selector={"zone": "a"}))
            assert sorted(zone_a["nodes"]) == ["n1", "n3"]
            # A named node that is not live gets a failed entry at once.
            named = await jobs.create(spec(nodes=["n2", "n9"]))
            assert named["desired"] == 2
            assert named["nodes"]["n9"]["state"] == "failed"
            assert "not a live node" in named["nodes"]["n9"]["message"]
            with pytest.raises(InvalidParameter, match=r"matches no live node.*n2 \(zone=b\)"):
                await jobs.create(spec(selector={"zone": "c"}))
            for job, pulled_by in ((every, 3), (zone_a, 2)):
                done = await finished(jobs, job["id"])
                assert (done["phase"], done["succeeded"], done["failed"]) == (
                    "Succeeded",
                    pulled_by,
                    0,
                )
                assert all(n["digest"] == DIGEST for n in done["nodes"].values())
                assert all(n["bytesDone"] == 1000 for n in done["nodes"].values())
            done = await finished(jobs, named["id"])
            assert (done["phase"], done["failedNodes"]) == ("Failed", ["n9"])
            # Only the nodes selected pulled: n2 for two jobs, n1 and n3 for two.
            assert [nodes[n].puller.calls for n in ("n1", "n2", "n3")] == [2, 2, 2]
            assert next(j["id"] for j in await jobs.all()) == named["id"]  # newest first

    run(body)


# -- slots -------------------------------------------------------------------------------------
def test_no_more_than_parallelism_nodes_pull_at_once() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2", "n3", "n4") as (etcd, nodes):
            gate = asyncio.Event()
            for node in nodes.values():
                node.puller.gate = gate
            jobs = nodes["n1"].jobs
            assert jobs is not None
            job = await jobs.create(spec(parallelism=2))
            got = await until(
                lambda: sum(n.puller.running for n in nodes.values()) == 2, "two pulls"
            )
            assert got
            # Every node looks again, at once: nobody takes a third slot.
            await asyncio.gather(*(n.jobs.step() for n in nodes.values() if n.jobs))
            now = await status(jobs, job["id"])
            assert (now["active"], now["pending"]) == (2, 2)
            slots, _ = await etcd.range(f"{SLOTS}{job['id']}/")
            assert len(slots) == 2
            assert sorted(json.loads(v)["state"] for v in _entries(etcd, job["id"])) == [
                "pending",
                "pending",
                "pulling",
                "pulling",
            ]
            # Progress is written while the pull runs.
            assert {n["bytesDone"] for n in now["nodes"].values() if n["state"] == "pulling"} <= {
                0,
                500,
            }
            await until(
                lambda: any(
                    json.loads(v).get("bytesDone") == 500 for v in _entries(etcd, job["id"])
                ),
                "progress in etcd",
            )
            gate.set()
            done = await finished(jobs, job["id"])
            assert done["succeeded"] == 4
            assert max(n.puller.most_at_once for n in nodes.values()) == 1
            slots, _ = await etcd.range(f"{SLOTS}{job['id']}/")
            assert slots == []

    run(body)


def test_two_nodes_cannot_both_take_the_last_slot() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2") as (etcd, nodes):
            gate = asyncio.Event()
            for node in nodes.values():
                node.puller.gate = gate
                await node.tasks.stop_loops()  # this test steps by hand
            jobs = nodes["n1"].jobs
            assert jobs is not None
            job = await jobs.create(spec(parallelism=1))
            await asyncio.gather(*(n.jobs.step() for n in nodes.values() if n.jobs))
            slots, _ = await etcd.range(f"{SLOTS}{job['id']}/")
            assert len(slots) == 1
            assert (await status(jobs, job["id"]))["active"] == 1
            gate.set()

    run(body)


def _entries(etcd: MemoryEtcd, job_id: str) -> list[bytes]:
    prefix = f"{ENTRIES}{job_id}/"
    return [kv.value for k, kv in etcd.data.items() if k.startswith(prefix)]


# -- retries, timeouts -------------------------------------------------------------------------
def test_failed_attempts_are_retried_up_to_the_backoff_limit() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2") as (_, nodes):
            jobs = nodes["n1"].jobs
            assert jobs is not None
            nodes["n1"].puller.errors = [RegistryError("503"), RegistryError("503")]
            nodes["n2"].puller.errors = [RegistryError("503")] * 3
            job = await jobs.create(spec(backoffLimit=2))
            done = await finished(jobs, job["id"])
            n1, n2 = done["nodes"]["n1"], done["nodes"]["n2"]
            assert (n1["state"], n1["attempts"]) == ("succeeded", 3)
            assert (n2["state"], n2["attempts"]) == ("failed", 3)
            assert "RegistryError: 503" in n2["message"]
            assert (done["phase"], done["failedNodes"]) == ("Failed", ["n2"])

    run(body)


def test_retrying_cannot_help_a_missing_image() -> None:
    async def body() -> None:
        async with cluster_of("n1") as (_, nodes):
            jobs = nodes["n1"].jobs
            assert jobs is not None
            nodes["n1"].puller.errors = [ImageNotFound("manifest unknown")]
            done = await finished(jobs, (await jobs.create(spec()))["id"])
            entry = done["nodes"]["n1"]
            assert (entry["state"], entry["attempts"]) == ("failed", 1)
            assert "manifest unknown" in entry["message"]

    run(body)


def test_an_attempt_that_takes_too_long_fails() -> None:
    async def body() -> None:
        async with cluster_of("n1") as (_, nodes):
            jobs = nodes["n1"].jobs
            assert jobs is not None
            nodes["n1"].puller.gate = asyncio.Event()  # never opened
            job = await jobs.create(spec(timeoutSeconds=1, backoffLimit=0))
            done = await finished(jobs, job["id"])
            assert done["nodes"]["n1"]["state"] == "failed"
            assert "timed out after 1 s" in done["nodes"]["n1"]["message"]

    run(body)


# -- nodes that go away -------------------------------------------------------------------------
def test_a_node_that_dies_mid_pull_fails_its_part_and_the_job_ends() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2", "n3") as (_etcd, nodes):
            nodes["n2"].puller.gate = asyncio.Event()  # n2 pulls until it dies
            jobs = nodes["n1"].jobs
            assert jobs is not None
            job = await jobs.create(spec(parallelism=1, nodes=["n2", "n3"]))
            await until(lambda: nodes["n2"].puller.running == 1, "n2 to pull")
            assert (await status(jobs, job["id"]))["nodes"]["n2"]["state"] == "pulling"
            await nodes["n2"].crash()
            jobs.wake()  # as a membership change does
            done = await finished(jobs, job["id"])
            assert done["nodes"]["n2"]["state"] == "failed"
            assert done["nodes"]["n2"]["message"] == "the node left the cluster during the pull"
            # Its slot went with its lease: n3 pulled after it.
            assert done["nodes"]["n3"]["state"] == "succeeded"
            assert (done["phase"], done["failedNodes"]) == ("Failed", ["n2"])

    run(body)


def test_a_node_that_restarts_mid_pull_tries_again() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2") as (_etcd, nodes):
            nodes["n2"].puller.gate = asyncio.Event()
            jobs = nodes["n1"].jobs
            assert jobs is not None
            await nodes["n1"].tasks.stop_loops()  # n1 does not sweep: n2 is back in time
            job = await jobs.create(spec(nodes=["n2"]))
            await until(lambda: nodes["n2"].puller.running == 1, "n2 to pull")
            await nodes["n2"].crash()
            # The same node starts again (a new process, a new lease).
            again = Node(nodes["n2"].cluster, "n2", FakePuller(), {})
            nodes["n2"] = again
            await again.start()
            done = await finished(again.jobs, job["id"])  # type: ignore[arg-type]
            entry = done["nodes"]["n2"]
            assert (entry["state"], entry["attempts"]) == ("succeeded", 2)
            assert again.puller.calls == 1

    run(body)


# -- the end of a job --------------------------------------------------------------------------
def test_a_finished_job_is_kept_for_its_ttl_then_gone() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2") as (etcd, nodes):
            jobs = nodes["n1"].jobs
            assert jobs is not None
            kept = await jobs.create(spec(ttlSecondsAfterFinished=3600))
            done = await finished(jobs, kept["id"])
            assert done["phase"] == "Succeeded" and done["startTime"] <= done["completionTime"]
            job_kv = etcd.data[JOBS + kept["id"]]
            assert job_kv.lease != 0
            keys = [k for k, kv in etcd.data.items() if kv.lease == job_kv.lease]
            assert len(keys) == 3  # the job and its two entries
            etcd.expire(job_kv.lease)  # the TTL runs out
            assert await jobs.get(kept["id"]) is None
            assert not [k for k in etcd.data if kept["id"] in k]
            # A TTL of 0: gone as soon as it is finished.
            gone = await jobs.create(spec(ttlSecondsAfterFinished=0))
            await until(lambda: JOBS + gone["id"] not in etcd.data, "the job to go")
            assert not [k for k in etcd.data if gone["id"] in k]

    run(body)


def test_deleting_a_job_stops_its_pulls() -> None:
    async def body() -> None:
        async with cluster_of("n1", "n2") as (etcd, nodes):
            for node in nodes.values():
                node.puller.gate = asyncio.Event()
            jobs = nodes["n1"].jobs
            assert jobs is not None
            job = await jobs.create(spec())
            await until(lambda: all(n.puller.running for n in nodes.values()), "both to pull")
            assert await jobs.delete(job["id"])
            assert not await jobs.delete(job["id"])
            await until(lambda: not any(n.puller.running for n in nodes.values()), "pulls to stop")
            assert not [k for k in etcd.data if job["id"] in k]
            assert await jobs.get(job["id"]) is None

    run(body)
