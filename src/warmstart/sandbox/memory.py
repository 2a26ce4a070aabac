"""How much memory a process really uses: RSS, and the PSS and USS that sharing makes matter.

A forked instance shares most of its pages with its zygote: RSS counts them in full for
every process, PSS splits each shared page among its sharers, USS counts only the pages
no other process maps.  Reading ``smaps_rollup`` walks the process's whole address space
in the kernel (milliseconds for a big one), so callers read it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryUse:
    rss: int
    pss: int
    uss: int


def memory_of(pid: int) -> MemoryUse | None:
    """RSS, PSS and USS in bytes from /proc/<pid>/smaps_rollup (None if it is gone)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return MemoryUse(fields.get("Rss", 0), fields.get("Pss", 0), uss)
