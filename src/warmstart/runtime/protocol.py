"""Wire format between the worker and an instance's runtime (stdlib only).

A frame is a 12-byte header ``!III`` (meta length, payload length, log length) followed
by those three byte strings.  *meta* is a small JSON object; *payload* is passed through
untouched (the event going in, the handler's JSON result coming out), so the worker never
parses or re-encodes user data on the hot path; *logs* is what the handler printed.

Worker → runtime:  meta ``{"id", "deadline_ms", "arn", "max_response", "client_context"?}``,
                   payload=event; the first request of a new instance, written right
                   after the sandbox is made (it waits in the socket while the handler is
                   imported), says ``"timeout_ms"`` instead of ``"deadline_ms"``: the
                   deadline runs from when the runtime reads it
Runtime → worker:  meta ``{"type": "ready"}`` once the handler module is imported, or
                   ``{"type": "init_error"}`` with the error JSON as payload;
                   then per invocation ``{"type": "result"}`` / ``{"type": "error"}`` /
                   ``{"type": "invalid_event"}``, payload = result or error JSON; or
                   ``{"type": "response_too_large"}`` (Lambda's error JSON) instead of a
                   payload over the request's ``max_response`` bytes, which the worker
                   would refuse to read (it reads no payload over that limit).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!III")
MAX_META = 1 << 20
MAX_PAYLOAD = 64 << 20
MAX_LOGS = 1 << 20

# The file descriptor the runtime finds its end of the socketpair on.
RUNTIME_FD = 3


def encode(meta: bytes, payload: bytes = b"", logs: bytes = b"") -> bytes:
    return HEADER.pack(len(meta), len(payload), len(logs)) + meta + payload + logs


def check_sizes(meta_len: int, payload_len: int, logs_len: int) -> None:
    if meta_len > MAX_META or payload_len > MAX_PAYLOAD or logs_len > MAX_LOGS:
        raise ValueError(f"frame too large: {meta_len}/{payload_len}/{logs_len}")
