"""Sandboxes: where instances run.

``SandboxManager`` is the only entry point the worker uses.  On Linux as root it builds
lean SOCK-style sandboxes (bind-mount root + chroot, PID/UTS/IPC/NET/mount namespaces,
a pooled cgroup with memory, pids and CPU limits, freezer); elsewhere it falls back to
plain processes and says so loudly.  It knows nothing of HTTP or functions.

The names below are loaded on first use: the spawner runs as ``python -m
warmstart.sandbox.spawner`` and must import only the standard library and
``warmstart.runtime.syscalls``, not the manager (asyncio, cgroup drivers) behind them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from warmstart.sandbox.manager import (
        CommandResult,
        Isolation,
        RootLayout,
        Sandbox,
        SandboxManager,
        SandboxSpec,
    )

__all__ = ["CommandResult", "Isolation", "RootLayout", "Sandbox", "SandboxManager", "SandboxSpec"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from warmstart.sandbox import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
