"""One answer being built from the engine's outputs: the choices of n > 1 and of a batch of prompts
interleave, each output tagged with its choice; the answer leaves whole or as SSE frames.

Framework-neutral: a server hands it outputs and writes what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microserve.api.shapes import Choice, ResponseShape, Usage, vllm_prompt_logprobs
from microserve.api.sse import DONE_FRAME, frame
from microserve.engine.outputs import FinishReason, RequestOutput


@dataclass(slots=True)
class Answer:
    """`num_choices` choices, numbered prompt-major (prompt p's choice j is p * n + j).

    `echo` (completions): each prompt's text, put before its choices' text; with logprobs, the
    prompt's logprobs come first too (they arrive on a choice's first output).
    """

    shape: ResponseShape
    num_choices: int
    n: int = 1
    echo: list[str] | None = None
    prompt_logprobs: bool = False  # the request asked for vLLM's prompt_logprobs (not only echo's)
    choices: dict[int, Choice] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    _prompts_counted: set[int] = field(default_factory=set)
    _finished: int = 0
    _reasons: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self._finished == self.num_choices

    @property
    def finish_reason(self) -> str:
        """The request's outcome for metrics: "length" if any choice ran out, else "stop"."""
        return "length" if "length" in self._reasons else "stop"

    def _account(self, prompt: int, out: RequestOutput) -> Choice:
        index = prompt * self.n + out.index
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = Choice(index, logprobs=[] if out.logprobs is not None else None)
            if self.prompt_logprobs:
                choice.prompt_logprobs = out.prompt_logprobs
            if self.echo is not None:
                choice.text = self.echo[prompt]
                if choice.logprobs is not None and out.prompt_logprobs is not None:
                    choice.logprobs.extend(e for e in out.prompt_logprobs if e is not None)
        if prompt not in self._prompts_counted:
            self._prompts_counted.add(prompt)
            self.usage.prompt_tokens += out.prompt_tokens
            self.usage.cached_tokens += out.cached_tokens
        self.usage.completion_tokens += len(out.token_ids)
        if out.finished:
            self._finished += 1
            reason = str(out.finish_reason or FinishReason.STOP)
            self._reasons.append(reason)
            choice.finish_reason = reason
            choice.stop_reason = out.stop_reason
        return choice

    def add(self, prompt: int, out: RequestOutput) -> None:
        """Gather an output into the whole answer."""
        choice = self._account(prompt, out)
        choice.text += out.text
        choice.token_ids.extend(out.token_ids)
        if choice.logprobs is not None and out.logprobs is not None:
            choice.logprobs.extend(out.logprobs)

    def whole(self) -> dict[str, object]:
        return self.shape.full([self.choices[i] for i in sorted(self.choices)], self.usage)

    # -- streaming ------------------------------------------------------------------------------------

    def opening(self) -> list[bytes]:
        return [frame(chunk) for chunk in self.shape.opening_chunks(range(self.num_choices))]

    def frames(self, prompt: int, out: RequestOutput) -> list[bytes]:
        """The SSE frames this output adds: its delta (if any) and, when its choice ends, the finish."""
        new = (prompt * self.n + out.index) not in self.choices
        choice = self._account(prompt, out)
        text, logprobs = out.text, out.logprobs
        if new and self.echo is not None:
            text = self.echo[prompt] + text
            if logprobs is not None and out.prompt_logprobs is not None:
                logprobs = [e for e in out.prompt_logprobs if e is not None] + logprobs
        frames: list[bytes] = []
        # vLLM's prompt_logprobs, when asked: in the first chunk of each choice.
        prompt_entries = out.prompt_logprobs if new and self.prompt_logprobs else None
        # With return_token_ids a token whose text is still held back (half a UTF-8 character, a
        # possible stop string) gets its own chunk too, so that every generated id is reported; so
        # does a token with logprobs.
        shape = self.shape
        if text or (out.token_ids and (shape.return_token_ids or logprobs)) or prompt_entries is not None:
            chunk = shape.delta_chunk(choice.index, text, out.token_ids, logprobs)
            chunks = shape.rewrite(chunk)
            if prompt_entries is not None and shape.token_text is not None:
                first = next((c for c in chunks if c.get("choices")), None)
                if first is None:  # a tool-call reader held the text back: the entries go alone
                    first = shape.delta_chunk(choice.index, "", [], None)
                    chunks.insert(0, first)
                first["choices"][0]["prompt_logprobs"] = vllm_prompt_logprobs(
                    prompt_entries, shape.token_text
                )
            frames.extend(frame(c) for c in chunks)
        if out.finished:
            chunk = shape.finish_chunk(choice.index, choice.finish_reason, choice.stop_reason)
            frames.extend(frame(c) for c in shape.rewrite(chunk))
        return frames

    def closing(self) -> list[bytes]:
        """After the last choice's finish: the usage chunk if asked, then [DONE]."""
        frames = [frame(self.shape.usage_chunk(self.usage))] if self.shape.include_usage else []
        frames.append(DONE_FRAME)
        return frames
