"""Engine output against the transformers oracle, and invariance under caching, batching and preemption."""

from __future__ import annotations

import pytest
import torch

from microserve.engine.config import CacheConfig
from microserve.engine.core import EngineCore
from microserve.engine.outputs import FinishReason
from microserve.engine.scheduler import SchedulerConfig
from tests.conftest import completion_ids, greedy, make_core, run_to_completion

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "List three prime numbers."},
    ],
    [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am SmolLM, an AI assistant."},
        {"role": "user", "content": "What can you do for me?"},
    ],
    [{"role": "user", "content": "Explain photosynthesis to a child in two sentences."}],
]
COMPLETIONS = [
    "The quick brown fox",
    "def fibonacci(n):\n",
    "In 1969, the first humans",
]


def _hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return out[0, len(prompt_ids) :].tolist()


def _prompts(core: EngineCore) -> list[list[int]]:
    tok = core.tokenizer
    chats = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in CHATS]
    return chats + [tok.encode(p) for p in COMPLETIONS]


@pytest.mark.slow
def test_greedy_output_equals_transformers(core: EngineCore, hf_model):
    prompts = _prompts(core)
    ours = run_to_completion(core, {f"r{i}": (p, greedy(32, min_tokens=32)) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert completion_ids(ours[f"r{i}"]) == _hf_greedy(hf_model, p, 32), f"prompt {i} differs"


def test_text_matches_decoded_tokens(core: EngineCore):
    prompt = _prompts(core)[0]
    outs = run_to_completion(core, {"t": (prompt, greedy(24))})["t"]
    text = "".join(o.text for o in outs)
    assert text == core.tokenizer.decode(completion_ids(outs))
    assert outs[-1].finished and outs[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert "Paris" in text


def test_prefix_cache_hit_gives_same_output_as_cold(core: EngineCore):
    base = _prompts(core)[3]
    prompt = base * 3  # long enough for several full blocks
    cold = run_to_completion(core, {"cold": (prompt, greedy(16, ignore_eos=True))})["cold"]
    warm = run_to_completion(core, {"warm": (prompt, greedy(16, ignore_eos=True))})["warm"]
    assert warm[-1].cached_tokens >= len(prompt) - core.kv.block_size
    assert cold[-1].cached_tokens < warm[-1].cached_tokens
    assert completion_ids(warm) == completion_ids(cold)


def test_mixed_batch_gives_each_request_its_solo_output(core: EngineCore):
    prompts = _prompts(core)
    alone = {
        f"a{i}": completion_ids(run_to_completion(core, {f"a{i}": (p, greedy(12, ignore_eos=True))})[f"a{i}"])
        for i, p in enumerate(prompts)
    }
    core.kv.pool.reset_prefix_cache()
    together = run_to_completion(
        core, {f"a{i}": (p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)}
    )
    assert {rid: completion_ids(o) for rid, o in together.items()} == alone


def test_chunked_prefill_and_preemption_keep_output():
    prompts = [list(range(1000, 1000 + 90)), list(range(2000, 2000 + 70)), list(range(3000, 3000 + 50))]
    reference = make_core()
    want = run_to_completion(
        reference, {f"p{i}": (p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)}
    )
    # 20 blocks of 16 tokens cannot hold all three (needs 25): preemption by recompute must kick in;
    # a 32-token budget forces chunked prefill.
    tight = make_core(
        cache=CacheConfig(num_blocks=20, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
        max_model_len=256,
    )
    got = run_to_completion(tight, {f"p{i}": (p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)})
    assert tight.scheduler.num_preemptions > 0
    for rid in want:
        assert completion_ids(got[rid]) == completion_ids(want[rid]), rid
    assert tight.kv.num_free_blocks == 20
