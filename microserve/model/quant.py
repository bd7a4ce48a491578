"""GGUF's quantized blocks, unpacked exactly: Q4_0/Q4_1 as int4 groups, Q8_0 as int8 groups.

What the weights are, not how they run: the linear layers that run on them are in `model.layers.linear`,
and which format a model is loaded in (and whether its blocks are kept) is `model.loader`'s policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 32  # elements per Q4_0/Q4_1/Q8_0 block, and the kernels' group
INT4_TYPES = frozenset({"Q4_0", "Q4_1"})
Q8_TYPES = frozenset({"Q8_0"})  # a tied embedding's blocks the LM head runs on (`Int8Linear`)
_Q4_BYTES = {"Q4_0": 18, "Q4_1": 20}  # fp16 d, [fp16 m], 16 bytes of nibbles
_Q8_BYTES = 34  # fp16 d, 32 int8


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """One GGUF weight still in its quantized blocks, rows in HF order (q/k un-permuted for rotary)."""

    name: str  # the HF name
    qtype: str  # GGML type name: Q4_0, Q4_1, Q8_0...
    shape: tuple[int, int]  # [out_features, in_features]
    blocks: np.ndarray  # uint8 [out_features, bytes per row]: each row's blocks run along in_features


def dequantize_blocks(t: QuantizedTensor) -> torch.Tensor:
    """A kept tensor's float32 weights, as `load_weights` would have dequantized them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(t.blocks, GGMLQuantizationType[t.qtype]).reshape(t.shape))


def int4_groups(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1 tensor as (q uint8 [N, K] in 0..15, scale, zero float32 [N, K/32]), exactly.

    Q4_1 is w = d*q + m = (q - 8)*d + (m + 8d); Q4_0 is w = d*(q - 8). Within a block, byte j holds
    element j in its low nibble and element j + 16 in its high one (ggml's layout).
    """
    if t.qtype not in INT4_TYPES:
        raise ValueError(f"{t.name}: {t.qtype} is not an int4 GGUF type")
    n, k = t.shape
    blocks = t.blocks.reshape(n, k // GROUP_SIZE, _Q4_BYTES[t.qtype])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., -16:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
    if t.qtype == "Q4_0":
        return q, d, np.zeros_like(d)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    # d and m are fp16, so 8*d is exact and m + 8d is exact in float32 at these magnitudes.
    return q, d, m + 8 * d


def dequantize_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The float32 weights an `int4_groups` triple stands for."""
    n, k = q.shape
    groups = (q.reshape(n, -1, GROUP_SIZE).astype(np.float32) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(n, k)


def q8_groups(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor as (q int8 [N, K], scale float32 [N, K/32]), exactly: w = q * scale."""
    if t.qtype not in Q8_TYPES:
        raise ValueError(f"{t.name}: {t.qtype} is not Q8_0")
    n, k = t.shape
    raw = t.blocks.reshape(n, k // GROUP_SIZE, _Q8_BYTES)
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = raw[..., 2:].copy().view(np.int8).reshape(n, k)
    return q, scale
