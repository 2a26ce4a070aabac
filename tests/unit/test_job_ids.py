"""Jobs in the store: named by a unique id prefix; results as JSON values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmstart.errors import InvalidParameter
from warmstart.functions.store import FunctionStore


@pytest.fixture
def store(tmp_path: Path) -> FunctionStore:
    s = FunctionStore(tmp_path / "data")
    for job_id in ("abcdef01-0000", "abcdef02-0000", "12345678-aaaa"):
        s.db.execute(
            "INSERT INTO jobs(id, function, created, total) VALUES (?, 'f', 0, 1)", (job_id,)
        )
    return s


def test_a_unique_prefix_names_a_job(store: FunctionStore) -> None:
    assert store.resolve_job_id("12345678-aaaa") == "12345678-aaaa"
    assert store.resolve_job_id("123456") == "12345678-aaaa"
    assert store.resolve_job_id("ABCDEF01") == "abcdef01-0000"  # as typed from a screen
    job = store.job("1234567")
    assert job is not None and job["JobId"] == "12345678-aaaa"


def test_unknown_short_and_ambiguous_prefixes(store: FunctionStore) -> None:
    assert store.resolve_job_id("999999") is None
    assert store.job("no-such-job") is None
    with pytest.raises(InvalidParameter, match="at least 6"):
        store.resolve_job_id("12345")
    with pytest.raises(InvalidParameter, match=r"ambiguous \(abcdef01-0000, abcdef02-0000\)"):
        store.resolve_job_id("abcdef")


def test_results_are_json_values(tmp_path: Path) -> None:
    store = FunctionStore(tmp_path / "data")
    payloads = [{"x": 1}, 7, "text", None]
    job_id = store.create_job("f", [json.dumps(p).encode() for p in payloads] + [b"{}"])
    outcomes = [
        (f"{job_id}/0", "succeeded", b'{"y": [1, 2]}', 1),
        (f"{job_id}/1", "succeeded", b"49", 1),
        (f"{job_id}/2", "succeeded", b'"TEXT"', 1),
        (f"{job_id}/3", "failed", b'{"errorMessage": "boom"}', 3),
        (f"{job_id}/4", "succeeded", b"not json \xff", 1),
    ]
    store.record_outcomes(outcomes)
    results = store.job_results(job_id[:8])
    assert [r["result"] for r in results] == [
        {"y": [1, 2]},
        49,
        "TEXT",
        {"errorMessage": "boom"},
        "not json \ufffd",  # not JSON: kept as text
    ]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    event = store.event(f"{job_id}/1")
    assert event is not None and event["result"] == 49
