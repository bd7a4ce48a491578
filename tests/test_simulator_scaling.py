"""The router's autoscaler sizing a simulated fleet on virtual time, and the shaped arrival traces."""

from __future__ import annotations

from dataclasses import replace

import pytest

from microserve.bench.runner import RunConfig
from microserve.bench.workloads import Endpoint, RandomWorkload
from microserve.model.loader import resolve_model
from microserve.model.tokenizer import Tokenizer
from microserve.router.admission import AdmissionConfig
from microserve.router.autoscaler import AutoscalerConfig
from microserve.runner.cost_model import CostModel
from microserve.simulator.host import FleetConfig, parse_roles
from microserve.simulator.replica import ReplicaConfig
from microserve.simulator.run import SimRun, Simulator
from microserve.simulator.scaling import SimScaling
from microserve.simulator.traces import LoadShape, rate_function, shaped_gaps


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(resolve_model("smollm2-135m"))


def bursty_run(tokenizer: Tokenizer, scaling: SimScaling | None, replicas: int) -> SimRun:
    fleet = FleetConfig(
        parse_roles("both", replicas),
        ReplicaConfig(CostModel.default(), num_blocks=1024, max_model_len=4096),
        admission=AdmissionConfig(max_queue_wait_s=60.0, queue_timeout_s=120.0),
        autoscale=scaling,
    )
    workload = RandomWorkload(token_ids=True, seed=0, input_len=128, output_len=16)
    rate = rate_function(LoadShape.BURSTY, base=1.0, peak=12.0, period_s=120.0, burst_s=20.0)
    sim = Simulator(fleet, tokenizer, Endpoint.COMPLETIONS)
    return sim.run(
        workload, RunConfig(request_rate=1.0, duration_s=120.0), gaps=shaped_gaps(rate, 12.0, seed=0)
    )


def test_the_fleet_grows_for_a_burst_shrinks_after_it_and_loses_nothing(tokenizer: Tokenizer) -> None:
    config = AutoscalerConfig(
        min_replicas=1, max_replicas=4, target_load=4, scale_down_after_s=10, scale_up_cooldown_s=2
    )
    scaled = bursty_run(tokenizer, SimScaling(config, startup_s=5.0), replicas=1)
    fixed = bursty_run(tokenizer, None, replicas=4)
    counts = [n for _, n in scaled.extra["replicas_timeline"]]
    assert max(counts) == 4 and counts[-1] < 4  # up for the burst, down after it
    assert scaled.summary.completed == fixed.summary.completed == len(scaled.result.records)
    for replica in scaled.replicas:  # retired replicas included: each drained before it stopped
        assert replica["left_in_engine"] == 0 and replica["kv_blocks_free"] == replica["kv_blocks_total"]
    assert len(scaled.replicas) > 1
    # Replicas joined and left through the router's membership code, as registered engines do.
    started = len(scaled.replicas) - 1  # all but the fleet's first replica
    assert scaled.extra["membership"] == {"joined": started, "left": started - (counts[-1] - 1)}
    assert scaled.extra["engine_seconds"] < 0.8 * fixed.extra["engine_seconds"]


def test_a_ttft_over_the_slo_grows_the_fleet_the_load_alone_would_not(tokenizer: Tokenizer) -> None:
    """A target so high that the load never asks for a second replica; the TTFT signal (first tokens and
    the waits of requests still without one) does."""
    config = AutoscalerConfig(min_replicas=1, max_replicas=4, target_load=1000, scale_up_cooldown_s=2)
    blind = bursty_run(tokenizer, SimScaling(config, startup_s=5.0), replicas=1)
    watching = replace(config, ttft_slo_s=0.5)
    guarded = bursty_run(tokenizer, SimScaling(watching, startup_s=5.0), replicas=1)
    assert max(n for _, n in blind.extra["replicas_timeline"]) == 1
    assert max(n for _, n in guarded.extra["replicas_timeline"]) > 1
    assert guarded.summary.completed == blind.summary.completed == len(guarded.result.records)


def test_shaped_rates() -> None:
    diurnal = rate_function(LoadShape.DIURNAL, base=2.0, peak=10.0, period_s=100.0, burst_s=1.0)
    assert (diurnal(0.0), diurnal(50.0), diurnal(100.0)) == (2.0, 10.0, 2.0)
    bursty = rate_function(LoadShape.BURSTY, base=1.0, peak=9.0, period_s=100.0, burst_s=20.0)
    assert [bursty(t) for t in (0.0, 39.9, 40.0, 59.9, 60.0)] == [1.0, 1.0, 9.0, 9.0, 1.0]
    with pytest.raises(ValueError):
        rate_function(LoadShape.BURSTY, base=5.0, peak=1.0, period_s=10.0, burst_s=1.0)


def test_shaped_gaps_follow_the_rate() -> None:
    rate = rate_function(LoadShape.BURSTY, base=1.0, peak=20.0, period_s=100.0, burst_s=50.0)
    t, quiet, busy = 0.0, 0, 0
    for gap in shaped_gaps(rate, 20.0, seed=3):
        t += gap
        if t >= 1000:
            break
        if 25 <= t % 100 < 75:
            busy += 1
        else:
            quiet += 1
    assert 9000 < busy < 11000 and 400 < quiet < 600  # 20/s and 1/s over 500 s each


def handoff_run(tokenizer: Tokenizer, tokens: int) -> SimRun:
    """Two replicas serve four documents' questions, go quiet for 20 s (one replica leaves), then the
    same documents are asked again on the survivor; `tokens` of hand-off (0: none)."""
    from microserve.bench.workloads import SharedDocWorkload
    from microserve.router.handoff import HandoffConfig

    config = AutoscalerConfig(min_replicas=1, max_replicas=2, target_load=2, scale_down_after_s=5)
    handoff = HandoffConfig(max_tokens=tokens) if tokens else None
    fleet = FleetConfig(
        parse_roles("both", 2),
        ReplicaConfig(CostModel.default(), num_blocks=2048, max_model_len=4096),
        policy="prefix_aware",
        policy_options={"tokens": True, "min_match": 64},
        admission=AdmissionConfig(max_queue_wait_s=60.0, queue_timeout_s=120.0),
        autoscale=SimScaling(config, startup_s=5.0, handoff=handoff),
    )
    workload = SharedDocWorkload(documents=4, document_len=256, questions=6, output_len=8)
    gaps = [0.0] + [0.25] * 23 + [20.0] + [1.0] * 23
    sim = Simulator(fleet, tokenizer, Endpoint.COMPLETIONS)
    return sim.run(workload, RunConfig(num_requests=48, request_rate=4.0, seed=0), gaps=gaps)


def test_a_leaving_replica_hands_its_hot_prefixes_to_the_survivor(tokenizer: Tokenizer) -> None:
    """On the virtual clock, through the same hand-off as `serve`: after the scale-down the survivor holds
    the leaving replica's documents (its prefix hits rise against the same run without a hand-off) and
    no block is kept on either replica."""
    runs = {tokens: handoff_run(tokenizer, tokens) for tokens in (0, 8192)}
    hits = {}
    for tokens, run in runs.items():
        assert run.summary.completed == 48
        assert [n for _, n in run.extra["replicas_timeline"]][-1] == 1
        for replica in run.replicas:
            assert replica["left_in_engine"] == 0 and replica["kv_blocks_free"] == replica["kv_blocks_total"]
        survivor = next(r for r in run.replicas if r["requests"] == max(x["requests"] for x in run.replicas))
        hits[tokens] = survivor["prefix_hit_rate"]
    (moved,) = runs[8192].extra["handoffs"]
    assert moved["error"] is None and moved["prefixes"] >= 1 and moved["sent_tokens"] > 0
    assert "handoffs" not in runs[0].extra
    assert hits[8192] > hits[0]
