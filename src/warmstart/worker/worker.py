"""Worker: functions in memory, their pools, and the invocation path.

The hot path of a warm invocation, in order: dict lookup of the function's pool, pop of
an idle instance (thaw if frozen: one write to an open cgroup file), one socket write of
the event bytes, one read of the reply, a log append, metrics.  Nothing on it touches
SQLite, parses the event, or re-encodes the result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart.errors import (
    Conflict,
    InvalidParameter,
    InvalidRequestContent,
    NotFound,
    PlatformError,
    TooManyRequests,
)
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore, bundle
from warmstart.functions.models import HANDLER_RE, QOS_TAG, ImageSource
from warmstart.packages import InstallCache, parse_pins
from warmstart.qos.policy import be_admission
from warmstart.sandbox import Isolation, RootLayout, SandboxManager, SandboxSpec
from warmstart.sandbox.zygotes import memory_of
from warmstart.worker.bequeue import BEQueue
from warmstart.worker.forks import ZygoteCache
from warmstart.worker.images import ImageManager
from warmstart.worker.instance import Instance, InstanceDied, Reply, State
from warmstart.worker.metrics import Metrics
from warmstart.worker.pool import FunctionPool, HandlerCache
from warmstart.worker.qos import BEInstance, QoSManager
from warmstart.worker.settings import Settings

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 4096
MAX_JOB_INPUTS = 100_000
StartKind = str  # "warm" | "cold"


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


def _error_payload(error_type: str, message: str) -> bytes:
    return json.dumps({"errorMessage": message, "errorType": error_type}).encode()


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.store = FunctionStore(self.data_dir)
        iso = None if settings.isolation is None else Isolation(settings.isolation)
        self.sandboxes = SandboxManager(
            self.data_dir,
            isolation=iso,
            uid=settings.sandbox_uid,
            gid=settings.sandbox_gid,
            pids_max=settings.pids_max,
            tmp_mb=settings.tmp_mb,
            cpu_quota=settings.cpu_quota,
            pool_size=settings.cgroup_pool,
            be_sched_idle=settings.qos_config.be_sched_idle,
        )
        self.packages = InstallCache(
            self.data_dir / "packages",
            self.sandboxes,
            python=self.sandboxes.python,
            index_url=settings.index_url,
            find_links=settings.find_links,
            offline=settings.offline,
        )
        self.cache = HandlerCache(
            settings.cache_budget_mb << 20, settings.freeze_after_ms / 1000, settings.idle_ttl_s
        )
        self.zygotes: ZygoteCache | None = None
        self.images: ImageManager | None = None  # made on first use (container images)
        self._layouts: dict[str, RootLayout] = {}  # image digest -> sandbox root layout
        self._image_colds: dict[str, int] = {}  # image digest -> fresh starts so far
        self._image_preload: dict[str, list[str]] = {}  # what the image's handler imported
        self.qos: QoSManager | None = None
        self.running_be: dict[Instance, FunctionPool] = {}
        self.functions: dict[str, FunctionRecord] = {}
        self.pools: dict[str, FunctionPool] = {}  # latency-sensitive instances
        self.be_pools: dict[str, FunctionPool] = {}  # best-effort instances (events, jobs)
        self._old_pools: set[FunctionPool] = set()
        self.reserved_mb = 0
        self.metrics = Metrics(self._snapshot)
        self._log_fds: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._event_wakeup = asyncio.Event()
        # Best-effort bookkeeping (job inserts, progress, outcomes) off the event loop.
        self.be_queue = BEQueue(self.store)
        self._closing = False
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.sandboxes.start()
        if self.settings.zygotes and self.sandboxes.isolation is Isolation.LINUX:
            self.zygotes = ZygoteCache(
                self.sandboxes,
                lambda pin: self.packages.path(parse_pins(pin)[0]),
                grow_after=self.settings.zygote_after,
                budget_mb=self.settings.zygote_budget_mb,
                uid=self.settings.zygote_uid,
            )
            try:
                await self.zygotes.start()
            except (PlatformError, OSError, TimeoutError) as exc:
                log.error("zygotes are off: the root zygote did not start: %s", exc)
                self.zygotes = None
        if self.sandboxes.reaped:
            log.warning(
                "start-up reaped %d process(es) left by a previous worker", self.sandboxes.reaped
            )
        for rec in self.store.load_all():
            self.functions[rec.name] = rec
        if self.sandboxes.isolation is Isolation.LINUX:
            # Ready for image functions (and recovering what a crash left mounted).
            self._image_manager().recover()
        log.info(
            "worker ready: %d function(s), isolation=%s",
            len(self.functions),
            self.sandboxes.isolation.value,
        )
        if self.sandboxes.isolation is Isolation.LINUX and self.sandboxes.driver is not None:
            self.qos = QoSManager(
                self.sandboxes,
                self._be_instances,
                self._evict_be,
                config=self.settings.qos_config,
                enabled=self.settings.qos,
            )
        self._loops = [self._spawn(self._event_loop()), self._spawn(self._sweeper())]
        if self.qos is not None:
            self._loops.append(self._spawn(self.qos.run()))

    async def close(self) -> None:
        self._closing = True
        for task in list(self._loops):
            task.cancel()
        for task in list(self._loops):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Retiring schedules the destruction of every idle instance; let it finish
        # before the sandboxes go, so nothing races with the cgroup pool's removal.
        for pool in self._all_pools():
            pool.retire()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self.zygotes is not None:
            await self.zygotes.close()
        await self.sandboxes.close()
        if self.images is not None:
            await self.images.close()
        for fd in self._log_fds.values():
            os.close(fd)
        self._log_fds.clear()
        await self.be_queue.close()
        self.store.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.cache.enforce()
            if self.zygotes is not None:
                self.zygotes.enforce()
            self._old_pools = {p for p in self._old_pools if p.live > 0}

    # -- functions -------------------------------------------------------------------------
    def get(self, name: str) -> FunctionRecord:
        try:
            return self.functions[name]
        except KeyError:
            raise NotFound(f"Function not found: {self.arn(name)}") from None

    def arn(self, name: str) -> str:
        return f"arn:aws:lambda:{self.settings.region}:{self.settings.account}:function:{name}"

    async def create_function(
        self, name: str, config: FunctionConfig, code: bytes
    ) -> FunctionRecord:
        FunctionRecord.check_name(name)
        if name in self.functions:
            raise Conflict(f"Function already exist: {name}")
        packages = await self._prepare_code(code)
        rec = await asyncio.to_thread(self.store.create, name, config, code, packages)
        self.functions[name] = rec
        return rec

    def _image_manager(self) -> ImageManager:
        if self.images is None:
            self.images = ImageManager(
                self.data_dir,
                pull_mode=self.settings.image_pull,
                budget_mb=self.settings.image_budget_mb,
                insecure=self.settings.insecure_registries,
                background_fetch=self.settings.image_background_fetch,
            )
        return self.images

    async def inspect_image(self, uri: str, overrides: dict[str, Any]) -> ImageSource:
        """Resolve an image for a function; its CMD (or ImageConfig.Command) names the handler."""
        if self.sandboxes.isolation is not Isolation.LINUX:
            raise InvalidParameter(
                "PackageType=Image needs linux isolation (run warmstart serve as root on Linux)"
            )
        image = await self._image_manager().inspect(uri, overrides)
        if not image.command or not HANDLER_RE.match(image.command[0]):
            raise InvalidParameter(
                f"Image {uri}: the handler comes from ImageConfig.Command or the image's CMD, "
                f"which must be ['module.function'] (got {list(image.command)})"
            )
        return image

    async def create_image_function(
        self, name: str, config: FunctionConfig, image: ImageSource
    ) -> FunctionRecord:
        FunctionRecord.check_name(name)
        if name in self.functions:
            raise Conflict(f"Function already exist: {name}")
        config = config.updated(handler=image.command[0])
        rec = await asyncio.to_thread(self.store.create_image, name, config, image)
        self.functions[name] = rec
        self._spawn(self._premount(image))
        return rec

    async def _premount(self, image: ImageSource) -> None:
        """Mount a new function's image right away, so its first invocation finds it ready."""
        try:
            await self._image_layout(image)
        except Exception as exc:  # the first invocation retries and reports it
            log.warning("image %s: cannot mount it yet: %s", image.uri, exc)

    async def update_image(self, name: str, image: ImageSource) -> FunctionRecord:
        rec = self.get(name)
        old = rec.image
        new = self.store.bump(
            rec,
            config=rec.config.updated(handler=image.command[0]),
            package_type="Image",
            image=image,
            code_sha256=image.digest.split(":", 1)[-1],
            code_size=image.size,
            packages=(),
        )
        out = self._replace(new)
        if old is not None and old.digest != image.digest:
            await self._release_image(old)
        self._spawn(self._premount(image))
        return out

    async def _release_image(self, image: ImageSource) -> None:
        if self.images is None:
            return
        used = any(
            r.image is not None and r.image.digest == image.digest
            for r in self.functions.values()
        )
        if not used:
            self._layouts.pop(image.digest, None)
            self._image_colds.pop(image.digest, None)
            if self.zygotes is not None:
                await self.zygotes.drop_image(image.digest)
        await self.images.release(image, still_used=used)

    async def _image_layout(self, image: ImageSource) -> RootLayout:
        """The sandbox root layout of an image (mounting it on first use)."""
        images = self._image_manager()
        rootfs = await images.rootfs(image)
        layout = self._layouts.get(image.digest)
        if layout is None or self.images is None or not rootfs.exists():
            env = image.env_dict()
            layout = await asyncio.to_thread(
                self.sandboxes.image_layout, rootfs, env.get("PATH", "")
            )
            self._layouts[image.digest] = layout
        return layout

    async def update_code(self, name: str, code: bytes) -> FunctionRecord:
        rec = self.get(name)
        packages = await self._prepare_code(code)
        sha = bundle.digest(code)
        out = self._replace(
            self.store.bump(
                rec,
                code_sha256=sha,
                code_size=len(code),
                packages=packages,
                package_type="Zip",
                image=None,
            )
        )
        if rec.image is not None:
            await self._release_image(rec.image)
        return out

    async def _prepare_code(self, code: bytes) -> tuple[str, ...]:
        """Unpack the bundle; resolve and install its requirements.txt, if any.

        Nothing is recorded until every package is installed, so a failed deploy
        leaves the function as it was.
        """
        _, directory = await asyncio.to_thread(self.store.put_code, code)
        req = directory / "requirements.txt"
        if not req.is_file():
            return ()
        pins = await self.packages.resolve(req.read_text(errors="replace"))
        await self.packages.install(pins)
        return tuple(str(p) for p in pins)

    def _package_dirs(self, rec: FunctionRecord) -> list[Path]:
        return [self.packages.path(p) for p in parse_pins("\n".join(rec.packages))]

    def update_config(self, name: str, **changes: Any) -> FunctionRecord:
        rec = self.get(name)
        return self._replace(self.store.bump(rec, config=rec.config.updated(**changes)))

    def put_concurrency(self, name: str, reserved: int | None) -> FunctionRecord:
        rec = self.get(name)
        new = self.store.bump(rec, reserved_concurrency=reserved)
        self.functions[name] = new
        for pool in (self.pools.get(name), self.be_pools.get(name)):
            if pool is not None:
                pool.limit = self._limit(new)
                pool._pass_slot()
        return new

    def delete_function(self, name: str) -> None:
        rec = self.get(name)
        self.store.delete(name)
        del self.functions[name]
        self._retire(name)
        fd = self._log_fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        if rec.image is not None:
            self._spawn(self._release_image(rec.image))

    def _replace(self, rec: FunctionRecord) -> FunctionRecord:
        """A new revision: new invocations get new instances; running ones finish."""
        self.functions[rec.name] = rec
        self._retire(rec.name)
        return rec

    def _retire(self, name: str) -> None:
        for pools in (self.pools, self.be_pools):
            pool = pools.pop(name, None)
            if pool is not None:
                pool.retire()
                if pool.live > 0:
                    self._old_pools.add(pool)

    def _limit(self, rec: FunctionRecord) -> int:
        if rec.reserved_concurrency is not None:
            return rec.reserved_concurrency
        return self.settings.max_concurrency

    def _pool(self, rec: FunctionRecord, qos: str = "ls") -> FunctionPool:
        pools = self.be_pools if qos == "be" else self.pools
        pool = pools.get(rec.name)
        if pool is None or pool.revision != rec.revision:
            if pool is not None:
                pool.retire()
                if pool.live > 0:
                    self._old_pools.add(pool)
            pool = FunctionPool(
                rec.name,
                rec.revision,
                self._limit(rec),
                self.settings.queue_depth,
                lambda: self._start_instance(rec, qos),
                self._destroy_instance,
                self.cache,
            )
            pools[rec.name] = pool
        return pool

    def _all_pools(self) -> list[FunctionPool]:
        return [*self.pools.values(), *self.be_pools.values(), *self._old_pools]

    # -- instances -------------------------------------------------------------------------
    def _env(self, rec: FunctionRecord) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "HOME": "/tmp",
            "_HANDLER": rec.config.handler,
            "AWS_REGION": self.settings.region,
            "AWS_DEFAULT_REGION": self.settings.region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{rec.config.runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": rec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(rec.config.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{rec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"warmstart/{rec.revision_id}",
        }
        env.update(rec.config.environment)
        return env

    async def _start_instance(self, rec: FunctionRecord, qos: str = "ls") -> Instance:
        need = rec.config.memory_mb
        while self.reserved_mb + need > self.settings.memory_budget_mb:
            if not self.cache.evict_lru():
                raise TooManyRequests(
                    f"The node's memory budget ({self.settings.memory_budget_mb} MB) is in use",
                    "ConcurrentInvocationLimitExceeded",
                )
        self.reserved_mb += need
        t0 = time.perf_counter()
        if rec.image is not None:
            return await self._start_image_instance(rec, qos, t0)
        env = self._env(rec)
        mounts: tuple[tuple[str, str], ...] = ()
        if rec.packages:
            dirs = self._package_dirs(rec)
            if self.sandboxes.isolation is Isolation.LINUX:
                mounts = tuple((str(d), f"/var/packages/{d.name}") for d in dirs)
                env["WARMSTART_PATH"] = ":".join(dst for _, dst in mounts)
            else:
                env["WARMSTART_PATH"] = ":".join(str(d) for d in dirs)
        spec = SandboxSpec(
            code_dir=self.store.code_dir(rec),
            env=env,
            memory_mb=need,
            network=rec.config.network,
            extra_ro_mounts=mounts,
            qos=qos,
        )
        forked = None
        try:
            if self.zygotes is not None and rec.config.network == "none":
                forked = await self.zygotes.fork(frozenset(rec.packages), spec)
            sandbox = forked[0] if forked else await self.sandboxes.create(spec)
        except BaseException:
            self.reserved_mb -= need
            raise
        inst = Instance(sandbox, rec.name, rec.revision, need)
        if forked:
            inst.start_kind = "fork"
            inst.zygote = forked[1]
        return await self._await_ready(inst, t0)

    async def _start_image_instance(self, rec: FunctionRecord, qos: str, t0: float) -> Instance:
        """A fresh sandbox whose root is the function's image (mounted on first use)."""
        image = rec.image
        assert image is not None
        zc = self.zygotes if rec.config.network == "none" else None
        forked = None
        try:
            layout = await self._image_layout(image)
            workdir = image.working_directory or "/var/task"
            env = image.env_dict()
            env.update(self._env(rec))
            env["PATH"] = image.env_dict().get("PATH") or env["PATH"]
            # Set here too: a forked child gets no spawner to add them.
            env["LAMBDA_TASK_ROOT"] = workdir
            env["LAMBDA_RUNTIME_DIR"] = layout.runtime_root
            if zc is not None and image.digest not in self._image_preload:
                env["WARMSTART_REPORT_MODULES"] = "1"
            spec = SandboxSpec(
                code_dir=None,
                env=env,
                memory_mb=rec.config.memory_mb,
                network=rec.config.network,
                qos=qos,
                layout=layout,
                workdir=workdir,
            )
            if zc is not None:
                forked = await zc.fork_image(image.digest, spec)
            sandbox = forked[0] if forked else await self.sandboxes.create(spec)
        except BaseException:
            self.reserved_mb -= rec.config.memory_mb
            raise
        inst = Instance(sandbox, rec.name, rec.revision, rec.config.memory_mb)
        if forked:
            inst.start_kind = "fork"
            inst.zygote = forked[1]
        ready = await self._await_ready(inst, t0)
        if zc is not None and not forked:
            self._image_cold_start(image, layout, ready.ready_payload)
        return ready

    def _image_cold_start(self, image: ImageSource, layout: RootLayout, report: bytes) -> None:
        """Count a fresh start of an image; after ``zygote_after`` of them, start a zygote
        inside the image's root that preloads what the handler imported."""
        if report and image.digest not in self._image_preload:
            with contextlib.suppress(ValueError):
                names = json.loads(report)
                if isinstance(names, list):
                    self._image_preload[image.digest] = [str(n) for n in names]
        n = self._image_colds.get(image.digest, 0) + 1
        self._image_colds[image.digest] = n
        if self.zygotes is not None and n >= self.settings.zygote_after:
            preload = self._image_preload.get(image.digest, [])
            self.zygotes.grow_image(image.digest, layout, image.env_dict(), preload)

    async def _await_ready(self, inst: Instance, t0: float) -> Instance:
        try:
            await inst.connect()
            reply = await asyncio.wait_for(inst.read_reply(), self.settings.init_timeout_s)
        except (InstanceDied, TimeoutError) as exc:
            self._destroy_instance(inst)
            raise _InitFailed(
                "Runtime.ExitError",
                f"Runtime exited before it was ready: {exc or 'timed out'}",
                b"",
            ) from exc
        except BaseException:
            self._destroy_instance(inst)
            raise
        if reply.kind != "ready":
            self._destroy_instance(inst)
            err = json.loads(reply.payload or b"{}")
            raise _InitFailed(
                err.get("errorType", "Runtime.Unknown"),
                err.get("errorMessage", ""),
                reply.logs,
                reply.payload,
            )
        self.metrics.sandbox_create.observe(time.perf_counter() - t0)
        inst.state = State.BUSY
        inst.ready_payload = reply.payload
        return inst

    def _destroy_instance(self, inst: Instance) -> None:
        self.running_be.pop(inst, None)
        if inst.state is State.DEAD:
            return
        if inst.zygote is not None and self.zygotes is not None:
            self.zygotes.released(inst.zygote)
        inst.close()
        self.reserved_mb -= inst.memory_mb
        self._spawn(self.sandboxes.destroy(inst.sandbox))

    # -- invocation ------------------------------------------------------------------------
    async def invoke(
        self, name: str, payload: bytes, *, client_context: str | None = None, qos: str = "ls"
    ) -> InvokeResult:
        """Invoke ``name``; ``qos`` is the invocation's class ("ls" for synchronous calls,
        "be" for Event invocations and job items), unless the function's
        ``warmstart:qos`` tag pins one."""
        rec = self.get(name)
        pool = self._pool(rec, rec.config.tags.get(QOS_TAG, qos))
        request_id = str(uuid.uuid4())
        t0 = time.perf_counter()
        try:
            inst, cold = await pool.acquire()
        except _InitFailed as exc:
            return self._finish(
                rec,
                request_id,
                t0,
                "cold",
                "init_error",
                _error_payload(exc.error_type, exc.message) if not exc.payload else exc.payload,
                "Unhandled",
                exc.logs,
            )
        except TooManyRequests:
            self.metrics.invocations.labels(name, "throttled").inc()
            raise
        start = inst.start_kind if cold else "warm"
        timeout = rec.config.timeout_s
        meta = {
            "id": request_id,
            "deadline_ms": int(time.time() * 1000) + timeout * 1000,
            "arn": self.arn(name),
        }
        if client_context:
            meta["client_context"] = client_context
        best_effort = pool.name in self.be_pools and self.be_pools[pool.name] is pool
        if best_effort:
            self.running_be[inst] = pool
        try:
            await inst.send(json.dumps(meta).encode(), payload)
            reply: Reply = await asyncio.wait_for(inst.read_reply(), timeout)
        except TimeoutError:
            pool.discard(inst)
            msg = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {request_id} Task timed out after {timeout:.2f} seconds"
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
        except InstanceDied:
            if inst.evicted:
                raise Evicted(f"best-effort instance of {name} was evicted") from None
            oom = inst.sandbox.oom_killed()
            pool.discard(inst)
            kind = "Runtime.OutOfMemory" if oom else "Runtime.ExitError"
            why = "signal: killed" if oom else "the runtime exited unexpectedly"
            msg = f"RequestId: {request_id} Error: Runtime exited with error: {why}"
            if oom:
                msg += f" (memory limit of {rec.config.memory_mb} MB exceeded)"
            return self._finish(
                rec,
                request_id,
                t0,
                start,
                "oom" if oom else "crash",
                _error_payload(kind, msg),
                "Unhandled",
                b"",
            )
        except BaseException:
            pool.discard(inst)
            raise
        inst.invocations += 1
        self.running_be.pop(inst, None)
        pool.release(inst)
        if reply.kind == "result":
            return self._finish(
                rec, request_id, t0, start, "success", reply.payload, None, reply.logs
            )
        if reply.kind == "invalid_event":
            self.metrics.invocations.labels(name, "invalid_request").inc()
            raise InvalidRequestContent(
                "Could not parse request body into json: "
                + json.loads(reply.payload).get("errorMessage", "")
            )
        return self._finish(
            rec, request_id, t0, start, "error", reply.payload, "Unhandled", reply.logs
        )

    def _finish(
        self,
        rec: FunctionRecord,
        request_id: str,
        t0: float,
        start: str,
        outcome: str,
        payload: bytes,
        function_error: str | None,
        logs: bytes,
    ) -> InvokeResult:
        elapsed = time.perf_counter() - t0
        duration_ms = elapsed * 1000
        m = self.metrics
        m.invocations.labels(rec.name, outcome).inc()
        m.starts.labels(rec.name, start).inc()
        m.latency.labels(rec.name, start).observe(elapsed)
        text = self._log(rec, request_id, duration_ms, logs, payload if function_error else None)
        return InvokeResult(
            request_id, payload, function_error, start, duration_ms, text[-LOG_TAIL_BYTES:]
        )

    def _log(
        self,
        rec: FunctionRecord,
        request_id: str,
        duration_ms: float,
        logs: bytes,
        error: bytes | None,
    ) -> bytes:
        report = (
            f"END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
            f"Billed Duration: {max(1, int(duration_ms + 0.999))} ms\tMemory Size: {rec.config.memory_mb} MB\n"
        ).encode()
        parts = [f"START RequestId: {request_id} Version: $LATEST\n".encode(), logs]
        if error is not None and not logs:
            parts.append(error + b"\n")
        parts.append(report)
        text = b"".join(parts)
        fd = self._log_fds.get(rec.name)
        if fd is None:
            fd = os.open(
                self.log_path(rec.name),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o640,
            )
            self._log_fds[rec.name] = fd
        os.write(fd, text)
        return text

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    # -- async (Event) invocations ----------------------------------------------------------
    def invoke_async(self, name: str, payload: bytes) -> str:
        self.get(name)
        event_id = self.store.enqueue_event(name, payload)
        self._event_wakeup.set()
        return event_id

    # -- batch jobs ------------------------------------------------------------------------
    async def submit_job(self, name: str, inputs: list[bytes]) -> str:
        """Queue ``inputs`` for ``name`` durably; they run like Event invocations.  The
        insert runs on the best-effort queue's thread: a large job takes tens of
        milliseconds to write, which the event loop owes to LS requests."""
        self.get(name)
        if not inputs:
            raise InvalidParameter("a job needs at least one input")
        if len(inputs) > MAX_JOB_INPUTS:
            raise InvalidParameter(f"a job takes at most {MAX_JOB_INPUTS} inputs")
        job_id = await self.be_queue.run(lambda db: db.create_job(name, inputs))
        self._event_wakeup.set()
        return job_id

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's progress (None if there is no such job), counted off the event loop."""
        return await self.be_queue.run(lambda db: db.job(job_id))

    async def jobs(self) -> list[dict[str, Any]]:
        return await self.be_queue.run(lambda db: db.jobs())

    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None:
        """A job's results in input order (None if there is no such job)."""

        def read(db: FunctionStore) -> list[dict[str, Any]] | None:
            return None if db.job(job_id) is None else db.job_results(job_id)

        return await self.be_queue.run(read)

    async def _event_loop(self) -> None:
        """Run queued Event invocations (durable in SQLite; retried like Lambda does).

        The queue is read only when a slot is free, on the best-effort queue's thread."""
        running: set[asyncio.Task[None]] = set()
        while True:
            self._event_wakeup.clear()
            free = self._be_slots() - len(running)
            if free > 0:
                taken = {t.get_name() for t in running}
                for event_id, fn, payload, attempts in await self.be_queue.pending(
                    free + len(taken)
                ):
                    if event_id in taken or len(running) >= self._be_slots():
                        continue
                    task = asyncio.get_running_loop().create_task(
                        self._run_event(event_id, fn, payload, attempts), name=event_id
                    )
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _t: self._event_wakeup.set())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_wakeup.wait(), 1.0)

    def _be_slots(self) -> int:
        """How many best-effort invocations may run: within the reclaimed capacity
        (``qos.policy.be_admission``), never more than ``be_concurrency``, and at least
        ``min_be_concurrency`` so async work cannot starve for ever (it stays in the
        lowest-weight BE subtree)."""
        cap = self.settings.be_concurrency
        if self.qos is None or not self.qos.enabled:
            return cap
        return be_admission(
            self.qos.reclaimed,
            len(self.running_be),
            sum(inst.memory_mb for inst in self.running_be),
            self.qos.config,
            most=cap,
            least=self.settings.min_be_concurrency,
        )

    def _be_instances(self) -> list[BEInstance]:
        """Running BE instances for the QoS tick (which reads their memory off the loop)."""
        request = self.settings.qos_config.be_cpu_request
        return [
            BEInstance(inst.id, inst.sandbox.cgroup.rel, request)
            for inst in self.running_be
            if inst.sandbox.cgroup is not None
        ]

    def _evict_be(self, ids: list[str]) -> None:
        for inst, pool in list(self.running_be.items()):
            if inst.id in ids:
                inst.evicted = True
                self.running_be.pop(inst, None)
                pool.discard(inst)  # the invocation sees the instance die and is requeued

    async def _run_event(self, event_id: str, fn: str, payload: bytes, attempts: int) -> None:
        try:
            result = await self.invoke(fn, payload, qos="be")
        except NotFound:
            self.be_queue.finish(event_id, "dropped", b"function deleted", attempts)
            return
        except Evicted:
            return  # still pending: it runs again when there is room (not an attempt)
        except (TooManyRequests, PlatformError) as exc:
            log.warning("event %s for %s deferred: %s", event_id, fn, exc)
            await asyncio.sleep(1.0)
            return
        except InvalidRequestContent as exc:
            self.be_queue.finish(event_id, "failed", str(exc).encode(), attempts + 1)
            return
        # Outcomes are written in batches on the queue's thread (``BEQueue``).
        attempts += 1
        if result.function_error is None:
            self.be_queue.finish(event_id, "succeeded", result.payload, attempts)
        elif attempts > self.settings.event_retries:
            self.be_queue.finish(event_id, "failed", result.payload, attempts)
        else:
            self.be_queue.retry(event_id, attempts)

    # -- statistics ------------------------------------------------------------------------
    def _instance_states(self) -> dict[str, float]:
        states = {s.value: 0.0 for s in State if s is not State.DEAD}
        for pool in self._all_pools():
            st = pool.statistics()
            states["busy"] += st.busy
            states["starting"] += st.starting
        for inst in self.cache.instances():
            states[inst.state.value] += 1
        return states

    def _snapshot(self) -> dict[str, dict[str, float]]:
        zc = self.zygotes
        q = self.qos
        return {
            "instances": self._instance_states(),
            "memory": {
                "idle_instances": float(self.cache.memory),
                "reserved": float(self.reserved_mb << 20),
            },
            "other": {
                "functions": float(len(self.functions)),
                "evictions_total": float(self.cache.evictions),
                "package_installs_total": float(self.packages.installs),
                "freezes_total": float(self.cache.freezes),
                "zygotes": float(len(zc.live)) if zc else 0.0,
                "zygote_forks_total": float(zc.forks) if zc else 0.0,
                "zygote_memory_pss_bytes": float(zc.memory()) if zc else 0.0,
                "reclaimed_cpu_cores": q.reclaimed.cpu_cores if q else 0.0,
                "reclaimed_memory_bytes": float(q.reclaimed.memory_bytes) if q else 0.0,
                "be_cpu_limit_cores": (q.be_cpu_cores or 0.0) if q else 0.0,
                "qos_evictions_total": float(q.evictions) if q else 0.0,
                "best_effort_running": float(len(self.running_be)),
                **(self.images.snapshot() if self.images is not None else {}),
            },
        }

    def node_status(self) -> dict[str, Any]:
        """GET /node (``warmstart top`` polls it every second): only what is in memory
        plus one indexed COUNT -- not ``_snapshot``, whose zygote PSS reads walk whole
        address spaces on the event loop."""
        status: dict[str, Any] = self.qos.status() if self.qos is not None else {"qos": False}
        status.update(
            {
                "isolation": self.sandboxes.isolation.value,
                "instances": self._instance_states(),
                "best_effort_running": len(self.running_be),
                "best_effort_slots": self._be_slots(),
                "queue_depth": self.store.pending_count(),
                "functions": len(self.functions),
                "zygotes": len(self.zygotes.live) if self.zygotes is not None else 0,
            }
        )
        return status

    def instances(self) -> list[dict[str, Any]]:
        """Idle instances with their memory: the cgroup's charge, and the processes'
        proportional (PSS) and unique (USS) set sizes -- a forked instance shares most
        of its pages with its zygote, which PSS splits fairly and USS leaves out."""
        out = []
        for pool in [*self.pools.values(), *self.be_pools.values()]:
            for inst in pool.idle:
                pss = uss = 0
                pids = (
                    inst.sandbox.cgroup.pids()
                    if inst.sandbox.cgroup is not None
                    else [inst.sandbox.pid]
                )
                for pid in pids:
                    use = memory_of(pid)
                    if use is not None:
                        pss += use.pss
                        uss += use.uss
                out.append(
                    {
                        "id": inst.id,
                        "function": inst.function,
                        "state": inst.state.value,
                        "start": inst.start_kind,
                        "invocations": inst.invocations,
                        "memory": {"cgroup": inst.memory_bytes, "pss": pss, "uss": uss},
                    }
                )
        return out


class Evicted(Exception):
    """A best-effort instance was evicted by the QoS manager; its work is requeued."""


class _InitFailed(Exception):
    def __init__(self, error_type: str, message: str, logs: bytes, payload: bytes = b"") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.logs = logs
        self.payload = payload
