"""The ``warmstart`` command."""
