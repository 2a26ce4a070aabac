"""warmstart: a serverless platform for Python functions that makes every start feel warm.

The package is laid out like the system it runs:

* ``runtime``   -- the code that runs inside a sandbox (stdlib only, no warmstart imports)
* ``sandbox``   -- Linux sandboxes (namespaces, bind-mount roots, pooled cgroups, freezer)
                   and an unprivileged process backend
* ``functions`` -- the function registry: configuration, code bundles, SQLite state
* ``worker``    -- instance pools, the handler cache and the invocation path
* ``api``       -- the HTTP server: AWS Lambda's REST API, the native API, /metrics
* ``cli``       -- the ``warmstart`` command

Lower layers never import higher ones (see docs/architecture.md).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
