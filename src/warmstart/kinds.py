"""Words every layer shares: a unit of work's QoS class, how an instance started, and
which size limit a request met.

A leaf (standard library only), so the sandbox, the QoS manager, the worker and the API
can all speak of them without importing one another.
"""

from __future__ import annotations

import enum


class QoSClass(enum.Enum):
    """Which class a unit of work runs in (differentiated SLO, after Koordinator)."""

    LS = "ls"  # latency-sensitive: synchronous invocations (and zygotes)
    BE = "be"  # best-effort: Event invocations and job items, on reclaimed capacity

    @classmethod
    def parse(cls, text: str) -> QoSClass:
        """``ls``/``be`` (any case), as a ``warmstart:qos`` tag writes it."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"QoS class must be 'ls' or 'be', not {text!r}") from None


class StartKind(enum.Enum):
    """How the instance that served an invocation came to be (``X-Warmstart-Start``)."""

    WARM = "warm"  # an idle instance, thawed if it was frozen
    COLD = "cold"  # a fresh interpreter in a fresh sandbox
    FORK = "fork"  # forked from a zygote that had imported the function's packages


class SizeLimit(enum.Enum):
    """Which of the node's size limits a request body met (the label of
    ``warmstart_requests_too_large_total``; ``Settings`` holds the sizes)."""

    INVOKE = "invoke"  # a synchronous invocation's payload (Invoke, /run)
    EVENT = "event"  # an Event invocation's payload
    JOB = "job"  # a job's whole input
    JOB_INPUT = "job_input"  # one item of a job
    CODE = "code"  # a deploy carrying a zip (CreateFunction, UpdateFunctionCode)
    CONTROL = "control"  # any other API request with a body
    BUNDLE = "bundle"  # a code bundle sent by a peer (cluster mode)
