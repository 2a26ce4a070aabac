"""Sandboxes: where instances run.

``SandboxManager`` is the only entry point the worker uses.  On Linux as root it builds
lean SOCK-style sandboxes (bind-mount root + chroot, PID/UTS/IPC/NET/mount namespaces,
a pooled cgroup with memory, pids and CPU limits, freezer); elsewhere it falls back to
plain processes and says so loudly.  It knows nothing of HTTP or functions.
"""

from warmstart.sandbox.manager import (
    CommandResult,
    Isolation,
    RootLayout,
    Sandbox,
    SandboxManager,
    SandboxSpec,
)

__all__ = ["CommandResult", "Isolation", "RootLayout", "Sandbox", "SandboxManager", "SandboxSpec"]
