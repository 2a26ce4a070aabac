"""What the client commands share: a node's API over HTTP, and errors shown as one line.

Kept apart from ``main`` so that every command module raises the same ``CLIError``
class: run as ``python -m warmstart.cli.main`` the entry module is ``__main__``, and a
class defined there would be a different one from ``warmstart.cli.main.CLIError``.
"""

from __future__ import annotations

import argparse
from typing import Any

FALLBACK_ENDPOINT = "http://127.0.0.1:8080"  # without --endpoint and $WARMSTART_ENDPOINT


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def client(args: argparse.Namespace) -> Any:
    """An HTTP client of ``args.endpoint`` (httpx, imported here: startup stays light)."""
    import httpx

    return httpx.Client(base_url=args.endpoint, timeout=960)


def check(resp: Any) -> Any:
    """``resp``, or a ``CLIError`` with the API's error type and message."""
    if resp.status_code >= 400:
        try:
            body = resp.json()
            msg = body.get("message") or body.get("Message") or resp.text
        except ValueError:
            msg = resp.text
        code = resp.headers.get("x-amzn-ErrorType", f"HTTP {resp.status_code}")
        raise CLIError(f"{code}: {msg}")
    return resp
