"""Node QoS for colocating latency-sensitive (LS) and best-effort (BE) work.

``policy`` decides (pure functions), ``usage`` measures (/proc and cgroupfs), ``enforce``
writes decisions to cgroupfs.  See the module docstrings for formulas and defaults.
"""
