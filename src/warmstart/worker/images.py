"""Image functions on this node: their roots, their sandbox specs and their zygotes.

The worker's image side.  ``ImageManager`` (``warmstart.images.manager``) knows images --
resolve, pull or mount lazily, release; this class knows what a *function* made of an
image needs on top:

- ``inspect``: the image a deploy names, checked for a handler (and, with the deployer's
  registry credentials, for their right to pull it: ``images/access.py``);
- ``premount``: mounting right after CreateFunction, so the first invocation finds the
  root ready (in the background, under the worker's supervisor); one mount per digest
  at a time, its outcome the image's state (``worker/states.py``: Pending, Active,
  Failed), which ``wait_invocable`` checks and waits for before an invocation;
- ``spec``: the sandbox of one instance: the image's root layout (mounted on first use
  and kept per digest), its environment under the function's, its working directory;
- zygotes inside images: an image's first fresh starts report what the handler imported
  from site-packages; after ``zygote_after`` of them, a zygote inside the image's root
  preloads those modules and later instances of any function of the image fork from it;
- ``release``: when no function uses an image any more, its zygote stops and it is
  unmounted; ``release_idle`` (``--image-idle-release-s``) does the same for an image
  no instance has used for a while, whose functions become Inactive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from warmstart.errors import InvalidParameter, PlatformError, SandboxError, ServiceUnavailable
from warmstart.functions.models import HANDLER_RE, FunctionRecord, ImageSource
from warmstart.images.access import AccessPolicy, RegistryCredential
from warmstart.images.errors import ImageError
from warmstart.images.manager import ImageManager
from warmstart.kinds import QoSClass
from warmstart.lifecycle import Supervisor
from warmstart.sandbox import Isolation, RootLayout, SandboxManager, SandboxSpec
from warmstart.worker.settings import Settings
from warmstart.worker.states import ImageStates, NotInvocable, ReasonCode, State
from warmstart.zygote.cache import ZygoteCache

log = logging.getLogger(__name__)


class ImageFunctions:
    def __init__(self, settings: Settings, sandboxes: SandboxManager, tasks: Supervisor) -> None:
        self.settings = settings
        self.sandboxes = sandboxes
        self.tasks = tasks
        self.zygotes: ZygoteCache | None = None  # set by the worker once zygotes run
        self._manager: ImageManager | None = None  # made on first use
        self._layouts: dict[str, RootLayout] = {}  # image digest -> sandbox root layout
        self._fresh_starts: dict[str, int] = {}  # image digest -> fresh starts so far
        self._preload: dict[str, list[str]] = {}  # what the image's handler imported
        self._mounted: dict[str, int] = {}  # digest -> size, of images mounted here
        # Pending, ready or failed, per digest; failures persist across restarts.
        self.states = ImageStates(settings.data_dir / "images" / "failures.json")
        self._sources: dict[str, ImageSource] = {}  # digest -> the image, while mounted
        self._last_used: dict[str, float] = {}  # digest -> monotonic time of its last start
        self._locks: dict[str, asyncio.Lock] = {}  # digest -> held to mount or unmount it
        # Set by a cluster node: given the registry client, what full pulls fetch blobs
        # through (peers first).
        self.blob_source: Callable[[Any], Any] | None = None

    @property
    def manager(self) -> ImageManager:
        if self._manager is None:
            s = self.settings
            self._manager = ImageManager(
                s.data_dir,
                pull_mode=s.image_pull,
                budget_mb=s.image_budget_mb,
                layer_format=s.image_layers,
                insecure=s.insecure_registries,
                background_fetch=s.image_background_fetch,
                blob_source=self.blob_source,
                access=AccessPolicy(
                    require_deployer_credentials=s.require_deployer_credentials,
                    ttl_s=s.registry_access_ttl_s,
                ),
            )
        return self._manager

    @property
    def opened(self) -> bool:
        """Whether the image manager (and its content store) exists yet."""
        return self._manager is not None

    def recover(self) -> int:
        """At start: unmount what a crashed worker left mounted (linux isolation only)."""
        return self.manager.recover()

    async def close(self) -> None:
        if self._manager is not None:
            await self._manager.close()

    def mounted(self) -> dict[str, int]:
        """Images whose root is mounted here: digest -> compressed size."""
        return dict(self._mounted)

    def held(self) -> dict[str, Any]:
        """Layers and lazy chunks held here (``ImageManager.held``; on a thread)."""
        if self._manager is None:
            return {"layers": {}, "chunks": 0}
        return self._manager.held()

    def snapshot(self) -> dict[str, float]:
        return self._manager.snapshot() if self._manager is not None else {}

    # -- deploy ----------------------------------------------------------------------------
    async def inspect(
        self,
        uri: str,
        overrides: dict[str, Any],
        credential: RegistryCredential | None = None,
    ) -> ImageSource:
        """Resolve an image for a function; its CMD (or ImageConfig.Command) names the
        handler.  ``credential``: the deployer's, checked against the registry first."""
        if self.sandboxes.isolation is not Isolation.LINUX:
            raise InvalidParameter(
                "PackageType=Image needs linux isolation (run warmstart serve as root on Linux)"
            )
        image = await self.manager.inspect(uri, overrides, credential)
        if not image.command or not HANDLER_RE.fullmatch(image.command[0]):
            raise InvalidParameter(
                f"Image {uri}: the handler comes from ImageConfig.Command or the image's CMD, "
                f"which must be ['module.function'] (got {list(image.command)})"
            )
        return image

    def premount(self, image: ImageSource) -> None:
        """Mount a new function's image now, so its first invocation finds it ready."""
        self.mount(image)

    def mount(self, image: ImageSource) -> asyncio.Future[RootLayout]:
        """The mount of ``image`` on this node: the one in progress, or a new one run
        under the worker's supervisor (a caller that stops waiting does not cancel it).
        Its outcome is the image's state (``worker/states.py``)."""
        d = image.digest
        fut = self.states.mounting(d)
        if fut is not None:
            return fut
        failure = self.states.failure(d)
        if failure is not None:  # not again: a deploy of the image clears it first
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(NotInvocable(State.FAILED, failure.code, failure.reason))
            fut.exception()  # retrieved: nobody need wait for it
            return fut
        fut = self.states.begin(d)
        self.tasks.spawn(self._mount(image), f"mount {image.uri}")
        return fut

    async def _mount(self, image: ImageSource) -> None:
        try:
            async with self._lock(image.digest):
                layout = await self._layout(image)
        except asyncio.CancelledError:
            self.states.abandoned(image.digest)
            raise
        except Exception as exc:
            error = self.states.failed(image.digest, exc)
            if not isinstance(error, NotInvocable):
                log.warning("image %s: cannot mount it: %s", image.uri, exc)
            return
        self.states.succeeded(image.digest, layout)

    async def wait_invocable(self, image: ImageSource, timeout: float | None) -> None:
        """Before an invocation: an image that failed is a 409 (``NotInvocable``); one
        being mounted, or not mounted (Inactive), is mounted and waited for, at most
        ``timeout`` seconds (then a 409 naming Pending).  ``timeout`` None: only the
        failure is checked (Event invocations, DryRun)."""
        d = image.digest
        failure = self.states.failure(d)
        if failure is not None:
            raise NotInvocable(State.FAILED, failure.code, failure.reason)
        if timeout is None or self.states.ready(d):
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.mount(image))
        except TimeoutError:
            raise NotInvocable(State.PENDING, ReasonCode.CREATING) from None
        except PlatformError:
            raise
        except ImageError as exc:  # not the image's fault (the registry unreachable)
            raise ServiceUnavailable(f"cannot mount image {image.uri}: {exc}") from exc

    async def release(self, image: ImageSource, *, still_used: bool) -> None:
        """A function stopped using ``image``; if no other does, forget and unmount it."""
        if self._manager is None:
            return
        if not still_used:
            self.states.released(image.digest)
            self._sources.pop(image.digest, None)
            self._last_used.pop(image.digest, None)
            self._mounted.pop(image.digest, None)
            self._layouts.pop(image.digest, None)
            self._fresh_starts.pop(image.digest, None)
            if self.zygotes is not None:
                await self.zygotes.drop_image(image.digest)
        await self._manager.release(image, still_used=still_used)

    # -- instances -------------------------------------------------------------------------
    async def layout(self, image: ImageSource) -> RootLayout:
        """The sandbox root layout of an image (mounting it on first use; a failed image
        is ``NotInvocable``)."""
        if self.states.ready(image.digest):
            async with self._lock(image.digest):
                if self.states.ready(image.digest):  # not released meanwhile
                    try:
                        return await self._layout(image)
                    except Exception as exc:  # a lazy mount replaced, and failing now
                        error = self.states.failed(image.digest, exc)
                        if error is exc:
                            raise
                        raise error from exc
        return await asyncio.shield(self.mount(image))

    def _lock(self, digest: str) -> asyncio.Lock:
        return self._locks.setdefault(digest, asyncio.Lock())

    async def release_idle(self, busy: Callable[[], set[str]], idle_s: float) -> int:
        """Unmount every image no instance has started from for ``idle_s`` seconds and
        none uses now (``busy()``: the digests with live instances, asked again before
        each): its functions become Inactive, their next invocation mounts it again.
        Returns how many were released."""
        released = 0
        for digest, image in list(self._sources.items()):
            idle = time.monotonic() - self._last_used.get(digest, 0.0)
            if idle < idle_s or digest in busy() or self.states.mounting(digest) is not None:
                continue
            async with self._lock(digest):
                if not self.states.ready(digest) or digest in busy():
                    continue
                log.info("image %s: unused for %.0f s, unmounting it", image.uri, idle)
                self.states.released(digest)
                self._mounted.pop(digest, None)
                self._layouts.pop(digest, None)
                self._sources.pop(digest, None)
                if self.zygotes is not None:
                    await self.zygotes.drop_image(digest)
                await self.manager.release(image, still_used=False)
                released += 1
        return released

    async def _layout(self, image: ImageSource) -> RootLayout:
        """The layout (mounting the root if need be); the caller holds the digest's lock."""
        rootfs = await self.manager.rootfs(image)
        self._mounted[image.digest] = image.size
        self._sources[image.digest] = image
        self._last_used[image.digest] = time.monotonic()
        layout = self._layouts.get(image.digest)
        if layout is None or not rootfs.exists():
            path_env = image.env_dict().get("PATH", "")
            try:
                layout = await asyncio.to_thread(self.sandboxes.image_layout, rootfs, path_env)
            except SandboxError as exc:  # no python3 in the image
                raise InvalidParameter(f"image {image.uri}: {exc}") from exc
            self._layouts[image.digest] = layout
        return layout

    async def spec(
        self, rec: FunctionRecord, env: dict[str, str], qos_class: QoSClass
    ) -> SandboxSpec:
        """The sandbox of one instance of an image function: the image's root, its
        environment under the function's (``env``), its working directory."""
        image = rec.image
        if image is None:
            raise ValueError(f"{rec.name} is not an image function")
        layout = await self.layout(image)
        workdir = image.working_directory or "/var/task"
        merged = image.env_dict()
        merged.update(env)
        merged["PATH"] = image.env_dict().get("PATH") or env["PATH"]
        # Set here too: a forked child gets no spawner to add them.
        merged["LAMBDA_TASK_ROOT"] = workdir
        merged["LAMBDA_RUNTIME_DIR"] = layout.runtime_root
        if self.zygotes is not None and image.digest not in self._preload:
            merged["WARMSTART_REPORT_MODULES"] = "1"
        return SandboxSpec(
            code_dir=None,
            env=merged,
            memory_mb=rec.config.memory_mb,
            network=rec.config.network,
            qos_class=qos_class,
            layout=layout,
            workdir=workdir,
            tmp_mb=rec.config.ephemeral_mb,
        )

    def fresh_start(self, image: ImageSource, report: bytes) -> None:
        """Count a fresh (not forked) start of ``image``, with what its handler imported
        (``report``: a JSON list, sent with the runtime's ready); after ``zygote_after``
        of them, start a zygote inside the image's root that preloads those modules."""
        if report and image.digest not in self._preload:
            with contextlib.suppress(ValueError):
                names = json.loads(report)
                if isinstance(names, list):
                    self._preload[image.digest] = [str(n) for n in names]
        n = self._fresh_starts.get(image.digest, 0) + 1
        self._fresh_starts[image.digest] = n
        layout = self._layouts.get(image.digest)
        if self.zygotes is not None and layout is not None and n >= self.settings.zygote_after:
            preload = self._preload.get(image.digest, [])
            self.zygotes.grow_image(image.digest, layout, image.env_dict(), preload)
