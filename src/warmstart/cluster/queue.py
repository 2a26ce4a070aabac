"""The cluster's work queue: Event invocations and job items in etcd, claimed under leases.

Keys (under the cluster prefix)::

    events/<id>          the item: function, payload, attempts, status, result, job
    queue/<ts>-<id>      present while the item is pending (key order: oldest first)
    claims/<id>          the node running it, under that node's lease
    jobs/<job>           a job: function, size, creation time; its items are
                         events/<job>.<index> (key order: input order)

A node's dispatcher takes work only when it has best-effort slots free (its own
reclaimed capacity), by *claiming* items: a transaction that creates ``claims/<id>``
under the node's lease only if nobody claimed it and it is still queued.  An outcome is
one transaction (the item's new record, its queue entry and claim deleted); a retry
updates the attempts and drops the claim; a release only drops the claim.  When a node
dies its lease lapses, its claims vanish and its items are queued again for the others:
at least once, nothing lost.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from typing import Any

from warmstart.cluster.etcd import TXN_MAX_OPS, ClusterUnavailable, Delete, Etcd, Put
from warmstart.cluster.membership import Membership
from warmstart.errors import InvalidParameter
from warmstart.functions.store import MIN_JOB_ID_PREFIX, result_value
from warmstart.worker.bequeue import PendingRow

log = logging.getLogger(__name__)

EVENTS, QUEUE, CLAIMS, JOBS = "events/", "queue/", "claims/", "jobs/"
# A finished item (and its result) is kept this long by default (the node setting
# ``event_retention_hours``), then etcd drops it with the lease it was written under.
RETENTION_S = 24 * 3600
RETENTION_ROLLS = 24  # a new retention lease this many times per retention period
# etcd takes at most 1.5 MiB a request: a larger result is recorded as an error.
MAX_RESULT_BYTES = 1 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdQueue:
    """``WorkQueue`` for a cluster node."""

    def __init__(
        self, etcd: Etcd, membership: Membership, *, retention_s: float = RETENTION_S
    ) -> None:
        self.etcd = etcd
        self.membership = membership
        self.retention_s = max(1, int(retention_s))
        self._roll_s = max(1, self.retention_s // RETENTION_ROLLS)
        self._taken: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (queue key, record)
        self._claimed: dict[str, bytes] = {}  # id -> the claim's value when it was taken
        self._retention_lease = 0
        self._retention_granted = 0.0

    async def _retention(self) -> int:
        """The lease finished items are kept under, so etcd does not fill with old
        outcomes: one per 1/RETENTION_ROLLS of the retention period of finishing (an hour
        of a day), lasting the retention period and that much more."""
        now = time.monotonic()
        if self._retention_lease == 0 or now - self._retention_granted > self._roll_s:
            self._retention_lease = await self.etcd.grant(self.retention_s + self._roll_s)
            self._retention_granted = now
        return self._retention_lease

    def _holder(self) -> bytes:
        """A claim's value: this node, under this lease (a restarted node with the same
        name holds none of its predecessor's claims)."""
        return f"{self.membership.name}:{self.membership.lease:x}".encode()

    @staticmethod
    def _queue_key(event_id: str) -> str:
        return f"{QUEUE}{time.time_ns():020d}-{event_id}"

    # -- submitting ------------------------------------------------------------------------
    async def enqueue(self, function: str, payload: bytes) -> str:
        event_id = str(uuid.uuid4())
        record = {
            "function": function,
            "payload": _b64(payload),
            "attempts": 0,
            "status": "pending",
            "created": time.time(),
        }
        await self.etcd.commit(
            [
                Put(EVENTS + event_id, json.dumps(record).encode()),
                Put(self._queue_key(event_id), event_id.encode()),
            ]
        )
        return event_id

    async def create_job(self, function: str, inputs: list[bytes]) -> str:
        """The job's record goes last: until it is written, ``job`` does not know it,
        while its items already run (a job is not atomic here -- a node that dies while
        writing a large one leaves its first items queued without the job)."""
        job_id = str(uuid.uuid4())
        now = time.time()
        per = TXN_MAX_OPS // 2
        for start in range(0, len(inputs), per):
            ops: list[Put | Delete] = []
            for index in range(start, min(start + per, len(inputs))):
                event_id = f"{job_id}.{index:06d}"
                record = {
                    "function": function,
                    "payload": _b64(inputs[index]),
                    "attempts": 0,
                    "status": "pending",
                    "created": now,
                    "job": job_id,
                    "index": index,
                }
                ops.append(Put(EVENTS + event_id, json.dumps(record).encode()))
                ops.append(Put(self._queue_key(event_id), event_id.encode()))
            await self.etcd.commit(ops)
        meta = {"function": function, "created": now, "total": len(inputs)}
        await self.etcd.put(JOBS + job_id, json.dumps(meta).encode(), lease=await self._retention())
        return job_id

    # -- running ---------------------------------------------------------------------------
    async def take(self, limit: int, running: frozenset[str]) -> list[PendingRow]:
        """Claim up to ``limit`` queued items for this node, oldest first."""
        lease = self.membership.lease
        if limit <= 0 or lease == 0:
            return []
        claims, _ = await self.etcd.range(CLAIMS)
        claimed = {kv.key[len(CLAIMS) :] for kv in claims}
        queued, _ = await self.etcd.range(QUEUE, limit=limit + len(claimed) + len(running) + 8)
        rows: list[PendingRow] = []
        for kv in queued:
            event_id = kv.value.decode()
            if event_id in claimed or event_id in running:
                continue
            if not await self.etcd.claim(
                CLAIMS + event_id, self._holder(), lease=lease, while_exists=kv.key
            ):
                continue  # another node was first
            item = await self.etcd.get(EVENTS + event_id)
            if item is None:  # finished and gone meanwhile
                await self.etcd.delete(CLAIMS + event_id)
                continue
            record = json.loads(item.value)
            self._taken[event_id] = (kv.key, record)
            self._claimed[event_id] = self._holder()
            rows.append(
                (
                    event_id,
                    str(record["function"]),
                    base64.b64decode(record["payload"]),
                    int(record["attempts"]),
                )
            )
            if len(rows) >= limit:
                break
        return rows

    async def finish(self, event_id: str, status: str, result: bytes, attempts: int) -> None:
        taken = self._taken.pop(event_id, None)
        if taken is None:
            return
        queue_key, record = taken
        holder = self._claimed.pop(event_id, b"")
        if len(result) > MAX_RESULT_BYTES:
            status = "failed"
            result = json.dumps(
                {
                    "errorType": "Function.ResponseSizeTooLarge",
                    "errorMessage": f"the result took {len(result)} bytes; a queued "
                    f"invocation's result may take at most {MAX_RESULT_BYTES}",
                }
            ).encode()
        record.update(
            status=status, attempts=attempts, result=_b64(result), node=self.membership.name
        )
        try:
            retention = await self._retention()
            written = await self.etcd.commit(
                [
                    Put(EVENTS + event_id, json.dumps(record).encode(), lease=retention),
                    Delete(queue_key),
                    Delete(CLAIMS + event_id),
                ],
                if_value=(CLAIMS + event_id, holder),
            )
            if not written:
                log.warning(
                    "cluster: %s was no longer this node's (its lease lapsed); the node "
                    "that holds it now records the outcome",
                    event_id,
                )
        except ClusterUnavailable as exc:
            # The claim lapses with this node's lease and the item runs again: at least once.
            log.error(
                "cluster: cannot record the outcome of %s (it will run again): %s", event_id, exc
            )

    async def retry(self, event_id: str, attempts: int) -> None:
        taken = self._taken.pop(event_id, None)
        if taken is None:
            return
        _, record = taken
        holder = self._claimed.pop(event_id, b"")
        record["attempts"] = attempts
        try:
            await self.etcd.commit(
                [Put(EVENTS + event_id, json.dumps(record).encode()), Delete(CLAIMS + event_id)],
                if_value=(CLAIMS + event_id, holder),
            )
        except ClusterUnavailable as exc:
            log.error("cluster: cannot record a retry of %s: %s", event_id, exc)

    async def release(self, event_id: str) -> None:
        if self._taken.pop(event_id, None) is None:
            return
        holder = self._claimed.pop(event_id, b"")
        try:
            await self.etcd.commit(
                [Delete(CLAIMS + event_id)], if_value=(CLAIMS + event_id, holder)
            )
        except ClusterUnavailable as exc:
            log.warning(
                "cluster: cannot release %s (its claim lapses by itself): %s", event_id, exc
            )

    # -- reading ---------------------------------------------------------------------------
    async def _resolve_job(self, job_id: str) -> tuple[str, dict[str, Any]] | None:
        kv = await self.etcd.get(JOBS + job_id)
        if kv is not None:
            return job_id, json.loads(kv.value)
        prefix = job_id.lower()
        if len(prefix) < MIN_JOB_ID_PREFIX:
            raise InvalidParameter(
                f"job id {job_id!r}: give the whole id or at least {MIN_JOB_ID_PREFIX} of its "
                "first characters"
            )
        kvs, _ = await self.etcd.range(JOBS + prefix, limit=3)
        if len(kvs) > 1:
            shown = ", ".join(kv.key[len(JOBS) :] for kv in kvs[:2])
            raise InvalidParameter(
                f"job id prefix {job_id!r} is ambiguous ({shown}, ...): give more characters"
            )
        if not kvs:
            return None
        return kvs[0].key[len(JOBS) :], json.loads(kvs[0].value)

    async def _items(self, job_id: str) -> list[dict[str, Any]]:
        kvs, _ = await self.etcd.range(f"{EVENTS}{job_id}.")
        return [json.loads(kv.value) for kv in kvs]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        found = await self._resolve_job(job_id)
        if found is None:
            return None
        job_id, meta = found
        counts: dict[str, int] = {}
        for item in await self._items(job_id):
            counts[item["status"]] = counts.get(item["status"], 0) + 1
        failed = counts.get("failed", 0) + counts.get("dropped", 0)
        done = counts.get("succeeded", 0) + failed
        return {
            "JobId": job_id,
            "function": meta["function"],
            "created": meta["created"],
            "total": meta["total"],
            "succeeded": counts.get("succeeded", 0),
            "failed": failed,
            "pending": counts.get("pending", 0),
            "status": "completed" if done == meta["total"] else "running",
        }

    async def jobs(self) -> list[dict[str, Any]]:
        kvs, _ = await self.etcd.range(JOBS)
        newest = sorted(kvs, key=lambda kv: -json.loads(kv.value)["created"])[:100]
        out = []
        for kv in newest:
            job = await self.job(kv.key[len(JOBS) :])
            if job is not None:
                out.append(job)
        return out

    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None:
        found = await self._resolve_job(job_id)
        if found is None:
            return None
        return [
            {
                "index": item["index"],
                "status": item["status"],
                "attempts": item["attempts"],
                "result": result_value(base64.b64decode(item["result"]))
                if item.get("result") is not None
                else None,
            }
            for item in await self._items(found[0])
        ]

    async def event(self, event_id: str) -> dict[str, Any] | None:
        kv = await self.etcd.get(EVENTS + event_id)
        if kv is None:
            return None
        item = json.loads(kv.value)
        raw = item.get("result")
        return {
            "function": item["function"],
            "status": item["status"],
            "attempts": item["attempts"],
            "result": result_value(base64.b64decode(raw)) if raw is not None else None,
            **({"node": item["node"]} if "node" in item else {}),
        }

    async def depth(self) -> int:
        return await self.etcd.count(QUEUE)

    async def expire(self, before: float, limit: int) -> int:
        """Nothing to delete: etcd drops finished items, and jobs, with the retention
        lease they were written under (``_retention``)."""
        return 0

    async def vacuum(self, pages: int) -> int:
        """etcd compacts its own storage."""
        return 0

    async def close(self) -> None:
        """Nothing to write: outcomes are written as they come; claims go with the lease."""
