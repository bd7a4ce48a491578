"""Linear layers behind one interface (`layer(x) = x @ W.T`): dense, or weight-only int4 kept packed.

Dense bf16 weights on CPU are packed once at load: as AMX tiles for microserve's GEMM kernel where the CPU
has AMX, else in oneDNN's blocked layout, so no GEMM reorders them again. Int4 reuses a GGUF's own
Q4_0/Q4_1 blocks exactly, so small decode batches read ~5 bits a weight, not 16; a tied Q8_0 embedding's
blocks give the LM head ~9 bits a weight (`Int8Linear`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from microserve.kernels import cpu_ops, loaded_cpu_ops
from microserve.model.quant import GROUP_SIZE, QuantizedTensor, int4_groups, q8_groups

log = logging.getLogger(__name__)

Activation = Callable[[torch.Tensor], torch.Tensor]  # SiLU(gate) * up over a gate/up projection's output

# An int4 kernel beats the bf16 GEMM only while a step is memory-bound, i.e. for few rows. Torch's CPU
# int4 kernel multiplies in fp32 FMAs, 4 rows at a time; on the 2-core Xeon (benchmarks/int4_steps.py) a
# decode step with it vs the dequantized weights on oneDNN: 16 vs 33 ms at 1 row, 33 vs 44 at 8, 43 vs 47
# at 12. microserve's AMX int4 kernel (`kernels.amx_linear_q4`) dequantizes each tile in registers into
# the bf16 GEMM: a 32-row step 24.2 ms against 26.3 with the dense weights on AMX (all of its layers'
# GEMMs alone: 7.9 vs 10.1 ms), but it loses beyond (18.4 vs 13.1 ms at 64 rows) and to torch's kernel on
# the fewest rows, a GEMV: a step 10.3 vs 12.5 ms at 1 row, 12.9 vs 13.7 at 4, 20.5 vs 15.2 at 8.
INT4_KERNEL_MAX_ROWS = 8  # torch's int4 kernel, where there is no AMX
INT4_AMX_MAX_ROWS = 32  # microserve's AMX int4 kernel
INT4_TORCH_MAX_ROWS_WITH_AMX = 4  # with AMX, torch's kernel still takes up to this many rows
# The int8 LM head's kernel dequantizes every tile whatever the batch, so below this many rows (a GEMV,
# where the bf16 stream is cheaper to read than to dequantize) the head keeps its bf16 copy: at 1 row
# 2.2 vs 3.0 ms, at 8 about even, at 16 2.9 vs 1.5, at 32 2.9 vs 2.6 (cold 49,152 x 576 head, 2 threads).
Q8_KERNEL_MIN_ROWS = 16
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what microserve's row-wise CPU kernels take
# The rows oneDNN lays packed weights out for; any row count works, and 1..512 ran as fast as with their
# own hint (decode batches and prefill chunks alike).
PACK_ROWS_HINT = 32


class Linear:
    """`forward(x, bias)` = x @ W.T (+ bias) for x of shape [..., in_features].

    A fused gate/up projection (W = [gate; up], built with `gate_up=True`) also gives the MLP's
    SiLU(x @ gate.T) * (x @ up.T) through `silu_mul`, which its AMX kernels apply as they write the GEMM's
    results instead of in a pass of its own.
    """

    out_features: int
    in_features: int

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, bias)

    def silu_mul(self, x: torch.Tensor, act: Activation | None = None) -> torch.Tensor:
        """SiLU(x @ gate.T) * (x @ up.T) for W = [gate; up]: [..., out_features / 2]. Where no AMX
        epilogue applies, `act` (default: `silu_mul`) runs on the GEMM's output."""
        return (act or silu_mul)(self(x))

    def _silu_mul_on_tiles(self, x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """`silu_mul` in the AMX GEMM's epilogue, on gate/up tiles."""
        y = loaded_cpu_ops().amx_silu_mul(x.reshape(-1, self.in_features), tiles)
        return y.view(*x.shape[:-1], self.out_features // 2)

    def amx_tiles(self, rows: int) -> torch.Tensor | None:
        """The AMX tiles `forward` runs for `rows` rows (`kernels.amx_linear` or `amx_linear_q4` on them),
        or None where it runs something else."""
        return None


class DenseLinear(Linear):
    """A weight matrix in the model's dtype; on CPU in bf16, packed once for the GEMM that runs it.

    AMX tiles for microserve's kernel (`pack_for_amx`) where the CPU has AMX, else oneDNN's blocked
    layout (`pack_for_onednn`), else the plain matrix for F.linear. The packed copy is the layer's only
    weight.
    """

    def __init__(self, weight: torch.Tensor, gate_up: bool = False) -> None:
        self.out_features, self.in_features = weight.shape
        self.tiles = pack_for_amx(weight, gate_up)
        self.packed = pack_for_onednn(weight) if self.tiles is None else None
        self.weight = weight if self.tiles is None and self.packed is None else None
        paired = self.tiles is not None and self.tiles.dim() == 6  # for kernels.amx_silu_mul
        self._paired_tiles = self.tiles if paired else None

    def amx_tiles(self, rows: int) -> torch.Tensor | None:
        return self.tiles

    def silu_mul(self, x: torch.Tensor, act: Activation | None = None) -> torch.Tensor:
        tiles = self._paired_tiles
        return self._silu_mul_on_tiles(x, tiles) if tiles is not None else super().silu_mul(x, act)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, bias)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.tiles is not None:
            y = loaded_cpu_ops().amx_linear(flat, self.tiles, bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


class Int8Linear(Linear):
    """GGUF Q8_0 weights (w = q * scale, q int8, groups of 32 along K) on microserve's AMX int8 kernel.

    Each tile is dequantized in registers as the GEMM reaches it (`kernels.amx_linear_q8`): q * scale is
    exact in float32 and rounds to bf16 as the dense weights do at load, so a batch gets the dense bf16
    GEMM's results to the bit from 9/16 of the bytes. Batches of fewer than `Q8_KERNEL_MIN_ROWS` rows, and
    every batch where the kernel does not apply (no AMX, not bf16), run on `dense`, those weights in bf16.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dense: DenseLinear) -> None:
        n, k = q.shape
        dense_shape = (dense.out_features, dense.in_features)
        if k % GROUP_SIZE or scale.shape != (n, k // GROUP_SIZE) or dense_shape != (n, k):
            raise ValueError(f"int8 weight {tuple(q.shape)} does not match its scales or dense copy")
        self.out_features, self.in_features = n, k
        self.dense = dense
        # Where the dense copy is on AMX tiles, so can the int8 weights be (same shape, same kernels).
        self.tiles = loaded_cpu_ops().amx_pack_q8(q, scale.float()) if dense.tiles is not None else None

    @classmethod
    def from_gguf(cls, blocks: QuantizedTensor, dense: DenseLinear) -> Int8Linear:
        """A layer on a Q8_0 tensor's blocks, beside `dense`, the same weights dequantized."""
        q, scale = q8_groups(blocks)
        return cls(torch.from_numpy(q), torch.from_numpy(scale), dense)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.tiles is None or flat.shape[0] < Q8_KERNEL_MIN_ROWS or x.dtype != torch.bfloat16:
            return self.dense(x, bias)
        y = loaded_cpu_ops().amx_linear_q8(flat, self.tiles, bias)
        return y.view(*x.shape[:-1], self.out_features)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over a fused gate/up projection's output [..., 2 * half], rounded as the eager ops:
    microserve's kernel where it takes this tensor, torch's ops otherwise (chosen at each call; the model
    chooses once, when built: `model.layers.mlp`)."""
    kernels = cpu_ops()
    kernel_input = gate_up.device.type == "cpu" and gate_up.dim() == 2 and gate_up.dtype in KERNEL_DTYPES
    if kernels is not None and kernel_input:
        return kernels.silu_mul(gate_up)
    return torch_silu_mul(gate_up)


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_mul` in torch's eager ops, on any device and dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def pack_for_amx(weight: torch.Tensor, gate_up: bool = False) -> torch.Tensor | None:
    """`weight` as AMX tiles for microserve's bf16 GEMM (`kernels.amx_linear`), or None where it does
    not apply: not bf16 on a CPU with AMX, kernels off, or a shape not in whole tiles (N % 16, K % 32).

    oneDNN's GEMM on the same tiles spends a decode step's few rows on its own overheads; the kernel
    streams the weights instead: all the bundled model's GEMMs in a 32-sequence decode step take 13.6 ms
    instead of 20.7 on the 2-core Xeon, and it is faster at every row count up to a 512-token prefill
    (docs/engine-benchmark.md). Up to 32 rows the result equals oneDNN's to the bit (the same tile sums in
    the same order); beyond, oneDNN changes its order and the two differ by a rounding in a few values.
    Each row's result depends on that row alone, never on the batch it rides in. `gate_up`: W = [gate; up]
    with its blocks paired for `kernels.amx_silu_mul` where N % 32 == 0 (the GEMM's results are the same).
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return None
    n, k = weight.shape
    kernels = cpu_ops()
    if kernels is None or n % 16 or k % 32 or not kernels.amx_available():
        return None
    return kernels.amx_pack(weight, gate_up and n % 32 == 0)


def pack_for_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in oneDNN's blocked GEMM layout, or None where that does not apply (not bf16 on CPU).

    F.linear hands oneDNN a plain matrix, which it reorders into its blocked layout on every call: a
    second pass over every weight on every step. Packed once here, a whole bf16 decode step of the
    bundled model on the 2-core Xeon is ~6 ms shorter, for one sequence and for 32
    (benchmarks/decode_steps.py); the result is the same to the bit. torch's inductor packs the same way
    when it freezes a model for CPU. fp32 GEMMs run in MKL, where packing did not pay.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
    except RuntimeError as error:  # an unusual shape or build: the plain matrix still works
        log.info("keeping a %s weight unpacked: %s", tuple(weight.shape), error)
        return None


class Int4Linear(Linear):
    """Groupwise int4 (group 32): w = (q - 8) * scale + zero, q in 0..15, on int4 kernels.

    Torch's CPU kernel, packed by `_convert_weight_to_int4pack_for_cpu` from [N, K] int32 nibbles (scales
    and zeros one [K/32, N, 2] tensor in the activations' dtype, scale before zero), takes every kernel
    batch; in bf16 on a CPU with AMX only those of at most `torch_kernel_max_rows` rows, and microserve's
    AMX kernel (`pack_q4_for_amx`) the larger ones, with the dense bf16 GEMM's results to the bit.
    Batches of more than `max_kernel_rows` rows (None: no limit; "auto": where the dense GEMM starts to
    win) use the same weights dequantized. `gate_up`: q holds [gate; up], both tile forms paired.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        dtype: torch.dtype,
        max_kernel_rows: int | Literal["auto"] | None = "auto",
        gate_up: bool = False,
    ) -> None:
        n, k = q.shape
        if k % GROUP_SIZE or scale.shape != (n, k // GROUP_SIZE) or zero.shape != scale.shape:
            raise ValueError(f"int4 weight {tuple(q.shape)} does not match scales {tuple(scale.shape)}")
        self.out_features, self.in_features = n, k
        self.dtype = dtype
        self.tiles = pack_q4_for_amx(q, scale, zero, dtype, gate_up)
        paired = self.tiles is not None and self.tiles.dim() == 4  # for kernels.amx_silu_mul
        self._paired_tiles = self.tiles if paired else None
        if max_kernel_rows == "auto":
            max_kernel_rows = INT4_AMX_MAX_ROWS if self.tiles is not None else INT4_KERNEL_MAX_ROWS
        self.max_kernel_rows: int | None = max_kernel_rows
        # torch's kernel: every kernel batch without AMX; with it, the fewest rows (near a GEMV, fp32 FMAs
        # straight from the nibbles beat dequantizing tiles for AMX).
        self.torch_kernel_max_rows = INT4_TORCH_MAX_ROWS_WITH_AMX if self.tiles is not None else None
        nibbles = q.to(torch.int32).contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        # Exactly the weights `none` would hold: the float32 dequantization, cast once. Big batches are
        # compute-bound, where bf16 GEMM is several times faster than the int4 kernel (see README).
        self.dense: DenseLinear | None = None
        if max_kernel_rows is not None:
            groups = (q.reshape(n, -1, GROUP_SIZE).float() - 8) * scale[..., None] + zero[..., None]
            self.dense = DenseLinear(groups.reshape(n, k).to(dtype), gate_up)

    @classmethod
    def from_gguf(
        cls,
        parts: Sequence[QuantizedTensor],
        dtype: torch.dtype,
        max_kernel_rows: int | Literal["auto"] | None = "auto",
        gate_up: bool = False,
    ) -> Int4Linear:
        """One layer from GGUF tensors stacked along the output rows (fused q/k/v or gate/up).

        Stacking is exact: the kernel packs and scales each output row on its own.
        """
        groups = [int4_groups(p) for p in parts]
        q, scale, zero = (torch.from_numpy(np.concatenate(g)) for g in zip(*groups, strict=True))
        return cls(q, scale, zero, dtype, max_kernel_rows, gate_up)

    def _runs_on(self, rows: int) -> DenseLinear | torch.Tensor | None:
        """What a batch of `rows` rows runs on: the dequantized weights' layer, the AMX int4 kernel (its
        tiles) or, None, torch's int4 kernel."""
        if self.dense is not None and self.max_kernel_rows is not None and rows > self.max_kernel_rows:
            return self.dense
        torch_rows = self.torch_kernel_max_rows
        if self.tiles is not None and (torch_rows is None or rows > torch_rows):
            return self.tiles
        return None

    def amx_tiles(self, rows: int) -> torch.Tensor | None:
        on = self._runs_on(rows)
        if isinstance(on, DenseLinear):
            return on.amx_tiles(rows)
        return on

    def silu_mul(self, x: torch.Tensor, act: Activation | None = None) -> torch.Tensor:
        on = self._runs_on(x.reshape(-1, self.in_features).shape[0])
        if isinstance(on, DenseLinear):
            return on.silu_mul(x, act)
        if on is not None and self._paired_tiles is not None:
            self._check_dtype(x)
            return self._silu_mul_on_tiles(x, self._paired_tiles)
        return super().silu_mul(x, act)

    def _check_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.dtype:
            raise TypeError(f"int4 layer built for {self.dtype} activations got {x.dtype}")

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self._check_dtype(x)
        flat = x.reshape(-1, self.in_features)
        on = self._runs_on(flat.shape[0])
        if isinstance(on, DenseLinear):
            return on(x, bias)
        if on is not None:
            y = loaded_cpu_ops().amx_linear_q4(flat, on, bias)
            return y.view(*x.shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.contiguous(), self.packed, GROUP_SIZE, self.scales_and_zeros
        )
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


def pack_q4_for_amx(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype, gate_up: bool = False
) -> torch.Tensor | None:
    """Int4 groups as tiles for microserve's AMX int4 kernel (`kernels.amx_linear_q4`), or None where it
    does not apply: not bf16, no AMX (or kernels off), or N not a multiple of 16.

    Each tile is dequantized in registers as the GEMM reaches it, exactly as the dense weights are at
    load ((q - 8) * scale + zero in float32, rounded to bf16), so the layer's results are the dense bf16
    GEMM's to the bit at 3/8 of the bytes: ~5 bits read per weight instead of 16. `gate_up`: paired as
    `pack_for_amx`'s (where N % 32 == 0).
    """
    n, k = q.shape
    kernels = cpu_ops()
    if dtype != torch.bfloat16 or kernels is None or n % 16 or k % 32 or not kernels.amx_available():
        return None
    return kernels.amx_pack_q4(q.to(torch.uint8), scale.float(), zero.float(), gate_up and n % 32 == 0)
