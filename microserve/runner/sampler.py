"""Turn logits into tokens: greedy, temperature, top-k, top-p, min-p, logit bias, the presence,
frequency and repetition penalties, per-request seeds, min_tokens, grammar masks (structured output),
and the logprobs a request asks for.

Rows sample independently, each from its own generator when it has a seed, so a seeded request draws
the same tokens whatever it is batched with. Logprobs are the model's own (before bias, penalties and
temperature), as vLLM reports them by default; the runner hands them over on the sequence.
"""

from __future__ import annotations

import torch

from microserve.engine.outputs import TokenLogprobs
from microserve.engine.sequence import Sequence
from microserve.kernels import cpu_ops
from microserve.runner.grammar_mask import BitmaskFiller, apply_bitmask


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], device: torch.device, seed: int = 0) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        kernels = cpu_ops() if device.type == "cpu" else None
        self._argmax = kernels.argmax_rows if kernels is not None else None
        self._bitmasks = BitmaskFiller()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of `logits` ([rows, vocab], the model's dtype) for the matching sequence."""
        wants_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs = logits.float().log_softmax(-1) if wants_logprobs else None
        self._suppress_early_stops(logits, seqs)
        self._mask_grammars(logits, seqs)
        if all(s.params.greedy and s.params.plain for s in seqs):
            # max().indices is argmax with the same first-index tie rule, 2.7x faster on CPU; the CPU
            # kernel gives the same indices (NaN rules included) in a quarter of max's time, and reads
            # bf16 logits as they are (a float32 copy of a 32-row batch's costs ~0.5 ms a step).
            if self._argmax is not None and logits.dtype in (torch.float32, torch.bfloat16):
                out: list[int] = self._argmax(logits).tolist()
            else:
                out = logits.max(dim=-1).indices.tolist()
        else:
            logits = logits.float()  # softmax, top-k and top-p in float32, whatever the model's dtype
            out = []
            for row, seq in zip(logits, seqs, strict=True):
                p = seq.params
                if not p.plain:
                    row = self._process(row.clone(), seq)
                if p.greedy:
                    out.append(int(row.argmax()))
                    continue
                out.append(self._draw(row / p.temperature, p.top_k, p.top_p, p.min_p, self._generator(seq)))
        if logprobs is not None:
            for row_lp, seq, token in zip(logprobs, seqs, out, strict=True):
                if seq.params.logprobs is not None:
                    seq.logprobs.append(token_logprobs(row_lp, token, seq.params.logprobs))
        return out

    def _suppress_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # Below min_tokens neither EOS nor a stop token id may end the request.
        for i, seq in enumerate(seqs):
            p = seq.params
            # A grammar decides where its answer ends: banning EOS there could leave no token at all.
            if seq.num_completion_tokens < p.min_tokens and seq.grammar is None:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[i, banned] = float("-inf")

    def _mask_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # One batched mask computation and one vectorised apply for all the constrained rows.
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if rows:
            matchers = [g for i in rows if (g := seqs[i].grammar) is not None]
            apply_bitmask(logits, rows, self._bitmasks(matchers))

    @staticmethod
    def _process(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """Bias and penalties on one row of float32 logits (min_p is applied with the temperature)."""
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        output = seq.output_token_ids
        if output and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        return row

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self._shared
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            # Each of n choices draws its own stream from the one seed.
            gen.manual_seed(seq.params.seed + seq.index)
            self._generators[seq.request_id] = gen
        return gen

    @staticmethod
    def _draw(logits: torch.Tensor, top_k: int, top_p: float, min_p: float, gen: torch.Generator) -> int:
        if min_p > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
        if top_k > 0 or top_p < 1.0:
            k = min(top_k, logits.numel()) if top_k > 0 else logits.numel()
            values, indices = logits.topk(k) if top_k > 0 else logits.sort(descending=True)
            if top_p < 1.0:
                probs = values.softmax(-1)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                keep = (probs.cumsum(-1) - probs) < top_p
                values, indices = values[keep], indices[keep]
            choice = torch.multinomial(values.softmax(-1), 1, generator=gen)
            return int(indices[choice])
        return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


def token_logprobs(row: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """`token`'s entry in a row of log-probabilities, with the row's top `k`."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = row.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    logprob = row[token]
    return TokenLogprobs(token, float(logprob), top, int((row > logprob).sum()) + 1)
