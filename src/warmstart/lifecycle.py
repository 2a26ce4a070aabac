"""Who owns a background task: the ``Supervisor`` of the component that started it.

Every component that runs work in the background (the worker's loops, the sandbox
manager's cgroup refills, the zygote cache's growth, per-event tasks) owns one
``Supervisor``, made in the component's ``start`` and closed in its ``close``.  Nothing is
fire-and-forget: a task lives inside the supervisor's ``asyncio.TaskGroup`` until it ends,
its failure is logged with a traceback the moment it happens, and the component's close
cancels or awaits every task it started before the resources those tasks use go away.

Two kinds of work::

    supervisor.loop("sweeper", sweep)   runs for the component's life; if it raises, the
                                        error is logged and the loop restarted after a
                                        backoff (doubling up to ``max_backoff``; reset
                                        once a run has lasted ``healthy_after`` seconds)
    supervisor.spawn(coro, "destroy")   one-shot work; a failure is logged, never lost

Shutdown (``close``) runs in stages, so cleanup work is finished rather than cut short:

1. loops are cancelled and awaited (they stop producing work);
2. one-shot tasks -- including those spawned while closing, such as the destruction of
   retired instances -- are awaited for up to ``drain_timeout`` seconds;
3. whatever still runs is named in a warning, cancelled and awaited;
4. the task group is left.

Cancellation is never swallowed: a task that is cancelled ends cancelled, and a task
group member that raised ``BaseException`` other than ``Exception`` (KeyboardInterrupt,
SystemExit) ends the whole group, as ``asyncio.TaskGroup`` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class SupervisorStatistics:
    loops: int  # loops running now
    tasks: int  # one-shot tasks running now
    restarts: int  # loop restarts after a crash, since start
    failures: int  # one-shot tasks that raised, since start


class SupervisorClosed(RuntimeError):
    """Work was handed to a supervisor that is not running (not started, or closed)."""


class Supervisor:
    def __init__(
        self,
        name: str,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
        drain_timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.drain_timeout = drain_timeout
        self._sleep = sleep  # the backoff's clock (tests pass their own)
        self._group: asyncio.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._loops_stopped = False
        self.restarts = 0
        self.failures = 0

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._group is not None and not self._closing

    async def start(self) -> None:
        """Open the task group (in a host task of its own, which lives until ``close``)."""
        if self._host is not None:
            raise RuntimeError(f"supervisor {self.name} started twice")
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._stop = asyncio.Event()
        self._host = loop.create_task(
            self._run(opened, self._stop), name=f"{self.name}:supervisor"
        )
        await opened

    async def _run(self, opened: asyncio.Future[None], stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                opened.set_result(None)
                await stop.wait()
        finally:
            self._group = None
            if not opened.done():
                opened.cancel()

    async def stop_loops(self) -> None:
        """Cancel the loops and wait for them to end; no new loop starts after this.
        One-shot work goes on (and may still be spawned) until ``close``."""
        self._loops_stopped = True
        loops = list(self._loops.values())
        for task in loops:
            task.cancel()
        if loops:
            await asyncio.wait(loops)

    async def close(self) -> None:
        """Stop the loops, drain one-shot work, cancel what hangs, leave the group."""
        if self._host is None or self._stop is None or self._closing:
            return
        self._closing = True
        await self.stop_loops()
        # Draining: tasks spawned meanwhile (cleanups of what the loops left) count too.
        deadline = time.monotonic() + self.drain_timeout
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(list(self._tasks), timeout=left)
        if self._tasks:
            names = sorted(t.get_name() for t in self._tasks)
            log.warning(
                "%s: cancelling %d task(s) still running after %.0f s: %s",
                self.name,
                len(names),
                self.drain_timeout,
                ", ".join(names),
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait(list(self._tasks))
        self._stop.set()
        await self._host

    # -- work ------------------------------------------------------------------------------
    def _create(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        if self._group is None:
            coro.close()
            raise SupervisorClosed(f"supervisor {self.name} is not running (task {name})")
        try:
            return self._group.create_task(coro, name=f"{self.name}:{name}")
        except RuntimeError as exc:  # the group is finishing
            coro.close()
            raise SupervisorClosed(f"supervisor {self.name} is closed (task {name})") from exc

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[None]:
        """Run one-shot work; a failure is logged with its traceback.  Allowed while the
        supervisor is closing (cleanups), refused once it is closed."""
        if self._group is None:
            coro.close()
            raise SupervisorClosed(f"supervisor {self.name} is not running (task {name})")
        task = self._create(self._guard(coro, name), name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def loop(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run ``factory()`` for the component's life, restarting it when it raises."""
        if self._closing or self._loops_stopped or self._group is None:
            raise SupervisorClosed(f"supervisor {self.name} is not running (loop {name})")
        if name in self._loops:
            raise ValueError(f"{self.name}: a loop named {name!r} runs already")
        task = self._create(self._supervise(name, factory), name)
        self._loops[name] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._loops.get(name) is done:
                del self._loops[name]

        task.add_done_callback(forget)

    async def _guard(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await coro
        except Exception:
            self.failures += 1
            log.exception("%s: task %s failed", self.name, name)

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        delay = self.min_backoff
        while True:
            began = time.monotonic()
            try:
                await factory()
            except Exception:
                self.restarts += 1
                if time.monotonic() - began >= self.healthy_after:
                    delay = self.min_backoff
                log.exception("%s: loop %s crashed; restarting in %.1f s", self.name, name, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            log.info("%s: loop %s finished", self.name, name)
            return

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(len(self._loops), len(self._tasks), self.restarts, self.failures)


async def close_all(*steps: tuple[str, Callable[[], Awaitable[None] | None]]) -> None:
    """Run every close step in order, even when one fails, then raise what failed.

    Shutdown must release every resource it can, so one step's error does not skip the
    rest; and it must not hide that error either, so the failures are raised together
    (an ``ExceptionGroup``) once all steps ran.  Cancellation is not caught.
    """
    errors: list[Exception] = []
    for what, step in steps:
        try:
            result = step()
            if result is not None:
                await result
        except Exception as exc:
            log.error("shutdown: %s failed: %s", what, exc, exc_info=True)
            exc.add_note(f"while closing: {what}")
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("shutdown failed in several steps", errors)
