"""The router's parts without sockets: circuit breaker, retry budget and backoff, admission queue, config
and worker specs, request checks, stream tracking and continuation, metrics parsing, strategy loading."""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from microserve.router.admission import AdmissionConfig, AdmissionQueue
from microserve.router.breaker import BreakerConfig, CircuitBreaker, CircuitState
from microserve.router.config import RouterConfig, add_router_args, config_from_args, load_config_file
from microserve.router.continuation import StreamProgress, UpstreamStreamError, split_frames
from microserve.router.health import parse_prometheus_load
from microserve.router.request import Route, RoutedRequest
from microserve.router.retry import RetryBudget, RetryConfig, backoff_s
from microserve.router.strategies import DataParallel, Strategy, make_strategy
from microserve.router.workers import Role, WorkerKind, WorkerPool, WorkerSpec
from microserve.server.errors import APIError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- circuit breaker --------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_trials_when_half_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=5, max_open_s=20), clock)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()  # a success resets the count: failures must be consecutive
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state is CircuitState.CLOSED and breaker.allows()
    breaker.on_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allows()
    clock.now = 4.9
    assert not breaker.allows()
    clock.now = 5.0
    assert breaker.state is CircuitState.HALF_OPEN and breaker.allows()
    breaker.on_dispatch()
    assert not breaker.allows()  # one trial at a time
    breaker.on_failure()  # the trial failed: open again, for twice as long
    assert breaker.state is CircuitState.OPEN
    clock.now = 14.9
    assert breaker.state is CircuitState.OPEN
    clock.now = 15.0
    breaker.on_dispatch()
    breaker.on_release()  # the trial ended without a verdict (client left): another may go
    assert breaker.allows()
    breaker.on_dispatch()
    breaker.on_success()
    assert breaker.state is CircuitState.CLOSED and breaker.allows()


# -- retries ----------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_capped() -> None:
    config = RetryConfig(backoff_base_s=0.1, backoff_max_s=0.5)
    rng = random.Random(7)
    for attempt in range(1, 8):
        bound = min(0.5, 0.1 * 2**attempt)
        samples = [backoff_s(attempt, config, rng) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > 0.8 * bound  # spread over the whole range, not a fixed delay


def test_retry_budget_allows_a_ratio_of_requests_plus_a_trickle() -> None:
    clock = Clock()
    budget = RetryBudget(RetryConfig(budget_ratio=0.5, budget_min_per_s=1.0), clock)
    spent = sum(budget.try_spend() for _ in range(20))
    assert spent == 10  # starts with 10 s of the trickle: a quiet router can retry at once
    assert not budget.try_spend()
    for _ in range(4):
        budget.on_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]  # 4 requests x 0.5
    clock.now = 1.0
    assert budget.try_spend() and not budget.try_spend()  # one more per second


# -- admission --------------------------------------------------------------------------------------


async def test_admission_runs_queues_in_order_and_refuses_beyond() -> None:
    queue = AdmissionQueue(
        AdmissionConfig(max_concurrent=1, max_queued=2, queue_timeout_s=5, retry_after_s=2)
    )
    await queue.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await queue.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0)
    assert (queue.running, queue.queued) == (1, 2)
    with pytest.raises(APIError) as refused:
        await queue.acquire()
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "2"}
    queue.release()
    await waiters[0]
    assert order == [0] and (queue.running, queue.queued) == (1, 1)
    queue.release()
    await waiters[1]
    queue.release()
    assert (queue.running, queue.queued) == (0, 0)


async def test_admission_times_out_a_waiter_and_forgets_it() -> None:
    queue = AdmissionQueue(AdmissionConfig(max_concurrent=1, max_queued=1, queue_timeout_s=0.05))
    await queue.acquire()
    with pytest.raises(APIError, match="waited"):
        await queue.acquire()
    assert queue.queued == 0
    queue.release()
    assert queue.running == 0


# -- config and workers -----------------------------------------------------------------------------


def test_worker_spec_from_flag_and_dict() -> None:
    spec = WorkerSpec.parse("http://h:8000/,kind=openai,role=decode,weight=2,model=a,model=b,label.zone=x")
    assert spec.url == "http://h:8000" and spec.kind is WorkerKind.OPENAI and spec.role is Role.DECODE
    assert (spec.weight, spec.models, dict(spec.labels)) == (2, ("a", "b"), {"zone": "x"})
    assert WorkerSpec.from_dict(spec.to_dict()) == spec
    for bad, message in [
        ("localhost:8000", "http://host:port"),
        ("http://h:1/v1", "without a path"),
        ("http://h:1,role=boss", "role must be one of"),
        ("http://h:1,weight=0", "positive"),
        ("http://h:1,speed=9", "unknown worker option"),
    ]:
        with pytest.raises(ValueError, match=message):
            WorkerSpec.parse(bad)
    with pytest.raises(ValueError, match="unknown worker field"):
        WorkerSpec.from_dict({"url": "http://h:1", "colour": "red"})


def test_pool_candidates_filter_by_model_role_kind_and_state() -> None:
    pool = WorkerPool()
    a = pool.add(WorkerSpec("http://a:1", models=("m",)))
    b = pool.add(WorkerSpec("http://b:1", role=Role.DECODE, models=("m",)))
    c = pool.add(WorkerSpec("http://c:1", kind=WorkerKind.OPENAI, models=("m", "n")))
    assert pool.models() == ["m", "n"]
    assert pool.candidates("m") == [a, c]  # whole requests need role both
    assert pool.candidates("m", Role.DECODE) == [a, b, c]
    assert pool.candidates("m", Role.DECODE, WorkerKind.MICROSERVE) == [a, b]
    assert pool.candidates("n") == [c]
    assert pool.candidates("m", exclude={"http://a:1"}) == [c]
    assert pool.candidates("n", exclude={"http://c:1"}) == [c]  # nothing else left: a retry may go back
    b.draining = True
    a.healthy = False
    assert pool.candidates("m", Role.DECODE) == [c]
    with pytest.raises(ValueError, match="already"):
        pool.add(WorkerSpec("http://a:1"))


def test_yaml_config_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "port: 9000\n"
        "policy: {name: prefix_aware, options: {min_match: 64}}\n"
        "retry: {max_attempts: 5}\n"
        "workers:\n"
        "  - {url: 'http://a:1', weight: 3, labels: {zone: x}}\n"
        "  - {url: 'http://b:1', kind: openai, models: [llama]}\n"
    )
    config = load_config_file(path)
    assert (config.port, config.policy, config.policy_options) == (9000, "prefix_aware", {"min_match": 64})
    assert config.retry.max_attempts == 5 and [w.weight for w in config.workers] == [3, 1]

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    add_router_args(parser)
    args = parser.parse_args(
        [
            "--config",
            str(path),
            "--worker",
            "http://c:1",
            "--policy-opt",
            "balance_abs=8",
            "--max-queued",
            "0",
        ]
    )
    config = config_from_args(args)
    assert [w.url for w in config.workers] == ["http://a:1", "http://b:1", "http://c:1"]
    assert config.policy_options == {"min_match": 64, "balance_abs": 8}
    assert config.admission.max_queued == 0 and config.port == 9000

    path.write_text("connections: {header_timeout_s: 5, keepalive_s: 20}\nmax_body_bytes: 1000\n")
    flags = ["--config", str(path), "--body-timeout", "9", "--body-min-rate", "2KiB"]
    flags += ["--max-body-size", "1MiB", "--max-connections-per-client", "7", "--no-reuse-port"]
    flags += ["--drain-timeout", "4"]
    config = config_from_args(parser.parse_args(flags))
    limits = config.connections
    assert (limits.header_timeout_s, limits.keepalive_s, limits.body_timeout_s) == (5, 20, 9)
    assert (limits.body_min_rate, limits.max_connections_per_client) == (2048, 7)
    assert (config.max_body_bytes, config.reuse_port, config.drain_timeout_s) == (1 << 20, False, 4)
    with pytest.raises(ValueError, match="timeouts"):
        config_from_args(parser.parse_args(["--header-timeout", "0"]))

    path.write_text("prot: 9000\n")
    with pytest.raises(ValueError, match="unknown router setting"):
        load_config_file(path)
    with pytest.raises(ValueError, match="retry"):
        RouterConfig.from_dict({"retry": {"max_attempts": 0}})


# -- requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, raw, message",
    [
        (Route.CHAT, b"", "empty"),
        (Route.CHAT, b"{", "not valid JSON"),
        (Route.CHAT, b"[]", "JSON object"),
        (Route.CHAT, b'{"messages": []}', "messages"),
        (Route.CHAT, b'{"messages": ["hi"]}', "messages.0"),
        (
            Route.CHAT,
            b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
            "tool_choice",
        ),
        (Route.CHAT, b'{"model": 3, "messages": [{}]}', "model"),
        (Route.COMPLETIONS, b'{"prompt": ""}', "prompt"),
        (Route.COMPLETIONS, b'{"prompt": 12}', "prompt"),
        (Route.COMPLETIONS, b'{"prompt": "x", "stream": "yes"}', "stream"),
        (Route.COMPLETIONS, b'{"prompt": "x", "max_tokens": "8"}', "max_tokens"),  # ranges: the engine's 400
    ],
)
def test_bad_requests_are_400(route: Route, raw: bytes, message: str) -> None:
    with pytest.raises(APIError, match=message) as exc:
        RoutedRequest.parse(route, raw)
    assert exc.value.status == 400


def test_request_fields_session_and_lazy_ids() -> None:
    calls: list[Any] = []

    def tokenize(model: str | None, route: Route, body: Any) -> list[int]:
        calls.append(model)
        return [1, 2, 3]

    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u7", "stream": true}'
    req = RoutedRequest.parse(Route.CHAT, raw, {}, tokenize=tokenize)
    assert (req.model, req.stream, req.session_key, req.max_tokens) == ("m", True, "u7", None)
    assert req.upstream_body() is raw  # nothing changed: the client's bytes go as they are
    assert orjson.loads(req.upstream_body(return_token_ids=True))["return_token_ids"] is True
    assert req.prefix == "<|user|>hi\n" and calls == []  # no tokenizing unless asked
    assert req.prompt_ids == [1, 2, 3] and req.prompt_ids == [1, 2, 3] and calls == ["m"]
    req = RoutedRequest.parse(Route.COMPLETIONS, b'{"prompt": [5, 6]}', {"x-session-id": "s1"})
    assert (req.session_key, req.prefix, req.max_tokens) == ("s1", [5, 6], 16)


# -- stream tracking and continuation ----------------------------------------------------------------


def frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body)


def chat_chunk(
    content: str | None, ids: list[int], reason: str | None = None, role: bool = False, **top: Any
) -> bytes:
    delta = {} if content is None else {"content": content}
    if role:
        delta["role"] = "assistant"
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason, "token_ids": ids}
    return frame(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 5,
            "model": "m",
            "choices": [choice],
            **top,
        }
    )


def test_split_frames_keeps_partial_frames_and_crlf() -> None:
    buffer = bytearray()
    assert split_frames(buffer, b"data: 1\n\ndata: 2") == [b"data: 1"]
    assert split_frames(buffer, b"\n\ndata: [DONE]\r\n\r\n") == [b"data: 2", b"data: [DONE]"]
    assert buffer == b""


def tracked_chat(keep_ids: bool = False, include_usage: bool = False) -> StreamProgress:
    progress = StreamProgress(Route.CHAT, keep_ids=keep_ids, include_usage=include_usage)
    out = progress.track(chat_chunk("", [], role=True, prompt_token_ids=[7, 8, 9]))
    assert out is not None and b"prompt_token_ids" not in out and b"token_ids" not in out
    progress.track(chat_chunk(" a", [11]))
    # held back (half a character): there only for the ids, so the client gets no empty delta
    assert progress.track(chat_chunk("", [12])) is None
    progress.track(chat_chunk(" bc", [13]))
    progress.track(chat_chunk("", [14]))
    return progress


def test_tracking_strips_ids_and_counts_what_the_client_has() -> None:
    progress = tracked_chat()
    assert (progress.id, progress.created, progress.model) == ("chatcmpl-1", 5, "m")
    assert progress.prompt_ids == [7, 8, 9] and progress.generated == [11, 12, 13, 14]
    assert progress.delivered == 3 and progress.resumable
    with pytest.raises(UpstreamStreamError, match="boom"):
        progress.track(frame({"error": {"message": "boom", "code": "engine_dead"}}))
    kept = StreamProgress(Route.CHAT, keep_ids=True, include_usage=False)
    assert b'"prompt_token_ids":[7,8,9]' in (
        kept.track(chat_chunk("", [], prompt_token_ids=[7, 8, 9])) or b""
    )


def test_resume_body_restarts_after_the_delivered_ids_with_the_same_sampling() -> None:
    progress = tracked_chat()
    raw = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10,
            "temperature": 0,
            "seed": 3,
            "min_tokens": 5,
            "n": 1,
            "stop": "\n",
        }
    )
    req = RoutedRequest.parse(Route.CHAT, raw)
    body = progress.resume_body(req)
    assert body == {
        "model": "m",
        "prompt": [7, 8, 9, 11, 12, 13],
        "stream": True,
        "return_token_ids": True,
        "temperature": 0,
        "seed": 3,
        "stop": "\n",
        "min_tokens": 2,
        "max_tokens": 7,
        "prior_output_tokens": 3,  # the penalties count them as output
    }
    assert progress.generated == [11, 12, 13]  # 14 is generated again

    done = StreamProgress(Route.COMPLETIONS, keep_ids=False, include_usage=True, id="c", prompt_ids=[1])
    done.generated, done.delivered = [5, 6], 2
    req = RoutedRequest.parse(Route.COMPLETIONS, b'{"prompt": "x", "max_tokens": 2}')
    assert done.resume_body(req) is None  # all generated: only the ending was lost
    frames = [orjson.loads(f[6:]) if f != b"data: [DONE]\n\n" else "DONE" for f in done.closing_frames()]
    assert frames[0]["choices"][0]["finish_reason"] == "length"
    assert frames[1]["usage"]["completion_tokens"] == 2 and frames[2] == "DONE"


def test_reshape_turns_a_completion_stream_into_the_clients_chat_chunks() -> None:
    progress = tracked_chat(include_usage=True)
    req = RoutedRequest.parse(
        Route.CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 6}'
    )
    progress.resume_body(req)

    def cmpl(text: str, ids: list[int], reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "token_ids": ids}
        return frame(
            {
                "id": "cmpl-other",
                "object": "text_completion",
                "created": 99,
                "model": "m",
                "choices": [choice],
                "usage": None,
            }
        )

    out = [progress.reshape(f) for f in (cmpl(" d", [14]), cmpl("", [15]), cmpl("", [], "length"))]
    assert out[1] is None  # no text yet, nothing for the client
    first, last = orjson.loads(out[0][6:]), orjson.loads(out[2][6:])
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "system_fingerprint": "microserve",
        "choices": [
            {
                "index": 0,
                "delta": {"content": " d"},
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
            }
        ],
        "usage": None,
    }
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    usage = progress.reshape(frame({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}}))
    assert orjson.loads(usage[6:])["usage"]["completion_tokens"] == 5  # 3 before the failure, 2 after
    assert progress.reshape(b"data: [DONE]") == b"data: [DONE]\n\n" and progress.done


def test_resume_with_stop_strings_backs_up_to_a_token_boundary_and_skips_the_overlap() -> None:
    vocab = {11: "ab", 12: "cd", 13: "ef"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    progress = StreamProgress(Route.COMPLETIONS, keep_ids=False, include_usage=False, id="c", prompt_ids=[1])
    # The engine held "ef" and the "d" back (a stop string "xyz" could start there): the client has "abc".
    progress.generated, progress.delivered, progress.text = [11, 12, 13], 3, ["abc"]
    req = RoutedRequest.parse(Route.COMPLETIONS, b'{"prompt": "x", "max_tokens": 9, "stop": ["xyz"]}')
    body = progress.resume_body(req, decode)
    assert body is not None and body["prompt"] == [1, 11] and body["max_tokens"] == 8
    assert progress.skip == 1  # "cd" comes again; the client has its "c"

    def cmpl(text: str, ids: list[int]) -> bytes:
        return frame({"choices": [{"index": 0, "text": text, "finish_reason": None, "token_ids": ids}]})

    out = orjson.loads(progress.reshape(cmpl("cd", [12]))[6:])
    assert out["choices"][0]["text"] == "d" and progress.generated == [11, 12]


def test_prometheus_load_from_vllm_and_sglang() -> None:
    vllm = (
        "# HELP vllm:num_requests_waiting x\n"
        'vllm:num_requests_waiting{model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{model_name="b"} 1.0\n'
        'vllm:num_requests_running{model_name="a"} 2.0\n'
        'vllm:gpu_cache_usage_perc{model_name="a"} 0.25\n'
    )
    assert parse_prometheus_load(vllm) == (4, 2, 0.25)
    assert parse_prometheus_load("sglang:num_queue_reqs 5\nsglang:token_usage 0.5\n") == (5, 0, 0.5)
    assert parse_prometheus_load("process_cpu_seconds_total 3\n") is None


# -- strategies -------------------------------------------------------------------------------------

USER_STRATEGY = """
from microserve.router.strategies import Strategy

class Twice(Strategy):
    name = "twice"

    def __init__(self, times: int = 2):
        super().__init__()
        self.times = times

    def options(self):
        return {"times": self.times}

    async def serve(self, req):
        for _ in range(self.times):
            yield b"x"

class NotAGenerator(Strategy):
    async def serve(self, req):
        return None
"""


def test_strategies_by_name_and_from_a_file(tmp_path: Path) -> None:
    assert isinstance(make_strategy("data_parallel"), DataParallel)
    path = tmp_path / "mine.py"
    path.write_text(USER_STRATEGY)
    strategy = make_strategy(f"{path}:Twice", {"times": 3})
    assert isinstance(strategy, Strategy) and strategy.describe() == {
        "name": "twice",
        "options": {"times": 3},
    }
    for spec, message in [
        ("pd_magic", "unknown strategy"),
        (f"{tmp_path}/nope.py:X", "does not exist"),
        (f"{path}:Missing", "no Strategy subclass"),
        (f"{path}:NotAGenerator", "async generator"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_strategy(spec)
    with pytest.raises(ValueError, match="bad options"):
        make_strategy("data_parallel", {"ratio": 0.5})
