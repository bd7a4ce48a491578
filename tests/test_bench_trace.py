"""JSONL traces: each kind of line, every bad line reported with its number, endpoint compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from microserve.bench.trace import TraceError, TraceWorkload, parse_trace
from microserve.bench.workloads import Endpoint


def test_trace_parses_each_kind_of_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"prompt": "hello there", "output_len": 3}\n'
        "\n"
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],'
        ' "output_len": 5}\n'
    )
    w = TraceWorkload.load(path)
    assert w.natural_count == 2 and w.endpoints == {Endpoint.CHAT}
    r0, r1, r2 = (w.request(i) for i in range(3))
    assert (r0.prompt, r0.expected_output_len) == ("hello there", 3)
    assert r1.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert r2.prompt == r0.prompt and r2.index == 2  # cycled
    assert w.for_run(3) is w  # a replay replays, sweep or not
    ids = TraceWorkload(tuple(parse_trace(['{"prompt": [1, 2, 3], "output_len": 2}'])))
    assert ids.request(0).prompt_len == 3 and ids.endpoints == {Endpoint.COMPLETIONS}


def test_trace_reports_every_bad_line() -> None:
    lines = [
        '{"prompt": "ok", "output_len": 4}',
        "not json",
        '{"prompt": "x"}',
        '{"prompt": "x", "output_len": 0}',
        '{"prompt": "x", "output_len": true}',
        '{"prompt": "x", "messages": [], "output_len": 2}',
        '{"output_len": 2}',
        '{"messages": [{"role": "user"}], "output_len": 2}',
        '{"prompt": [1, "a"], "output_len": 2}',
        "[1, 2]",
    ]
    with pytest.raises(TraceError) as err:
        parse_trace(lines, source="t.jsonl", max_reported=20)
    message = str(err.value)
    for n in range(2, 11):
        assert f"t.jsonl:{n}:" in message
    assert "t.jsonl:1:" not in message
    assert "output_len must be a positive integer, got True" in message
    assert 'messages[0] must be an object with string "role" and "content"' in message
    with pytest.raises(TraceError, match="and 4 more bad line"):
        parse_trace(lines, source="t.jsonl")
    with pytest.raises(TraceError, match="no requests"):
        parse_trace(["", "  "])


def test_trace_cannot_mix_token_ids_and_messages() -> None:
    w = TraceWorkload(
        tuple(
            parse_trace(
                [
                    '{"prompt": [5, 6], "output_len": 2}',
                    '{"messages": [{"role": "user", "content": "hi"}], "output_len": 2}',
                ]
            )
        ),
        path="mix.jsonl",
    )
    with pytest.raises(TraceError, match="cannot mix"):
        w.check_endpoint(Endpoint.CHAT)
