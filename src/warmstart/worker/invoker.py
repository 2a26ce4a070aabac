"""The invocation path: per-version instance pools, one invocation, its log and metrics.

The hot path of a warm invocation, in order: the qualifier resolved to a version (an
alias draws one by its weights: dict lookups), dict lookup of that version's pool, pop of
an idle instance (thaw if frozen: one write to an open cgroup file), one socket write of
the event bytes, one read of the reply, a log append, metrics.  Nothing on it touches
SQLite, parses the event, or re-encodes the result.

Pools are keyed by (function, version): $LATEST and each published version have their
own, and an instance serves only the version it was started for.  Each has two pools,
one per QoS class: latency-sensitive instances serve synchronous calls, best-effort ones
Event invocations and job items, in the best-effort cgroup subtree.  A new revision of
$LATEST retires $LATEST's pools only (published versions never change): idle instances
go at once, busy ones finish their invocation on the old code and are then destroyed.
The pools of one function's versions share its concurrency limit (``ConcurrencyGroup``).

An invocation keeps the record it resolved at its start: an alias moved, or $LATEST
updated, while it runs does not change what it runs or reports.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from warmstart.errors import InvalidRequestContent, NotFound, TooManyRequests
from warmstart.functions import FunctionRecord
from warmstart.functions.models import LATEST
from warmstart.kinds import QoSClass, StartKind
from warmstart.runtime.protocol import encode
from warmstart.sandbox.memory import memory_of
from warmstart.worker.instance import (
    Instance,
    InstanceDied,
    NotDelivered,
    Reply,
    ReplyTooLarge,
    State,
)
from warmstart.worker.instances import InitFailed, InstanceFactory
from warmstart.worker.logs import LOG_TAIL_BYTES, FunctionLogs
from warmstart.worker.metrics import Metrics
from warmstart.worker.pool import ConcurrencyGroup, FunctionPool, HandlerCache
from warmstart.worker.registry import FunctionRegistry
from warmstart.worker.settings import Settings

log = logging.getLogger(__name__)

# The largest payload sent to a new instance before it is ready (it waits in the socket's
# buffer, which holds this much at once whatever the kernel's settings).
FIRST_REQUEST_MAX = 64 * 1024


@dataclass(frozen=True)
class InvokeResult:
    request_id: str
    payload: bytes
    function_error: str | None  # None, or "Unhandled" as Lambda says it
    start: StartKind
    duration_ms: float
    log_tail: bytes  # the last 4 KB of this invocation's log (START..REPORT)
    version: str = "$LATEST"

    def log_tail_b64(self) -> str:
        return base64.b64encode(self.log_tail).decode()


class Evicted(Exception):
    """A best-effort instance was evicted by the QoS manager; its work is requeued."""


def _error_payload(error_type: str, message: str) -> bytes:
    return json.dumps({"errorMessage": message, "errorType": error_type}).encode()


def response_too_large(size: int, limit: int) -> bytes:
    """Lambda's ``Function.ResponseSizeTooLarge`` (the runtime words it the same way)."""
    return _error_payload(
        "Function.ResponseSizeTooLarge",
        f"Response payload size ({size} bytes) exceeded maximum allowed payload size "
        f"({limit} bytes).",
    )


class Invoker:
    def __init__(
        self,
        settings: Settings,
        registry: FunctionRegistry,
        factory: InstanceFactory,
        cache: HandlerCache,
        logs: FunctionLogs,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.factory = factory
        self.cache = cache
        self.logs = logs
        self.metrics = metrics
        # (function, version) -> pool, per class; a function's concurrency group per class.
        self._pools: dict[QoSClass, dict[tuple[str, str], FunctionPool]] = {
            c: {} for c in QoSClass
        }
        self._groups: dict[QoSClass, dict[str, ConcurrencyGroup]] = {c: {} for c in QoSClass}
        self._retired: set[FunctionPool] = set()  # old revisions' pools with busy instances
        self.running_be: dict[Instance, FunctionPool] = {}  # BE instances serving a call
        # Reserved concurrency -> this node's limit (a cluster splits it over its nodes).
        self.reserved_limit: Callable[[int], int] = lambda reserved: reserved

    # -- pools -----------------------------------------------------------------------------
    def _limit(self, rec: FunctionRecord) -> int:
        """The function's limit: its reserved concurrency (the function's, $LATEST's
        record: a version has none of its own), else the node's per-function limit."""
        try:
            reserved = self.registry.get(rec.name).reserved_concurrency
        except NotFound:
            reserved = rec.reserved_concurrency
        if reserved is not None:
            return self.reserved_limit(reserved)
        return self.settings.max_concurrency

    def pool(self, rec: FunctionRecord, qos_class: QoSClass) -> FunctionPool:
        """The pool of ``rec``'s version (and, for $LATEST, current revision) in
        ``qos_class`` (a new revision gets a new pool; the old one is retired)."""
        pools = self._pools[qos_class]
        key = (rec.name, rec.version)
        pool = pools.get(key)
        if pool is None or pool.revision != rec.revision:
            if pool is not None:
                self._retire_pool(pool)
            limit = self._limit(rec)
            group = self._groups[qos_class].get(rec.name)
            if group is None:
                group = self._groups[qos_class][rec.name] = ConcurrencyGroup(limit)
            group.limit = limit
            pool = FunctionPool(
                rec.name,
                rec.revision,
                limit,
                self.settings.queue_depth,
                lambda first: self._start(rec, qos_class, first),
                self._destroy,
                self.cache,
                version=rec.version,
                group=group,
            )
            pools[key] = pool
        return pool

    async def _start(
        self, rec: FunctionRecord, qos_class: QoSClass, first: bytes | None = None
    ) -> Instance:
        inst = await self.factory.start(rec, qos_class, first)
        inst.version = rec.version
        return inst

    def _destroy(self, inst: Instance) -> None:
        self.running_be.pop(inst, None)
        self.factory.destroy(inst)

    def _retire_pool(self, pool: FunctionPool) -> None:
        pool.retire()
        if pool.live > 0:
            self._retired.add(pool)

    def retire(self, name: str, version: str | None = None) -> None:
        """``name``'s ``version`` changed revision or went away (None: the function went
        away, every version): new invocations get new instances."""
        for qos_class, pools in self._pools.items():
            for key in [k for k in pools if k[0] == name and version in (None, k[1])]:
                self._retire_pool(pools.pop(key))
            if version is None:
                self._groups[qos_class].pop(name, None)

    def retire_all(self) -> None:
        """Shutdown: every idle instance goes now (its destruction is spawned)."""
        for name in {key[0] for pools in self._pools.values() for key in pools}:
            self.retire(name)
        for pool in list(self._retired):
            pool.retire()

    def set_limit(self, rec: FunctionRecord) -> None:
        limit = self._limit(rec)
        for pools in self._pools.values():
            for key, pool in pools.items():
                if key[0] == rec.name:
                    pool.set_limit(limit)

    def has_idle(self, rec: FunctionRecord) -> bool:
        """Whether a latency-sensitive instance of ``rec``'s version and revision is
        idle here."""
        pool = self._pools[QoSClass.LS].get((rec.name, rec.version))
        return pool is not None and pool.revision == rec.revision and bool(pool.idle)

    def inflight(self, name: str) -> int:
        """Latency-sensitive invocations of ``name`` here now, all versions (running,
        starting, queued)."""
        total = 0
        for key, pool in self._pools[QoSClass.LS].items():
            if key[0] == name:
                st = pool.statistics()
                total += st.busy + st.starting + st.waiting
        return total

    def function_states(self) -> dict[str, dict[str, int]]:
        """Per function: its current revision's latency-sensitive instances here
        ($LATEST's), and its invocations in flight over all its versions."""
        out: dict[str, dict[str, int]] = {}
        for (name, version), pool in self._pools[QoSClass.LS].items():
            st = pool.statistics()
            entry = out.setdefault(name, {"revision": -1, "idle": 0, "busy": 0, "inflight": 0})
            entry["inflight"] += st.busy + st.starting + st.waiting
            if version == LATEST:
                entry.update(revision=pool.revision, idle=st.idle, busy=st.busy)
            else:
                entry["version_idle"] = entry.get("version_idle", 0) + st.idle
                entry["version_busy"] = entry.get("version_busy", 0) + st.busy
        return out

    def sweep(self) -> None:
        """Forget retired pools whose last instance is gone."""
        self._retired = {p for p in self._retired if p.live > 0}

    def pools(self) -> list[FunctionPool]:
        return [p for pools in self._pools.values() for p in pools.values()] + list(
            self._retired
        )

    # -- one invocation --------------------------------------------------------------------
    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        qualifier: str | None = None,
        client_context: Any = None,
        qos_class: QoSClass = QoSClass.LS,
        max_response: int | None = None,
    ) -> InvokeResult:
        """Invoke ``name`` (``qualifier``: a version, $LATEST or an alias; None: $LATEST)
        in ``qos_class`` (LS for synchronous calls, BE for Event invocations and job
        items), unless the function's ``warmstart:qos`` tag pins one.

        A result over ``max_response`` bytes (default: the node's ``max_response_bytes``)
        is a ``Function.ResponseSizeTooLarge`` error: the runtime refuses to send it, and
        one that sends it anyway is not read past its frame's header and is destroyed."""
        rec = self.registry.resolve(name, qualifier)
        limit = self.settings.max_response_bytes if max_response is None else max_response
        # The function's ``warmstart:qos`` tag, if it pins a class, wins.
        qos_class = rec.config.qos_class or qos_class
        pool = self.pool(rec, qos_class)
        request_id = str(uuid.uuid4())
        t0 = time.perf_counter()
        timeout = rec.config.timeout_s
        # An instance that turns out to have died before the request reached it (killed
        # while frozen, say: nothing saw it die until now) gets the request only once:
        # the call goes to another instance, once.
        meta: dict[str, Any] = {
            "id": request_id,
            "arn": self.registry.arn(name, qualifier or None),
            "max_response": limit,
        }
        if client_context:
            meta["client_context"] = client_context
        # Should this call start an instance, the request goes into the new runtime's
        # socket at once and waits there while the handler is imported: the runtime goes
        # on from "ready" to the call without waiting for the worker to read "ready" and
        # send it.  Its deadline then runs from when the runtime reads it.  (A large
        # payload is sent the usual way: it should not sit in a socket buffer.)
        first = None
        if len(payload) <= FIRST_REQUEST_MAX:
            first = encode(json.dumps({**meta, "timeout_ms": timeout * 1000}).encode(), payload)
        for attempt in range(2):
            try:
                inst, cold = await pool.acquire(first if attempt == 0 else None)
            except InitFailed as exc:
                return self._finish(
                    rec,
                    request_id,
                    t0,
                    StartKind.COLD,
                    "init_error",
                    exc.error_payload(),
                    "Unhandled",
                    exc.logs,
                )
            except TooManyRequests:
                self.metrics.invocations.labels(name, rec.version, "throttled").inc()
                raise
            start = inst.start_kind if cold else StartKind.WARM
            if qos_class is QoSClass.BE:
                self.running_be[inst] = pool
            try:
                if inst.first_sent:
                    inst.first_sent = False
                else:
                    meta["deadline_ms"] = int(time.time() * 1000) + timeout * 1000
                    await inst.send(json.dumps(meta).encode(), payload)
                async with asyncio.timeout(timeout):
                    reply: Reply = await inst.read_reply(limit)
            except TimeoutError:
                pool.discard(inst)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                msg = f"{stamp} {request_id} Task timed out after {timeout:.2f} seconds"
                return self._finish(
                    rec,
                    request_id,
                    t0,
                    start,
                    "timeout",
                    _error_payload("Sandbox.Timedout", msg),
                    "Unhandled",
                    b"",
                )
            except ReplyTooLarge as exc:
                pool.discard(inst)
                return self._finish(
                    rec,
                    request_id,
                    t0,
                    start,
                    "response_too_large",
                    response_too_large(exc.size, exc.limit),
                    "Unhandled",
                    b"",
                )
            except InstanceDied as exc:
                if inst.evicted:
                    raise Evicted(f"best-effort instance of {name} was evicted") from None
                if isinstance(exc, NotDelivered) and attempt == 0:
                    log.info(
                        "instance %s of %s had died before request %s reached it (%s); "
                        "another instance takes it",
                        inst.id,
                        name,
                        request_id,
                        exc,
                    )
                    pool.discard(inst)
                    continue
                return await self._died(rec, pool, inst, request_id, t0, start)
            except BaseException:
                pool.discard(inst)
                raise
            break
        inst.invocations += 1
        self.running_be.pop(inst, None)
        pool.release(inst)
        if reply.kind == "result":
            return self._finish(
                rec, request_id, t0, start, "success", reply.payload, None, reply.logs
            )
        if reply.kind == "response_too_large":
            return self._finish(
                rec,
                request_id,
                t0,
                start,
                "response_too_large",
                reply.payload,
                "Unhandled",
                reply.logs,
            )
        if reply.kind == "invalid_event":
            self.metrics.invocations.labels(name, rec.version, "invalid_request").inc()
            raise InvalidRequestContent(
                "Could not parse request body into json: "
                + json.loads(reply.payload).get("errorMessage", "")
            )
        return self._finish(
            rec, request_id, t0, start, "error", reply.payload, "Unhandled", reply.logs
        )

    async def _died(
        self,
        rec: FunctionRecord,
        pool: FunctionPool,
        inst: Instance,
        request_id: str,
        t0: float,
        start: StartKind,
    ) -> InvokeResult:
        """The runtime died during the invocation: the error says how it ended (Lambda's
        words), and the log keeps what it wrote last."""
        try:
            end = await self.factory.ended(inst)
        finally:
            pool.discard(inst)
        if end.oom:
            kind = "Runtime.OutOfMemory"
            why = f"{end.reason or 'signal: killed'} "
            why += f"(memory limit of {rec.config.memory_mb} MB exceeded)"
        else:
            kind = "Runtime.ExitError"
            why = end.reason or ""
        said = f"Runtime exited with error: {why}" if why else ""
        msg = f"RequestId: {request_id} Error: " + (
            said or "Runtime exited without providing a reason"
        )
        output = end.output
        if output and not output.endswith(b"\n"):
            output += b"\n"
        return self._finish(
            rec,
            request_id,
            t0,
            start,
            "oom" if end.oom else "crash",
            _error_payload(kind, msg),
            "Unhandled",
            output + f"{msg}\n{kind}\n".encode(),
        )

    def _finish(
        self,
        rec: FunctionRecord,
        request_id: str,
        t0: float,
        start: StartKind,
        outcome: str,
        payload: bytes,
        function_error: str | None,
        output: bytes,
    ) -> InvokeResult:
        elapsed = time.perf_counter() - t0
        duration_ms = elapsed * 1000
        m = self.metrics
        m.invocations.labels(rec.name, rec.version, outcome).inc()
        m.starts.labels(rec.name, rec.version, start.value).inc()
        m.latency.labels(rec.name, rec.version, start.value).observe(elapsed)
        text = self.logs.append(
            rec.name,
            request_id,
            rec.version,
            rec.config.memory_mb,
            duration_ms,
            output,
            payload if function_error else None,
        )
        return InvokeResult(
            request_id,
            payload,
            function_error,
            start,
            duration_ms,
            text[-LOG_TAIL_BYTES:],
            rec.version,
        )

    # -- best-effort instances (for the QoS manager and the dispatcher) --------------------
    def be_memory_mb(self) -> int:
        return sum(inst.memory_mb for inst in self.running_be)

    def evict_youngest_be(self) -> bool:
        """Evict the running best-effort instance that started its work last (the least
        work lost; it is requeued) to make room for latency-sensitive work.  False when
        none runs."""
        if not self.running_be:
            return False
        victim = max(self.running_be, key=lambda inst: inst.last_used)
        log.info(
            "evicting best-effort instance %s of %s (%d MB): latency-sensitive work needs "
            "the memory",
            victim.id,
            victim.function,
            victim.memory_mb,
        )
        self.evict_be([victim.id])
        return True

    def evict_be(self, ids: list[str]) -> None:
        """Kill running best-effort instances; their invocations see the instance die and
        raise ``Evicted`` (the dispatcher requeues the work)."""
        for inst, pool in list(self.running_be.items()):
            if inst.id in ids:
                inst.evicted = True
                self.running_be.pop(inst, None)
                pool.discard(inst)

    # -- statistics ------------------------------------------------------------------------
    def instance_states(self) -> dict[str, float]:
        states = {s.value: 0.0 for s in State if s is not State.DEAD}
        for pool in self.pools():
            st = pool.statistics()
            states["busy"] += st.busy
            states["starting"] += st.starting
        for inst in self.cache.instances():
            states[inst.state.value] += 1
        return states

    def waiting(self) -> int:
        """Invocations queued for an instance (their function at its concurrency limit)."""
        return sum(len(pool.waiters) for pool in self.pools())

    def idle_instances(self) -> list[Instance]:
        return [inst for pool in self.pools() for inst in pool.idle]


def describe_instances(instances: list[Instance]) -> list[dict[str, Any]]:
    """Idle instances with their memory: the cgroup's charge, and the processes'
    proportional (PSS) and unique (USS) set sizes -- a forked instance shares most of its
    pages with its zygote, which PSS splits fairly and USS leaves out.  Reads /proc and
    cgroupfs: call it on a thread."""
    out = []
    for inst in instances:
        pss = uss = 0
        cgroup = inst.sandbox.cgroup
        pids = cgroup.pids() if cgroup is not None else [inst.sandbox.pid]
        for pid in pids:
            use = memory_of(pid)
            if use is not None:
                pss += use.pss
                uss += use.uss
        out.append(
            {
                "id": inst.id,
                "function": inst.function,
                "version": inst.version,
                "state": inst.state.value,
                "start": inst.start_kind.value,
                "invocations": inst.invocations,
                "pids": pids,  # host pids of the sandbox's processes
                "memory": {"cgroup": inst.memory_bytes, "pss": pss, "uss": uss},
            }
        )
    return out
