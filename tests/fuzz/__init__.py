"""Property-based tests (Hypothesis) of the parsers that read what callers and image
builders send: code zips, layer tars, eStargz footers and TOCs, image references, function
records and the Lambda API's request bodies.  What every one of them checks: no exception
but the project's own documented ones, nothing written outside the target directory, and
a 4xx in Lambda's error shape for every malformed request.

The example counts come from the Hypothesis profile (``tests/conftest.py``): "ci" by
default, ``HYPOTHESIS_PROFILE=soak`` for a deeper local run.
"""

from __future__ import annotations

from hypothesis import settings

_CI_EXAMPLES = 60


def scaled(n: int) -> int:
    """``n`` examples under the "ci" profile, proportionally more (or fewer) under others:
    for the tests whose examples cost more than a few milliseconds."""
    return max(1, n * settings.default.max_examples // _CI_EXAMPLES)
