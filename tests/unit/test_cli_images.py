"""``warmstart image preheat`` and ``image cache`` against a fake node API: the requests
they make, and what they print while a job runs (lines when stdout is not a terminal)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from warmstart.cli import main as cli


def job(state2: str, done: int, *, finished: bool = False) -> dict[str, Any]:
    nodes = {
        "n1": {"state": "succeeded", "bytesDone": 10, "bytesTotal": 10, "message": ""},
        "n2": {"state": state2, "bytesDone": done, "bytesTotal": 10, "message": "boom"},
    }
    failed = [n for n, v in nodes.items() if v["state"] == "failed"]
    return {
        "id": "j1",
        "image": "r:5000/a:1",
        "phase": ("Failed" if failed else "Succeeded") if finished else "Running",
        "desired": 2,
        "succeeded": sum(v["state"] == "succeeded" for v in nodes.values()),
        "failed": len(failed),
        "failedNodes": failed,
        "completionTime": "2024-01-01T00:00:00Z" if finished else None,
        "nodes": nodes,
    }


def serve(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    def client(args: Any) -> httpx.Client:
        return httpx.Client(base_url=args.endpoint, transport=httpx.MockTransport(handler))

    monkeypatch.setattr("warmstart.cli.client.client", client)


def test_preheat_sends_the_job_and_follows_it_line_by_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[Any] = []
    states = iter([job("pending", 0), job("pulling", 5), job("failed", 5, finished=True)])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            sent.append(json.loads(request.content))
            return httpx.Response(202, json=job("pending", 0))
        return httpx.Response(200, json=next(states))

    serve(monkeypatch, handler)
    monkeypatch.setattr("warmstart.cli.images.time.sleep", lambda s: None)
    argv = ["image", "preheat", "r:5000/a:1", "--nodes", "n1,n2", "--parallelism", "1"]
    assert cli.main([*argv, "--timeout", "30", "--wait"]) == 1
    assert sent == [
        {"image": "r:5000/a:1", "nodes": ["n1", "n2"], "parallelism": 1, "timeoutSeconds": 30}
    ]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "preheat job j1: r:5000/a:1 on 2 node(s)"
    assert "n2: pending" in out and "n2: pulling 0.0/0.0 MB" in out
    assert "n2: failed: boom" in out
    assert out[-2:] == [
        "preheat job j1: Failed: 1 of 2 node(s) succeeded, failed: n2",
        "  n2: boom",
    ]


def test_preheat_status_ls_rm_and_the_cache_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/images/preheat":
            return httpx.Response(200, json={"jobs": [job("succeeded", 10, finished=True)]})
        if path.startswith("/images/preheat/"):
            if request.method == "DELETE":
                return httpx.Response(204)
            return httpx.Response(200, json=job("succeeded", 10, finished=True))
        if path == "/images/cache":
            entry = {"name": "web", "image": "r/a:1", "pinned": 1, "desired": 3}
            return httpx.Response(200, json={"entries": [entry]})
        if request.method == "PUT":
            return httpx.Response(201, json={"name": "web", "image": "r/a:1", "desired": 2})
        if request.method == "DELETE":
            return httpx.Response(
                404,
                json={"message": "no such image cache entry: x"},
                headers={"x-amzn-ErrorType": "ResourceNotFoundException"},
            )
        return httpx.Response(200, json={"name": "web"})

    serve(monkeypatch, handler)
    assert cli.main(["image", "preheat", "status", "j1"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "j1"
    assert cli.main(["image", "preheat", "ls"]) == 0
    assert "Succeeded" in capsys.readouterr().out
    assert cli.main(["image", "preheat", "rm", "j1"]) == 0
    assert cli.main(["image", "preheat", "rm"]) == 2
    assert "takes a job id" in capsys.readouterr().err
    assert cli.main(["image", "cache", "put", "web", "r/a:1", "--selector", "zone=a"]) == 0
    assert "created: r/a:1 on 2 node(s)" in capsys.readouterr().out
    assert cli.main(["image", "cache", "ls"]) == 0
    assert capsys.readouterr().out.strip() == "web  1/3 pinned  r/a:1"
    assert cli.main(["image", "cache", "rm", "x"]) == 2
    assert "ResourceNotFoundException: no such image cache entry" in capsys.readouterr().err
    assert ("PUT", "/images/cache/web", {"image": "r/a:1", "selector": "zone=a"}) in seen
    assert ("DELETE", "/images/preheat/j1", None) in seen
