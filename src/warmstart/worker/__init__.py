"""The worker: one node's functions, instance pools, handler cache and invocation path.

``Worker`` is the facade the API talks to; ``worker.py`` describes the rooms behind it.
"""

from warmstart.kinds import StartKind
from warmstart.worker.invoker import InvokeResult
from warmstart.worker.settings import Settings
from warmstart.worker.worker import Worker

__all__ = ["InvokeResult", "Settings", "StartKind", "Worker"]
