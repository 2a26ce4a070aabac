"""The install cache: each package version installed once per node, shared read-only."""

from warmstart.packages.cache import InstallCache, Pin, parse_pins

__all__ = ["InstallCache", "Pin", "parse_pins"]
