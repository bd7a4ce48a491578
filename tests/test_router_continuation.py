"""Stream tracking and continuation: frames split, ids stripped and counted, a broken stream resumed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from microserve.router.continuation import StreamProgress, UpstreamStreamError, split_frames
from microserve.router.request import Route, RoutedRequest


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


def completion_chunk(index: int, text: str, ids: list[int], reason: str | None = None, **extra: Any) -> bytes:
    choice = {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": reason,
        "token_ids": ids,
        **extra,
    }
    return frame(
        {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m", "choices": [choice]}
    )


def test_a_batch_continues_each_unfinished_choice_under_its_index() -> None:
    raw = orjson.dumps(
        {"prompt": ["p0", "p1"], "n": 2, "max_tokens": 4, "stream": True, "prompt_logprobs": 1,
         "stream_options": {"include_usage": True}}
    )  # fmt: skip
    req = RoutedRequest.parse(Route.COMPLETIONS, raw)
    progress = StreamProgress.for_request(req)
    assert [p.index for p in progress.parts] == [0, 1, 2, 3] and progress.n == 2
    progress.track(completion_chunk(0, " a", [11], prompt_token_ids=[1, 2]))
    progress.track(completion_chunk(0, " b", [12], "stop"))
    progress.track(completion_chunk(3, " c", [13], prompt_token_ids=[5, 6, 7]))
    progress.track(completion_chunk(1, " d", [14], prompt_token_ids=[1, 2]))
    # choice 2 has had nothing yet: it starts over from its prompt as the client gave it
    assert progress.resumable
    assert [p.index for p in progress.unfinished()] == [1, 2, 3]
    bodies = [progress.part_for_resume(p).resume_body(req) for p in progress.unfinished()]
    assert [b["prompt"] if b else None for b in bodies] == [[1, 2, 14], "p1", [5, 6, 7, 13]]
    assert [b["choice_index"] for b in bodies if b] == [1, 0, 1]
    assert [b["max_tokens"] for b in bodies if b] == [3, 4, 3]
    assert [b.get("prompt_logprobs") for b in bodies if b] == [None, 1, None]  # only where none was sent
    assert all("stream_options" not in b for b in bodies if b)  # one usage chunk, the router's

    part = progress.parts[2]
    out = part.reshape(completion_chunk(0, " e", [15], prompt_token_ids=[3, 4], prompt_logprobs=[None]))
    assert out is not None
    sent = orjson.loads(out[6:])["choices"][0]
    assert sent["index"] == 2 and sent["text"] == " e" and sent["prompt_logprobs"] == [None]
    assert part.reshape(b"data: [DONE]") is None  # a part's end is not the stream's
    assert part.prompt_ids == [3, 4]
    ending = b"".join(progress.ending_frames())
    usage = orjson.loads(ending.split(b"\n\n")[0][6:])["usage"]
    # prompts counted once each (p0: 2, p1: 2 ids); every choice's tokens once
    assert usage["prompt_tokens"] == 4 and usage["completion_tokens"] == 5
    assert ending.endswith(b"data: [DONE]\n\n")


def test_a_strategys_own_stream_of_several_choices_tracks_each_choice() -> None:
    """start_generate's stream (pd, migration) with n = 2: reshaped as chat, each choice tracked."""
    raw = orjson.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": True}
    )
    req = RoutedRequest.parse(Route.CHAT, raw)
    progress = StreamProgress.for_request(req, [7, 8])
    out = progress.reshape(completion_chunk(0, " a", [11], prompt_token_ids=[7, 8]))
    assert out is not None and out.count(b'"role":"assistant"') == 2  # an opening for each choice
    out = progress.reshape(completion_chunk(1, " b", [12]))
    assert out is not None and orjson.loads(out[6:])["choices"][0]["index"] == 1
    progress.reshape(completion_chunk(1, "", [], "length"))
    assert [p.generated for p in progress.parts] == [[11], [12]] and progress.resumable
    (part,) = progress.unfinished()
    body = progress.part_for_resume(part).resume_body(req)
    assert body is not None and body["prompt"] == [7, 8, 11] and body["choice_index"] == 0
    assert body["max_tokens"] == 2 and progress.completion_tokens == 2
