"""The torch model runner: turns a scheduled batch into tensors, runs the model, samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from microserve.engine.kv_storage import KVLayout, KVStorage
from microserve.engine.scheduler import ScheduledBatch
from microserve.engine.sequence import Sequence
from microserve.model.config import ModelConfig
from microserve.model.llama import AttentionMetadata, Llama, PrefillChunk
from microserve.model.loader import QuantizedTensor
from microserve.runner.sampler import Sampler, token_logprobs

# Tokens run through the model at once when embedding: a batch of long inputs goes in pieces of this size.
EMBED_BATCH_TOKENS = 8192

# (sequence, first position, count): prompt positions whose logits give the next prompt token's logprob
PromptRows = list[tuple[Sequence, int, int]]


class TorchRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict[str, torch.Tensor],
        *,
        dtype: str,
        device: str,
        block_size: int,
        eos_token_ids: frozenset[int],
        quantized: dict[str, QuantizedTensor] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.model = Llama(model_config, weights, self.dtype, self.device, quantized)
        self.quantization = "int4" if quantized else "none"
        self.block_size = block_size
        self.layout = KVLayout(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            block_size=block_size,
            dtype=dtype,
        )
        self.sampler = Sampler(eos_token_ids, self.device)
        self.storage: KVStorage | None = None

    def bind(self, storage: KVStorage) -> None:
        self.storage = storage

    def forget(self, request_id: str) -> None:
        self.sampler.forget(request_id)

    def transfer_time(self, num_tokens: int) -> float:
        return 0.0  # real bytes travel; nothing to model

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Compute the batch's new tokens; a sampled token for each sequence that reached its end."""
        assert self.storage is not None, "bind() the KV storage first"
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)  # decodes first
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        input_ids, positions, meta, logit_rows, samplers = self._prepare(seqs, counts)
        prompt_rows = self._prompt_rows(seqs, counts)
        if prompt_rows:
            extra = [r for _, row, n in prompt_rows for r in range(row, row + n)]
            logit_rows = torch.cat([logit_rows, torch.tensor(extra, dtype=torch.long, device=self.device)])
        logits = self.model(input_ids, positions, meta, self.storage.k, self.storage.v, logit_rows)
        if prompt_rows:
            self._prompt_logprobs(logits[len(samplers) :], prompt_rows)
            logits = logits[: len(samplers)]
        sampled = self.sampler.sample(logits, samplers) if samplers else []
        by_seq = dict(zip(map(id, samplers), sampled, strict=True))
        return [by_seq.get(id(seq)) for seq in batch.seqs]

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], pooling: str = "mean") -> torch.Tensor:
        """Each prompt's embedding: the mean of its tokens' final hidden states (or, `pooling="last"`, its
        last token's), L2-normalised, float32 [len(prompts), hidden]. Prompts run together, each attending
        to itself only, with K/V written to a scratch cache of their own: nothing of the paged cache (nor
        its blocks) is touched."""
        out: list[torch.Tensor] = []
        group: list[list[int]] = []
        for ids in prompts:
            if group and sum(map(len, group)) + len(ids) > EMBED_BATCH_TOKENS:
                out.append(self._embed_group(group, pooling))
                group = []
            group.append(ids)
        if group:
            out.append(self._embed_group(group, pooling))
        return torch.cat(out)

    def _embed_group(self, prompts: list[list[int]], pooling: str) -> torch.Tensor:
        c = self.model.config
        lengths = [len(ids) for ids in prompts]
        total = sum(lengths)
        tokens = torch.tensor([t for ids in prompts for t in ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        chunks, row = [], 0
        for n in lengths:
            chunks.append(PrefillChunk(row, n, None, None))
            row += n
        meta = AttentionMetadata(slot_mapping=torch.arange(total, device=self.device), prefills=chunks)
        shape = (c.num_layers, total, c.num_kv_heads, c.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        hidden = self.model.hidden_states(tokens, positions, meta, k, v).float()
        rows = hidden.split(lengths)
        pooled = torch.stack([r[-1] for r in rows] if pooling == "last" else [r.mean(0) for r in rows])
        return F.normalize(pooled, dim=-1).cpu()

    @staticmethod
    def _prompt_rows(seqs: list[Sequence], counts: list[int]) -> PromptRows:
        """The batch rows (first row, count) of the prompt positions whose logprobs a request asked for."""
        rows: PromptRows = []
        if not any(s.params.prompt_logprobs is not None for s in seqs):
            return rows
        row = 0
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            # Position p predicts prompt token p + 1; the last prompt position predicts the first output.
            upto = min(start + n, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and upto > start:
                rows.append((seq, row, upto - start))
            row += n
        return rows

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows: PromptRows) -> None:
        logprobs = logits.float().log_softmax(-1)
        i = 0
        for seq, _, n in prompt_rows:
            first = seq.num_computed_tokens  # the chunk's first position (its KV is not committed yet)
            k = seq.params.prompt_logprobs or 0
            if first == 0 and not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # nothing predicts the first token
            for p in range(first, first + n):
                if len(seq.prompt_logprobs) == p + 1:  # a recompute after preemption adds nothing twice
                    seq.prompt_logprobs.append(token_logprobs(logprobs[i], seq.token_ids[p + 1], k))
                i += 1

    def _prepare(
        self, seqs: list[Sequence], counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        bs = self.block_size
        tokens: list[int] = []
        slot_chunks: list[torch.Tensor] = []
        pos_chunks: list[torch.Tensor] = []
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        row = 0
        decode_slots: list[int] = []  # decode rows (first in the batch) in plain ints: no tensor per row
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            tokens.extend(seq.token_ids[start:end])
            if n == 1:
                decode_slots.append(seq.block_table[start // bs] * bs + start % bs)
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                table = torch.tensor(seq.block_table, dtype=torch.long)
                positions = torch.arange(start, end)
                pos_chunks.append(positions)
                slot_chunks.append(table[positions // bs] * bs + positions % bs)
                ctx_slots = mask = None
                if start > 0:
                    ctx = torch.arange(end)
                    ctx_slots = (table[ctx // bs] * bs + ctx % bs).to(self.device)
                    mask = (ctx[None, :] <= positions[:, None]).to(self.device)
                prefills.append(PrefillChunk(row, n, ctx_slots, mask))
            if seq.samples_after(n):
                logit_rows.append(row + n - 1)
                samplers.append(seq)
            row += n

        lens = torch.tensor(decode_lens, dtype=torch.long)  # decode rows' context lengths, new token included
        if decode_slots:
            slot_chunks.insert(0, torch.tensor(decode_slots, dtype=torch.long))
            pos_chunks.insert(0, lens - 1)
        meta = AttentionMetadata(slot_mapping=torch.cat(slot_chunks).to(self.device), prefills=prefills)
        if decode_tables:
            meta.num_decode = len(decode_tables)
            max_len = max(decode_lens)
            width = -(-max_len // bs)
            padded = torch.tensor([t[:width] + [t[0]] * (width - len(t[:width])) for t in decode_tables])
            if self.model.kernels is not None:  # it reads the blocks itself
                meta.decode_tables = padded.to(self.device)
                meta.decode_lens = lens.to(self.device)
                meta.block_size = bs
                return self._tensors(tokens, pos_chunks, meta, logit_rows, samplers)
            slots = (padded[:, :, None] * bs + torch.arange(bs)).view(len(decode_tables), -1)[:, :max_len]
            meta.decode_slots = slots.contiguous().to(self.device)
            if min(decode_lens) != max_len:
                meta.decode_mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :].to(
                    self.device
                )
        return self._tensors(tokens, pos_chunks, meta, logit_rows, samplers)

    def _tensors(
        self,
        tokens: list[int],
        pos_chunks: list[torch.Tensor],
        meta: AttentionMetadata,
        logit_rows: list[int],
        samplers: list[Sequence],
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        return (
            torch.tensor(tokens, dtype=torch.long, device=self.device),
            torch.cat(pos_chunks).to(self.device),
            meta,
            torch.tensor(logit_rows, dtype=torch.long, device=self.device),
            samplers,
        )
