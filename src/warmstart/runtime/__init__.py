"""The in-sandbox runtime.

Everything in this package runs inside a sandbox, where it is copied (``data/runtime``,
bound read-only at ``/var/runtime``): under the host's base interpreter with
``-E -s -S`` (no environment-driven paths, no user or site packages), or under an
image's own Python with ``-s``.  It may import only the standard library and its sibling
modules, never the rest of warmstart.  The host imports ``protocol`` (one definition of
the wire format for both sides) and ``syscalls`` (one set of wrappers for mount,
namespaces and capabilities) from here.
"""
