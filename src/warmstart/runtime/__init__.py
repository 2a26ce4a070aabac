"""The in-sandbox runtime.

Everything in this package runs inside a sandbox under the *base* interpreter with
``-I -S``: it may import only the standard library and its sibling modules, never the
rest of warmstart.  The worker imports ``protocol`` from here so both sides share one
definition of the wire format.
"""
