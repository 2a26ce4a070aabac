"""Making and unmaking instances: the cold path of an invocation.

``InstanceFactory.start`` is what a pool calls when it has no idle instance: it reserves
the function's MemorySize against the node's memory budget (evicting idle instances to
fit, frozen first), builds the sandbox's spec -- the host layout with the function's code
and packages, or an image's root (``ImageFunctions``) -- forks the instance from the best
zygote when there is one (``ZygoteCache``), else starts a fresh interpreter in a fresh
sandbox, and waits for the runtime's ``ready``: by then the handler module is imported.
An import that fails is ``InitFailed`` with Lambda's error type.  ``destroy`` returns the
memory reservation and has the sandbox torn down in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from warmstart.errors import TooManyRequests
from warmstart.functions import FunctionRecord
from warmstart.kinds import QoSClass, StartKind
from warmstart.lifecycle import Supervisor
from warmstart.qos.enforce import set_oom_score_adj
from warmstart.sandbox import Isolation, Sandbox, SandboxManager, SandboxSpec
from warmstart.worker.images import ImageFunctions
from warmstart.worker.instance import Instance, InstanceDied, State
from warmstart.worker.metrics import Metrics
from warmstart.worker.pool import HandlerCache
from warmstart.worker.registry import NODE_RUNTIMES, FunctionRegistry
from warmstart.worker.settings import Settings
from warmstart.zygote.cache import ZygoteCache
from warmstart.zygote.launcher import Zygote

log = logging.getLogger(__name__)

# The OOM killer's preference for best-effort processes (the most the kernel takes).
BE_OOM_SCORE_ADJ = 1000

# How long a dead runtime's parent may take to report how it ended (it reaps the child
# as soon as the kernel tells it; the worker saw the socket close a moment before).
EXIT_REASON_WAIT_S = 1.0


async def _send_early(sandbox: Sandbox, frame: bytes) -> bool:
    """Write ``frame`` into a new sandbox's socket, where the runtime reads it once
    ready; False if none of it was written."""
    try:
        sent = sandbox.sock.send(frame, socket.MSG_DONTWAIT)
    except OSError:  # the runtime is gone already (its start says so), or no room
        return False
    if sent < len(frame):
        # Part of the frame is in: the rest follows before anything else, as the runtime
        # reads (after it said ready; if it fails instead, so does this).
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(sandbox.sock, frame[sent:])
    return True


def _last_line(output: bytes) -> str:
    """": <the last line the runtime wrote>", or "" when it wrote nothing."""
    lines = output.decode(errors="replace").strip().splitlines()
    return f": {lines[-1][-300:]}" if lines else ""


@dataclass(frozen=True)
class RuntimeEnd:
    """How a runtime that died ended, as far as the worker can tell."""

    reason: str  # its parent's words ("exit status 7", "signal: killed"); "" if none came
    output: bytes  # what it wrote last (since its last reply), up to 4 KB
    oom: bool  # the cgroup's OOM killer killed a process of the sandbox


class InitFailed(Exception):
    """The runtime could not get ready: the handler's import failed, or the runtime died
    first.  Reported to the caller as the invocation's function error (status 200)."""

    def __init__(self, error_type: str, message: str, logs: bytes, payload: bytes = b"") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.logs = logs
        self.payload = payload

    def error_payload(self) -> bytes:
        if self.payload:
            return self.payload
        return json.dumps({"errorMessage": self.message, "errorType": self.error_type}).encode()


class InstanceFactory:
    def __init__(
        self,
        settings: Settings,
        sandboxes: SandboxManager,
        registry: FunctionRegistry,
        images: ImageFunctions,
        cache: HandlerCache,
        metrics: Metrics,
        tasks: Supervisor,
    ) -> None:
        self.settings = settings
        self.sandboxes = sandboxes
        self.registry = registry
        self.images = images
        self.cache = cache
        self.metrics = metrics
        self.tasks = tasks
        self.zygotes: ZygoteCache | None = None  # set by the worker once zygotes run
        self.reserved_mb = 0  # the MemorySize of every live instance
        self.be_starting_mb = 0  # of which best-effort instances still starting hold
        # Evicts one running best-effort instance (the invoker's): latency-sensitive
        # starts take memory from best-effort work.  False when there is none.
        self.evict_be: Callable[[], bool] | None = None
        self.be_evicted_for_ls = 0

    def env(self, rec: FunctionRecord) -> dict[str, str]:
        """The instance's environment: Lambda's reserved variables, then the function's."""
        s = self.settings
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "HOME": "/tmp",
            "_HANDLER": rec.config.handler,
            "AWS_REGION": s.region,
            "AWS_DEFAULT_REGION": s.region,
            "AWS_LAMBDA_FUNCTION_NAME": rec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": rec.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(rec.config.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{rec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"warmstart/{rec.revision_id}",
        }
        if rec.image is None:
            # What runs: the node's interpreter (``check_runtime`` refuses any other at deploy).  An
            # image's Python is its own; its base image may set this variable itself.
            env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_{NODE_RUNTIMES[0]}"
        env.update(rec.config.environment)
        return env

    def prepare_zygote(self, rec: FunctionRecord) -> None:
        """``rec`` was just deployed (or changed): have its package set's zygote built now,
        so that the first invocations -- often a burst right after a deploy -- fork from
        it.  Only for functions that may fork, with packages installed on this node (in a
        cluster, a function deployed through another node installs them here on demand)."""
        if (
            self.zygotes is None
            or not self.settings.zygote_at_deploy
            or rec.image is not None
            or not rec.packages
            or not self._may_fork(rec)
        ):
            return
        if all(d.is_dir() for d in self.registry.package_dirs(rec)):
            self.zygotes.prepare(frozenset(rec.packages))

    # -- start -----------------------------------------------------------------------------
    def _reserve(self, memory_mb: int, qos_class: QoSClass) -> None:
        """Reserve ``memory_mb`` of the node's memory budget for a new instance.

        Over the budget, idle instances go first (least recently used, frozen first).
        Latency-sensitive work then takes memory from best-effort work: running
        best-effort instances are evicted, youngest first (their work is requeued, no
        attempt spent), and what best-effort instances still starting hold is lent to
        latency-sensitive work (the budget is overcommitted by at most that much until
        they are evicted in turn).  Only latency-sensitive reservations themselves make a
        latency-sensitive start ``TooManyRequests``; best-effort starts wait for room."""
        budget = self.settings.memory_budget_mb
        while self.reserved_mb + memory_mb > budget:
            if self.cache.evict_lru():
                continue
            if qos_class is QoSClass.LS and self.evict_be is not None and self.evict_be():
                self.be_evicted_for_ls += 1
                continue
            if qos_class is QoSClass.LS and (
                self.reserved_mb - self.be_starting_mb + memory_mb <= budget
            ):
                break  # the rest is best-effort instances still starting: lent, not refused
            raise TooManyRequests(
                f"The node's memory budget ({budget} MB) is in use",
                "ConcurrentInvocationLimitExceeded",
            )
        self.reserved_mb += memory_mb
        if qos_class is QoSClass.BE:
            self.be_starting_mb += memory_mb

    async def start(
        self, rec: FunctionRecord, qos_class: QoSClass, first: bytes | None = None
    ) -> Instance:
        """A ready instance of ``rec`` (its handler imported), or ``InitFailed``.

        ``first``: a request frame to write to the runtime as soon as the sandbox exists,
        before it is ready (``Instance.first_sent`` says whether it was)."""
        if self.registry.distributed:
            await self.registry.ensure_code(rec)
        need = rec.config.memory_mb
        self._reserve(need, qos_class)
        try:
            return await self._start(rec, qos_class, need, first)
        finally:
            if qos_class is QoSClass.BE:
                self.be_starting_mb -= need

    async def _start(
        self, rec: FunctionRecord, qos_class: QoSClass, need: int, first: bytes | None
    ) -> Instance:
        t0 = time.perf_counter()
        try:
            sandbox, zygote = await self._sandbox(rec, qos_class)
        except BaseException:
            self.reserved_mb -= need
            raise
        if qos_class is QoSClass.BE:
            self._prefer_for_oom(sandbox)
        inst = Instance(sandbox, rec.name, rec.revision, need)
        if zygote is not None:
            inst.start_kind = StartKind.FORK
            inst.zygote = zygote
        if first is not None:
            try:
                inst.first_sent = await _send_early(sandbox, first)
            except BaseException:
                self.destroy(inst)
                raise
        ready = await self._await_ready(inst, t0)
        if rec.image is not None and zygote is None and self._may_fork(rec):
            self.images.fresh_start(rec.image, ready.ready_payload)
        return ready

    def _prefer_for_oom(self, sandbox: Sandbox) -> None:
        """An OOM anywhere on the node kills best-effort work before anything else: its
        processes get the highest ``oom_score_adj`` (their children inherit it)."""
        cgroup = sandbox.cgroup
        pids = cgroup.pids() if cgroup is not None else [sandbox.pid]
        try:
            set_oom_score_adj(pids or [sandbox.pid], BE_OOM_SCORE_ADJ)
        except OSError as exc:  # a sandbox that died meanwhile fails its start anyway
            log.debug("oom_score_adj of %s: %s", sandbox.pid, exc)

    async def _sandbox(
        self, rec: FunctionRecord, qos_class: QoSClass
    ) -> tuple[Sandbox, Zygote | None]:
        """The instance's sandbox: forked from a zygote when one fits, else fresh.  A
        zygote serves only loopback-only functions (it has no network of its own)."""
        zygotes = self.zygotes if self._may_fork(rec) else None
        env = self.env(rec)
        if rec.image is not None:
            spec = await self.images.spec(rec, env, qos_class)
            forked = await zygotes.fork_image(rec.image.digest, spec) if zygotes else None
        else:
            spec = self._code_spec(rec, env, qos_class)
            forked = await zygotes.fork(frozenset(rec.packages), spec) if zygotes else None
        if forked is not None:
            return forked
        return await self.sandboxes.create(spec), None

    def _may_fork(self, rec: FunctionRecord) -> bool:
        return self.zygotes is not None and rec.config.network == "none"

    def _code_spec(self, rec: FunctionRecord, env: dict[str, str], qos: QoSClass) -> SandboxSpec:
        mounts: tuple[tuple[str, str], ...] = ()
        if rec.packages:
            dirs = self.registry.package_dirs(rec)
            if self.sandboxes.isolation is Isolation.LINUX:
                mounts = tuple((str(d), f"/var/packages/{d.name}") for d in dirs)
                env["WARMSTART_PATH"] = ":".join(dst for _, dst in mounts)
            else:
                env["WARMSTART_PATH"] = ":".join(str(d) for d in dirs)
        return SandboxSpec(
            code_dir=self.registry.code_dir(rec),
            env=env,
            memory_mb=rec.config.memory_mb,
            network=rec.config.network,
            extra_ro_mounts=mounts,
            qos_class=qos,
            tmp_mb=rec.config.ephemeral_mb,
        )

    async def _await_ready(self, inst: Instance, t0: float) -> Instance:
        try:
            await inst.connect()
            async with asyncio.timeout(self.settings.init_timeout_s):
                reply = await inst.read_reply()
        except InstanceDied as exc:
            raise await self._died_before_ready(inst) from exc
        except TimeoutError as exc:
            output = inst.sandbox.output_tail()
            self.destroy(inst)
            raise InitFailed(
                "Runtime.ExitError",
                f"Runtime did not get ready within {self.settings.init_timeout_s:g} seconds"
                + _last_line(output),
                output,
            ) from exc
        except BaseException:
            self.destroy(inst)
            raise
        if reply.kind != "ready":
            self.destroy(inst)
            err = json.loads(reply.payload or b"{}")
            raise InitFailed(
                err.get("errorType", "Runtime.Unknown"),
                err.get("errorMessage", ""),
                reply.logs,
                reply.payload,
            )
        self.metrics.sandbox_create.observe(time.perf_counter() - t0)
        inst.state = State.BUSY
        inst.ready_payload = reply.payload
        return inst

    async def _died_before_ready(self, inst: Instance) -> InitFailed:
        """Why a runtime died before it was ready."""
        try:
            end = await self.ended(inst)
        finally:
            self.destroy(inst)
        if end.oom:
            return InitFailed(
                "Runtime.OutOfMemory",
                f"Runtime exited with error: {end.reason or 'signal: killed'} "
                f"(out of memory: MemorySize is {inst.memory_mb} MB)",
                end.output,
            )
        what = f"Runtime exited with error: {end.reason}" if end.reason else "Runtime exited"
        return InitFailed(
            "Runtime.ExitError",
            f"{what} before it was ready" + _last_line(end.output),
            end.output,
        )

    async def ended(self, inst: Instance) -> RuntimeEnd:
        """How the runtime of ``inst``, found dead, ended: its parent's report (which
        comes within a moment of the death: wait at most EXIT_REASON_WAIT_S for it), what
        it wrote last, and whether the OOM killer did it.  Call before ``destroy``: the
        sandbox's exit pipe and output go with it."""
        sandbox = inst.sandbox
        reason = await sandbox.exit_reason(timeout=EXIT_REASON_WAIT_S)
        return RuntimeEnd(reason, sandbox.output_tail(), sandbox.oom_killed())

    # -- stop ------------------------------------------------------------------------------
    def destroy(self, inst: Instance) -> None:
        """Close the instance now; its sandbox is torn down in the background."""
        if inst.state is State.DEAD:
            return
        if inst.zygote is not None and self.zygotes is not None:
            self.zygotes.released(inst.zygote)
        inst.close()
        self.reserved_mb -= inst.memory_mb
        self.tasks.spawn(self.sandboxes.destroy(inst.sandbox), f"destroy {inst.id}")
