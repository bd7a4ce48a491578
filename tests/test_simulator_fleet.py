"""The simulator's fleet: the real cores, policies and strategies on virtual time, timed by the cost model."""

from __future__ import annotations

import math

import pytest

from microserve.bench.runner import RunConfig
from microserve.bench.workloads import Endpoint, MultiTurnWorkload, RandomWorkload, SharedDocWorkload
from microserve.engine.outputs import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.model.loader import resolve_model
from microserve.model.tokenizer import Tokenizer
from microserve.router.workers import Role
from microserve.runner.cost_model import CostModel
from microserve.runner.sim_runner import plain_word_tokens
from microserve.simulator.host import FleetConfig, parse_roles
from microserve.simulator.replica import ReplicaConfig, SimReplica
from microserve.simulator.run import SimRun, Simulator

COST = CostModel.default()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(resolve_model("smollm2-135m"))


def fleet(roles: str, replicas: int | None = None, **kw: object) -> FleetConfig:
    replica = ReplicaConfig(COST, num_blocks=kw.pop("num_blocks", 1024), max_model_len=4096)  # type: ignore[arg-type]
    return FleetConfig(parse_roles(roles, replicas), replica, **kw)  # type: ignore[arg-type]


def run(
    tokenizer: Tokenizer, config: FleetConfig, n: int, rate: float = 8.0, seed: int = 0, **wl: int
) -> SimRun:
    workload = RandomWorkload(token_ids=True, seed=seed, **{"input_len": 200, "output_len": 16, **wl})
    sim = Simulator(config, tokenizer, Endpoint.COMPLETIONS)
    return sim.run(workload, RunConfig(request_rate=rate, num_requests=n, seed=seed))


def assert_drained(result: SimRun) -> None:
    for replica in result.replicas:
        assert replica["left_in_engine"] == 0, replica
        assert replica["kv_blocks_free"] == replica["kv_blocks_total"], replica


def test_roles_parse_into_one_role_per_replica() -> None:
    assert parse_roles("both", 3) == (Role.BOTH,) * 3
    assert parse_roles("prefill:1,decode:2", None) == (Role.PREFILL, Role.DECODE, Role.DECODE)
    with pytest.raises(ValueError, match="names 3 replicas but --replicas is 4"):
        parse_roles("prefill:1,decode:2", 4)
    with pytest.raises(ValueError):
        parse_roles("prefill:0", None)


def test_a_lone_request_takes_exactly_the_cost_models_time(tokenizer: Tokenizer) -> None:
    result = run(tokenizer, fleet("both", 1), n=1, rate=math.inf, input_len=300, output_len=5)
    [record] = result.result.records
    # One prefill step of the whole prompt, then one decode step per further token.
    steps = [COST.step_time([(0, 300)], 1)] + [COST.step_time([(300 + i, 1)], 1) for i in range(4)]
    t, times = 0.0, []
    for s in steps:
        t += s
        times.append(t)
    assert record.start == 0.0
    assert record.ttft == steps[0]
    assert record.chunk_times == times
    assert record.output_tokens == 5 and record.prompt_len == 300
    assert result.result.duration_s == times[-1]


@pytest.mark.parametrize(
    ("strategy", "roles", "policy"),
    [
        ("data_parallel", "both:3", "round_robin"),
        ("data_parallel", "both:3", "least_loaded"),
        ("pd", "prefill:1,decode:2", "least_connections"),
        ("pd_balanced", "prefill:1,decode:2", "least_loaded"),
        ("migration", "both:3", "random"),
    ],
)
def test_strategies_finish_every_request_and_free_every_block(
    tokenizer: Tokenizer, strategy: str, roles: str, policy: str
) -> None:
    options = {"max_in_flight": 1} if strategy == "migration" else {}
    result = run(tokenizer, fleet(roles, strategy=strategy, strategy_options=options, policy=policy), n=60)
    records = result.result.records
    assert len(records) == 60
    assert all(r.success and r.output_tokens == 16 for r in records), result.summary.errors
    assert result.summary.completed == 60 and result.summary.failed == 0
    assert_drained(result)
    served = [r["steps"] for r in result.replicas]
    assert all(s > 0 for s in served)  # every replica took part


def test_pd_sends_the_prompt_to_the_decode_side_and_costs_a_transfer(tokenizer: Tokenizer) -> None:
    lone = dict(n=1, rate=math.inf, input_len=300, output_len=2)
    dp = run(tokenizer, fleet("both", 1), **lone).result.records[0]  # type: ignore[arg-type]
    pd = run(tokenizer, fleet("prefill:1,decode:1", strategy="pd"), **lone).result.records[0]  # type: ignore[arg-type]
    # PD: prefill 299 tokens on P, move their KV in two pieces (256 + 43), then D computes the last token.
    expected = (
        COST.step_time([(0, 299)], 0)
        + COST.kv_transfer_time(256)
        + COST.kv_transfer_time(43)
        + COST.step_time([(299, 1)], 1)
    )
    assert pd.ttft == pytest.approx(expected, rel=1e-12)
    assert pd.ttft > dp.ttft


def test_a_full_cache_preempts_and_still_finishes(tokenizer: Tokenizer) -> None:
    # 300 blocks of 16 tokens hold about 16 requests of 216 tokens: 40 at once must preempt.
    config = FleetConfig(parse_roles("both", 1), ReplicaConfig(COST, num_blocks=300, max_model_len=4096))
    result = run(tokenizer, config, n=40, rate=math.inf)
    assert result.summary.completed == 40
    assert result.replicas[0]["preemptions"] > 0
    assert_drained(result)


def test_the_same_seed_gives_the_same_run_and_another_seed_another(tokenizer: Tokenizer) -> None:
    config = fleet("both", 3, policy="power_of_two")
    a, b = (run(tokenizer, config, n=40, seed=7) for _ in range(2))
    c = run(tokenizer, config, n=40, seed=8)
    times = [[r.start, *r.chunk_times] for r in a.result.records]
    assert times == [[r.start, *r.chunk_times] for r in b.result.records]
    assert a.replicas == b.replicas
    assert times != [[r.start, *r.chunk_times] for r in c.result.records]


def test_text_workloads_run_through_the_engines_tokenization(tokenizer: Tokenizer) -> None:
    sim = Simulator(fleet("both", 2, policy="prefix_aware", policy_options={"min_match": 64}), tokenizer)
    docs = sim.run(
        SharedDocWorkload(documents=2, document_len=300, questions=3, output_len=8),
        RunConfig(request_rate=2.0, num_requests=12),
    )
    assert docs.summary.completed == 12
    # Each document's later questions hit the prefix cache of the replica that read it first.
    assert all(r["prefix_hit_rate"] > 0.4 for r in docs.replicas)
    chat = sim.run(
        MultiTurnWorkload(turns=3, system_prompts=1, system_prompt_len=50, turn_len=10, output_len=8),
        RunConfig(request_rate=4.0, num_requests=9),
    )
    assert chat.summary.completed == 9 and chat.result.skipped == 0
    turns = [r for r in chat.result.records if r.request.conversation == 0]
    assert [r.request.turn for r in turns] == [0, 1, 2]
    assert turns[0].prompt_len < turns[1].prompt_len < turns[2].prompt_len  # the history grows


def test_replicas_skip_text_unless_a_stop_string_needs_it(tokenizer: Tokenizer) -> None:
    core = SimReplica("r", ReplicaConfig(COST, num_blocks=512), tokenizer, plain_word_tokens(tokenizer)).core
    core.add_request("plain", [1000 + i for i in range(20)], SamplingParams(max_tokens=6))
    core.add_request("stop", [2000 + i for i in range(20)], SamplingParams(max_tokens=6, stop=["\n\n\n"]))
    outputs: dict[str, list[RequestOutput]] = {"plain": [], "stop": []}
    while core.has_work():
        for out in core.step():
            outputs[out.request_id].append(out)
    plain, stop = outputs["plain"], outputs["stop"]
    assert sum(len(o.token_ids) for o in plain) == 6 and all(o.text == "" for o in plain)
    ids = [t for o in stop for t in o.token_ids]
    assert len(ids) == 6 and "".join(o.text for o in stop) == tokenizer.decode(ids)
