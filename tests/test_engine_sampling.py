"""The sampler's controls on the bundled model, in-process: logit_bias, penalties, min_p, logprobs, prompt
logprobs, n (forked from one prefill), stop strings kept, special tokens kept, stop_reason."""

from __future__ import annotations

import math

import pytest

from microserve.engine.core import EngineCore
from microserve.engine.outputs import RequestOutput
from microserve.engine.sampling import SamplingParams
from tests.conftest import completion_ids, greedy, run_to_completion

PROMPT = "The three primary colors are"


def ids(core: EngineCore, text: str = PROMPT) -> list[int]:
    return core.tokenizer.encode(text)


def run_one(core: EngineCore, params: SamplingParams, prompt: list[int] | None = None) -> list[RequestOutput]:
    return run_to_completion(core, {"r": (prompt or ids(core), params)})["r"]


def chat_ids(core: EngineCore, question: str) -> list[int]:
    tok = core.tokenizer
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False
    )


def test_logit_bias_bans_and_forces_tokens(core: EngineCore) -> None:
    plain = completion_ids(run_one(core, greedy(4)))
    banned = completion_ids(run_one(core, greedy(4, logit_bias={plain[0]: -100.0})))
    assert banned[0] != plain[0]
    forced = completion_ids(run_one(core, greedy(3, logit_bias={42: 100.0})))
    assert forced == [42, 42, 42]


def test_greedy_tokens_logprob_is_the_top_logprob(core: EngineCore) -> None:
    outs = run_one(core, greedy(5, logprobs=3))
    entries = [e for o in outs for e in o.logprobs or []]
    assert [e.token_id for e in entries] == completion_ids(outs)
    for e in entries:
        assert len(e.top) == 3 and e.top[0][0] == e.token_id
        assert e.logprob == pytest.approx(e.top[0][1]) and e.logprob <= 0.0
        assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    # logprobs are the model's own: a bias changes the token, not what the model thought of it
    biased = run_one(core, greedy(1, logprobs=1, logit_bias={entries[0].token_id: -100.0}))
    assert biased[0].logprobs is not None and biased[0].logprobs[0].logprob < entries[0].logprob


def test_prompt_logprobs_cover_every_prompt_token(core: EngineCore) -> None:
    prompt = ids(core)
    outs = run_one(core, greedy(2, prompt_logprobs=2), prompt)
    entries = outs[0].prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    assert [e.token_id for e in entries[1:] if e is not None] == prompt[1:]
    assert all(e is not None and len(e.top) == 2 and e.logprob <= e.top[0][1] + 1e-6 for e in entries[1:])


def test_n_choices_fork_one_prefill(core: EngineCore) -> None:
    prompt = ids(core, PROMPT * 4)  # several blocks
    computed = []
    execute = core.runner.execute

    def counting(batch):  # type: ignore[no-untyped-def]
        computed.append(batch.total_tokens)
        return execute(batch)

    core.runner.execute = counting  # type: ignore[method-assign]
    try:
        outs = run_one(core, greedy(6, n=3), prompt)
    finally:
        core.runner.execute = execute  # type: ignore[method-assign]
    by_index: dict[int, list[int]] = {}
    for o in outs:
        by_index.setdefault(o.index, []).extend(o.token_ids)
    assert sorted(by_index) == [0, 1, 2]
    single = completion_ids(run_one(core, greedy(6), prompt))
    assert all(tokens == single for tokens in by_index.values())  # greedy: every choice the same
    # One prefill of the prompt; the forked choices each compute only its last token again.
    assert sum(computed) == len(prompt) + 2 + 3 * 5
    assert sum(o.finished for o in outs) == 3 and not core.has_work()


def test_n_seeded_choices_differ(core: EngineCore) -> None:
    outs = run_one(core, SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3))
    texts = {i: [t for o in outs if o.index == i for t in o.token_ids] for i in range(3)}
    assert len({tuple(t) for t in texts.values()}) > 1


def test_penalties_change_a_repetitive_greedy_answer(core: EngineCore) -> None:
    prompt = ids(core, "one one one one one one one one")
    plain = completion_ids(run_one(core, greedy(12), prompt))
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert completion_ids(run_one(core, greedy(12, **penalty), prompt)) != plain, penalty
    counted = completion_ids(run_one(core, greedy(12, frequency_penalty=2.0), prompt))
    assert max(map(counted.count, counted)) <= max(map(plain.count, plain))


def test_min_p_one_keeps_only_the_top_token(core: EngineCore) -> None:
    plain = completion_ids(run_one(core, greedy(6)))
    sampled = completion_ids(run_one(core, SamplingParams(max_tokens=6, temperature=1.5, min_p=1.0, seed=3)))
    assert sampled == plain


def test_stop_string_kept_and_stop_reason(core: EngineCore) -> None:
    text = core.tokenizer.decode(completion_ids(run_one(core, greedy(8))))
    stop = text.split()[1]
    cut = run_one(core, greedy(8, stop=[stop]))
    kept = run_one(core, greedy(8, stop=[stop], include_stop_str_in_output=True))
    cut_text, kept_text = "".join(o.text for o in cut), "".join(o.text for o in kept)
    assert kept_text == cut_text + stop and cut[-1].stop_reason == stop == kept[-1].stop_reason
    token = completion_ids(cut)[0]
    by_id = run_one(core, greedy(8, stop_token_ids=[token]))
    assert by_id[-1].stop_reason == token and by_id[-1].finish_reason == "stop"


def test_special_tokens_kept_when_asked(core: EngineCore) -> None:
    prompt = chat_ids(core, "What is the capital of France? One word.")
    params = {"ignore_eos": True, "max_tokens": 24}
    skipped = "".join(o.text for o in run_one(core, greedy(**params), prompt))
    kept = "".join(o.text for o in run_one(core, greedy(skip_special_tokens=False, **params), prompt))
    assert "<|im_end|>" in kept and "<|im_end|>" not in skipped


def test_logprobs_are_normalized(core: EngineCore) -> None:
    outs = run_one(core, greedy(1, logprobs=20))
    entry = (outs[0].logprobs or [])[0]
    assert 0.0 < sum(math.exp(lp) for _, lp in entry.top) <= 1.0 + 1e-5
