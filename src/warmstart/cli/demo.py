"""The demo function ``warmstart serve --demo`` deploys."""

from __future__ import annotations

import io
import zipfile

HELLO = """\
import os
import socket


def handler(event, context):
    name = (event or {}).get("name", "world") if isinstance(event, dict) else "world"
    print(f"saying hello to {name}")
    return {
        "message": f"Hello, {name}!",
        "request_id": context.aws_request_id,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
    }
"""


def hello_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hello.py", HELLO)
    return buf.getvalue()
