"""The application over a real worker, in-process: requests go through ``httpx``'s ASGI
transport to the app, which runs (lifespan included) on a portal's event loop, so a
synchronous test (or a Hypothesis example) calls it like a server.  A crash is the 500 a
caller would see, not an exception in the test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from warmstart.api.app import create_app
from warmstart.worker import Settings, Worker


class AppClient:
    """Blocking calls into the app running on ``portal``."""

    def __init__(self, portal: BlockingPortal, http: httpx.AsyncClient) -> None:
        self.portal = portal
        self.http = http

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = self.portal.call(
            lambda: self.http.request(method, url, **kwargs)
        )
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


@contextlib.contextmanager
def app_client(data_dir: Path, **settings: Any) -> Iterator[AppClient]:
    """The app over a ``Worker`` (no zygotes unless asked) in ``data_dir``."""
    options = {"zygotes": False, "cgroup_pool": 2, **settings}
    app = create_app(Worker(Settings(data_dir=data_dir, **options)))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        http = httpx.AsyncClient(transport=transport, base_url="http://node", timeout=120)
        try:
            yield AppClient(portal, http)
        finally:
            portal.call(http.aclose)
