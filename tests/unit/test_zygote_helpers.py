"""Host-side zygote helpers that need no sandbox."""

from __future__ import annotations

import os
from pathlib import Path

from warmstart.sandbox.memory import memory_of
from warmstart.zygote.launcher import top_level_modules


def test_top_level_modules(tmp_path: Path) -> None:
    (tmp_path / "pandas").mkdir()
    (tmp_path / "pandas" / "__init__.py").write_text("")
    (tmp_path / "pandas-3.1.1.dist-info").mkdir()
    (tmp_path / "numpy.libs").mkdir()  # shared libraries, not a package
    (tmp_path / "six.py").write_text("")
    (tmp_path / "_private.py").write_text("")
    (tmp_path / "bin").mkdir()
    assert top_level_modules(tmp_path) == ["pandas", "six"]


def test_memory_of_self_and_of_nothing() -> None:
    use = memory_of(os.getpid())
    assert use is not None and use.rss >= use.pss >= use.uss > 0
    assert memory_of(2**22 + 12345) is None


def _preload_in_child(tmp_path: Path, modules: list[str], probe: bool) -> str:
    """Run the zygote's preload in a fresh interpreter; its outcome as one line."""
    import subprocess
    import sys

    import warmstart.runtime

    runtime = Path(warmstart.runtime.__file__).parent
    code = (
        f"import sys; sys.path[:0] = [{str(runtime)!r}, {str(tmp_path)!r}]\n"
        "import zygote\n"
        "try:\n"
        f"    print(zygote.preload({modules!r}, probe={probe!r}))\n"
        "except zygote.Unsafe as exc:\n"
        "    print('unsafe:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_preload_without_probes_imports_once_and_flags_unsafe_packages(tmp_path: Path) -> None:
    (tmp_path / "calm.py").write_text("VALUE = 1\n")
    (tmp_path / "broken.py").write_text("raise ValueError('no')\n")
    (tmp_path / "busy.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    # Safe packages: imported in this process, without a probe child; a failing import
    # is left out as the probe would have.
    assert _preload_in_child(tmp_path, ["calm", "broken"], probe=False) == (
        "(['calm'], {'broken': 'import failed: ValueError: no'})"
    )
    # A package that starts a thread: this process is spoilt for forking -- say so.
    assert _preload_in_child(tmp_path, ["calm", "busy"], probe=False) == (
        "unsafe: busy starts threads"
    )
    # Probing (the fallback) leaves it out and keeps the rest.
    assert _preload_in_child(tmp_path, ["calm", "busy"], probe=True) == (
        "(['calm'], {'busy': 'starts threads'})"
    )
