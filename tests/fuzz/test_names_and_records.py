"""Image references (``images/reference.py``) and function records as stored in SQLite
and etcd (``functions/store.py``, read by ``cluster/catalog.py``): a reference parses to
one that prints and parses back the same, or is ``InvalidReference``; a record parses, or
is the ``ValueError`` the catalog logs and skips."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from warmstart.functions import FunctionConfig, FunctionRecord
from warmstart.functions.store import record_from_json, record_json
from warmstart.images.errors import InvalidReference
from warmstart.images.reference import Reference

_PIECES = st.sampled_from(
    ["localhost", "localhost:5000", "registry.example:443", "[::1]:5000", "docker.io", "a",
     "python", "library", "/", ":", "@", "sha256:" + "a" * 64, "latest", "-", "_", "..", "é",
     "A", " ", "\n", "x" * 130]
)


@given(st.one_of(st.lists(_PIECES, max_size=6).map("".join), st.text(max_size=40)))
def test_a_reference_round_trips_or_is_invalid(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReference:
        return
    again = Reference.parse(str(ref))
    assert again == ref
    assert "\n" not in str(ref) and " " not in str(ref)


_GOOD = json.loads(
    record_json(FunctionRecord.new("f", FunctionConfig(handler="m.h"), "0" * 64, 1))
)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@given(
    st.sampled_from([None, *_GOOD, *(f"config.{k}" for k in _GOOD["config"])]),
    _VALUES,
)
def test_a_stored_record_parses_or_is_a_value_error(key: str | None, value: Any) -> None:
    doc: Any = json.loads(json.dumps(_GOOD))
    if key is None:
        doc = value
    elif key.startswith("config."):
        doc["config"][key.split(".", 1)[1]] = value
    else:
        doc[key] = value
    with contextlib.suppress(ValueError):
        rec = record_from_json(json.dumps(doc))
        assert isinstance(rec, FunctionRecord)
        assert dataclasses.asdict(rec)  # a record that parsed is a whole one
