"""Grammar-constrained decoding units on a tiny byte-level tokenizer: the spec, the compiler's cache,
a matcher's masks and termination, a continued stream's rebuilt state, and the batched mask apply;
then in a sim engine core: n choices, a continuation resumed mid-grammar, a bad grammar refused."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from microserve.engine.core import EngineCore
from microserve.engine.grammar import GrammarCompiler, GrammarMatcher, GrammarSpec
from microserve.engine.outputs import FinishReason, RequestOutput
from microserve.engine.sampling import InvalidParams, SamplingParams
from microserve.runner.grammar_mask import BitmaskFiller, apply_bitmask, unpack_bitmask
from tests.conftest import make_core, run_to_completion

# Tokens beyond the 256 byte tokens: whole JSON pieces and words, so that a test can spell its answer.
WORDS = ['{"', '":', ' "', '"}', "name", "age", "yes", "no", "maybe", "12"]


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    merges = []
    for word in WORDS:
        encoded = "".join(t for t, _ in byte_level.pre_tokenize_str(word))
        for i in range(2, len(encoded) + 1):  # left to right: each prefix merges with the next character
            if encoded[:i] not in vocab:
                merges.append((encoded[: i - 1], encoded[i - 1]))
                vocab[encoded[:i]] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    compiler = GrammarCompiler(tok.to_str(), [vocab["<eos>"]], len(vocab))
    compiler.vocab = vocab  # type: ignore[attr-defined]
    compiler.hf = tok  # type: ignore[attr-defined]
    return compiler


def ids(compiler: GrammarCompiler, text: str) -> list[int]:
    return list(compiler.hf.encode(text).ids)  # type: ignore[attr-defined]


def eos(compiler: GrammarCompiler) -> int:
    return int(compiler.vocab["<eos>"])  # type: ignore[attr-defined]


def allowed(matcher: GrammarMatcher) -> set[int]:
    masks = BitmaskFiller()([matcher])
    return set(np.flatnonzero(np.unpackbits(masks.view(np.uint8), bitorder="little")).tolist())


def test_choice_allows_only_the_choices_and_ends_after_one(compiler: GrammarCompiler) -> None:
    m = compiler.matcher(GrammarSpec.choice(["yes", "no"]))
    first = allowed(m)
    assert {ids(compiler, "yes")[0], ids(compiler, "no")[0]} <= first
    assert ids(compiler, "maybe")[0] not in first and eos(compiler) not in first
    assert m.accept(ids(compiler, "no")[0]) and m.terminated


def test_json_schema_answer_is_masked_to_the_schema(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    m = compiler.matcher(GrammarSpec.json_schema(schema))
    assert ids(compiler, '{"')[0] in allowed(m) and ids(compiler, "12")[0] not in allowed(m)
    answer = ids(compiler, '{"age": 12}')
    for token in answer[:-1]:
        assert token in allowed(m)
        assert m.accept(token) and not m.terminated
    assert m.accept(answer[-1]) and m.terminated


def test_a_forbidden_token_fails_the_matcher_which_ends_the_sequence(compiler: GrammarCompiler) -> None:
    m = compiler.matcher(GrammarSpec.regex("[0-9]+"))
    assert not m.accept(ids(compiler, "yes")[0])
    assert m.terminated and m.error


def test_regex_allows_eos_once_it_is_satisfied(compiler: GrammarCompiler) -> None:
    m = compiler.matcher(GrammarSpec.regex("[0-9]+"))
    assert eos(compiler) not in allowed(m)
    assert m.accept(ids(compiler, "12")[0]) and not m.terminated
    assert eos(compiler) in allowed(m)
    assert m.accept(eos(compiler)) and m.terminated


def test_advance_rebuilds_a_continued_streams_state(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"name": {"type": "string"}}})
    whole = ids(compiler, '{"name": "no"}')
    fresh = compiler.matcher(spec)
    assert fresh.advance(whole[:3])
    reference = compiler.matcher(spec)
    for token in whole[:3]:
        reference.accept(token)
    assert allowed(fresh) == allowed(reference)
    assert not compiler.matcher(spec).advance(ids(compiler, "yes"))


def test_compiled_grammars_are_cached_and_matchers_are_independent(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec.choice(["yes", "maybe"], param="guided_choice")
    a = compiler.matcher(spec)
    b = compiler.matcher(GrammarSpec.choice(["yes", "maybe"], param="structured_outputs.choice"))
    assert len([s for s in compiler._compiled if s == spec]) == 1  # the field it came from is no key
    a.accept(ids(compiler, "yes")[0])
    assert a.terminated and not b.terminated


def test_cache_drops_the_least_recently_used(compiler: GrammarCompiler) -> None:
    small = GrammarCompiler.__new__(GrammarCompiler)
    small.__dict__.update(compiler.__dict__)
    small._compiled = type(compiler._compiled)()
    small.capacity = 2
    specs = [GrammarSpec.regex(p) for p in ("a+", "b+", "c+")]
    small.matcher(specs[0])
    small.matcher(specs[1])
    small.matcher(specs[0])  # used again: b+ is now the oldest
    small.matcher(specs[2])
    assert list(small._compiled) == [specs[0], specs[2]]


@pytest.mark.parametrize(
    ("spec", "param", "words"),
    [
        (GrammarSpec.json_schema({"type": "nonsense"}, "response_format.json_schema.schema"),
         "response_format.json_schema.schema", "Invalid type"),
        (GrammarSpec.regex("a(b", "guided_regex"), "guided_regex", "regular expression"),
        (GrammarSpec.grammar("start: foo", "structured_outputs.grammar"), "structured_outputs.grammar",
         "foo"),
        (GrammarSpec.grammar('root ::= "a" | b', "guided_grammar"), "guided_grammar", "b"),
    ],
)  # fmt: skip
def test_a_bad_grammar_is_refused_naming_its_field(
    compiler: GrammarCompiler, spec: GrammarSpec, param: str, words: str
) -> None:
    with pytest.raises(InvalidParams, match=words) as info:
        compiler.matcher(spec)
    assert info.value.param == param


def test_spec_shapes() -> None:
    assert GrammarSpec.json_object() == GrammarSpec.json_schema({"type": "object"})
    # The schema's property order is the answer's: the spec keeps the text as given.
    assert json.loads(GrammarSpec.json_schema({"b": 1, "a": 2}).source) == {"b": 1, "a": 2}
    assert list(json.loads(GrammarSpec.json_schema({"b": 1, "a": 2}).source)) == ["b", "a"]
    for bad in ([], ["ok", ""], ["ok", 3]):
        with pytest.raises(InvalidParams) as info:
            GrammarSpec.choice(bad, "guided_choice")  # type: ignore[arg-type]
        assert info.value.param == "guided_choice"
    with pytest.raises(InvalidParams):
        GrammarSpec.json_schema([1], "guided_json")  # type: ignore[arg-type]


@pytest.mark.parametrize("extra", [5, 40])  # a model's vocab wider than its tokenizer's: within the
# mask's last word (267 tokens, 288 bits), or past it (the columns no mask covers are banned)
def test_batched_masks_apply_to_their_rows_only(compiler: GrammarCompiler, extra: int) -> None:
    yes_no = compiler.matcher(GrammarSpec.choice(["yes", "no"]))
    digits = compiler.matcher(GrammarSpec.regex("[0-9]+"))
    masks = BitmaskFiller()([yes_no, digits])
    assert masks.shape == (2, (len(compiler.vocab) + 31) // 32)  # type: ignore[attr-defined]
    vocab = len(compiler.vocab)  # type: ignore[attr-defined]
    logits = torch.randn(3, vocab + extra)
    before = logits.clone()
    apply_bitmask(logits, [0, 2], masks)
    assert torch.equal(logits[1], before[1])
    for row, matcher in ((0, yes_no), (2, digits)):
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == allowed(matcher)
        assert torch.equal(logits[row][list(finite)], before[row][list(finite)])
    assert unpack_bitmask(masks, vocab + extra)[:, vocab:].sum() == 0


# -- in the engine core (the sim runner follows the grammar too) ------------------------------------


@pytest.fixture(scope="module")
def sim() -> EngineCore:
    return make_core(backend="sim", max_model_len=256)


def texts(outs: list[RequestOutput]) -> dict[int, str]:
    by_choice: dict[int, str] = {}
    for out in outs:
        by_choice[out.index] = by_choice.get(out.index, "") + out.text
    return by_choice


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_the_core_decodes_under_the_grammar_for_every_choice(sim: EngineCore) -> None:
    spec = GrammarSpec.json_schema(PERSON)
    outs = run_to_completion(sim, {"p": ([5, 6, 7], SamplingParams(max_tokens=40, n=2, grammar=spec))})["p"]
    answers = texts(outs)
    assert sorted(answers) == [0, 1] and answers[0] != answers[1]  # the sim's choices differ
    for text in answers.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert {o.finish_reason for o in outs if o.finished} == {FinishReason.STOP}
    choice = GrammarSpec.choice(["alpha", "beta"])
    outs = run_to_completion(sim, {"c": ([5, 6, 7], SamplingParams(max_tokens=10, grammar=choice))})["c"]
    assert texts(outs)[0] in ("alpha", "beta")


def test_a_continued_request_resumes_mid_grammar(sim: EngineCore) -> None:
    spec = GrammarSpec.json_schema(PERSON)
    prompt = [5, 6, 7]
    whole = run_to_completion(sim, {"w": (prompt, SamplingParams(max_tokens=40, grammar=spec))})["w"]
    tokens = [t for o in whole for t in o.token_ids]
    k = len(tokens) // 2
    params = SamplingParams(max_tokens=40 - k, grammar=spec, num_prior_output_tokens=k)
    rest = run_to_completion(sim, {"r": (prompt + tokens[:k], params)})["r"]
    # The sim's tokens depend on the sequence alone: the continuation ends exactly as the whole did.
    assert tokens[:k] + [t for o in rest for t in o.token_ids] == tokens
    with pytest.raises(InvalidParams) as info:  # tokens the grammar cannot have produced
        sim.add_request("bad", [*prompt, 5, 6], SamplingParams(grammar=spec, num_prior_output_tokens=2))
    assert info.value.param == "prior_output_tokens" and "bad" not in sim.requests


def test_a_bad_grammar_is_refused_before_the_request_is_queued(sim: EngineCore) -> None:
    with pytest.raises(InvalidParams) as info:
        sim.add_request("x", [5, 6], SamplingParams(grammar=GrammarSpec.regex("a(", "guided_regex")))
    assert info.value.param == "guided_regex" and "x" not in sim.requests and not sim.has_work()
