"""The function registry: configuration, code bundles and their SQLite state."""

from warmstart.functions import bundle
from warmstart.functions.models import FunctionConfig, FunctionRecord
from warmstart.functions.store import FunctionStore

__all__ = ["FunctionConfig", "FunctionRecord", "FunctionStore", "bundle"]
