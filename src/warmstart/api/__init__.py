"""The HTTP layer: AWS Lambda's REST API, the native API and /metrics.  No cgroups here."""

from warmstart.api.app import create_app, create_asgi

__all__ = ["create_app", "create_asgi"]
