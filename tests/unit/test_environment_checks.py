"""The environment checks in tests/conftest.py: a missing prerequisite skips a test with
its reason, or fails it under WARMSTART_TEST_STRICT (as scripts/test runs in CI)."""

from __future__ import annotations

import pytest

from tests.conftest import STRICT_ENV, require, wait_until

INNER = """
from tests.conftest import needs, require

@needs(False, "no frobnicator here")
def test_marked():
    raise AssertionError("must not run")

def test_called():
    require(False, "no widget here")
    raise AssertionError("must not run")

@needs(True, "there is one")
def test_available():
    require(True, "there is one too")
"""


@pytest.mark.parametrize("value", ["", "0"])
def test_require_skips_with_the_reason_by_default(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(STRICT_ENV, value)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        require(False, "no frobnicator")
    require(True, "no frobnicator")


def test_require_fails_with_the_reason_when_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        require(False, "no frobnicator")
    require(True, "no frobnicator")


@pytest.mark.parametrize("strict", [False, True])
def test_needs_mark_and_require_in_a_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    monkeypatch.setenv(STRICT_ENV, "1" if strict else "")
    # The hook that reads the mark lives in tests/conftest.py: load it in the inner run.
    pytester.makeconftest("from tests.conftest import pytest_configure, pytest_runtest_setup\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-rsfE", "-p", "no:cacheprovider")
    if strict:
        # The mark fails before the test runs (a setup error), the call fails the test.
        result.assert_outcomes(passed=1, failed=1, errors=1)
    else:
        result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*no frobnicator here*", "*no widget here*"])
    result.stdout.no_fnmatch_line("*must not run*")


def test_wait_until_returns_the_value_or_fails_naming_what_it_waited_for() -> None:
    values = iter([0, [], "ready"])
    assert wait_until(lambda: next(values), "a value", timeout=10, interval=0) == "ready"
    with pytest.raises(AssertionError, match=r"waiting for the moon \(got None\)"):
        wait_until(lambda: None, "the moon", timeout=0)
