"""Apply grammar masks to logits: every constrained row's bitmask computed in one batched call, and
applied with one vectorised fill (the rows unconstrained in the batch are not touched)."""

from __future__ import annotations

from typing import Any

import llguidance
import numpy as np
import torch

from microserve.engine.grammar import GrammarMatcher


class BitmaskFiller:
    """Computes several matchers' bitmasks at once, on llguidance's thread pool (made on first use)."""

    def __init__(self) -> None:
        self._executor: llguidance.LLExecutor | None = None

    def __call__(self, matchers: list[GrammarMatcher]) -> np.ndarray[Any, Any]:
        """One int32 row of bits per matcher: bit t % 32 of word t // 32 says token t is allowed."""
        masks = np.empty((len(matchers), matchers[0].words), dtype=np.int32)
        if len(matchers) == 1:
            matchers[0].fill_bitmask(masks[0])
            return masks
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        pairs = [(m.llguidance_matcher, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, masks.ctypes.data, masks.shape[1] * 4, len(matchers))
        return masks


def unpack_bitmask(masks: np.ndarray[Any, Any], vocab: int) -> torch.Tensor:
    """Bool [rows, vocab]: True where a token is allowed. Columns past the mask's width are not."""
    bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits.view(np.bool_))
    width = allowed.shape[1]
    if width >= vocab:
        return allowed[:, :vocab]
    return torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - width)], dim=1)


def apply_bitmask(logits: torch.Tensor, rows: list[int], masks: np.ndarray[Any, Any]) -> None:
    """Set the disallowed tokens' logits to -inf, in place, for `rows` of `logits` (one mask each)."""
    # The bits inverted as words (1,536 a row) give the banned tokens directly: no pass to negate the
    # unpacked [rows, vocab] tensor. Columns past the mask's width (a model's padding) stay banned.
    vocab = logits.shape[1]
    if masks.shape[1] * 32 >= vocab:
        bits = np.unpackbits(np.invert(masks).view(np.uint8), axis=1, bitorder="little")
        banned = torch.from_numpy(bits.view(np.bool_))[:, :vocab]
    else:
        banned = ~unpack_bitmask(masks, vocab)
    banned = banned.to(logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index).masked_fill_(banned, float("-inf"))
    logits.index_copy_(0, index, sub)
