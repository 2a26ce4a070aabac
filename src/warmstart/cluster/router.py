"""Where an invocation runs: placement from the state nodes publish, and the one-hop forward.

Placement, for a synchronous invocation arriving at any node, best first:

1. a node with an idle (warm or frozen) instance of the function's current revision --
   this node first, without looking further, when it has one (the warm path never
   reads anything but its own pools) -- then a node whose instances of it are all busy
   at the moment it published (under steady load an instance is busy half the time:
   it is warm again within a call, where any other node would start cold);
2. a node with a zygote whose packages the function needs (a fork, milliseconds);
3. a node that has the function's artifacts cached -- its packages installed, its image
   mounted -- scored like Kubernetes' ImageLocality: each cached artifact counts its
   size times the fraction of nodes holding it, so an artifact every node has adds
   little and popular functions do not all pile onto one node;
4. the least loaded node (in-flight invocations per CPU).

Ties go to this node (no hop).  A function with reserved concurrency has it split
across the live nodes (``share``): a node at its share sends the call to a node with
room.  The state of other nodes is at most ``publish_interval_s`` old; a wrong guess
costs a cold start, never an error.

Forwarding is one hop over a pooled keep-alive connection (httpx), the request body
streamed through; the target runs the call itself (``X-Warmstart-Forwarded``) and its
headers come back unchanged with ``X-Warmstart-Node`` naming it.  A target that cannot
be reached before the request is sent is skipped (the call runs here); one that dies
mid-request is a clear 502, never a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from warmstart.cluster.membership import Member, Membership
from warmstart.functions import FunctionRecord

log = logging.getLogger(__name__)

PLACEMENT_TTL_S = 0.25
FORWARDED_HEADER = "X-Warmstart-Forwarded"
NODE_HEADER = "X-Warmstart-Node"
MiB = 1 << 20


@dataclass(frozen=True)
class Placement:
    node: str  # the chosen node's name
    url: str
    local: bool
    reason: str  # warm | zygote | cached | load | share | self


def share(reserved: int, names: list[str], me: str) -> int:
    """This node's part of a cluster-wide reserved concurrency: the limit split evenly
    over the live nodes by name, the remainder to the first ones."""
    if me not in names:
        names = sorted([*names, me])
    n = len(names)
    index = names.index(me)
    return reserved // n + (1 if index < reserved % n else 0)


def _function_state(member: Member, rec: FunctionRecord) -> dict[str, Any]:
    state = member.state.get("functions", {}).get(rec.name)
    if not isinstance(state, dict) or state.get("revision") != rec.revision:
        return {}
    return state


def zygote_cover(member: Member, rec: FunctionRecord) -> float:
    """The fraction of the function's packages the node's best zygote has imported."""
    want = set(rec.packages)
    if rec.image is not None:
        return 1.0 if rec.image.digest in member.state.get("image_zygotes", ()) else 0.0
    if not want:
        return 1.0 if member.state.get("zygotes") else 0.0
    best = 0.0
    for packages in member.state.get("zygotes", ()):
        have = set(packages)
        if have and have <= want:
            best = max(best, len(have) / len(want))
    return best


def locality(member: Member, rec: FunctionRecord, members: list[Member]) -> float:
    """ImageLocality-style score: the sum over cached artifacts of size * (nodes holding it / nodes)."""
    total = len(members) or 1
    score = 0.0
    if rec.image is not None:
        holders = sum(1 for m in members if rec.image.digest in m.state.get("images", {}))
        if rec.image.digest in member.state.get("images", {}):
            score += rec.image.size * holders / total
        return score
    for pin in rec.packages:
        if pin in member.state.get("packages", ()):
            holders = sum(1 for m in members if pin in m.state.get("packages", ()))
            score += 10 * MiB * holders / total  # a package counts as 10 MiB (sizes unknown)
    if rec.code_sha256 in member.state.get("code", ()):
        score += rec.code_size
    return score


def load(member: Member) -> float:
    state = member.state
    cpus = float(state.get("capacity", {}).get("cpus") or 1.0)
    return float(state.get("inflight", 0)) / cpus


class Router:
    def __init__(
        self,
        membership: Membership,
        local_idle: Callable[[FunctionRecord], bool],
        local_inflight: Callable[[FunctionRecord], int],
        *,
        placement_ttl_s: float = PLACEMENT_TTL_S,
    ) -> None:
        self.membership = membership
        self.local_idle = local_idle
        self.local_inflight = local_inflight
        self.forwarded = 0
        self.kept = 0
        # A remote placement is reused for a moment: the state it was made from is up to a
        # publish interval old anyway, and scoring every node on every call would cost
        # the forwarded call more than the decision is worth.
        self._recent: dict[tuple[str, int], tuple[float, Placement]] = {}
        self.placement_ttl_s = placement_ttl_s

    def place(self, rec: FunctionRecord) -> Placement:
        me = self.membership.name
        if self.local_idle(rec) and self._has_room_here(rec):
            self.kept += 1
            return Placement(me, self.membership.settings.advertise, True, "warm")
        key = (rec.name, rec.revision)
        now = time.monotonic()
        recent = self._recent.get(key)
        if recent is not None and now - recent[0] < self.placement_ttl_s:
            placement = recent[1]
            if placement.local:
                self.kept += 1
            else:
                self.forwarded += 1
            return placement
        placement = self._place(rec)
        if len(self._recent) > 4096:
            self._recent.clear()
        self._recent[key] = (now, placement)
        return placement

    def _place(self, rec: FunctionRecord) -> Placement:
        me = self.membership.name
        members = self.membership.live()
        if len(members) <= 1:
            self.kept += 1
            return Placement(me, self.membership.settings.advertise, True, "self")
        names = [m.name for m in members]
        candidates = [m for m in members if self._has_room(m, rec, names)]
        if not candidates:
            # Every node is at its share: this node queues the call (or answers 429).
            self.kept += 1
            return Placement(me, self.membership.settings.advertise, True, "share")

        def key(m: Member) -> tuple[float, float, float, float, int]:
            fn = _function_state(m, rec)
            warm = 2.0 if fn.get("idle", 0) > 0 else 1.0 if fn.get("busy", 0) > 0 else 0.0
            return (warm, zygote_cover(m, rec), locality(m, rec, members), -load(m), m.name == me)

        best = max(candidates, key=key)
        k = key(best)
        reason = "warm" if k[0] else "zygote" if k[1] else "cached" if k[2] else "load"
        if best.name == me:
            self.kept += 1
            return Placement(me, best.url, True, reason)
        self.forwarded += 1
        return Placement(best.name, best.url, False, reason)

    def _has_room_here(self, rec: FunctionRecord) -> bool:
        if rec.reserved_concurrency is None:
            return True
        names = [m.name for m in self.membership.live()]
        return self.local_inflight(rec) < share(
            rec.reserved_concurrency, names, self.membership.name
        )

    def _has_room(self, m: Member, rec: FunctionRecord, names: list[str]) -> bool:
        if rec.reserved_concurrency is None:
            return True
        limit = share(rec.reserved_concurrency, names, m.name)
        if m.name == self.membership.name:
            return self.local_inflight(rec) < limit
        return int(_function_state(m, rec).get("inflight", 0)) < limit


HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def forward_headers(headers: list[tuple[str, str]], origin: str) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    out.append((FORWARDED_HEADER, origin))
    return out


async def body_chunks(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in stream:
        if chunk:
            yield chunk
