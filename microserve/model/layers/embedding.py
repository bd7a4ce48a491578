"""The token embedding: a lookup in the (always dequantized) embedding matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Embedding:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [vocab, hidden]; a tied LM head multiplies by it too

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
