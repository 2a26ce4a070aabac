"""The import cache at work: a tree of zygotes grown from demand, used for cold starts.

``ZygoteCache.fork`` is called on every cold start of a function that runs with
loopback-only networking.  It counts the function's package set (the tree grows a zygote
for a set once it has been asked for ``grow_after`` times -- in the background, never on
the request path), picks the deepest ready zygote whose packages the function has, and
forks from it.  Any failure -- a zygote that crashed, was killed, or could not fork --
drops that zygote (the root is restarted) and returns None: the caller then starts the
instance the slow way, so the invocation still succeeds.

``prepare`` builds a package set's zygote before any demand: the worker calls it when a
function with those packages is deployed (its packages have just been installed), so
the burst of first invocations that often follows a deploy forks from it.  A cold start
that finds a better zygote for its packages already under construction waits for it (at
most ``build_wait_s`` after the build began) rather than import the packages itself: the
build, already under way, imports them once for every instance to come, while a start
of its own would import them again beside it, on the same cores, and leave the next
start no better off.  (The start that begins a build on demand does not wait for it: a
zygote's start-up on top of the same imports would be later than starting alone.)  If
the build fails, the waiters fork from what is there (the root), as before.

Zygotes idle for ``freeze_after_s`` are frozen, tree zygotes and image zygotes alike
(thawed before the next fork); when the zygotes' proportional memory (PSS) exceeds the
budget, or one has been idle past its TTL, the least recently used leaves and image
zygotes without live instances are stopped (stopping a
zygote ends its pid namespace, so one with live children stays until they are gone).
PSS is read by ``measure`` on a thread (a read walks a zygote's whole address space);
``enforce``, the metrics and ``describe`` use the last reading and never touch /proc.

Zygote starts, restarts and spare forks run in the background under the cache's own
``Supervisor``; ``close`` drains them before it stops the zygotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart.errors import PlatformError, SandboxError
from warmstart.lifecycle import Supervisor
from warmstart.sandbox import RootLayout, Sandbox, SandboxManager, SandboxSpec
from warmstart.sandbox.memory import MemoryUse
from warmstart.zygote.launcher import Zygote, ZygoteLauncher, top_level_modules
from warmstart.zygote.tree import Node, PackageSet, ZygoteTree

log = logging.getLogger(__name__)

# How long after a zygote's build began a cold start still waits for it (a build that
# takes longer than this is stuck or unusually slow: start without it).
BUILD_WAIT_S = 10.0


@dataclass(eq=False)
class _Build:
    """A zygote under construction, and who waits for it."""

    packages: PackageSet
    started: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _read_memory(zygotes: list[Zygote]) -> dict[Zygote, MemoryUse]:
    return {z: use for z in zygotes if (use := z.memory()) is not None}


class ZygoteCache:
    def __init__(
        self,
        sandboxes: SandboxManager,
        package_dir: Any,  # (pin string) -> Path
        *,
        grow_after: int = 2,
        budget_mb: int = 4096,
        freeze_after_s: float = 30.0,
        ttl_s: float = 900.0,
        uid: int = 200000,
        build_wait_s: float = BUILD_WAIT_S,
    ) -> None:
        self.sandboxes = sandboxes
        self.package_dir = package_dir
        self.tasks = Supervisor("zygotes")
        self.launcher = ZygoteLauncher(sandboxes, self.tasks, uid=uid, gid=uid)
        self.tree = ZygoteTree(grow_after=grow_after)
        self.budget = budget_mb << 20
        self.freeze_after = freeze_after_s
        self.ttl = ttl_s
        self.build_wait = build_wait_s
        self._building: dict[PackageSet, _Build] = {}
        self.prepared = 0  # zygotes built ahead of demand (``prepare``)
        self.waits = 0  # cold starts that waited for a zygote under construction
        self.live: dict[Zygote, int] = {}  # zygote -> instances forked from it still alive
        self._memory: dict[Zygote, MemoryUse] = {}  # the last ``measure``
        self.frozen: set[Zygote] = set()
        self.forks = 0
        self.failures = 0
        self.created = 0
        # Image functions: one zygote per image, inside the image's root, preloading what
        # the image's first cold starts imported from its site-packages.
        self.images: dict[str, Zygote] = {}
        self._image_used: dict[str, float] = {}  # image key -> last fork (or start)
        self._image_starting: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.tasks.start()
        self.tree.root.handle = root = await self._launch(frozenset())
        await self.measure([root])

    async def close(self) -> None:
        await self.tasks.close()
        for zygote in list(self.images.values()):
            await self.launcher.stop(zygote)
        self.images.clear()
        for node in self.tree.nodes():
            if isinstance(node.handle, Zygote):
                await self.launcher.stop(node.handle)
                node.handle = None

    def _background(self, coro: Any, what: str) -> None:
        self.tasks.spawn(coro, what)

    def _packages(self, pins: PackageSet) -> tuple[tuple[str, str], ...]:
        dirs: list[Path] = [self.package_dir(p) for p in sorted(pins)]
        return tuple((str(d), f"/var/packages/{d.name}") for d in dirs)

    async def _launch(self, pins: PackageSet) -> Zygote:
        """Start a zygote for ``pins``: forked from the deepest ready zygote whose packages
        are a subset (sharing what it imported), or from scratch for the root."""
        t0 = time.perf_counter()
        parent = self._ready_node(pins) if pins else None
        if parent is not None and isinstance(parent.handle, Zygote):
            parent.last_used = time.monotonic()
            self._thaw(parent.handle)
            extra = self._packages(pins - parent.packages)
            preload = [m for src, _ in extra for m in top_level_modules(Path(src))]
            zygote = await self.launcher.start_child(parent.handle, extra, preload)
        else:
            packages = self._packages(pins)
            preload = [m for src, _ in packages for m in top_level_modules(Path(src))]
            zygote = await self.launcher.start(packages, preload)
        self.created += 1
        self.live[zygote] = 0
        if zygote.skipped:
            log.info("zygote %s left out %s", zygote.id, zygote.skipped)
        log.info(
            "zygote %s ready in %.0f ms with %s",
            zygote.id,
            (time.perf_counter() - t0) * 1000,
            ", ".join(zygote.imported) or "the runtime only",
        )
        return zygote

    def _start_growing(self, pins: PackageSet) -> bool:
        if pins in self._building:
            return False
        build = self._building[pins] = _Build(pins)
        self._background(self._grow(build), f"grow {sorted(pins)}")
        return True

    async def _grow(self, build: _Build) -> None:
        pins = build.packages
        try:
            zygote = await self._launch(pins)
        except (SandboxError, OSError, TimeoutError) as exc:
            log.warning("cannot start a zygote for %s: %s", sorted(pins), exc)
            return
        else:
            node = self.tree.add(pins)
            old, node.handle = node.handle, zygote
            if isinstance(old, Zygote):  # a dead one not dropped yet: it goes now
                self.live.pop(old, None)
                self.frozen.discard(old)
                self._background(self.launcher.stop(old), f"stop {old.id}")
        finally:
            # Waiters go on at once: with the new zygote, or with what there was.
            del self._building[pins]
            build.done.set()
        await self.measure([zygote])
        self.enforce()

    def prepare(self, pins: PackageSet) -> bool:
        """Build the zygote of ``pins`` now, in the background, ahead of demand (a
        function with these packages was just deployed).  False when there is one
        already, or one is being built, or the tree is full."""
        if not pins or self._ready_exact(pins) or pins in self._building:
            return False
        if len(self.tree.nodes()) >= self.tree.max_nodes:
            return False
        self.prepared += 1
        return self._start_growing(pins)

    def _ready_exact(self, pins: PackageSet) -> bool:
        node = self.tree.exact(pins)
        return node is not None and isinstance(node.handle, Zygote) and node.handle.alive

    def _build_to_wait_for(self, pins: PackageSet, node: Node | None) -> _Build | None:
        """The build under way that would serve ``pins`` better than ``node`` (the most
        packages), if it began less than ``build_wait`` ago."""
        have = node.packages if node is not None else frozenset()
        now = time.monotonic()
        builds = [
            b
            for b in self._building.values()
            if b.packages and have < b.packages <= pins and now - b.started < self.build_wait
        ]
        return max(builds, key=lambda b: len(b.packages), default=None)

    async def _wait_for_build(self, pins: PackageSet, build: _Build) -> Node | None:
        self.waits += 1
        remaining = build.started + self.build_wait - time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await build.done.wait()
        return self._ready_node(pins)

    # -- forking ---------------------------------------------------------------------------
    def _ready_node(self, pins: PackageSet) -> Node | None:
        node: Node | None = self.tree.find(pins)
        while node is not None and not (isinstance(node.handle, Zygote) and node.handle.alive):
            node = node.parent
        return node

    async def fork(self, pins: PackageSet, spec: SandboxSpec) -> tuple[Sandbox, Zygote] | None:
        node = self._ready_node(pins)
        # Only a build already under way is worth the wait: one this start would begin
        # now finishes later than the start itself could (it adds a zygote's start-up).
        build = self._build_to_wait_for(pins, node)
        grow = self.tree.record(pins)
        if grow is not None:
            self._start_growing(grow)
        if build is not None:
            node = await self._wait_for_build(pins, build)
        if node is None:
            self._restart_root()
            return None
        zygote = node.handle
        if not isinstance(zygote, Zygote):
            return None
        node.last_used = time.monotonic()
        try:
            self._thaw(zygote)
            sandbox = await self.launcher.fork(zygote, spec)
        except (SandboxError, PlatformError) as exc:
            self.failures += 1
            log.warning("fork from zygote %s failed (%s); starting without it", zygote.id, exc)
            if not zygote.alive:  # it crashed or was killed: replace it
                await self._drop(node)
            return None
        node.forks += 1
        self.forks += 1
        self.live[zygote] = self.live.get(zygote, 0) + 1
        return sandbox, zygote

    # -- image zygotes ---------------------------------------------------------------------
    def image_zygote(self, key: str) -> Zygote | None:
        zygote = self.images.get(key)
        if zygote is not None and not zygote.alive:
            del self.images[key]
            self.live.pop(zygote, None)
            self._background(self.launcher.stop(zygote), f"stop {zygote.id}")
            return None
        return zygote

    def grow_image(
        self, key: str, layout: RootLayout, env: dict[str, str], preload: list[str]
    ) -> None:
        """Start, in the background, a zygote inside an image's root (once per image)."""
        if key in self.images or key in self._image_starting:
            return
        self._image_starting.add(key)

        async def launch() -> None:
            t0 = time.perf_counter()
            try:
                zygote = await self.launcher.start((), preload, image=layout, image_env=env)
            except (SandboxError, OSError, TimeoutError) as exc:
                log.warning("cannot start a zygote for image %s: %s", key, exc)
                return
            finally:
                self._image_starting.discard(key)
            self.images[key] = zygote
            self._image_used[key] = time.monotonic()
            self.live[zygote] = 0
            self.created += 1
            await self.measure([zygote])
            log.info(
                "image zygote %s for %s ready in %.0f ms with %s",
                zygote.id,
                key,
                (time.perf_counter() - t0) * 1000,
                ", ".join(zygote.imported) or "the runtime only",
            )

        self._background(launch(), f"image zygote for {key}")

    async def fork_image(self, key: str, spec: SandboxSpec) -> tuple[Sandbox, Zygote] | None:
        zygote = self.image_zygote(key)
        if zygote is None:
            return None
        self._image_used[key] = time.monotonic()
        try:
            self._thaw(zygote)
            sandbox = await self.launcher.fork(zygote, spec)
        except (SandboxError, PlatformError) as exc:
            self.failures += 1
            log.warning("fork from image zygote %s failed (%s); starting without it", zygote.id, exc)
            self.image_zygote(key)  # drops it if it died
            return None
        self.forks += 1
        self.live[zygote] = self.live.get(zygote, 0) + 1
        return sandbox, zygote

    async def drop_image(self, key: str) -> None:
        zygote = self.images.pop(key, None)
        self._image_used.pop(key, None)
        if zygote is not None:
            self.live.pop(zygote, None)
            self.frozen.discard(zygote)
            await self.launcher.stop(zygote)

    def _thaw(self, zygote: Zygote) -> None:
        if zygote in self.frozen and zygote.cgroup is not None:
            zygote.cgroup.thaw()
            self.frozen.discard(zygote)

    def released(self, zygote: Zygote) -> None:
        """An instance forked from ``zygote`` is gone."""
        if zygote in self.live:
            self.live[zygote] = max(0, self.live[zygote] - 1)

    async def _drop(self, node: Node) -> None:
        zygote = node.handle
        node.handle = None
        if isinstance(zygote, Zygote):
            self.live.pop(zygote, None)
            self.frozen.discard(zygote)
            await self.launcher.stop(zygote)
        if node is self.tree.root:
            self._restart_root()
        else:
            self.tree.remove(node)

    def _restart_root(self) -> None:
        root = self.tree.root
        if isinstance(root.handle, Zygote) and root.handle.alive:
            return
        if frozenset() in self._building:
            return
        build = self._building[frozenset()] = _Build(frozenset())

        async def restart() -> None:
            try:
                root.handle = zygote = await self._launch(frozenset())
            except (SandboxError, OSError, TimeoutError) as exc:
                log.error("cannot restart the root zygote: %s", exc)
                return
            finally:
                del self._building[frozenset()]
                build.done.set()
            await self.measure([zygote])

        self._background(restart(), "restart the root zygote")

    # -- housekeeping ------------------------------------------------------------------------
    async def measure(self, zygotes: list[Zygote] | None = None) -> None:
        """Read the memory of ``zygotes`` (default: every live one) on a thread -- each
        read walks a whole address space -- and keep it for ``enforce``, ``describe`` and
        the metrics."""
        targets = list(self.live) if zygotes is None else zygotes
        readings = await asyncio.to_thread(_read_memory, targets)
        merged = {**self._memory, **readings}
        self._memory = {z: use for z, use in merged.items() if z in self.live}

    def memory(self) -> int:
        """The zygotes' PSS, as of the last ``measure``."""
        return sum(use.pss for z, use in self._memory.items() if z in self.live)

    def _pss(self, zygote: Zygote) -> int:
        use = self._memory.get(zygote)
        return use.pss if use else 0

    def enforce(self) -> None:
        """Freeze idle zygotes; stop LRU leaves over the budget or past their TTL."""
        now = time.monotonic()
        for node in self.tree.nodes():
            zygote = node.handle
            if not isinstance(zygote, Zygote):
                continue
            if not zygote.alive:
                self._background(self._drop(node), f"drop {zygote.id}")
                continue
            self._freeze_if_idle(zygote, now - node.last_used)
        for key, zygote in list(self.images.items()):
            if not zygote.alive:
                self.image_zygote(key)  # drops it
                continue
            self._freeze_if_idle(zygote, now - self._image_used.get(key, now))
        over = self.memory() - self.budget
        # Tree leaves and image zygotes compete for the budget, least recently used first
        # (a tree zygote with children only after every leaf).
        candidates: list[tuple[bool, float, Node | str, Zygote]] = []
        for node in self.tree.eviction_order():
            if isinstance(node.handle, Zygote):
                candidates.append((bool(node.children), node.last_used, node, node.handle))
        for key, zygote in self.images.items():
            candidates.append((False, self._image_used.get(key, now), key, zygote))
        for _, last_used, owner, zygote in sorted(candidates, key=lambda c: (c[0], c[1])):
            if self.live.get(zygote, 0) > 0:
                continue
            if over <= 0 and now - last_used < self.ttl:
                continue
            over -= self._pss(zygote)
            if isinstance(owner, str):
                log.info("evicting image zygote %s (%s)", zygote.id, owner)
                self._background(self.drop_image(owner), f"evict {zygote.id}")
            else:
                packages = ", ".join(sorted(owner.packages))
                log.info("evicting zygote %s (%s)", zygote.id, packages)
                self._background(self._drop(owner), f"evict {zygote.id}")

    def _freeze_if_idle(self, zygote: Zygote, idle: float) -> None:
        """Freeze a zygote idle past ``freeze_after`` (not one still forking spares)."""
        if (
            idle > self.freeze_after
            and zygote not in self.frozen
            and not zygote.filling
            and zygote.cgroup is not None
        ):
            with contextlib.suppress(PlatformError):
                zygote.cgroup.freeze()
                self.frozen.add(zygote)

    def package_sets(self) -> list[list[str]]:
        """The package set of every live zygote of the tree (the root's is empty)."""
        return [
            sorted(node.packages)
            for node in self.tree.nodes()
            if isinstance(node.handle, Zygote) and node.handle.alive
        ]

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for node in self.tree.nodes():
            zygote = node.handle
            entry: dict[str, Any] = {
                "packages": sorted(node.packages),
                "depth": node.depth,
                "forks": node.forks,
            }
            if isinstance(zygote, Zygote):
                entry.update(self._entry(zygote))
            out.append(entry)
        for key, zygote in self.images.items():
            out.append({"image": key, "packages": [], **self._entry(zygote)})
        return out

    def _entry(self, zygote: Zygote) -> dict[str, Any]:
        use = self._memory.get(zygote)
        return {
            "id": zygote.id,
            "pid": zygote.pid,
            "alive": zygote.alive,
            "frozen": zygote in self.frozen,
            "instances": self.live.get(zygote, 0),
            "imported": list(zygote.imported),
            "skipped": zygote.skipped,
            "memory": None if use is None else {"rss": use.rss, "pss": use.pss, "uss": use.uss},
        }
