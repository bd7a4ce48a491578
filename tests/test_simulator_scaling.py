"""The router's autoscaler sizing a simulated fleet on virtual time, and the shaped arrival traces."""

from __future__ import annotations

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
    assert scaled.extra["engine_seconds"] < 0.8 * fixed.extra["engine_seconds"]


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
