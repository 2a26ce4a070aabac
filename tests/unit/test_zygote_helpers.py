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
