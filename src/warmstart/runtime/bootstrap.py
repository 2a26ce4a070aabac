"""The runtime inside a sandbox: import the handler, then serve invocations.

Started as ``python -I -S bootstrap.py`` with its socket on fd 3 (or with ``--oneshot
EVENT`` to run the handler once and print the result, which is how the runc baseline
benchmark runs the very same code).  It follows AWS Lambda's Python conventions:
``handler(event, context)``, the context object, the error shapes and type names.

Output: fds 1 and 2 point at one memfd for the instance's life.  After each invocation
the runtime reads what was written (by print, logging, C extensions or child processes
alike), hands it to the worker with the result, and truncates the memfd.  The worker
makes that memfd and keeps a reference for the runtime's life, so whatever a runtime that
dies (before it is ready, or mid-invocation) wrote last is still there to say why.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

# Not "from typing import ...": importing typing costs ~2 ms of every cold start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from warmstart.runtime.protocol import HEADER, RUNTIME_FD, check_sizes, encode
else:  # inside a sandbox only this directory is there, not the warmstart package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from protocol import HEADER, RUNTIME_FD, check_sizes, encode

TASK_ROOT = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
LOG_TAIL = 256 * 1024


class LambdaContext:
    """The ``context`` argument, with AWS Lambda's attribute names."""

    def __init__(self, request_id: str, deadline_ms: int, arn: str, client_context: Any = None):
        env = os.environ
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.invoked_function_arn = arn
        self.aws_request_id = request_id
        self.client_context = client_context
        self.identity = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


class _Logs:
    """Lambda's root-logger format, set up only once user code has imported logging.

    Importing logging costs ~3 ms of a cold start; most handlers never use it.
    """

    request_id = ""
    installed = False

    def filter(self, record: Any) -> bool:
        record.aws_request_id = self.request_id
        return True

    def maybe_install(self) -> None:
        if not self.installed and "logging" in sys.modules:
            self.installed = True
            _setup_logging()


_request_filter = _Logs()


def _setup_logging() -> None:
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    handler.addFilter(_request_filter)
    logging.getLogger().addHandler(handler)


def _stack(tb: Any) -> list[str]:
    import traceback

    # Drop the runtime's own frames: users see their code only.
    frames = [
        f
        for f in traceback.extract_tb(tb)
        if not f.filename.endswith(("bootstrap.py", "protocol.py"))
    ]
    return traceback.format_list(frames)


def _error(
    exc: BaseException, error_type: str | None = None, message: str | None = None
) -> dict[str, Any]:
    return {
        "errorMessage": str(exc) if message is None else message,
        "errorType": error_type or type(exc).__name__,
        "stackTrace": _stack(exc.__traceback__),
    }


def _imported_packages() -> bytes:
    """With WARMSTART_REPORT_MODULES set: the top-level packages the handler's import
    pulled in from site-packages (what a zygote for this function should preload)."""
    if not os.environ.get("WARMSTART_REPORT_MODULES"):
        return b""
    names = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if "." not in name and "-packages/" in path:
            names.add(name)
    return json.dumps(sorted(names)).encode()


def load_handler(spec: str) -> tuple[Any, dict[str, Any] | None]:
    """Import ``module.function``; return (callable, None) or (None, Lambda init error)."""
    module_name, _, func_name = spec.rpartition(".")
    if not module_name or not func_name:
        return None, {
            "errorMessage": f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)",
            "errorType": "Runtime.MalformedHandlerName",
            "stackTrace": [],
        }
    module_name = module_name.replace("/", ".")
    task_root = os.environ.get("LAMBDA_TASK_ROOT", TASK_ROOT)
    if task_root not in sys.path:
        sys.path.insert(0, task_root)
        # The function's packages from the install cache come right after its own code.
        extra = [p for p in os.environ.get("WARMSTART_PATH", "").split(":") if p]
        sys.path[1:1] = extra
    try:
        import importlib

        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        return None, _error(
            exc, "Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}"
        )
    except ModuleNotFoundError as exc:
        return None, _error(
            exc, "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}"
        )
    except SystemExit as exc:  # sys.exit() at import: the runtime would exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return None, _error(
            exc, "Runtime.ExitError", f"Runtime exited with error: exit status {code}"
        )
    except BaseException as exc:
        return None, _error(
            exc, "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}"
        )
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        return None, {
            "errorMessage": f"Handler '{func_name}' missing on module '{module_name}'",
            "errorType": "Runtime.HandlerNotFound",
            "stackTrace": [],
        }
    return func, None


class Runtime:
    """Serves invocations over fd 3 with plain reads and writes (no socket module: it
    costs ~2 ms of import on every cold start)."""

    def __init__(self, fd: int, output: int | None = None):
        self.fd = fd
        self.rfile = open(fd, "rb", buffering=65536, closefd=False)  # noqa: SIM115
        # The worker's memfd when it passed one (it reads it if we die before ready).
        self.out = os.memfd_create("warmstart-output", os.MFD_CLOEXEC) if output is None else output
        for fd in (1, 2):
            os.dup2(self.out, fd)
        # Unbuffered-by-line text streams over the shared memfd.
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False),
            line_buffering=True,
            encoding="utf-8",
            errors="backslashreplace",
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False),
            line_buffering=True,
            encoding="utf-8",
            errors="backslashreplace",
        )

    def take_output(self) -> bytes:
        sys.stdout.flush()
        sys.stderr.flush()
        size = os.lseek(self.out, 0, os.SEEK_END)
        if size == 0:
            return b""
        start = max(0, size - LOG_TAIL)
        data = os.pread(self.out, size - start, start)
        os.ftruncate(self.out, 0)
        os.lseek(self.out, 0, os.SEEK_SET)
        return data

    def send(self, meta: dict[str, Any], payload: bytes = b"") -> None:
        view = memoryview(encode(json.dumps(meta).encode(), payload, self.take_output()))
        while view:
            view = view[os.write(self.fd, view) :]

    def recv(self) -> tuple[dict[str, Any], bytes] | None:
        head = self.rfile.read(HEADER.size)
        if len(head) < HEADER.size:
            return None
        meta_len, payload_len, logs_len = HEADER.unpack(head)
        check_sizes(meta_len, payload_len, logs_len)
        body = self.rfile.read(meta_len + payload_len + logs_len)
        if len(body) < meta_len + payload_len + logs_len:
            return None
        return json.loads(body[:meta_len]), body[meta_len : meta_len + payload_len]

    def run(self) -> None:
        handler, init_error = load_handler(
            os.environ.get("_HANDLER", "lambda_function.lambda_handler")
        )
        if init_error is not None:
            self.send({"type": "init_error"}, json.dumps(init_error).encode())
            return
        _request_filter.maybe_install()
        self.send({"type": "ready"}, _imported_packages())
        while True:
            req = self.recv()
            if req is None:
                return  # the worker closed its end: nothing more to do
            meta, payload = req
            self.invoke(handler, meta, payload)

    def invoke(self, handler: Any, meta: dict[str, Any], payload: bytes) -> None:
        request_id = meta["id"]
        _request_filter.request_id = request_id
        _request_filter.maybe_install()
        try:
            event = json.loads(payload) if payload else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            self.send({"type": "invalid_event"}, json.dumps({"errorMessage": str(exc)}).encode())
            return
        deadline_ms = meta.get("deadline_ms")
        if deadline_ms is None:  # a new instance's first request, sent before it was ready
            deadline_ms = int(time.time() * 1000) + meta["timeout_ms"]
        context = LambdaContext(
            request_id, deadline_ms, meta.get("arn", ""), meta.get("client_context")
        )
        limit = meta.get("max_response")
        try:
            result = handler(event, context)
        except Exception as exc:
            err = _error(exc)
            err["requestId"] = request_id
            import traceback

            traceback.print_exception(exc)  # Lambda logs the failure too
            self.reply("error", json.dumps(err).encode(), limit)
            return
        try:
            body = json.dumps(result).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            err = {
                "errorMessage": f"Unable to marshal response: {exc}",
                "errorType": "Runtime.MarshalError",
                "requestId": request_id,
                "stackTrace": [],
            }
            self.send({"type": "error"}, json.dumps(err).encode())
            return
        self.reply("result", body, limit)

    def reply(self, kind: str, body: bytes, limit: int | None) -> None:
        """Send an invocation's outcome -- or, when it is over the worker's ``limit``
        (``max_response`` in the request's meta), Lambda's error for that instead: the
        worker would not read it anyway, and this instance stays usable."""
        if limit is not None and len(body) > limit:
            message = (
                f"Response payload size ({len(body)} bytes) exceeded maximum allowed "
                f"payload size ({limit} bytes)."
            )
            print(message, file=sys.stderr)
            kind = "response_too_large"
            body = json.dumps(
                {"errorMessage": message, "errorType": "Function.ResponseSizeTooLarge"}
            ).encode()
        self.send({"type": kind}, body)


def oneshot(event_json: str) -> int:
    """Run the handler once and print its JSON result (used by the runc baseline)."""
    handler, init_error = load_handler(os.environ.get("_HANDLER", "lambda_function.lambda_handler"))
    if init_error is not None:
        print(json.dumps(init_error))
        return 1
    ctx = LambdaContext("oneshot", int(time.time() * 1000) + 60_000, "")
    print(json.dumps(handler(json.loads(event_json), ctx)))
    return 0


def main(output: int | None = None) -> None:
    """Serve on RUNTIME_FD; ``output``: the worker's output memfd, if it passed one."""
    if len(sys.argv) > 2 and sys.argv[1] == "--oneshot":
        sys.exit(oneshot(sys.argv[2]))
    os.set_inheritable(RUNTIME_FD, False)
    if output is not None:
        os.set_inheritable(output, False)
    Runtime(RUNTIME_FD, output).run()


if __name__ == "__main__":
    main()
