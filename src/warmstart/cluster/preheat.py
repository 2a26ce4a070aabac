"""Preheat jobs: pull an image onto many nodes ahead of need (OpenKruise's ImagePullJob).

``POST /images/preheat`` makes a job: an image, the nodes it is for (a list, a label
selector, or every live node), how many of them may pull at once, how long one attempt
may take, how often a node retries, and how long the finished job is kept.  The nodes it
selects are fixed when it is made (``desired``): a node that joins later is not part of
it (an image cache entry, ``imagecache.py``, is what follows new nodes).

Keys (under the cluster prefix)::

    preheat/jobs/<id>           the job: its spec, desired nodes, startTime, phase,
                                completionTime; written after its node entries
    preheat/nodes/<id>/<node>   one node's part: pending | pulling | succeeded | failed,
                                attempts, bytes done of bytes in all, digest, message
    preheat/slots/<id>/<k>      ``<node>``: one of the job's ``parallelism`` pull slots,
                                held under that node's lease while it pulls

Every node runs two supervised loops: a watch of ``preheat/`` that wakes the other when
something that concerns this node changes, and ``run``, which then (and every few
seconds) looks at each running job:

- **its own entry.**  *pending* (and its retry time reached): take a free slot -- a
  create-if-absent of ``slots/<id>/<k>`` under this node's lease, so two nodes can never
  both take the last one -- mark the entry *pulling* and pull: the full pull of
  ``images/preheat.py`` (the path a fully pulled image function takes), bytes done
  written every ``progress_interval_s``.  An attempt that takes longer than
  ``timeoutSeconds`` or fails is retried ``backoffLimit`` times (1 s, 2 s, 4 s ... apart,
  at most 30 s; the slot is given back meanwhile), unless retrying cannot help (no such
  image, credentials refused); then the entry is *failed*.  The outcome and the slot's
  release are one transaction, made only if the entry is still the one this node wrote.
  A *pulling* entry of this node with no pull running here is what a restart left
  behind: the attempt counts as interrupted and is retried.
- **entries of nodes that are gone.**  A node that dies mid-pull loses its lease: its
  slot goes with it, and since ``nodes/<node>`` is gone too, any node marks its unfinished
  entry *failed* ("left the cluster"), so the job ends instead of waiting forever.
- **completion.**  When every entry is final, the job's phase (Succeeded, or Failed if
  any node failed) and completionTime are written -- by whichever node gets there first,
  a replace-if-unchanged -- together with all the job's keys again under a lease of
  ``ttlSecondsAfterFinished``: etcd deletes the job when it lapses.

The job's status (``GET /images/preheat/<id>``) is derived from its entries: desired,
active (pulling), pending, succeeded, failed, failedNodes, and each node's progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from warmstart.cluster.etcd import TXN_MAX_OPS, ClusterUnavailable, Delete, Etcd, Op, Put
from warmstart.cluster.selection import NodeView, Selection, check_image
from warmstart.errors import InvalidParameter
from warmstart.images.preheat import ByteProgress, Pulled, permanent
from warmstart.lifecycle import Supervisor

log = logging.getLogger(__name__)

PREHEAT = "preheat/"
JOBS = "preheat/jobs/"
ENTRIES = "preheat/nodes/"
SLOTS = "preheat/slots/"

DEFAULT_TIMEOUT_S = 600
DEFAULT_BACKOFF_LIMIT = 3
DEFAULT_TTL_S = 24 * 3600  # as finished Event work
MAX_TIMEOUT_S = 24 * 3600
MAX_TTL_S = 30 * 24 * 3600
PROGRESS_INTERVAL_S = 0.5
TICK_S = 2.0
RETRY_BASE_S = 1.0
RETRY_MAX_S = 30.0
LIST_LIMIT = 100


class NodeState(StrEnum):
    PENDING = "pending"
    PULLING = "pulling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (NodeState.SUCCEEDED, NodeState.FAILED)


class Phase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ImagePuller(Protocol):
    async def pull(self, ref: str, progress: ByteProgress | None = None) -> Pulled: ...


def iso(t: float | None) -> str | None:
    """An epoch time as RFC 3339 (UTC, seconds), as Kubernetes shows times."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameter(f"{key} must be a whole number from {low} to {high}")
    return value


@dataclass(frozen=True)
class PreheatSpec:
    """What a preheat job asks for (the body of ``POST /images/preheat``)."""

    image: str
    selection: Selection = field(default_factory=Selection)
    parallelism: int | None = None  # nodes pulling at once; None: every selected node
    timeout_s: int = DEFAULT_TIMEOUT_S  # one attempt on one node
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT  # retries on a node after its first attempt
    ttl_s: int = DEFAULT_TTL_S  # how long a finished job is kept

    FIELDS = frozenset(
        {
            "image",
            "nodes",
            "selector",
            "parallelism",
            "timeoutSeconds",
            "backoffLimit",
            "ttlSecondsAfterFinished",
        }
    )

    @classmethod
    def from_json(cls, body: Any) -> PreheatSpec:
        if not isinstance(body, dict):
            raise InvalidParameter('the body must be a JSON object: {"image": "REF", ...}')
        unknown = sorted(set(body) - cls.FIELDS)
        if unknown:
            raise InvalidParameter(
                f"unknown field(s) {', '.join(unknown)}; a preheat job takes "
                f"{', '.join(sorted(cls.FIELDS))}"
            )
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidParameter('image is required: {"image": "registry/repository:tag"}')
        check_image(image)
        return cls(
            image=image,
            selection=Selection.from_json(body),
            parallelism=_int(body, "parallelism", None, 1, 100_000),
            timeout_s=_int(body, "timeoutSeconds", DEFAULT_TIMEOUT_S, 1, MAX_TIMEOUT_S)
            or DEFAULT_TIMEOUT_S,
            backoff_limit=_int(body, "backoffLimit", DEFAULT_BACKOFF_LIMIT, 0, 100) or 0,
            ttl_s=_int(body, "ttlSecondsAfterFinished", DEFAULT_TTL_S, 0, MAX_TTL_S) or 0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            **self.selection.to_json(),
            "parallelism": self.parallelism,
            "timeoutSeconds": self.timeout_s,
            "backoffLimit": self.backoff_limit,
            "ttlSecondsAfterFinished": self.ttl_s,
        }


@dataclass(frozen=True)
class NodeEntry:
    """One node's part of a job (``preheat/nodes/<id>/<node>``)."""

    state: NodeState
    attempts: int = 0  # attempts started
    bytes_done: int = 0
    bytes_total: int = 0
    digest: str = ""
    message: str = ""
    start_time: float | None = None  # the last attempt's
    completion_time: float | None = None
    retry_at: float = 0.0  # a pending entry is not taken up before this (epoch)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "state": self.state.value,
                "attempts": self.attempts,
                "bytesDone": self.bytes_done,
                "bytesTotal": self.bytes_total,
                "digest": self.digest,
                "message": self.message,
                "startTime": self.start_time,
                "completionTime": self.completion_time,
                "retryAt": self.retry_at,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> NodeEntry:
        d = json.loads(raw)
        return cls(
            NodeState(d["state"]),
            int(d.get("attempts", 0)),
            int(d.get("bytesDone", 0)),
            int(d.get("bytesTotal", 0)),
            str(d.get("digest", "")),
            str(d.get("message", "")),
            d.get("startTime"),
            d.get("completionTime"),
            float(d.get("retryAt", 0.0)),
        )

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "attempts": self.attempts,
            "bytesDone": self.bytes_done,
            "bytesTotal": self.bytes_total,
            "digest": self.digest or None,
            "message": self.message,
            "startTime": iso(self.start_time),
            "completionTime": iso(self.completion_time),
        }


@dataclass(frozen=True)
class JobRecord:
    """A job (``preheat/jobs/<id>``)."""

    id: str
    spec: PreheatSpec
    desired: tuple[str, ...]
    start_time: float
    created_by: str
    phase: Phase = Phase.RUNNING
    completion_time: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "spec": self.spec.to_json(),
                "desired": list(self.desired),
                "startTime": self.start_time,
                "createdBy": self.created_by,
                "phase": self.phase.value,
                "completionTime": self.completion_time,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobRecord:
        d = json.loads(raw)
        s = d["spec"]
        spec = PreheatSpec(
            image=str(s["image"]),
            selection=Selection(
                nodes=tuple(s["nodes"]) if s.get("nodes") is not None else None,
                selector=dict(s["selector"]) if s.get("selector") is not None else None,
            ),
            parallelism=s.get("parallelism"),
            timeout_s=int(s["timeoutSeconds"]),
            backoff_limit=int(s["backoffLimit"]),
            ttl_s=int(s["ttlSecondsAfterFinished"]),
        )
        return cls(
            str(d["id"]),
            spec,
            tuple(d["desired"]),
            float(d["startTime"]),
            str(d.get("createdBy", "")),
            Phase(d.get("phase", Phase.RUNNING.value)),
            d.get("completionTime"),
        )

    @property
    def slots(self) -> int:
        return self.spec.parallelism or max(1, len(self.desired))


def _entry_key(job_id: str, node: str) -> str:
    return f"{ENTRIES}{job_id}/{node}"


def _retry_delay(attempts: int, base: float) -> float:
    return float(min(RETRY_MAX_S, base * 2 ** max(0, attempts - 1)))


Entries = dict[str, tuple[bytes, NodeEntry]]  # node -> (the value as read, parsed)


class PreheatJobs:
    """Preheat jobs over etcd: made and read by the API on any node, carried out by each
    selected node's ``run`` loop."""

    def __init__(
        self,
        etcd: Etcd,
        view: NodeView,
        images: ImagePuller,
        tasks: Supervisor,
        *,
        alive: Callable[[str], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        tick_s: float = TICK_S,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self.etcd = etcd
        self.view = view
        self.images = images
        self.tasks = tasks
        self.alive = alive
        self.clock = clock
        self.progress_interval_s = progress_interval_s
        self.tick_s = tick_s
        self.retry_base_s = retry_base_s
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}  # job id -> this node's pull
        self._timers: dict[str, asyncio.TimerHandle] = {}  # job id -> wake for a retry

    # -- the API -------------------------------------------------------------------------------
    async def create(self, spec: PreheatSpec) -> dict[str, Any]:
        """Make a job for the nodes ``spec`` selects among the live ones (an explicit
        node that is not live gets a failed entry).  Its status."""
        members = self.view.live()
        live = {m.name for m in members}
        if spec.selection.nodes is not None:
            desired = list(spec.selection.nodes)
        else:
            desired = spec.selection.select(members)
            if not desired:
                shown = "; ".join(
                    f"{m.name} ({','.join(f'{k}={v}' for k, v in m.labels.items()) or 'no labels'})"
                    for m in members
                )
                raise InvalidParameter(
                    f"the selector {spec.selection.describe()} matches no live node (live: {shown})"
                )
        now = self.clock()
        job = JobRecord(uuid.uuid4().hex, spec, tuple(desired), now, self.view.name)
        entries: list[Op] = []
        for node in desired:
            entry = (
                NodeEntry(NodeState.PENDING)
                if node in live
                else NodeEntry(
                    NodeState.FAILED,
                    message="not a live node when the job was made",
                    completion_time=now,
                )
            )
            entries.append(Put(_entry_key(job.id, node), entry.to_json()))
        # The entries first: a job whose record can be read always has all of them.
        for start in range(0, len(entries), TXN_MAX_OPS):
            await self.etcd.commit(entries[start : start + TXN_MAX_OPS])
        await self.etcd.put(JOBS + job.id, job.to_json())
        log.info(
            "preheat %s: %s on %d node(s) (%s)",
            job.id[:8],
            spec.image,
            len(desired),
            spec.selection.describe(),
        )
        self.wake()
        status = await self.get(job.id)
        if status is None:  # deleted in the meantime
            raise InvalidParameter(f"preheat job {job.id} was deleted as it was made")
        return status

    async def get(self, job_id: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(JOBS + job_id) if "/" not in job_id else None
        if kv is None:
            return None
        job = JobRecord.from_json(kv.value)
        return self._status(job, await self._entries(job.id))

    async def all(self) -> list[dict[str, Any]]:
        """The newest jobs first (at most LIST_LIMIT)."""
        kvs, _ = await self.etcd.range(JOBS)
        jobs = sorted((JobRecord.from_json(kv.value) for kv in kvs), key=lambda j: -j.start_time)[
            :LIST_LIMIT
        ]
        return [self._status(job, await self._entries(job.id)) for job in jobs]

    async def delete(self, job_id: str) -> bool:
        """Delete a job and everything it keeps; pulls under way stop being reported
        (what was pulled stays in the nodes' stores)."""
        if "/" in job_id or await self.etcd.get(JOBS + job_id) is None:
            return False
        keys = [JOBS + job_id]
        for prefix in (f"{ENTRIES}{job_id}/", f"{SLOTS}{job_id}/"):
            kvs, _ = await self.etcd.range(prefix)
            keys += [kv.key for kv in kvs]
        for start in range(0, len(keys), TXN_MAX_OPS):
            await self.etcd.commit([Delete(k) for k in keys[start : start + TXN_MAX_OPS]])
        log.info("preheat %s: deleted", job_id[:8])
        return True

    def _status(self, job: JobRecord, entries: Entries) -> dict[str, Any]:
        states = {node: entry for node, (_, entry) in entries.items()}
        count = {s: 0 for s in NodeState}
        for entry in states.values():
            count[entry.state] += 1
        return {
            "id": job.id,
            "image": job.spec.image,
            "spec": job.spec.to_json(),
            "phase": job.phase.value,
            "desired": len(job.desired),
            "active": count[NodeState.PULLING],
            "pending": count[NodeState.PENDING],
            "succeeded": count[NodeState.SUCCEEDED],
            "failed": count[NodeState.FAILED],
            "failedNodes": sorted(n for n, e in states.items() if e.state is NodeState.FAILED),
            "startTime": iso(job.start_time),
            "completionTime": iso(job.completion_time),
            "createdBy": job.created_by,
            "nodes": {n: states[n].status() for n in job.desired if n in states},
        }

    async def _entries(self, job_id: str) -> Entries:
        kvs, _ = await self.etcd.range(f"{ENTRIES}{job_id}/")
        out: Entries = {}
        for kv in kvs:
            try:
                out[kv.key.rsplit("/", 1)[1]] = (kv.value, NodeEntry.from_json(kv.value))
            except (ValueError, KeyError) as exc:
                log.warning("preheat: unreadable entry %s: %s", kv.key, exc)
        return out

    # -- the node's loops ------------------------------------------------------------------------
    def wake(self) -> None:
        """Look at the jobs again now (a change in etcd, a node left, a retry is due)."""
        self._wake.set()

    async def watch(self) -> None:
        """Wake ``run`` when something under ``preheat/`` concerns this node: a job made or
        deleted, this node's entry changed by someone else, an entry finished (the job may
        be complete), a slot given back."""
        while True:
            try:
                _, revision = await self.etcd.range(JOBS, limit=1)
                self.wake()
                async for event in self.etcd.watch(PREHEAT, revision + 1):
                    if self._concerns_me(event.key, event.kind, event.value):
                        self.wake()
            except ClusterUnavailable:
                await asyncio.sleep(1.0)

    def _concerns_me(self, key: str, kind: str, value: bytes) -> bool:
        if key.startswith(JOBS):
            return True
        if key.startswith(SLOTS):
            return kind == "delete"
        if kind == "delete":
            return key.endswith("/" + self.view.name)
        try:
            state = NodeEntry.from_json(value).state
        except (ValueError, KeyError):
            return False
        if key.endswith("/" + self.view.name):
            return state is not NodeState.PULLING  # not this node's own progress
        return state.final

    async def run(self) -> None:
        """Act on the running jobs whenever woken, and every ``tick_s`` regardless."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.step()
            except ClusterUnavailable as exc:
                log.warning("preheat: etcd unreachable (%s); trying again", exc)

    async def step(self) -> None:
        """One look at every running job: this node's entry, departed nodes' entries,
        completion.  Pulls of jobs that were deleted are cancelled."""
        kvs, _ = await self.etcd.range(JOBS)
        jobs = set()
        for kv in kvs:
            try:
                job = JobRecord.from_json(kv.value)
            except (ValueError, KeyError) as exc:
                log.warning("preheat: unreadable job %s: %s", kv.key, exc)
                continue
            jobs.add(job.id)
            if job.phase is not Phase.RUNNING:
                continue
            entries = await self._entries(job.id)
            mine = entries.get(self.view.name)
            if mine is not None:
                await self._act(job, *mine)
            await self._sweep(job, entries)
            await self._complete(job, kv.value)
        for job_id in [j for j in self._timers if j not in jobs]:
            self._timers.pop(job_id).cancel()
        for job_id, task in list(self._running.items()):
            if job_id not in jobs:
                log.info("preheat %s: the job was deleted; stopping this node's pull", job_id[:8])
                task.cancel()

    async def _act(self, job: JobRecord, raw: bytes, entry: NodeEntry) -> None:
        """This node's entry: start a pull when it is due and a slot is free; recover an
        attempt a restart interrupted."""
        if job.id in self._running:
            return
        key = _entry_key(job.id, self.view.name)
        now = self.clock()
        if entry.state is NodeState.PULLING:
            # Pulling here, but no pull runs here: this node restarted (or lost its task).
            message = "interrupted: the node restarted during the pull"
            if entry.attempts > job.spec.backoff_limit:
                new = replace(entry, state=NodeState.FAILED, message=message, completion_time=now)
            else:
                new = replace(entry, state=NodeState.PENDING, message=message, retry_at=now)
            await self.etcd.replace(key, raw, new.to_json())
            await self._give_back_slots(job)
            self.wake()
            return
        if entry.state is not NodeState.PENDING:
            return
        if now < entry.retry_at:
            # One wake-up per job, at its retry time (not one more on every look).
            loop = asyncio.get_running_loop()
            due = loop.time() + entry.retry_at - now
            timer = self._timers.get(job.id)
            if timer is None or timer.when() <= loop.time() or timer.when() > due + 0.01:
                if timer is not None:
                    timer.cancel()
                self._timers[job.id] = loop.call_at(due, self.wake)
            return
        slot = await self._take_slot(job)
        if slot is None:
            return  # every slot is taken: a node giving one back wakes us
        new = replace(
            entry,
            state=NodeState.PULLING,
            attempts=entry.attempts + 1,
            start_time=now,
            bytes_done=0,
        )
        if not await self.etcd.replace(key, raw, new.to_json()):
            await self.etcd.delete(slot)  # changed meanwhile (deleted, or marked failed)
            return
        log.info("preheat %s: pulling %s (attempt %d)", job.id[:8], job.spec.image, new.attempts)
        self._running[job.id] = self.tasks.spawn(
            self._pull(job, slot, new), f"preheat {job.id[:8]} {job.spec.image}"
        )

    async def _take_slot(self, job: JobRecord) -> str | None:
        """One of the job's pull slots for this node (under its lease), or None."""
        if self.view.lease == 0:
            return None
        prefix = f"{SLOTS}{job.id}/"
        kvs, _ = await self.etcd.range(prefix)
        for kv in kvs:
            if kv.value.decode() == self.view.name and kv.lease == self.view.lease:
                return kv.key  # still ours from an attempt that ended without giving it back
        taken = {kv.key for kv in kvs}
        for k in range(job.slots):
            key = f"{prefix}{k:05d}"
            if key in taken:
                continue
            if await self.etcd.create(key, self.view.name.encode(), lease=self.view.lease):
                return key
        return None

    async def _give_back_slots(self, job: JobRecord) -> None:
        kvs, _ = await self.etcd.range(f"{SLOTS}{job.id}/")
        for kv in kvs:
            if kv.value.decode() == self.view.name:
                await self.etcd.delete(kv.key)

    async def _pull(self, job: JobRecord, slot: str, entry: NodeEntry) -> None:
        try:
            await self._attempt(job, slot, entry)
        finally:
            self._running.pop(job.id, None)

    async def _attempt(self, job: JobRecord, slot: str, entry: NodeEntry) -> None:
        """One attempt: pull, reporting progress; then the outcome, with the slot given back."""
        key = _entry_key(job.id, self.view.name)
        last = entry.to_json()
        progress = [entry.bytes_done, entry.bytes_total]

        def on_progress(done: int, total: int) -> None:  # from the pulling thread
            progress[:] = [done, total]

        pull = asyncio.ensure_future(self.images.pull(job.spec.image, on_progress))
        pulled: Pulled | None = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(job.spec.timeout_s):
                while not pull.done():
                    await asyncio.wait({pull}, timeout=self.progress_interval_s)
                    if pull.done() or progress == [entry.bytes_done, entry.bytes_total]:
                        continue
                    entry = replace(entry, bytes_done=progress[0], bytes_total=progress[1])
                    try:
                        if not await self.etcd.replace(key, last, entry.to_json()):
                            log.info("preheat %s: this node's entry went away", job.id[:8])
                            return
                        last = entry.to_json()
                    except ClusterUnavailable as exc:
                        log.warning("preheat %s: cannot report progress: %s", job.id[:8], exc)
            pulled = pull.result()
        except TimeoutError:
            error = TimeoutError(f"the attempt timed out after {job.spec.timeout_s} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            if not pull.done():
                pull.cancel()  # the pulling thread finishes on its own; its layers are kept
        await self._finish(job, slot, key, last, entry, pulled, error)

    async def _finish(
        self,
        job: JobRecord,
        slot: str,
        key: str,
        last: bytes,
        entry: NodeEntry,
        pulled: Pulled | None,
        error: BaseException | None,
    ) -> None:
        now = self.clock()
        if pulled is not None:
            new = replace(
                entry,
                state=NodeState.SUCCEEDED,
                bytes_done=pulled.size,
                bytes_total=pulled.size,
                digest=pulled.digest,
                message="",
                completion_time=now,
            )
            log.info("preheat %s: %s pulled (%s)", job.id[:8], job.spec.image, pulled.digest)
        else:
            reason = f"{type(error).__name__}: {error}"
            if (error is not None and permanent(error)) or entry.attempts > job.spec.backoff_limit:
                new = replace(entry, state=NodeState.FAILED, message=reason, completion_time=now)
                log.warning("preheat %s: %s failed here: %s", job.id[:8], job.spec.image, reason)
            else:
                delay = _retry_delay(entry.attempts, self.retry_base_s)
                new = replace(
                    entry,
                    state=NodeState.PENDING,
                    message=f"attempt {entry.attempts} failed ({reason}); retrying in {delay:g} s",
                    retry_at=now + delay,
                )
                log.info("preheat %s: %s", job.id[:8], new.message)
        try:
            written = await self.etcd.commit(
                [Put(key, new.to_json()), Delete(slot)], if_value=(key, last)
            )
            if not written:  # the job went away (or the entry was taken from us)
                await self.etcd.delete(slot)
        except ClusterUnavailable as exc:
            # The entry stays "pulling" with no pull here: the next look retries the
            # attempt (an image that made it into the store is found there at once).
            log.warning("preheat %s: cannot record the outcome yet: %s", job.id[:8], exc)
        self.wake()

    async def _sweep(self, job: JobRecord, entries: Entries) -> None:
        """Fail the unfinished entries of nodes that have left the cluster."""
        live = {m.name for m in self.view.live()}
        for node, (raw, entry) in entries.items():
            if node == self.view.name or entry.state.final or node in live:
                continue
            if await self.alive(node):
                continue  # joined again, not yet in this node's table
            what = "during the pull" if entry.state is NodeState.PULLING else "before pulling"
            new = replace(
                entry,
                state=NodeState.FAILED,
                message=f"the node left the cluster {what}",
                completion_time=self.clock(),
            )
            if await self.etcd.replace(_entry_key(job.id, node), raw, new.to_json()):
                log.warning("preheat %s: %s %s", job.id[:8], node, new.message)

    async def _complete(self, job: JobRecord, raw: bytes) -> None:
        """When every entry is final: phase, completionTime, and the job's keys again
        under a lease of ttlSecondsAfterFinished -- one transaction, by one node."""
        entries = await self._entries(job.id)
        if len(entries) < len(job.desired) or not all(e.state.final for _, e in entries.values()):
            return
        failed = any(e.state is NodeState.FAILED for _, e in entries.values())
        done = replace(
            job,
            phase=Phase.FAILED if failed else Phase.SUCCEEDED,
            completion_time=self.clock(),
        )
        slots, _ = await self.etcd.range(f"{SLOTS}{job.id}/")
        leftovers: list[Op] = [Delete(kv.key) for kv in slots]
        lease = 0
        if job.spec.ttl_s == 0:
            keys = [_entry_key(job.id, n) for n in entries]
            ops: list[Op] = [Delete(JOBS + job.id), *(Delete(k) for k in keys)]
        else:
            lease = await self.etcd.grant(job.spec.ttl_s)
            ops = [Put(JOBS + job.id, done.to_json(), lease=lease)]
            ops += [Put(_entry_key(job.id, n), v, lease=lease) for n, (v, _) in entries.items()]
        ops += leftovers
        if not await self.etcd.commit(ops[:TXN_MAX_OPS], if_value=(JOBS + job.id, raw)):
            if lease:
                await self.etcd.revoke(lease)  # unused: no key is under it
            return  # another node completed it first (or it was deleted)
        for start in range(TXN_MAX_OPS, len(ops), TXN_MAX_OPS):
            await self.etcd.commit(ops[start : start + TXN_MAX_OPS])
        log.info(
            "preheat %s: %s (%d node(s), %d failed)",
            job.id[:8],
            done.phase.value.lower(),
            len(entries),
            sum(1 for _, e in entries.values() if e.state is NodeState.FAILED),
        )

    async def close(self) -> None:
        """Stop this node's pulls (their entries are retried as interrupted after a
        restart, or failed by the others if this node does not come back)."""
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._running.values()):
            task.cancel()
