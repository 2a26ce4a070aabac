"""The ``warmstart`` CLI as a user meets it, against a real server: one-line errors, short
job ids, ``ls`` and ``top`` in a pipe, ``top`` on a terminal quits on q, ``serve --demo``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server, deploy

pytestmark = [pytest.mark.integration]

CLI = [sys.executable, "-m", "warmstart.cli.main"]
DOUBLE = "def handler(event, context):\n    return {'twice': event['x'] * 2}\n"


def warmstart(server: Server, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI with its output in pipes (not a terminal), against ``server``."""
    env = dict(os.environ, WARMSTART_ENDPOINT=server.url, COLUMNS="40")
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=env, **kwargs
    )


def test_a_missing_input_file_is_one_line_not_a_traceback(server: Server, tmp_path: Path) -> None:
    out = warmstart(server, "job", "submit", "double", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"warmstart: {tmp_path / 'nope.jsonl'}: No such file or directory"
    ]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["invoke", "nosuchfn"], "Function not found"),
        (["job", "status", "ffffffffff"], "no such job"),
        (["job", "results", "abc"], "at least 6"),
        (["invoke", "double", "not json"], "the event must be JSON"),
        (["deploy", "/nonexistent", "--name", "x"], "no such file or directory"),
    ],
)
def test_user_errors_are_one_line(server: Server, args: list[str], message: str) -> None:
    out = warmstart(server, *args)
    assert out.returncode == 2, out
    assert len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    from tests.conftest import free_port

    out = subprocess.run(
        [*CLI, "ls", "--endpoint", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.startswith("warmstart: cannot reach http://")
    assert len(out.stderr.splitlines()) == 1


def test_short_job_ids_and_json_results(server: Server, lam: Any, tmp_path: Path) -> None:
    deploy(lam, "double", {"handler.py": DOUBLE})
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(3)))
    out = warmstart(server, "job", "submit", "double", str(inputs), "--wait")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1].rstrip(":")
    short = job_id[:8]  # what the progress bar shows
    assert f"job {short}" in out.stdout

    status = warmstart(server, "job", "status", short)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["JobId"] == job_id
    results = warmstart(server, "job", "results", short)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert [line["result"] for line in lines] == [{"twice": 0}, {"twice": 2}, {"twice": 4}]
    with server.http() as http:
        assert http.get(f"/jobs/{job_id[:6]}").json()["JobId"] == job_id
        body = http.get(f"/jobs/{short}/results").json()
        assert body["JobId"] == job_id and body["results"][1]["result"] == {"twice": 2}
        assert http.get("/jobs/12345").status_code == 400  # too short to be a prefix


def test_ls_in_a_pipe_keeps_every_column(server: Server, lam: Any) -> None:
    name = "a-function-with-a-rather-long-name-that-would-not-fit"
    deploy(lam, name, {"handler.py": DOUBLE}, Timeout=17)
    out = warmstart(server, "ls")  # COLUMNS=40: a table would have to cut
    assert out.returncode == 0, out.stderr
    header, row = (line.split("\t") for line in out.stdout.splitlines())
    assert header[:4] == ["name", "handler / image", "memory (MB)", "timeout (s)"]
    assert row[:4] == [name, "handler.handler", "128", "17"] and len(row) == len(header) == 7
    assert header[-1] == "state" and row[-1] == "Active"  # a zip function, once deployed


def test_top_in_a_pipe_prints_snapshots(server: Server) -> None:
    out = warmstart(server, "top", "--iterations", "2", "--interval", "0.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("warmstart top · ") == 2
    assert "\x1b[" not in out.stdout
    for word in ("latency-sensitive", "best-effort", "reclaimed", "queue depth", "instances"):
        assert word in out.stdout


def test_top_on_a_terminal_shows_the_hint_and_quits_on_q(server: Server) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [*CLI, "top", "--endpoint", server.url],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        screen = b""
        deadline = time.monotonic() + 30
        while b"q to quit" not in screen:
            assert time.monotonic() < deadline, screen.decode(errors="replace")
            if select.select([master], [], [], 1)[0]:
                screen += os.read(master, 65536)
        os.write(master, b"q")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_serve_demo_deploys_hello(server_factory: Any) -> None:
    server: Server = server_factory("--demo")
    deadline = time.monotonic() + 30
    with server.http() as http:
        while http.get("/2015-03-31/functions/hello").status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        r = http.post("/run/hello", json={"name": "cli"})
    assert r.status_code == 200 and r.json()["message"] == "Hello, cli!"
    assert "demo: curl -s -X POST" in server.log()
