"""Workloads: deterministic per seed and shaped as asked; multi-turn history grows and carries answers."""

from __future__ import annotations

import pytest

from microserve.bench.workloads import (
    WORDS,
    BenchRequest,
    Endpoint,
    MultiTurnWorkload,
    RandomWorkload,
    SharedDocWorkload,
)


def drain(workload, limit: int) -> list[BenchRequest]:
    source = workload.source(limit)
    out = []
    while (r := source.next_ready()) is not None:
        out.append(r)
    assert source.exhausted
    return out


def test_random_is_deterministic_per_seed_and_order_free() -> None:
    w = RandomWorkload(input_len=40, output_len=10, range_ratio=0.5, seed=3)
    first = drain(w, 20)
    assert first == drain(RandomWorkload(input_len=40, output_len=10, range_ratio=0.5, seed=3), 20)
    assert first != drain(RandomWorkload(input_len=40, output_len=10, range_ratio=0.5, seed=4), 20)
    assert w.request(7) == first[7]  # request i does not depend on the ones made before it
    assert [r.index for r in first] == list(range(20))


def test_random_lengths_span_the_range_ratio() -> None:
    reqs = drain(RandomWorkload(input_len=100, output_len=20, range_ratio=0.5, seed=0), 300)
    n_in = [len(r.prompt.split()) for r in reqs]  # type: ignore[union-attr]
    n_out = [r.expected_output_len for r in reqs]
    assert 50 <= min(n_in) < 60 and 140 < max(n_in) <= 150
    assert min(n_out) >= 10 and max(n_out) <= 30 and len(set(n_out)) > 10
    assert all(w in WORDS for r in reqs[:5] for w in r.prompt.split())  # type: ignore[union-attr]
    exact = drain(RandomWorkload(input_len=100, output_len=20, seed=0), 10)
    assert {len(r.prompt.split()) for r in exact} == {100} and {r.expected_output_len for r in exact} == {20}  # type: ignore[union-attr]


def test_random_token_ids_know_their_length_and_need_completions() -> None:
    w = RandomWorkload(input_len=64, output_len=8, token_ids=True, seed=1)
    r = w.request(0)
    assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 64
    assert all(1000 <= t < 10000 for t in r.prompt)
    assert r.api_input(Endpoint.COMPLETIONS) == {"prompt": r.prompt}
    with pytest.raises(ValueError, match="--endpoint completions"):
        w.check_endpoint(Endpoint.CHAT)
    with pytest.raises(ValueError, match="--endpoint completions"):
        r.api_input(Endpoint.CHAT)
    text = RandomWorkload(input_len=4, output_len=8).request(0)
    assert text.api_input(Endpoint.CHAT) == {"messages": [{"role": "user", "content": text.prompt}]}


def test_multi_turn_history_grows_and_carries_the_answers() -> None:
    w = MultiTurnWorkload(turns=4, system_prompts=2, system_prompt_len=20, turn_len=5, output_len=7, seed=0)
    source = w.source(10)  # conversations of 4, 4 and 2 turns
    opener0, opener1 = source.next_ready(), source.next_ready()
    assert opener0 is not None and opener1 is not None
    assert (opener0.conversation, opener0.turn, opener1.conversation) == (0, 0, 1)
    assert [m["role"] for m in opener0.messages] == ["system", "user"]  # type: ignore[union-attr]

    source.complete(opener0, "ANSWER 0.0")
    follow = source.next_ready()  # the waiting user goes before a new conversation
    assert follow is not None and (follow.conversation, follow.turn, follow.index) == (0, 1, 2)
    assert follow.messages[:2] == opener0.messages  # type: ignore[index]
    assert follow.messages[2] == {"role": "assistant", "content": "ANSWER 0.0"}  # type: ignore[index]
    assert follow.messages[3]["role"] == "user" and len(follow.messages) == 4  # type: ignore[index]
    assert follow.expected_output_len == 7

    answered = {0: follow, 1: opener1}
    sent = 3
    while not source.exhausted:
        r = source.next_ready()
        if r is None:  # every conversation in flight waits for its answer
            conv, last = answered.popitem()
            source.complete(last, f"ANSWER {conv}.{last.turn}")
            continue
        sent += 1
        if r.turn:
            assert len(r.messages) == 2 + 2 * r.turn  # type: ignore[arg-type]
            assert r.messages[-2]["content"] == f"ANSWER {r.conversation}.{r.turn - 1}"  # type: ignore[index]
        answered[r.conversation] = r  # type: ignore[index]
    assert sent == 10 and source.skipped == 0
    # Conversations 0 and 2 share system prompt 0; conversation 1 has the other one.
    assert w.system_prompt(0) == w.system_prompt(2) != w.system_prompt(1)


def test_multi_turn_drops_the_rest_of_a_failed_conversation() -> None:
    source = MultiTurnWorkload(turns=3, seed=0).source(6)
    a, b = source.next_ready(), source.next_ready()
    assert a is not None and b is not None and source.next_ready() is None and not source.exhausted
    source.complete(a, None)
    assert source.skipped == 2 and source.next_ready() is None
    source.complete(b, "ok")
    assert source.next_ready().turn == 1  # type: ignore[union-attr]


def test_multi_turn_is_deterministic_per_seed() -> None:
    a, b = MultiTurnWorkload(seed=1), MultiTurnWorkload(seed=2)
    assert a.request(3) == MultiTurnWorkload(seed=1).request(3)
    assert a.user_message(0, 1) != b.user_message(0, 1) and a.system_prompt(0) != b.system_prompt(0)
    with pytest.raises(ValueError, match="--endpoint chat"):
        a.check_endpoint(Endpoint.COMPLETIONS)


def test_shared_documents_group_questions_by_document() -> None:
    w = SharedDocWorkload(documents=2, document_len=50, questions=3, question_len=4, output_len=5, seed=0)
    reqs = drain(w, 8)
    docs = [r.conversation for r in reqs]
    assert docs == [0, 0, 0, 1, 1, 1, 0, 0]  # three questions each, then round again
    for r in reqs:
        assert w.document(r.conversation) in r.prompt  # type: ignore[arg-type, operator]
    assert len({r.prompt for r in reqs}) == 8  # only the document repeats, never the whole prompt
    prefix = reqs[0].prompt[: reqs[0].prompt.index("Question:")]  # type: ignore[union-attr]
    assert reqs[1].prompt.startswith(prefix) and not reqs[3].prompt.startswith(prefix)  # type: ignore[union-attr]
    assert drain(w, 8) == drain(SharedDocWorkload(2, 50, 3, 4, 5, seed=0), 8)
    assert w.document(0) != SharedDocWorkload(2, 50, 3, 4, 5, seed=1).document(0)


def test_each_run_of_a_sweep_gets_fresh_prompts_of_the_same_shape() -> None:
    for w in (
        RandomWorkload(input_len=30, output_len=5, seed=2),
        MultiTurnWorkload(system_prompt_len=30, seed=2),
        SharedDocWorkload(document_len=30, seed=2),
    ):
        assert w.for_run(0) is w
        later = w.for_run(1)
        # A repeated prompt would be served from the prefix cache the earlier run warmed.
        assert later.request(0) != w.request(0) and later.request(0) == w.for_run(1).request(0)
        assert w.for_run(2).request(0) != later.request(0)
        assert {k: v for k, v in later.describe().items() if k != "seed"} == {
            k: v for k, v in w.describe().items() if k != "seed"
        }
