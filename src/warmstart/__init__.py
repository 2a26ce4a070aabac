"""warmstart: a serverless platform for Python functions that makes every start feel warm.

The package is laid out like the system it runs, lowest layer last:

* ``cli``       -- the ``warmstart`` command (serve, deploy, invoke, jobs, images, top)
* ``api``       -- the HTTP server: AWS Lambda's REST API, the native API, /metrics
* ``worker``    -- one node behind one facade: function registry, instance pools and the
                   invocation path, handler cache, the best-effort dispatcher, image functions
* ``zygote``    -- the import cache: the zygote tree, zygote processes, forks from them
* ``qos``       -- colocation: reclaimed capacity, best-effort suppression, LS burst, eviction
* ``images``    -- registry client, content store, safe unpacking, eStargz, lazy FUSE mounts
* ``packages``  -- the install cache: each package version installed once per node
* ``functions`` -- function records, code bundles and their SQLite state
* ``sandbox``   -- Linux sandboxes (namespaces, bind-mount roots, pooled cgroups, freezer)
                   and an unprivileged process backend
* ``runtime``   -- the code that runs inside a sandbox (standard library only), including
                   the zygote's fork server and the syscall wrappers
* ``errors``, ``kinds``, ``lifecycle`` -- the error tree, shared enumerations, and the
                   supervisor that owns every background task

Lower layers never import higher ones (see docs/architecture.md).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
