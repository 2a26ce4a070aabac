"""Request bodies, read within a bound: every endpoint that takes a body reads it here.

A body over its limit is refused with ``RequestTooLarge`` (413) before it is buffered:
a ``Content-Length`` over the limit is refused without reading a byte; without one (a
chunked body) the stream is counted as it arrives and reading stops at the first chunk
that crosses the limit.  The server drains (and drops) whatever the client still sends.

``parse_json`` reads a JSON body (or a part of one) that arrived: a document nested too
deeply for the parser is malformed like any other, not a crash.

``read_body`` serves the application's endpoints (a starlette ``Request``);
``bounded_chunks`` and ``declared_length`` serve an ASGI layer that works on raw
messages (``api/forwarding.py``).  A ``BodyLimit`` says how large, and words the error as
Lambda does ("Request must be smaller than N bytes for the InvokeFunction operation").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmstart.errors import RequestTooLarge
from warmstart.kinds import SizeLimit

if TYPE_CHECKING:
    from starlette.requests import Request

# CreateFunction and UpdateFunctionCode carry the zip in base64 inside JSON: Lambda caps
# such a request at the base64 size of a 50 MB zip (4/3 of 52,428,800, rounded up).
CODE_REQUEST_BYTES = 69_905_067
# Any other control-plane request (configuration, concurrency, image operations).
CONTROL_REQUEST_BYTES = 1 << 20

TOO_LARGE = "RequestTooLargeException"  # an invocation's payload
ENTITY_TOO_LARGE = "RequestEntityTooLargeException"  # a deploy's (or other API) request


@dataclass(frozen=True)
class BodyLimit:
    """How large a body an operation takes, and how it says no."""

    size: int
    what: SizeLimit
    operation: str  # Lambda's name for it in the error ("InvokeFunction", ...)
    error_type: str = TOO_LARGE

    def error(self) -> RequestTooLarge:
        """Lambda's wording of a body over the limit."""
        return RequestTooLarge(
            f"Request must be smaller than {self.size} bytes for the {self.operation} operation",
            limit=self.what,
            error_type=self.error_type,
        )


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The request's ``Content-Length`` (raw ASGI headers), or None if absent or not a
    number (the server refuses a malformed one before the application sees it)."""
    for key, value in headers:
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def bounded_chunks(chunks: AsyncIterator[bytes], limit: BodyLimit) -> AsyncIterator[bytes]:
    """``chunks`` as they come; ``limit.error()`` is raised at the first chunk that takes
    the total over the limit (that chunk is not passed on)."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit.size:
            raise limit.error()
        yield chunk


async def read_body(request: Request, limit: BodyLimit) -> bytes:
    """The whole body of ``request`` if it is within ``limit``; else ``limit.error()``,
    raised before more than the limit (plus the chunk that crossed it) was held."""
    length = declared_length(request.scope["headers"])
    if length is not None and length > limit.size:
        raise limit.error()
    data = bytearray()
    async for chunk in bounded_chunks(request.stream(), limit):
        data += chunk
    return bytes(data)


def parse_json(raw: bytes | str) -> Any:
    """``json.loads(raw)``; a document nested deeper than the parser's recursion limit
    raises the ``ValueError`` any other malformed document does (not ``RecursionError``)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON document is nested too deeply") from None
