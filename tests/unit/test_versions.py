"""Versions and aliases below the API: the alias record's rules and routing, the SQLite
store's tables (made on an existing state.db too) and counter, and the concurrency a
function's versions share in their pools."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from tests.unit.test_pool import Node, counts, quiet_cache, run, until
from warmstart.errors import InvalidParameter, NotFound, TooManyRequests
from warmstart.functions import FunctionConfig, FunctionRecord, FunctionStore
from warmstart.functions.models import AliasRecord
from warmstart.functions.store import record_json
from warmstart.worker.pool import ConcurrencyGroup, FunctionPool, HandlerCache


def record(name: str = "fn") -> FunctionRecord:
    return FunctionRecord.new(name, FunctionConfig(handler="h.handler"), "ab" * 32, 10)


# -- the alias record ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "123"}, "regular expression"),
        ({"name": "a b"}, "regular expression"),
        ({"name": "x" * 129}, "regular expression"),
        ({"function_version": "v1"}, "functionVersion"),
        ({"weights": (("2", 0.1), ("3", 0.1))}, "cannot be greater than 1"),
        ({"weights": (("$LATEST", 0.5),)}, "not \\$LATEST"),
        ({"weights": (("2", 1.5),)}, "between 0.0 and 1.0"),
        ({"weights": (("2", -0.1),)}, "between 0.0 and 1.0"),
        ({"weights": (("1", 0.5),)}, "another one"),
        ({"function_version": "$LATEST", "weights": (("2", 0.5),)}, "more than 1 version"),
    ],
)
def test_alias_rules_are_lambdas(kwargs: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {"function": "fn", "name": "live", "function_version": "1"}
    fields.update(kwargs)
    with pytest.raises(InvalidParameter, match=match):
        AliasRecord(**fields)  # type: ignore[arg-type]


def test_an_alias_routes_by_its_weight_and_round_trips() -> None:
    alias = AliasRecord("fn", "live", "1", "d", (("2", 0.25),))
    assert [alias.pick(d) for d in (0.0, 0.2499, 0.25, 0.9999)] == ["2", "2", "1", "1"]
    assert AliasRecord("fn", "all", "1", weights=(("2", 1.0),)).pick(0.9999) == "2"
    assert AliasRecord("fn", "none", "1", weights=(("2", 0.0),)).pick(0.0) == "1"
    assert alias.versions() == ("1", "2")
    assert AliasRecord.from_json(alias.to_json()) == alias
    with pytest.raises(ValueError, match="not an alias"):
        AliasRecord.from_json('{"function": "fn", "name": "7", "function_version": "1"}')


def test_a_version_is_a_snapshot_and_publishing_compares_what_runs() -> None:
    latest = record().next_revision(reserved_concurrency=4)
    v1 = latest.publish(1, "first")
    assert (v1.version, v1.config.description, v1.reserved_concurrency) == ("1", "first", None)
    assert v1.revision_id != latest.revision_id and v1.published and not latest.published
    assert v1.same_deployment(latest)  # the description and concurrency are not compared
    assert not v1.same_deployment(latest.next_revision(config=latest.config.updated(timeout_s=9)))
    assert not v1.same_deployment(latest.next_revision(code_sha256="cd" * 32))


# -- the SQLite store ----------------------------------------------------------------------------
def test_an_existing_state_db_gets_the_new_tables_and_keeps_its_functions(tmp_path: Path) -> None:
    old = record("old")
    raw = json.loads(record_json(old))
    del raw["version"]  # written before versions existed
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("CREATE TABLE functions (name TEXT PRIMARY KEY, record TEXT NOT NULL)")
    db.execute("INSERT INTO functions VALUES (?, ?)", ("old", json.dumps(raw)))
    db.commit()
    db.close()

    store = FunctionStore(tmp_path)
    try:
        [loaded] = store.load_all()
        assert loaded.version == "$LATEST" and loaded.name == "old"
        v1 = store.publish("old", lambda n: loaded.publish(n, None))
        v2 = store.publish("old", lambda n: loaded.publish(n, None))
        assert (v1.version, v2.version) == ("1", "2")
        store.delete_version("old", "2")
        with pytest.raises(NotFound):
            store.delete_version("old", "2")
        assert store.publish("old", lambda n: loaded.publish(n, None)).version == "3"
        store.put_alias(AliasRecord("old", "live", "1"), create=True)
        with pytest.raises(NotFound):
            store.publish("missing", lambda n: loaded.publish(n, None))
        assert [v.version for v in store.load_versions()] == ["1", "3"]
        assert [a.name for a in store.load_aliases()] == ["live"]
        # The whole function goes with its versions, aliases and counter.
        store.delete("old")
        store.insert(old)
        assert list(store.load_versions()) == [] and list(store.load_aliases()) == []
        assert store.publish("old", lambda n: old.publish(n, None)).version == "1"
    finally:
        store.close()


# -- concurrency shared by a function's versions -------------------------------------------------
def pools(node: Node, cache: HandlerCache, limit: int) -> tuple[FunctionPool, FunctionPool]:
    group = ConcurrencyGroup(limit)
    make = node.start
    one = FunctionPool("f", 1, limit, 2, make, node.destroy, cache, version="1", group=group)
    two = FunctionPool("f", 1, limit, 2, make, node.destroy, cache, version="2", group=group)
    return one, two


def test_versions_share_the_functions_limit() -> None:
    async def main() -> None:
        node = Node()
        cache = quiet_cache()
        one, two = pools(node, cache, limit=1)
        a, _ = await one.acquire()
        # Version 2 waits while version 1's invocation holds the only slot...
        waiting = asyncio.ensure_future(two.acquire())
        await until(lambda: counts(two) == (0, 0, 0, 1), "version 2 to queue")
        # ...and its instance starts once that invocation ends: the released instance
        # of version 1 gives its slot up, as version 1 has no waiter of its own.
        one.release(a)
        b, cold = await waiting
        assert cold and b is not a and a in node.destroyed
        assert counts(one) == (0, 0, 0, 0)
        two.release(b)
        # An idle instance of another version gives its slot to a cold start.
        c, cold = await one.acquire()
        assert cold and b in node.destroyed and counts(two) == (0, 0, 0, 0)
        # With the group full and nothing idle elsewhere, the queue fills, then 429.
        queued = [asyncio.ensure_future(two.acquire()) for _ in range(2)]
        await until(lambda: counts(two)[3] == 2, "two waiters")
        with pytest.raises(TooManyRequests):
            await two.acquire()
        one.discard(c)
        d, _ = await queued[0]
        two.release(d)
        e, cold = await queued[1]
        assert e is d and not cold

    run(main)


def test_a_retired_version_stops_counting() -> None:
    async def main() -> None:
        node = Node()
        one, two = pools(node, quiet_cache(), limit=1)
        a, _ = await one.acquire()
        one.retire()  # e.g. version 1 deleted: its busy instance no longer counts
        b, cold = await two.acquire()
        assert cold and b is not a

    run(main)
