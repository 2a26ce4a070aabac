"""The import cache: zygotes that have imported a function's packages and fork its instances.

* ``tree``     -- which zygote serves which package set, and which to grow (pure bookkeeping)
* ``launcher`` -- zygote processes seen from the host: start one, fork a sandbox from it,
                  stop it (through the sandbox manager's public surface)
* ``cache``    -- the tree at work: grown from demand, frozen when idle, evicted by memory,
                  consulted on every cold start

The in-sandbox half (the fork server itself) is ``warmstart.runtime.zygote``: it runs
inside a sandbox, where only the runtime's standard-library modules exist.
"""
