"""The autoscaler's decisions, exactly, on a hand-driven clock."""

from __future__ import annotations

import pytest

from microserve.router.autoscaler import (
    Autoscaler,
    AutoscalerConfig,
    PoolAutoscaler,
    PoolSignals,
    idlest,
    pool_signals,
)


def scaler(**kw: float) -> Autoscaler:
    cfg = {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_load": 4,
        "scale_down_after_s": 10,
        "scale_up_cooldown_s": 5,
    }
    cfg.update(kw)
    return Autoscaler(AutoscalerConfig(**cfg))  # type: ignore[arg-type]


def test_scale_from_zero_on_the_first_held_request() -> None:
    a = scaler()
    assert a.decide(0.0, PoolSignals(replicas=0)) == 0
    assert a.decide(1.0, PoolSignals(replicas=0, queued=1)) == 1
    assert a.reason == "scale from zero"


def test_scale_from_zero_to_what_the_queue_needs_within_max() -> None:
    assert scaler().decide(0.0, PoolSignals(replicas=0, queued=9)) == 3
    assert scaler().decide(0.0, PoolSignals(replicas=0, queued=99)) == 4


def test_up_to_the_load_then_cooldown() -> None:
    a = scaler()
    assert a.decide(0.0, PoolSignals(replicas=1, running=4, waiting=5)) == 3
    # Still more load, but within the cooldown the starting replicas get time to help.
    assert a.decide(2.0, PoolSignals(replicas=3, running=12, queued=8)) == 3
    assert a.decide(5.0, PoolSignals(replicas=3, running=12, queued=8)) == 4


def test_kv_or_ttft_over_the_slo_adds_one_replica() -> None:
    assert scaler().decide(0.0, PoolSignals(replicas=2, running=2, kv_usage=0.95)) == 3
    a = scaler(ttft_slo_s=0.5)
    assert a.decide(0.0, PoolSignals(replicas=2, running=2, ttft_p99_s=0.8)) == 3
    assert a.reason == "overloaded"
    assert scaler(ttft_slo_s=0.5).decide(0.0, PoolSignals(replicas=2, running=2, ttft_p99_s=0.4)) == 2


def test_down_one_step_per_period_and_only_when_the_load_fits_with_margin() -> None:
    a = scaler()
    low = PoolSignals(replicas=3, running=3)  # fits in 2 replicas at half their target (4 <= 0.5*4*2)
    assert a.decide(0.0, low) == 3
    assert a.decide(9.9, low) == 3
    assert a.decide(10.0, low) == 2
    # 3 requests on 2 replicas do not fit in 1 at half its target: it stays.
    assert a.decide(30.0, PoolSignals(replicas=2, running=3)) == 2


def test_no_flapping_around_the_threshold() -> None:
    a = scaler()
    decisions = []
    for t in range(60):  # the load alternates just around one replica's target
        load = 4 if t % 2 else 5
        decisions.append(a.decide(float(t), PoolSignals(replicas=2, running=load)))
    assert set(decisions) == {2}


def test_a_burst_resets_the_idle_timer() -> None:
    a = scaler()
    assert a.decide(0.0, PoolSignals(replicas=1)) == 1
    assert a.decide(8.0, PoolSignals(replicas=1, running=1)) == 1
    assert a.decide(12.0, PoolSignals(replicas=1)) == 1  # idle again from 12
    assert a.decide(21.9, PoolSignals(replicas=1)) == 1
    assert a.decide(22.0, PoolSignals(replicas=1)) == 0
    assert a.reason == "idle"


def test_bounds() -> None:
    a = scaler(min_replicas=1, max_replicas=2)
    assert a.decide(0.0, PoolSignals(replicas=0)) == 1  # below min: back up to it
    assert a.decide(100.0, PoolSignals(replicas=1)) == 1  # never under min
    assert a.decide(200.0, PoolSignals(replicas=2, queued=100)) == 2  # never over max
    with pytest.raises(ValueError):
        AutoscalerConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        AutoscalerConfig(target_load=0)


def test_fixed_fleet_never_moves() -> None:
    a = Autoscaler(AutoscalerConfig(min_replicas=2, max_replicas=2, scale_down_after_s=0))
    assert [a.decide(float(t), PoolSignals(replicas=2, running=r)) for t, r in enumerate([0, 50, 0])] == [
        2,
        2,
        2,
    ]


def test_pools_per_role_decide_apart() -> None:
    cfg = AutoscalerConfig(min_replicas=1, max_replicas=4, target_load=4, scale_up_cooldown_s=0)
    pools = PoolAutoscaler({"prefill": cfg, "decode": cfg})
    got = pools.decide(
        0.0, {"prefill": PoolSignals(replicas=1, queued=9), "decode": PoolSignals(replicas=1, running=2)}
    )
    assert got == {"prefill": 3, "decode": 1}
    assert pools.desired() == {"prefill": 3, "decode": 1}


def test_pool_signals_count_the_queue_in_flight_or_reported_load_and_skip_draining() -> None:
    from microserve.router.workers import Worker, WorkerSpec

    a, b, c = (Worker(WorkerSpec(f"http://e{i}:1")) for i in range(3))
    a.in_flight = 3  # no report yet: what the router sent counts
    b.in_flight = 1
    b.report_load(waiting=2, running=4, kv_usage=0.5, at=0.0)  # the engine knows more (other routers)
    c.draining = True
    c.in_flight = 9
    s = pool_signals([a, b, c], queued=2, starting=1)
    assert (s.replicas, s.queued, s.waiting, s.running, s.kv_usage) == (3, 2, 2, 7, 0.5)
    assert idlest([a, b]) is b


def test_after_the_wait_down_to_what_the_load_needs_in_one_step() -> None:
    a = Autoscaler(AutoscalerConfig(0, 8, target_load=4, scale_down_after_s=10, down_step=None))
    low = PoolSignals(replicas=8, running=3)  # needs 2 replicas at half their target of 4
    assert a.decide(0.0, low) == 8
    assert a.decide(10.0, low) == 2
    b = Autoscaler(AutoscalerConfig(0, 8, target_load=4, scale_down_after_s=10, down_step=3))
    assert [b.decide(t, low) for t in (0.0, 10.0)] == [8, 5]


def test_recent_ttft_p99_reads_only_the_window_and_needs_enough_samples() -> None:
    from microserve.router.autoscaler import recent_ttft_p99

    old = [(0.0, 9.0)] * 50  # outside a 30 s window at t=100
    fresh = [(90.0 + i / 10, 0.1 * (i % 10)) for i in range(100)]
    assert recent_ttft_p99([*old, *fresh], now=100.0) == pytest.approx(0.9)
    assert recent_ttft_p99(fresh[:5], now=100.0) is None  # too few to say
    assert recent_ttft_p99([*fresh, (100.0, 5.0), (100.0, 6.0)], now=100.0) == 5.0


def test_a_growing_load_is_met_where_it_will_be_after_the_lookahead() -> None:
    now_only = scaler(max_replicas=8, target_load=10)
    ahead = scaler(max_replicas=8, target_load=10, growth_lookahead_s=10)
    for a in (now_only, ahead):
        a.decide(0.0, PoolSignals(replicas=1, running=2))
    # +18 requests in a second: the load now needs 2 replicas; in 10 s at that rate, 8.
    assert now_only.decide(1.0, PoolSignals(replicas=1, queued=10, running=10)) == 2
    assert ahead.decide(1.0, PoolSignals(replicas=1, queued=10, running=10)) == 8
