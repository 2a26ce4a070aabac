"""The worker: one node's functions, instances and background work, behind one facade.

The API layer talks to ``Worker`` and nothing else.  Behind it each role has a room:

    FunctionRegistry   functions, revisions, versions, aliases (memory + SQLite), code made
                       ready at deploy
    Invoker            per-version pools, the invocation path, logs and metrics of a call
    InstanceFactory    the cold path: memory reservation, sandbox or zygote fork, readiness
    HandlerCache       idle instances node-wide: freezing, memory budget, LRU eviction
    Dispatcher         Event invocations and jobs: durable queue, best-effort admission
    Retention          finished events and jobs deleted once older than the retention
    ImageFunctions     image functions: roots, specs, image zygotes, premounts, and their
                       states (``worker/states.py``: Pending, Active, Inactive, Failed)
    ZygoteCache        the import cache (``warmstart.zygote``), when sandboxes are linux
    QoSManager         reclaimed capacity, BE suppression, LS burst, eviction (``warmstart.qos``)
    SandboxManager     spawner, cgroup pools, root layouts (``warmstart.sandbox``)

The facade builds them, wires their callbacks, starts them in order and closes them in
reverse: its ``Supervisor`` owns the worker's loops (dispatcher, sweeper, retention, QoS) and every
task they start (events, instance teardown, premounts); the zygote cache and the sandbox
manager own theirs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from warmstart.errors import PlatformError, RequestTooLarge
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore
from warmstart.functions.models import LATEST, AliasRecord, ImageSource
from warmstart.images.access import RegistryCredential
from warmstart.kinds import QoSClass, SizeLimit
from warmstart.lifecycle import Supervisor, close_all
from warmstart.packages import InstallCache, parse_pins
from warmstart.packages.egress import reap_stale_dirs
from warmstart.qos.manager import QoSManager
from warmstart.sandbox import Isolation, SandboxManager
from warmstart.worker.bequeue import BEQueue, WorkQueue
from warmstart.worker.dispatcher import Dispatcher
from warmstart.worker.images import ImageFunctions
from warmstart.worker.instances import InstanceFactory
from warmstart.worker.invoker import Invoker, InvokeResult, describe_instances
from warmstart.worker.logs import FunctionLogs
from warmstart.worker.metrics import Metrics
from warmstart.worker.pool import HandlerCache
from warmstart.worker.registry import (
    CodeStore,
    FunctionCatalog,
    FunctionRegistry,
    LocalCode,
    SqliteCatalog,
)
from warmstart.worker.retention import Retention
from warmstart.worker.settings import Settings
from warmstart.worker.states import FunctionState
from warmstart.worker.states import State as FunctionStateName
from warmstart.zygote.cache import ZygoteCache

if TYPE_CHECKING:
    from warmstart.images.store import ImageStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


class Worker:
    """One node.  A single node keeps functions and queued work in SQLite; a cluster node
    (``warmstart.cluster.node``) hands in its own ``catalog``, ``code`` store and work
    ``queue`` (etcd-backed), built over the same ``store``."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: FunctionStore | None = None,
        catalog: FunctionCatalog | None = None,
        code: CodeStore | None = None,
        queue: WorkQueue | None = None,
    ) -> None:
        self.settings = settings
        s = settings
        self.tasks = Supervisor("worker")
        store = store if store is not None else FunctionStore(s.data_dir)
        self._store = store
        iso = None if s.isolation is None else Isolation(s.isolation)
        self._sandboxes = SandboxManager(
            s.data_dir,
            isolation=iso,
            uid=s.sandbox_uid,
            gid=s.sandbox_gid,
            pids_max=s.pids_max,
            tmp_mb=s.tmp_mb,
            cpu_quota=s.cpu_quota,
            pool_size=s.cgroup_pool,
            be_sched_idle=s.qos_config.be_sched_idle,
        )
        self._packages = InstallCache(
            s.data_dir / "packages",
            self._sandboxes,
            python=self._sandboxes.python,
            index_url=s.index_url,
            find_links=s.find_links,
            offline=s.offline,
            allow_requirement_sources=s.allow_requirement_sources,
            allow_hosts=s.installer_allow_hosts,
        )
        self._registry = FunctionRegistry(
            catalog if catalog is not None else SqliteCatalog(store),
            code if code is not None else LocalCode(store),
            self._packages,
            region=s.region,
            account=s.account,
        )
        self._registry.listen(self._function_changed)
        self._cache = HandlerCache(
            s.cache_budget_mb << 20, s.freeze_after_ms / 1000, s.idle_ttl_s
        )
        self._metrics = Metrics(self._snapshot)
        self._logs = FunctionLogs(
            s.data_dir / "logs",
            max_bytes=int(s.function_log_max_mb * (1 << 20)),
            backups=s.function_log_backups,
        )
        self._images = ImageFunctions(s, self._sandboxes, self.tasks)
        self._factory = InstanceFactory(
            s,
            self._sandboxes,
            self._registry,
            self._images,
            self._cache,
            self._metrics,
            self.tasks,
        )
        self._invoker = Invoker(
            s, self._registry, self._factory, self._cache, self._logs, self._metrics
        )
        self._factory.evict_be = self._invoker.evict_youngest_be
        # Best-effort bookkeeping (job inserts, progress, outcomes) off the event loop.
        queue = queue if queue is not None else BEQueue(store)
        self._dispatcher = Dispatcher(s, self._registry, self._invoker, queue, self.tasks)
        self._retention = Retention(queue, s.event_retention_hours * 3600)
        self._zygotes: ZygoteCache | None = None
        self._qos: QoSManager | None = None
        self._installed: set[str] = set()
        self._redeploys: set[str] = set()  # functions whose image a deploy here names again

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the sandboxes, the zygotes, the loops; load the functions.  If a step
        fails, what started is closed again before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await asyncio.shield(self._close_after_failed_start())
            raise

    async def _close_after_failed_start(self) -> None:
        try:
            await self.close()
        except Exception as exc:  # the start's own error is the one to report
            log.error("cleaning up after a failed start: %s", exc)

    async def _start(self) -> None:
        s = self.settings
        await self.tasks.start()
        await self._sandboxes.start()
        linux = self._sandboxes.isolation is Isolation.LINUX
        if s.zygotes and linux:
            await self._start_zygotes()
        if self._sandboxes.reaped:
            log.warning(
                "start-up reaped %d process(es) left by a previous worker",
                self._sandboxes.reaped,
            )
        # The package installer's proxy sockets a killed worker left in the temp dir.
        await asyncio.to_thread(reap_stale_dirs)
        loaded = await self._registry.load()
        if linux:
            self._images.recover()  # what a crash left mounted
        log.info(
            "worker ready: %d function(s), isolation=%s",
            loaded,
            self._sandboxes.isolation.value,
        )
        if linux and self._sandboxes.driver is not None:
            self._qos = QoSManager(
                self._sandboxes,
                self._dispatcher.be_instances,
                self._dispatcher.evict,
                config=s.qos_config,
                enabled=s.qos,
                idle_instances=self._idle_cgroups,
            )
            self._dispatcher.qos = self._qos
        self.tasks.loop("dispatcher", self._dispatcher.run)
        self.tasks.loop("sweeper", self._sweep)
        self.tasks.loop("retention", self._retention.run)
        if self._qos is not None:
            self.tasks.loop("qos", self._qos.run)

    async def _start_zygotes(self) -> None:
        s = self.settings
        zygotes = ZygoteCache(
            self._sandboxes,
            lambda pin: self._packages.path(parse_pins(pin)[0]),
            grow_after=s.zygote_after,
            budget_mb=s.zygote_budget_mb,
            uid=s.zygote_uid,
        )
        try:
            await zygotes.start()
        except (PlatformError, OSError, TimeoutError) as exc:
            log.error("zygotes are off: the root zygote did not start: %s", exc)
            await zygotes.close()
            return
        self._zygotes = self._factory.zygotes = self._images.zygotes = zygotes

    def _idle_cgroups(self) -> list[tuple[str, float]]:
        """Idle instances' cgroups and how long each has been idle (for the QoS tick's
        background reclaim of their page cache)."""
        now = time.monotonic()
        return [
            (inst.sandbox.cgroup.rel, now - inst.last_used)
            for inst in self._invoker.idle_instances()
            if inst.sandbox.cgroup is not None
        ]

    async def close(self) -> None:
        """Stop the loops and the invocations in flight, destroy every instance, then close
        the zygotes, the QoS thread, the sandboxes, the images and the stores -- each
        step even if an earlier one failed; the failures are raised at the end."""
        await self.tasks.stop_loops()
        self._dispatcher.cancel_running()  # their events stay pending: they run again
        # Retiring spawns the destruction of every idle instance; the supervisor's close
        # waits for it before the sandboxes go.
        self._invoker.retire_all()
        zygotes, qos = self._zygotes, self._qos
        await close_all(
            ("worker tasks", self.tasks.close),
            ("zygotes", zygotes.close if zygotes is not None else lambda: None),
            ("QoS manager", qos.close if qos is not None else lambda: None),
            ("sandboxes", self._sandboxes.close),
            ("images", self._images.close),
            ("function logs", self._logs.close),
            ("best-effort queue", self._dispatcher.close),
            ("function store", self._store.close),
        )

    async def _sweep(self) -> None:
        """Once a second: idle instances over budget or TTL go, zygotes are measured (on a
        thread) and frozen or evicted, retired pools with no instance left are dropped,
        and (``--image-idle-release-s``) images no instance used for a while unmounted."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self._cache.enforce()
            if self._zygotes is not None:
                await self._zygotes.measure()
                self._zygotes.enforce()
            self._invoker.sweep()
            if self.settings.image_idle_release_s > 0:
                await self._images.release_idle(
                    self._busy_images, self.settings.image_idle_release_s
                )

    def _busy_images(self) -> set[str]:
        """Digests of images whose functions have live instances here (starting, busy,
        idle or frozen)."""
        busy = set()
        for pool in self._invoker.pools():
            if pool.live > 0 and pool.name in self._registry:
                image = self._registry.get(pool.name).image
                if image is not None:
                    busy.add(image.digest)
        return busy

    # -- functions -------------------------------------------------------------------------
    def get(self, name: str) -> FunctionRecord:
        """The function's current revision (``NotFound`` if there is none)."""
        return self._registry.get(name)

    def functions(self) -> list[FunctionRecord]:
        """Every function, by name."""
        return [self._registry.get(n) for n in self._registry.names()]

    def arn(self, name: str, qualifier: str | None = None) -> str:
        return self._registry.arn(name, qualifier)

    # -- versions and aliases ----------------------------------------------------------------
    def target(self, name: str, qualifier: str | None) -> FunctionRecord:
        """What a control-plane request about ``name:qualifier`` reads ($LATEST, a
        version, or an alias's primary version)."""
        return self._registry.target(name, qualifier)

    def versions(self, name: str) -> list[FunctionRecord]:
        """A function's published versions, oldest first."""
        return self._registry.versions(name)

    async def publish_version(
        self, rec: FunctionRecord, description: str | None = None
    ) -> tuple[FunctionRecord, bool]:
        """Publish $LATEST (``rec``, as checked by the caller); (the version, whether it
        is new: an unchanged $LATEST gives the newest version back)."""
        return await self._registry.publish(rec, description)

    async def delete_version(self, name: str, version: str) -> None:
        await self._registry.delete_version(name, version)

    def alias(self, name: str, alias: str) -> AliasRecord:
        return self._registry.alias(name, alias)

    def aliases(self, name: str) -> list[AliasRecord]:
        return self._registry.aliases(name)

    async def create_alias(self, alias: AliasRecord) -> AliasRecord:
        return await self._registry.create_alias(alias)

    async def update_alias(
        self, name: str, alias: str, revision_id: str | None = None, **changes: Any
    ) -> AliasRecord:
        return await self._registry.update_alias(name, alias, revision_id, **changes)

    async def delete_alias(self, name: str, alias: str) -> None:
        await self._registry.delete_alias(name, alias)

    def state(self, rec: FunctionRecord) -> FunctionState:
        """The function's State and LastUpdateStatus on this node (``worker/states.py``)."""
        return self._images.states.state(rec)

    async def _invocable(self, name: str, *, wait: bool, qualifier: str | None = None) -> None:
        """Before an invocation: a Failed function is a 409 ``NotInvocable``; with
        ``wait``, a Pending (or Inactive) one is waited for, at most its Timeout.  The
        record is ``name:qualifier``'s (an alias's primary version): a version keeps the
        image it was published with."""
        rec = self._registry.target(name, qualifier)
        if rec.image is not None:
            await self._images.wait_invocable(rec.image, rec.config.timeout_s if wait else None)

    async def check_invocable(self, name: str, qualifier: str | None = None) -> None:
        """DryRun: the function (version, alias) exists and is not Failed."""
        await self._invocable(name, wait=False, qualifier=qualifier)

    def code_zip(self, rec: FunctionRecord) -> Path:
        """The zip a function was deployed with (GetFunction's Code.Location serves it)."""
        return self._registry.code_zip(rec)

    async def create_function(
        self, name: str, config: FunctionConfig, code: bytes
    ) -> FunctionRecord:
        return await self._registry.create(name, config, code)

    async def inspect_image(
        self,
        uri: str,
        overrides: dict[str, Any],
        credential: RegistryCredential | None = None,
    ) -> ImageSource:
        """Resolve an image for a function; its CMD (or ImageConfig.Command) names the
        handler.  ``credential``: the deployer's registry credentials (None: none given),
        with which their access to the image is checked first."""
        return await self._images.inspect(uri, overrides, credential)

    async def create_image_function(
        self, name: str, config: FunctionConfig, image: ImageSource
    ) -> FunctionRecord:
        self._images.states.retry(image.digest)  # a deploy tries a failed image again
        return await self._registry.create_image(name, config, image)

    async def update_code(self, name: str, code: bytes) -> FunctionRecord:
        return await self._registry.update_code(name, code)

    async def update_image(self, name: str, image: ImageSource) -> FunctionRecord:
        """A new revision running ``image``: an update (LastUpdateStatus InProgress until
        it is mounted), which tries the image again even if it failed before."""
        self._images.states.retry(image.digest)
        self._redeploys.add(name)
        try:
            return await self._registry.update_image(name, image)
        finally:
            self._redeploys.discard(name)

    async def update_config(self, name: str, **changes: Any) -> FunctionRecord:
        return await self._registry.update_config(name, **changes)

    async def put_concurrency(self, name: str, reserved: int | None) -> FunctionRecord:
        return await self._registry.put_concurrency(name, reserved)

    async def delete_function(self, name: str) -> None:
        await self._registry.delete(name)

    def _function_changed(self, old: FunctionRecord | None, new: FunctionRecord | None) -> None:
        """A function was created, changed or deleted -- here or, in a cluster, through
        another node: new invocations get instances of the new revision, an image no
        function uses any more is released, a new image is mounted ahead of its first
        invocation, a new package set's zygote is built."""
        rec = new or old
        assert rec is not None  # never both None
        name = rec.name
        if rec.published:
            # A version is published (its pools start empty) or deleted (they go); it
            # uses $LATEST's image, mounted already.
            if new is None:
                self._invoker.retire(name, rec.version)
                if rec.image is not None:
                    self.tasks.spawn(self._release_image(rec.image), f"release {rec.image.uri}")
            return
        if new is None:
            self._invoker.retire(name)  # every version's pools
            self._logs.forget(name)
            self._images.states.forget(name)
        else:
            self._invoker.retire(name, LATEST)
            self._invoker.set_limit(new)  # reserved concurrency is the function's
        old_image = old.image if old is not None else None
        new_image = new.image if new is not None else None
        if old_image is not None and (new_image is None or new_image.digest != old_image.digest):
            self.tasks.spawn(self._release_image(old_image), f"release {old_image.uri}")
        if new_image is not None and (
            old_image is None or old_image.digest != new_image.digest or name in self._redeploys
        ):
            # Pending (a new function) or InProgress (an update) until it is mounted.
            self._images.states.deployed(name, new_image.digest, update=old is not None)
            self._images.premount(new_image)
        if new is not None:
            self._factory.prepare_zygote(new)  # ahead of its first invocations

    async def _release_image(self, image: ImageSource) -> None:
        await self._images.release(image, still_used=self._registry.image_in_use(image.digest))

    # -- invocations -----------------------------------------------------------------------
    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        client_context: Any = None,
        qos_class: QoSClass = QoSClass.LS,
        qualifier: str | None = None,
    ) -> InvokeResult:
        """A synchronous invocation (RequestResponse, or the native ``/run``) of
        ``name:qualifier``; its result is bounded by ``max_response_bytes``."""
        _check_size(payload, self.settings.max_request_bytes, SizeLimit.INVOKE)
        await self._invocable(name, wait=True, qualifier=qualifier)
        return await self._invoker.invoke(
            name,
            payload,
            qualifier=qualifier,
            client_context=client_context,
            qos_class=qos_class,
        )

    def _queued_target(self, name: str, qualifier: str | None) -> tuple[str, str]:
        """What queued work runs: ``name`` (then $LATEST as it is when the work runs), or
        ``name:N`` -- a version, or the version an alias routed this submission to (drawn
        now: queued work keeps the version it was routed to)."""
        if qualifier is None or qualifier == LATEST:
            self._registry.get(name)
            return name, LATEST
        version = self._registry.resolve(name, qualifier).version
        return f"{name}:{version}", version

    async def invoke_async(
        self, name: str, payload: bytes, qualifier: str | None = None
    ) -> tuple[str, str]:
        """An Event invocation: queued durably, run on best-effort capacity; its id and
        the version it will run.  The payload, and the result kept for it, take at most
        ``max_event_bytes``."""
        _check_size(payload, self.settings.max_event_bytes, SizeLimit.EVENT)
        await self._invocable(name, wait=False, qualifier=qualifier)
        target, version = self._queued_target(name, qualifier)
        return await self._dispatcher.enqueue(target, payload), version

    async def event(self, event_id: str) -> dict[str, Any] | None:
        return await self._dispatcher.event(event_id)

    async def submit_job(
        self, name: str, inputs: list[bytes], qualifier: str | None = None
    ) -> str:
        """A job: each input (and the result kept for it) takes at most
        ``max_event_bytes``, like an Event payload.  With a ``qualifier`` every item runs
        the one version it names (an alias's is drawn once, for the whole job)."""
        for item in inputs:
            _check_size(item, self.settings.max_event_bytes, SizeLimit.JOB_INPUT)
        target, _ = self._queued_target(name, qualifier)
        return await self._dispatcher.submit_job(target, inputs)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return await self._dispatcher.job(job_id)

    async def jobs(self) -> list[dict[str, Any]]:
        return await self._dispatcher.jobs()

    async def job_results(self, job_id: str) -> list[dict[str, Any]] | None:
        return await self._dispatcher.job_results(job_id)

    # -- observing -------------------------------------------------------------------------
    def read_log(self, name: str, size: int) -> bytes:
        """The last ``size`` bytes of a function's log."""
        self._registry.get(name)
        return self._logs.tail(name, size)

    def log_path(self, name: str) -> Path:
        return self._logs.path(name)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self._metrics.registry

    def count_too_large(self, limit: SizeLimit) -> None:
        """A request was refused (413) for its body's size: ``/metrics`` counts it."""
        self._metrics.too_large.labels(limit.value).inc()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "isolation": self._sandboxes.isolation.value,
            "functions": len(self._registry),
            "idle_instances": len(self._cache),
            "zygotes": self._zygotes is not None,
        }

    async def instances(self) -> list[dict[str, Any]]:
        """Idle instances with their memory (read on a thread: /proc walks)."""
        return await asyncio.to_thread(describe_instances, self._invoker.idle_instances())

    def zygotes(self) -> dict[str, Any]:
        """The import cache's tree (memory as of the last background measurement)."""
        zc = self._zygotes
        if zc is None:
            return {"enabled": False, "zygotes": []}
        return {
            "enabled": True,
            "forks": zc.forks,
            "failures": zc.failures,
            "built_at_deploy": zc.prepared,
            "waits_for_builds": zc.waits,
            "zygotes": zc.describe(),
        }

    async def node_status(self) -> dict[str, Any]:
        """GET /node (``warmstart top`` polls it every second): what is in memory, plus
        the queue depth (one indexed COUNT, on the best-effort queue's thread)."""
        status: dict[str, Any] = self._qos.status() if self._qos is not None else {"qos": False}
        status.update(
            {
                "isolation": self._sandboxes.isolation.value,
                "instances": self._invoker.instance_states(),
                "waiting_invocations": self._invoker.waiting(),
                "best_effort_running": len(self._invoker.running_be),
                "best_effort_slots": self._dispatcher.slots(),
                "queue_depth": await self._dispatcher.queue_depth(),
                "functions": len(self._registry),
                "zygotes": len(self._zygotes.live) if self._zygotes is not None else 0,
            }
        )
        return status

    # -- for a cluster node ------------------------------------------------------------------
    @property
    def registry(self) -> FunctionRegistry:
        return self._registry

    def has_idle(self, rec: FunctionRecord) -> bool:
        """An idle latency-sensitive instance of ``rec``'s revision is here (warm path)."""
        return self._invoker.has_idle(rec)

    def inflight(self, rec: FunctionRecord) -> int:
        return self._invoker.inflight(rec.name)

    def set_reserved_limit(self, limit: Callable[[int], int]) -> None:
        """How a function's reserved concurrency becomes this node's limit (a cluster
        splits it over its nodes); applied to every pool now and on every new pool."""
        self._invoker.reserved_limit = limit
        for rec in self._registry:
            if rec.reserved_concurrency is not None:
                self._invoker.set_limit(rec)

    def published_state(self) -> dict[str, Any]:
        """What this node tells the cluster (every second, from memory only): capacity,
        usage and reclaimed capacity, instances per function revision, zygotes and the
        artifacts it has cached."""
        q = self._qos
        sample = q.sample if q is not None else None
        functions = self._invoker.function_states()
        state: dict[str, Any] = {
            "capacity": {
                "cpus": sample.capacity_cpus if sample else float(os.cpu_count() or 1),
                "memory_bytes": sample.capacity_memory_bytes if sample else 0,
            },
            "ls_usage": {
                "cpu": sample.ls_cpu_used if sample else 0.0,
                "memory_bytes": sample.ls_memory_used if sample else 0,
            },
            "reclaimed": {
                "cpu_cores": q.reclaimed.cpu_cores if q else 0.0,
                "memory_bytes": q.reclaimed.memory_bytes if q else 0,
            },
            "instances": {
                "idle": sum(f["idle"] + f.get("version_idle", 0) for f in functions.values()),
                "busy": sum(f["busy"] + f.get("version_busy", 0) for f in functions.values()),
            },
            "inflight": sum(f["inflight"] for f in functions.values()),
            "functions": functions,
            "zygotes": self._zygotes.package_sets() if self._zygotes is not None else [],
            "image_zygotes": sorted(self._zygotes.images) if self._zygotes is not None else [],
            "images": self._images.mounted(),
            "packages": self._installed_pins(),
            "best_effort_running": len(self._invoker.running_be),
        }
        return state

    def set_blob_source(self, source: Callable[[Any], Any]) -> None:
        """Where full image pulls fetch layer blobs (a cluster: peers first); set before
        the worker starts."""
        self._images.blob_source = source

    async def prepare(self, rec: FunctionRecord) -> None:
        """Make ``rec`` ready to start here without starting it: its bundle and packages
        (fetched and installed, and its package set's zygote built), or its image
        (mounted), as its first start would."""
        if rec.image is not None:
            await self._images.layout(rec.image)
        else:
            await self._registry.ensure_code(rec)
            self._factory.prepare_zygote(rec)

    def image_store(self) -> ImageStore:
        """This node's content store (made with the image manager on first use)."""
        return self._images.manager.store

    def image_store_opened(self) -> bool:
        return self._images.opened

    def held_artifacts(self) -> dict[str, Any]:
        """Image layers and lazy chunks held here (reads disk and SQLite: on a thread)."""
        return self._images.held()

    def _installed_pins(self) -> list[str]:
        """Pins of this node's functions whose package is installed here (checked once
        each: an installed version stays)."""
        for rec in self._registry.all_records():
            for pin in rec.packages:
                if pin not in self._installed and self._packages.installed(parse_pins(pin)[0]):
                    self._installed.add(pin)
        return sorted(self._installed)

    def _function_states(self) -> dict[str, float]:
        """How many functions are in each State on this node."""
        counts = {s.value: 0.0 for s in FunctionStateName}
        states = self._images.states
        for rec in self._registry:
            counts[states.state(rec).state.value] += 1
        return counts

    def _snapshot(self) -> dict[str, dict[str, float]]:
        """The node's state for /metrics: in-memory figures only."""
        zc, q, cache = self._zygotes, self._qos, self._cache
        return {
            "instances": self._invoker.instance_states(),
            "function_states": self._function_states(),
            "memory": {
                "idle_instances": float(cache.memory),
                "reserved": float(self._factory.reserved_mb << 20),
            },
            "other": {
                "functions": float(len(self._registry)),
                "evictions_total": float(cache.evictions),
                "package_installs_total": float(self._packages.installs),
                "freezes_total": float(cache.freezes),
                "zygotes": float(len(zc.live)) if zc else 0.0,
                "zygote_forks_total": float(zc.forks) if zc else 0.0,
                "zygote_memory_pss_bytes": float(zc.memory()) if zc else 0.0,
                "reclaimed_cpu_cores": q.reclaimed.cpu_cores if q else 0.0,
                "reclaimed_memory_bytes": float(q.reclaimed.memory_bytes) if q else 0.0,
                "be_cpu_limit_cores": (q.be_cpu_cores or 0.0) if q else 0.0,
                "qos_evictions_total": float(q.evictions) if q else 0.0,
                "be_memory_cap_bytes": float(q.be_memory_cap or 0) if q else 0.0,
                "page_cache_reclaimed_bytes_total": float(q.page_cache_reclaimed) if q else 0.0,
                "be_evictions_for_ls_memory_total": float(self._factory.be_evicted_for_ls),
                "best_effort_running": float(len(self._invoker.running_be)),
                "background_task_failures_total": float(self.tasks.failures),
                "background_loop_restarts_total": float(self.tasks.restarts),
                **self._images.snapshot(),
            },
        }


def _check_size(payload: bytes, limit: int, what: SizeLimit) -> None:
    """The API refuses an oversized body before reading it; this holds the line for any
    other caller (a cluster peer, the CLI's demo deploy, tests)."""
    if len(payload) > limit:
        raise RequestTooLarge(
            f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
            limit=what,
        )
