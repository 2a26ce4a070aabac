"""The in-sandbox runtime, run as a plain process over a socketpair (no sandbox needed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warmstart.runtime.protocol import HEADER, encode

RUNTIME = Path(__file__).resolve().parents[2] / "src" / "warmstart" / "runtime"


class Runtime:
    def __init__(self, code: Path, handler: str, env: dict[str, str] | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        os.set_inheritable(theirs.fileno(), True)
        fd = theirs.fileno()
        boot = (
            f"import os, sys; os.dup2({fd}, 3) if {fd} != 3 else None; "
            f"sys.path.insert(0, {str(RUNTIME)!r}); import bootstrap; bootstrap.main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-s", "-S", "-c", boot],
            env={
                "_HANDLER": handler,
                "LAMBDA_TASK_ROOT": str(code),
                "AWS_LAMBDA_FUNCTION_NAME": "t",
                **(env or {}),
            },
            pass_fds=[fd],
            cwd=code,
        )
        theirs.close()
        self.rfile = self.sock.makefile("rb")

    def read(self) -> tuple[dict[str, Any], bytes, bytes]:
        head = self.rfile.read(HEADER.size)
        assert len(head) == HEADER.size, "runtime closed the socket"
        a, b, c = HEADER.unpack(head)
        body = self.rfile.read(a + b + c)
        return json.loads(body[:a]), body[a : a + b], body[a + b :]

    def invoke(
        self, event: bytes, request_id: str = "r1", **extra: Any
    ) -> tuple[dict[str, Any], bytes, bytes]:
        meta = {
            "id": request_id,
            "deadline_ms": int(time.time() * 1000) + 5000,
            "arn": "arn:x",
            **extra,
        }
        self.sock.sendall(encode(json.dumps(meta).encode(), event))
        return self.read()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def code(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(
        "import logging, os, subprocess\n"
        "N = 0\n"
        "def handler(event, context):\n"
        "    global N\n"
        "    N += 1\n"
        "    print('printed', N)\n"
        "    logging.getLogger().warning('logged %s', N)\n"
        "    os.write(1, b'raw fd write\\n')\n"
        "    if event.get('fail'):\n"
        "        raise ValueError('boom')\n"
        "    if event.get('bad'):\n"
        "        return object()\n"
        "    if event.get('big'):\n"
        "        return 'x' * event['big']\n"
        "    if event.get('big_error'):\n"
        "        raise ValueError('x' * event['big_error'])\n"
        "    return {'n': N, 'id': context.aws_request_id, 'left': context.get_remaining_time_in_millis()}\n"
    )
    (tmp_path / "broken.py").write_text("def handler(:\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('at import')\n")
    return tmp_path


@pytest.fixture
def rt(code: Path) -> Iterator[Runtime]:
    r = Runtime(code, "app.handler")
    yield r
    r.close()


def test_a_first_request_written_before_ready_is_served_after_it(code: Path) -> None:
    # The worker writes a new instance's first request at once; its deadline is relative
    # (``timeout_ms``) and runs from when the runtime reads it, after the import.
    r = Runtime(code, "app.handler")
    try:
        meta = {"id": "early", "timeout_ms": 3000, "arn": "arn:x"}
        r.sock.sendall(encode(json.dumps(meta).encode(), b'{"x": 1}'))
        assert r.read()[0] == {"type": "ready"}
        meta_out, payload, _logs = r.read()
        assert meta_out == {"type": "result"}
        body = json.loads(payload)
        assert body["id"] == "early" and 0 < body["left"] <= 3000
    finally:
        r.close()


def test_ready_then_results_with_captured_output(rt: Runtime) -> None:
    assert rt.read()[0] == {"type": "ready"}
    meta, payload, logs = rt.invoke(b'{"x": 1}')
    assert meta == {"type": "result"}
    body = json.loads(payload)
    assert body["n"] == 1 and body["id"] == "r1" and 0 < body["left"] <= 5000
    text = logs.decode()
    assert "printed 1" in text and "logged 1" in text and "raw fd write" in text
    assert "\tr1\t" in text  # Lambda's log format carries the request id
    meta, payload, logs = rt.invoke(b"{}", "r2")
    assert json.loads(payload)["n"] == 2
    assert "printed 1" not in logs.decode(), "each invocation gets only its own output"


def test_errors_have_lambda_shape(rt: Runtime) -> None:
    rt.read()
    meta, payload, _logs = rt.invoke(b'{"fail": true}')
    assert meta["type"] == "error"
    err = json.loads(payload)
    assert err["errorType"] == "ValueError" and err["errorMessage"] == "boom"
    assert any("app.py" in line for line in err["stackTrace"])
    assert not any("bootstrap.py" in line for line in err["stackTrace"])
    meta, payload, _ = rt.invoke(b'{"bad": true}')
    assert json.loads(payload)["errorType"] == "Runtime.MarshalError"
    meta, payload, _ = rt.invoke(b"not json")
    assert meta["type"] == "invalid_event"
    meta, payload, _ = rt.invoke(b"{}")
    assert meta["type"] == "result", "the instance survives all of the above"


def test_a_result_over_the_limit_is_refused_by_the_runtime(rt: Runtime) -> None:
    rt.read()
    meta, payload, logs = rt.invoke(b'{"big": 2000}', max_response=1000)
    assert meta == {"type": "response_too_large"}
    assert json.loads(payload) == {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": "Response payload size (2002 bytes) exceeded maximum allowed payload "
        "size (1000 bytes).",
    }
    assert b"printed 1" in logs and b"exceeded maximum allowed payload size" in logs
    meta, payload, _ = rt.invoke(b'{"big_error": 2000}', max_response=1000)
    assert meta == {"type": "response_too_large"}, "an error over the limit too"
    meta, payload, _ = rt.invoke(b'{"big": 998}', max_response=1000)
    assert meta == {"type": "result"} and len(payload) == 1000, "the limit itself is allowed"
    meta, payload, _ = rt.invoke(b'{"big": 2000}')
    assert meta == {"type": "result"}, "no limit given: none applied"


@pytest.mark.parametrize(
    "handler,error_type",
    [
        ("missing.handler", "Runtime.ImportModuleError"),
        ("app.nope", "Runtime.HandlerNotFound"),
        ("broken.handler", "Runtime.UserCodeSyntaxError"),
        ("raises.handler", "Runtime.ImportModuleError"),
    ],
)
def test_init_errors(code: Path, handler: str, error_type: str) -> None:
    r = Runtime(code, handler)
    try:
        meta, payload, _ = r.read()
        assert meta == {"type": "init_error"}
        assert json.loads(payload)["errorType"] == error_type
    finally:
        r.close()


def test_oneshot_mode(code: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-E", "-s", "-S", str(RUNTIME / "bootstrap.py"), "--oneshot", '{"a": 1}'],
        env={"_HANDLER": "app.handler", "LAMBDA_TASK_ROOT": str(code)},
        capture_output=True,
        text=True,
        check=True,
        cwd=code,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 1
