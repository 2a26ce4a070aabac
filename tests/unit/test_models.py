"""Validation of function configuration and names."""

from __future__ import annotations

import pytest

from warmstart.api.lambda_api import function_name
from warmstart.errors import InvalidParameter
from warmstart.functions import FunctionConfig, FunctionRecord


def test_defaults_are_lambdas() -> None:
    cfg = FunctionConfig(handler="app.handler")
    assert (cfg.memory_mb, cfg.timeout_s, cfg.network) == (128, 3, "none")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"handler": "nodot"},
        {"handler": "a.b", "memory_mb": 64},
        {"handler": "a.b", "memory_mb": 10241},
        {"handler": "a.b", "timeout_s": 0},
        {"handler": "a.b", "timeout_s": 901},
        {"handler": "a.b", "runtime": "nodejs20.x"},
        {"handler": "a.b", "environment": {"AWS_REGION": "x"}},
        {"handler": "a.b", "network": "bridge"},
        {"handler": "a.b\n"},  # "$" with match() let a trailing newline through
        {"handler": ["a.b"]},  # a JSON list from UpdateFunctionConfiguration: not a TypeError
        {"handler": 7},
        {"handler": None},
    ],
)
def test_invalid_configs(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidParameter):
        FunctionConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("fn", ("fn", None)),
        ("fn:$LATEST", ("fn", "$LATEST")),
        ("arn:aws:lambda:us-east-1:000000000000:function:fn", ("fn", None)),
        ("arn:aws:lambda:us-east-1:000000000000:function:fn:prod", ("fn", "prod")),
        ("arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Afn", ("fn", None)),
    ],
)
def test_function_names(raw: str, expected: tuple[str, str | None]) -> None:
    assert function_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "a/b", "x" * 65, "a:b:c", "arn:aws:lambda:us-east-1:0:layer:x", "fn\n", "fn%0A"],
)
def test_bad_function_names(raw: str) -> None:
    with pytest.raises(InvalidParameter):
        function_name(raw)


def test_check_name() -> None:
    assert FunctionRecord.check_name("ok-name_1") == "ok-name_1"
    for bad in ("bad name", "name\n", "\nname"):
        with pytest.raises(InvalidParameter):
            FunctionRecord.check_name(bad)


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        ({f"K{i}": "v" for i in range(10_000)}, "exceeded the 4KB limit"),
        ({"BIG": "x" * 200_000}, "exceeded the 4KB limit"),
        ({"A=B": "1"}, "regular expression pattern"),
        ({"A": "1"}, "regular expression pattern"),  # at least two characters
        ({"1ABC": "1"}, "regular expression pattern"),
        ({"AWS_REGION": "eu-west-1"}, "Reserved keys used in this request: AWS_REGION"),
        ({"AWS_SECRET_ACCESS_KEY": "k"}, "AWS_SECRET_ACCESS_KEY"),
        ({"_HANDLER": "x.y"}, "_HANDLER"),
        ({"OK": 1}, "string keys with string values"),
    ],
)
def test_environment_is_validated_as_lambda_does(
    environment: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidParameter, match=reason):
        FunctionConfig(handler="a.b", environment=environment)  # type: ignore[arg-type]


def test_environment_at_the_size_limit_is_accepted() -> None:
    # {"KEY":"…"} in JSON: 2 braces + 5 for "KEY" + 1 colon + 2 quotes around the value.
    FunctionConfig(handler="a.b", environment={"KEY": "v" * (4096 - 10)})
    with pytest.raises(InvalidParameter, match="4KB"):
        FunctionConfig(handler="a.b", environment={"KEY": "v" * (4096 - 9)})


@pytest.mark.parametrize("size", [511, 10241])
def test_ephemeral_storage_range(size: int) -> None:
    with pytest.raises(InvalidParameter, match=r"ephemeralStorage\.size"):
        FunctionConfig(handler="a.b", ephemeral_mb=size)


def test_stored_configs_are_not_validated_again() -> None:
    """A rule added since a function was deployed must not make the node lose it."""
    from warmstart.functions.store import record_from_json, record_json

    rec = FunctionRecord.new("f", FunctionConfig(handler="a.b"), "00", 1)
    raw = record_json(rec).replace('"environment": {}', '"environment": {"A=B": "1"}')
    raw = raw.replace(', "ephemeral_mb": 512', "")
    back = record_from_json(raw)
    assert back.config.environment == {"A=B": "1"}
    assert back.config.ephemeral_mb == 512


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"name": "f"}',
        '{"name": "f", "config": {"handler": "no-dot"}}',  # InvalidParameter before
        '{"name": "f", "config": {"handler": "m.h"}, "image": [1]}',  # AttributeError before
    ],
)
def test_a_record_that_is_not_one_is_a_value_error(text: str) -> None:
    from warmstart.functions.store import record_from_json

    with pytest.raises(ValueError, match="not a function record"):
        record_from_json(text)
