"""The worker: instance pools, the handler cache and the invocation path."""

from warmstart.worker.settings import Settings
from warmstart.worker.worker import InvokeResult, StartKind, Worker

__all__ = ["InvokeResult", "Settings", "StartKind", "Worker"]
