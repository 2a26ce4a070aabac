"""Versions and aliases in a cluster: published through one node, numbered by one counter
in etcd, followed by every node's catalog watch, invokable through any node; deleting the
function through another node takes its versions and aliases everywhere."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import make_zip, needs_root
from tests.integration.test_cluster import API, FORWARDED, create, invoke, wait_until
from warmstart.cluster.local import LocalCluster

pytestmark = [pytest.mark.integration, needs_root]


def tagged(tag: str) -> str:
    return (
        f"CODE = {tag!r}\n"
        "def handler(event, context):\n"
        "    return {'code': CODE, 'version': context.function_version}\n"
    )


def publish(url: str, name: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{url}{API}/{name}/versions", json=body, timeout=60)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def versions(url: str, name: str) -> list[str]:
    resp = httpx.get(f"{url}{API}/{name}/versions", timeout=10)
    return [v["Version"] for v in resp.json().get("Versions", [])]


def alias_version(url: str, name: str, alias: str) -> str | None:
    resp = httpx.get(f"{url}{API}/{name}/aliases/{alias}", timeout=10)
    return resp.json()["FunctionVersion"] if resp.status_code == 200 else None


def test_versions_and_aliases_are_shared_by_every_node(
    local_cluster_factory: Callable[..., LocalCluster],
) -> None:
    n1, n2 = local_cluster_factory(2).nodes
    create(n1.url, "canary", tagged("one"))
    assert publish(n1.url, "canary")["Version"] == "1"
    zipped = base64.b64encode(make_zip({"handler.py": tagged("two")})).decode()
    wait_until(lambda: versions(n2.url, "canary") == ["$LATEST", "1"], "node2 to see version 1")
    resp = httpx.put(f"{n1.url}{API}/canary/code", json={"ZipFile": zipped}, timeout=60)
    assert resp.status_code == 200, resp.text
    wait_until(
        lambda: (
            httpx.get(f"{n2.url}{API}/canary", timeout=10).json()["Configuration"]["RevisionId"]
            == resp.json()["RevisionId"]
        ),
        "node2 to see the new code",
    )
    # Published through the other node: the counter in etcd gives it the next number.
    assert publish(n2.url, "canary")["Version"] == "2"
    for node in (n1, n2):
        wait_until(
            lambda node=node: versions(node.url, "canary") == ["$LATEST", "1", "2"],
            f"{node.name} to list both versions",
        )

    # Every node runs every version itself (the forwarded header keeps the call there).
    for node in (n1, n2):
        for version, code in (("1", "one"), ("2", "two")):
            r = invoke(node.url, f"canary:{version}", {}, **FORWARDED)
            assert r.status_code == 200, r.text
            assert r.headers["x-amz-executed-version"] == version
            assert r.json() == {"code": code, "version": version}

    # An alias made through node2 routes invocations through node1, and follows updates.
    made = httpx.post(
        f"{n2.url}{API}/canary/aliases",
        json={"Name": "live", "FunctionVersion": "1"},
        timeout=10,
    )
    assert made.status_code == 201, made.text
    wait_until(lambda: alias_version(n1.url, "canary", "live") == "1", "node1 to see the alias")
    r = invoke(n1.url, "canary:live", {}, **FORWARDED)
    assert r.headers["x-amz-executed-version"] == "1" and r.json()["code"] == "one"
    moved = httpx.put(
        f"{n1.url}{API}/canary/aliases/live",
        json={"FunctionVersion": "2", "RevisionId": made.json()["RevisionId"]},
        timeout=10,
    )
    assert moved.status_code == 200, moved.text
    wait_until(lambda: alias_version(n2.url, "canary", "live") == "2", "node2 to follow it")
    r = invoke(n2.url, "canary:live", {}, **FORWARDED)
    assert r.headers["x-amz-executed-version"] == "2" and r.json()["code"] == "two"
    # A stale RevisionId is refused whichever node it reaches.
    stale = httpx.put(
        f"{n2.url}{API}/canary/aliases/live",
        json={"FunctionVersion": "1", "RevisionId": made.json()["RevisionId"]},
        timeout=10,
    )
    assert stale.status_code == 412, stale.text

    # A version deleted through one node is gone from the other; its number stays used.
    assert httpx.delete(f"{n2.url}{API}/canary", params={"Qualifier": "1"}).status_code == 204
    wait_until(lambda: versions(n1.url, "canary") == ["$LATEST", "2"], "node1 to drop version 1")
    assert invoke(n1.url, "canary:1", {}, **FORWARDED).status_code == 404
    httpx.put(
        f"{n1.url}{API}/canary/configuration", json={"Timeout": 9}, timeout=10
    ).raise_for_status()
    assert publish(n1.url, "canary")["Version"] == "3"

    # The function deleted through node1: its versions and aliases go everywhere.
    assert httpx.delete(f"{n1.url}{API}/canary").status_code == 204
    for node in (n1, n2):
        wait_until(
            lambda node=node: httpx.get(f"{node.url}{API}/canary:2").status_code == 404,
            f"{node.name} to forget the versions",
        )
    create(n2.url, "canary", tagged("again"))
    wait_until(lambda: versions(n1.url, "canary") == ["$LATEST"], "node1 to see the new one")
    assert alias_version(n1.url, "canary", "live") is None
    assert publish(n1.url, "canary")["Version"] == "1"
