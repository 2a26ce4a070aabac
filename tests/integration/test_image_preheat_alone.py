"""Preheat and the image cache on a node alone (no cluster), through the ``warmstart
image`` commands in a pipe: the job pulls on this node, the entry pins here and outlives a
restart of the server, ``nodes`` is refused without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, needs_root, wait_until
from tests.imagetools import build_image

pytestmark = [pytest.mark.integration, needs_root]

CLI = [sys.executable, "-m", "warmstart.cli.main"]


def warmstart(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WARMSTART_ENDPOINT=server.url)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_a_node_alone_preheats_and_pins_for_itself(
    server_factory: Any, registry: Any, tmp_path: Path
) -> None:
    ref = build_image(
        tmp_path / "build", [{"data/blob": os.urandom(256 << 10)}], ref=f"{registry.host}/alone:1"
    )
    server: Server = server_factory()
    out = warmstart(server, "image", "preheat", ref, "--wait")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("preheat job ") and lines[0].endswith(f"{ref} on 1 node(s)")
    assert lines[-1].endswith("Succeeded: 1 of 1 node(s) succeeded")
    assert any(line.endswith(": succeeded") for line in lines)

    out = warmstart(server, "image", "preheat", ref, "--nodes", "elsewhere")
    assert out.returncode == 2 and "need cluster mode" in out.stderr

    out = warmstart(server, "image", "cache", "put", "alone", ref)
    assert out.returncode == 0, out.stderr
    assert "created" in out.stdout
    wait_until(lambda: "1/1 pinned" in warmstart(server, "image", "cache", "ls").stdout, "the pin")
    entry = json.loads(warmstart(server, "image", "cache", "get", "alone").stdout)
    (node,) = entry["nodes"].values()
    assert node["state"] == "pinned" and node["digest"].startswith("sha256:")

    # A restart keeps the entry, and the pin: nothing is pulled again.
    server.stop()
    server = server_factory(data_dir=server.data_dir)
    again = wait_until(
        lambda: (e := httpx.get(f"{server.url}/images/cache/alone").json())["ready"] and e,
        "the entry after a restart",
    )
    assert again["image"] == ref
    assert server.log().count("image cache alone: ") == 2  # made, pinned: once, before
    out = warmstart(server, "image", "cache", "rm", "alone")
    assert out.returncode == 0 and "removed" in out.stdout
    assert warmstart(server, "image", "cache", "rm", "alone").returncode == 2
