"""The QoS policy's formulas (pure functions, no system access)."""

from __future__ import annotations

import dataclasses

import pytest

from warmstart.qos.policy import (
    DEFAULT_CONFIG,
    BECPUSample,
    BEUsage,
    NodeSample,
    QoSConfig,
    Reclaimed,
    be_admission,
    be_cfs_quota_us,
    be_cpu_idle,
    be_cpu_limit,
    be_cpuset_cores,
    be_cpuset_list,
    cpu_satisfaction_evictions,
    effective_threshold,
    ewma,
    is_stale,
    ls_burst,
    memory_evictions,
    next_be_cpu,
    next_cpuset,
    reclaimed,
    smooth,
)

GiB = 1 << 30
# Koordinator's plain percentages, without the small-node scaling of the defaults.
PLAIN = QoSConfig(headroom_exempt_cores=0.0)


def node(**kw: float) -> NodeSample:
    """A 2-core, 4 GiB node at t=100 with LS 0.4 cores / 1 GiB, BE 0.2 / 0.5 GiB,
    system 0.1 cores / 0.25 GiB, unless overridden."""
    base: dict[str, float] = dict(
        timestamp=100.0,
        capacity_cpus=2.0,
        capacity_memory_bytes=4 * GiB,
        node_cpu_used=0.7,
        node_memory_used=int(1.75 * GiB),
        ls_cpu_used=0.4,
        ls_memory_used=1 * GiB,
        be_cpu_used=0.2,
        be_memory_used=GiB // 2,
    )
    base.update(kw)
    return NodeSample(**base)  # type: ignore[arg-type]


# -- config ------------------------------------------------------------------------


def test_defaults_are_koordinators_scaled_to_small_nodes() -> None:
    c = QoSConfig()
    assert (c.cpu_reclaim_threshold, c.memory_reclaim_threshold) == (0.60, 0.65)
    assert c.be_cpu_suppress_threshold == 0.65
    assert (c.memory_evict_upper, c.memory_evict_lower) == (0.70, 0.68)
    assert c.be_cpu_usage_threshold == 0.90
    assert c.cpuset_grow_step == 0.10
    assert c.be_min_cpu_cores == 1
    assert c.ls_burst_pool_threshold == 0.50
    # BE relies on the idle class; the limit is enforced only when asked for.
    assert c.be_cpu_policy == "none" and c.be_sched_idle is False
    assert c.be_cfs_period_us == 100_000
    assert c.headroom_exempt_cores == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cpu_reclaim_threshold = 0.9  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw",
    [
        {"cpu_reclaim_threshold": 1.5},
        {"memory_evict_upper": -0.1},
        {"memory_evict_lower": 0.8, "memory_evict_upper": 0.7},
        {"be_cpu_satisfaction_lower": 0.9, "be_cpu_satisfaction_upper": 0.8},
        {"smoothing_alpha": 0.0},
        {"stale_after_s": 0.0},
        {"be_min_cpu_cores": -1},
        {"reserved_memory_bytes": -1},
        {"be_cpu_policy": "throttle"},
        {"be_cfs_period_us": 500},
        {"be_cfs_period_us": 2_000_000},
        {"headroom_exempt_cores": -1.0},
        {"be_cpu_request": -0.1},
        {"be_memory_request_mb": -1},
    ],
)
def test_config_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QoSConfig(**kw)  # type: ignore[arg-type]


# -- samples and smoothing --------------------------------------------------------------


def test_system_usage_is_what_ls_and_be_do_not_explain() -> None:
    s = node()
    assert s.system_cpu_used == pytest.approx(0.1)
    assert s.system_memory_used == GiB // 4
    # Measurement noise never makes it negative.
    s = node(node_cpu_used=0.5, node_memory_used=GiB)
    assert s.system_cpu_used == 0.0
    assert s.system_memory_used == 0
    assert node(node_cpu_used=1.0).cpu_busy_fraction == 0.5
    assert node(node_cpu_used=3.0).cpu_busy_fraction == 1.0


def test_ewma_rises_fast_and_falls_slowly() -> None:
    c = QoSConfig(smoothing_alpha=0.2, smoothing_alpha_rise=0.6)
    assert ewma(None, 5.0, c) == 5.0
    assert ewma(1.0, 2.0, c) == pytest.approx(1.6)
    assert ewma(2.0, 1.0, c) == pytest.approx(1.8)
    assert ewma(1.0, 1.0, c) == 1.0
    # alpha 1 means no smoothing at all.
    plain = QoSConfig(smoothing_alpha=1.0, smoothing_alpha_rise=1.0)
    assert ewma(3.0, 1.0, plain) == 1.0


def test_smooth_averages_usage_and_keeps_newest_timestamp() -> None:
    c = QoSConfig(smoothing_alpha=0.5, smoothing_alpha_rise=0.5)
    first = node()
    assert smooth(None, first, c) is first
    second = node(timestamp=101.0, ls_cpu_used=0.8, ls_memory_used=3 * GiB, node_cpu_used=1.1)
    out = smooth(first, second, c)
    assert out.timestamp == 101.0
    assert out.ls_cpu_used == pytest.approx(0.6)
    assert out.ls_memory_used == 2 * GiB
    assert out.node_cpu_used == pytest.approx(0.9)
    assert out.capacity_cpus == 2.0


# -- reclaimed ------------------------------------------------------------------------


def test_reclaimed_is_threshold_minus_ls_minus_system() -> None:
    r = reclaimed(node(), PLAIN, now=100.5)
    # CPU: 2 * 0.60 - 0.4 - 0.1 = 0.7; memory: 4 GiB * 0.65 - 1 GiB - 0.25 GiB.
    assert r.cpu_cores == pytest.approx(0.7)
    assert r.memory_bytes == int(4 * GiB * 0.65 - GiB - GiB / 4)
    assert not r.stale


def test_thresholds_scale_to_small_nodes() -> None:
    # Koordinator's headroom applies to the cores beyond the first.
    assert effective_threshold(0.60, 2.0) == pytest.approx(0.80)
    assert effective_threshold(0.65, 2.0) == pytest.approx(0.825)
    assert effective_threshold(0.65, 8.0) == pytest.approx(1 - 0.35 * 7 / 8)
    assert effective_threshold(0.60, 64.0) == pytest.approx(1 - 0.4 * 63 / 64)
    assert effective_threshold(0.60, 1.0) == 1.0  # nothing beyond the exempt core
    assert effective_threshold(0.60, 0.5) == 1.0
    assert effective_threshold(0.60, 0.0) == 0.60  # no capacity: left as it is
    assert effective_threshold(0.60, 2.0, PLAIN) == pytest.approx(0.60)
    two = QoSConfig(headroom_exempt_cores=2.0)
    assert effective_threshold(0.60, 4.0, two) == pytest.approx(0.80)
    # Larger nodes get closer to the plain value, never past it.
    values = [effective_threshold(0.60, float(c)) for c in (2, 4, 8, 16, 32, 64, 128)]
    assert values == sorted(values, reverse=True) and values[-1] > 0.60


def test_default_reclaimed_on_a_two_core_node() -> None:
    # 2 * 0.80 - 0.4 - 0.1: about two thirds of the 1.6 cores LS leaves idle, where
    # the plain 60% would lend 0.7 (44%) by construction.
    assert reclaimed(node(), now=100.0).cpu_cores == pytest.approx(1.1)


def test_reclaimed_ignores_be_usage() -> None:
    # BE's own use is what reclaimed capacity is for; it must not shrink it.
    a = reclaimed(node(be_cpu_used=0.0, node_cpu_used=0.5), now=100.0)
    b = reclaimed(node(be_cpu_used=0.5, node_cpu_used=1.0), now=100.0)
    assert a == b


def test_reclaimed_uses_the_reservation_when_it_exceeds_system_usage() -> None:
    c = QoSConfig(reserved_cpu_cores=0.3, reserved_memory_bytes=GiB)
    r = reclaimed(node(), c, now=100.0)
    assert r.cpu_cores == pytest.approx(2 * 0.8 - 0.4 - 0.3)
    assert r.memory_bytes == int(4 * GiB * 0.65 - GiB - GiB)
    # A system using more than the reservation counts as used.
    r = reclaimed(node(node_cpu_used=1.2), c, now=100.0)
    assert r.cpu_cores == pytest.approx(2 * 0.8 - 0.4 - 0.6)


def test_reclaimed_never_negative() -> None:
    r = reclaimed(node(ls_cpu_used=1.8, node_cpu_used=2.0, ls_memory_used=3 * GiB), now=100.0)
    assert r == Reclaimed(0.0, 0)


def test_stale_metrics_withdraw_everything() -> None:
    c = QoSConfig(stale_after_s=5.0)
    assert not is_stale(node(), c, now=105.0)  # exactly at the timeout is still fresh
    assert is_stale(node(), c, now=105.01)
    r = reclaimed(node(), c, now=106.0)
    assert r == Reclaimed(0.0, 0, stale=True)
    assert be_cpu_limit(node(), c, now=106.0) == 0.0


# -- BE CPU suppress --------------------------------------------------------------------


def test_be_cpu_limit() -> None:
    # 2 * 0.65 - 0.4 - 0.1
    assert be_cpu_limit(node(), PLAIN, now=100.0) == pytest.approx(0.8)
    assert be_cpu_limit(node(ls_cpu_used=1.5, node_cpu_used=1.8), PLAIN, now=100.0) == 0.0
    c = QoSConfig(reserved_cpu_cores=0.5, headroom_exempt_cores=0.0)
    assert be_cpu_limit(node(), c, now=100.0) == pytest.approx(0.4)
    # The default scales the threshold to the 2-core node: 2 * 0.825 - 0.4 - 0.1.
    assert be_cpu_limit(node(), now=100.0) == pytest.approx(1.15)


def test_be_cpu_idle_is_what_ls_and_the_system_leave() -> None:
    assert be_cpu_idle(node(), now=100.0) == pytest.approx(1.5)  # 2 - 0.4 - 0.1
    c = QoSConfig(reserved_cpu_cores=0.5)
    assert be_cpu_idle(node(), c, now=100.0) == pytest.approx(1.1)
    busy = node(ls_cpu_used=1.9, be_cpu_used=0.0, node_cpu_used=2.2)  # system 0.3
    assert be_cpu_idle(busy, now=100.0) == 0.0
    assert be_cpu_idle(node(), now=106.0) == 0.0  # stale


# -- BE admission -------------------------------------------------------------------------


def test_admission_counts_each_instance_s_cpu_request() -> None:
    r = Reclaimed(1.1, 8 * GiB)
    # 1.1 reclaimed cores / 0.25 per instance.
    assert be_admission(r, 0, 0, most=8) == 4
    assert be_admission(r, 0, 0, QoSConfig(be_cpu_request=0.5), most=8) == 2
    assert be_admission(r, 0, 0, most=3) == 3  # never above the cap
    assert be_admission(Reclaimed(0.0, 8 * GiB), 0, 0, most=8) == 0
    assert be_admission(Reclaimed(0.0, 8 * GiB), 0, 0, most=8, least=1) == 1  # the floor
    assert be_admission(Reclaimed(1.0, 8 * GiB), 0, 0, most=8) == 4  # 1.0 / 0.25, not 3
    # A zero request means the CPU does not limit admission.
    assert be_admission(r, 0, 0, QoSConfig(be_cpu_request=0.0), most=6) == 6


def test_admission_within_reclaimed_memory() -> None:
    # 600 MB reclaimed, two instances running with 512 MB: 88 MB left, not one more.
    r = Reclaimed(2.0, 600 << 20)
    assert be_admission(r, 2, 1024, most=8) == 2
    assert be_admission(Reclaimed(2.0, 1400 << 20), 2, 1024, most=8) == 4  # 376 MB: 2 more
    assert be_admission(Reclaimed(2.0, 300 << 20), 0, 0, most=8) == 2
    per = QoSConfig(be_memory_request_mb=0)
    assert be_admission(Reclaimed(2.0, 0), 0, 0, per, most=8) == 8


def test_cpuset_shrinks_at_once() -> None:
    c = QoSConfig(be_min_cpu_cores=2)
    assert next_cpuset(14, 4, 16, c) == 4
    assert next_cpuset(14, 0, 16, c) == 2  # never below the minimum
    assert next_cpuset(2, 1, 2) == 1
    assert next_cpuset(5, 5, 16) == 5


def test_cpuset_grows_slowly() -> None:
    # 10% of 16 cores = 1.6 -> one whole core per step.
    steps = [4]
    while steps[-1] < 12:
        steps.append(next_cpuset(steps[-1], 12, 16))
    assert steps == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    # 10% of 20 = 2 cores per step; 10% of 30 = 3 (not 4 from float noise).
    assert next_cpuset(4, 20, 20) == 6
    assert next_cpuset(4, 30, 30) == 7
    # On a 2-core node growth is one core (at least one core per step).
    assert next_cpuset(1, 2, 2) == 2
    # Growth never overshoots the target.
    assert next_cpuset(4, 5, 40) == 5


def test_cpuset_bounds() -> None:
    assert next_cpuset(0, 0, 2) == 1  # at least 1 core on a 2-core node
    assert next_cpuset(1, 9, 2) == 2  # never above the node
    assert next_cpuset(7, 3, 2) == 2  # a current value beyond the node is clamped
    assert next_cpuset(0, 0, 1, QoSConfig(be_min_cpu_cores=2)) == 1  # minimum > node
    assert next_cpuset(0, 0, 4, QoSConfig(be_min_cpu_cores=0)) == 0


def test_be_cpuset_cores_rounds_up_within_bounds() -> None:
    assert be_cpuset_cores(0.8, 2) == 1
    assert be_cpuset_cores(1.2, 2) == 2
    assert be_cpuset_cores(1.0000000001, 4) == 1
    assert be_cpuset_cores(0.0, 2) == 1
    assert be_cpuset_cores(9.0, 2) == 2


def test_be_cpuset_list_takes_the_top_cores() -> None:
    assert be_cpuset_list(1, 2) == "1"
    assert be_cpuset_list(2, 2) == "0-1"
    assert be_cpuset_list(3, 8) == "5-7"
    assert be_cpuset_list(0, 2) == ""
    assert be_cpuset_list(5, 2) == "0-1"


def test_quota_limit_shrinks_at_once_and_grows_by_a_tenth_of_the_node() -> None:
    assert next_be_cpu(1.2, 0.3, 2.0) == pytest.approx(0.3)
    assert next_be_cpu(0.3, 1.2, 2.0) == pytest.approx(0.5)
    assert next_be_cpu(1.1, 1.2, 2.0) == pytest.approx(1.2)
    assert next_be_cpu(0.5, 0.0, 2.0) == pytest.approx(DEFAULT_CONFIG.be_min_quota_cores)
    assert next_be_cpu(0.5, 5.0, 2.0) == pytest.approx(0.7)
    assert next_be_cpu(3.0, 5.0, 2.0) == pytest.approx(2.0)


def test_be_cfs_quota() -> None:
    assert be_cfs_quota_us(0.8) == 80_000
    assert be_cfs_quota_us(0.0) == 10_000  # the 0.1-core floor
    assert be_cfs_quota_us(0.0, QoSConfig(be_min_quota_cores=0.0)) == 1000  # kernel minimum
    assert be_cfs_quota_us(1.5, period_us=50_000) == 75_000


# -- LS burst ---------------------------------------------------------------------------


def test_ls_burst_when_throttled_and_pool_quiet() -> None:
    assert ls_burst(True, 0.3, 50_000) == 50_000
    # The kernel caps burst at the quota, so a larger ratio is capped too.
    assert ls_burst(True, 0.3, 50_000, QoSConfig(ls_burst_ratio=10.0)) == 50_000
    assert ls_burst(True, 0.3, 50_000, QoSConfig(ls_burst_ratio=0.5)) == 25_000


def test_ls_burst_withdrawn_when_pool_busy() -> None:
    assert ls_burst(True, 0.5, 50_000, current_us=50_000) == 0
    assert ls_burst(False, 0.9, 50_000, current_us=50_000) == 0


def test_ls_burst_kept_when_not_throttled_and_none_without_quota() -> None:
    assert ls_burst(False, 0.2, 50_000, current_us=30_000) == 30_000
    assert ls_burst(False, 0.2, 50_000) == 0
    assert ls_burst(False, 0.2, 20_000, current_us=50_000) == 20_000  # quota was lowered
    assert ls_burst(True, 0.1, None) == 0
    assert ls_burst(True, 0.1, -1) == 0


# -- memory eviction -----------------------------------------------------------------------

CAP = 100 * GiB


def test_no_memory_eviction_below_the_upper_threshold() -> None:
    be = [BEUsage("a", memory_bytes=10 * GiB)]
    assert memory_evictions(69 * GiB, CAP, be) == []
    assert memory_evictions(70 * GiB, CAP, be) == ["a"]  # at the threshold counts
    assert memory_evictions(80 * GiB, 0, be) == []


def test_memory_eviction_order_lowest_priority_then_largest() -> None:
    be = [
        BEUsage("hi-big", priority=5, memory_bytes=20 * GiB),
        BEUsage("lo-small", priority=0, memory_bytes=1 * GiB),
        BEUsage("lo-big", priority=0, memory_bytes=3 * GiB),
        BEUsage("mid", priority=1, memory_bytes=2 * GiB),
    ]
    # 90 GiB used, target below 68 GiB: must free > 22 GiB -> everything but nothing
    # left over; order is the eviction order.
    assert memory_evictions(90 * GiB, CAP, be) == ["lo-big", "lo-small", "mid", "hi-big"]


def test_memory_eviction_stops_below_the_lower_bound() -> None:
    be = [
        BEUsage("a", memory_bytes=1 * GiB),
        BEUsage("b", memory_bytes=2 * GiB),
        BEUsage("c", memory_bytes=3 * GiB),
    ]
    # 71 GiB -> must get below 68 GiB: c (3 GiB) leaves 68 GiB, not below; b goes too.
    assert memory_evictions(71 * GiB, CAP, be) == ["c", "b"]
    # 72.5 GiB: c -> 69.5, b -> 67.5 < 68: stop.
    assert memory_evictions(int(72.5 * GiB), CAP, be) == ["c", "b"]
    # 70.5 GiB: c alone brings it to 67.5.
    assert memory_evictions(int(70.5 * GiB), CAP, be) == ["c"]


def test_memory_eviction_skips_instances_using_nothing_and_ties_are_stable() -> None:
    be = [
        BEUsage("idle", priority=-1, memory_bytes=0),
        BEUsage("y", memory_bytes=4 * GiB),
        BEUsage("x", memory_bytes=4 * GiB),
    ]
    assert memory_evictions(71 * GiB, CAP, be) == ["x"]
    assert memory_evictions(95 * GiB, CAP, []) == []


def test_memory_eviction_with_custom_thresholds() -> None:
    c = QoSConfig(memory_evict_upper=0.5, memory_evict_lower=0.4)
    be = [BEUsage(str(i), memory_bytes=5 * GiB) for i in range(4)]
    assert memory_evictions(54 * GiB, CAP, be, c) == ["0", "1", "2"]


# -- CPU satisfaction eviction --------------------------------------------------------


def history(
    seconds: int, granted: float, requested: float, used: float, start: float = 0.0
) -> list[BECPUSample]:
    return [BECPUSample(start + t, granted, requested, used) for t in range(seconds + 1)]


BE_JOBS = [
    BEUsage("lo-busy", priority=0, cpu_used=0.5, cpu_request=1.0),
    BEUsage("lo-quiet", priority=0, cpu_used=0.1, cpu_request=1.0),
    BEUsage("hi", priority=3, cpu_used=0.9, cpu_request=1.0),
]


def test_starved_busy_be_is_evicted_until_satisfaction_reaches_the_upper_bound() -> None:
    # granted 1 core, requested 3: satisfaction 0.33 < 0.6; BE uses 0.95 of its grant.
    h = history(30, granted=1.0, requested=3.0, used=0.95)
    # Keep at most 1 / 0.8 = 1.25 cores of requests: release 1.75 -> two instances,
    # lowest priority first, busiest first within it.
    assert cpu_satisfaction_evictions(h, BE_JOBS) == ["lo-busy", "lo-quiet"]


def test_no_cpu_eviction_without_a_full_window() -> None:
    h = history(29, granted=1.0, requested=3.0, used=1.0)
    assert cpu_satisfaction_evictions(h, BE_JOBS) == []
    assert cpu_satisfaction_evictions([], BE_JOBS) == []


def test_no_cpu_eviction_when_satisfied_or_not_using_the_grant() -> None:
    assert cpu_satisfaction_evictions(history(30, 2.0, 3.0, 2.0), BE_JOBS) == []
    # Starved on paper, but BE does not even use what it has (0.8 < 0.9).
    assert cpu_satisfaction_evictions(history(30, 1.0, 3.0, 0.8), BE_JOBS) == []
    # No requests at all: nothing to judge.
    assert cpu_satisfaction_evictions(history(30, 1.0, 0.0, 1.0), BE_JOBS) == []


def test_cpu_eviction_averages_only_the_window() -> None:
    # An old starved period followed by 31 s of satisfied BE: the window is satisfied.
    h = history(100, 0.5, 3.0, 0.5) + history(31, 3.0, 3.0, 3.0, start=101.0)
    assert cpu_satisfaction_evictions(h, BE_JOBS) == []
    # And the reverse evicts.
    h = history(100, 3.0, 3.0, 3.0) + history(31, 0.5, 3.0, 0.5, start=101.0)
    assert cpu_satisfaction_evictions(h, BE_JOBS) != []


def test_fully_suppressed_be_counts_as_using_its_grant() -> None:
    # A zero grant: satisfaction 0, and BE cannot use "90% of nothing" -- it is starved.
    jobs = [BEUsage("a", cpu_request=0.5), BEUsage("b", cpu_request=0.5)]
    assert cpu_satisfaction_evictions(history(30, 0.0, 1.0, 0.0), jobs) == ["a", "b"]


def test_cpu_eviction_releases_only_what_is_needed() -> None:
    # granted 1.0, requested 2.0 (satisfaction 0.5): keep 1.25, release 0.75.
    jobs = [
        BEUsage("small", cpu_used=0.2, cpu_request=0.25),
        BEUsage("big", cpu_used=0.8, cpu_request=1.0),
        BEUsage("none", cpu_used=0.9, cpu_request=0.0),
        BEUsage("mid", cpu_used=0.5, cpu_request=0.75),
    ]
    h = history(30, granted=1.0, requested=2.0, used=1.0)
    assert cpu_satisfaction_evictions(h, jobs) == ["big"]
