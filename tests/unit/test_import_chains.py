"""Processes that must start small import only what they need."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_the_spawner_imports_only_the_standard_library_and_syscalls() -> None:
    loaded = _modules_after("import warmstart.sandbox.spawner")
    ours = [m for m in loaded if m.startswith("warmstart")]
    assert ours == [
        "warmstart",
        "warmstart.runtime",
        "warmstart.runtime.syscalls",
        "warmstart.sandbox",
        "warmstart.sandbox.spawner",
    ]
    assert "asyncio" not in loaded


def test_the_runtime_needs_nothing_but_the_standard_library() -> None:
    loaded = _modules_after(
        "import warmstart.runtime.bootstrap, warmstart.runtime.protocol, "
        "warmstart.runtime.syscalls"
    )
    ours = {m for m in loaded if m.startswith("warmstart")}
    assert ours <= {
        "warmstart",
        "warmstart.runtime",
        "warmstart.runtime.bootstrap",
        "warmstart.runtime.protocol",
        "warmstart.runtime.syscalls",
    }


def test_the_guardian_imports_only_the_standard_library_and_the_cgroup_drivers() -> None:
    loaded = _modules_after("import warmstart.sandbox.guardian")
    ours = [m for m in loaded if m.startswith("warmstart")]
    assert ours == [
        "warmstart",
        "warmstart.errors",
        "warmstart.kinds",
        "warmstart.sandbox",
        "warmstart.sandbox.cgroups",
        "warmstart.sandbox.guardian",
    ]
    assert "asyncio" not in loaded
