"""The decoder's layers, each choosing microserve's CPU kernel or torch's ops once, when built.

`linear` (dense, int4 and int8 weights), `norm` (residual add + RMSNorm), `rope` (rotary tables, RoPE with
the K/V cache write), `attention` (over the paged K/V storage), `mlp` (SwiGLU), `embedding`; `model.llama`
composes them. A factory per layer (`rms_norm`, `qkv_rope`, `paged_attention`, `silu_and_mul`) takes the
kernels (`kernels_for`) and returns the class that runs on them, or torch's, so no call asks again.
Plain classes, not nn.Modules: a decode step calls ~9 of them a layer, and a call through nn.Module's
__call__ took ~2 us against ~0.2 us for a plain one (docs/architecture.md).
"""

from __future__ import annotations

import torch

from microserve.kernels import CpuOps, cpu_ops

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what microserve's row-wise CPU kernels take


def kernels_for(device: torch.device, dtype: torch.dtype) -> CpuOps | None:
    """microserve's CPU kernels where a model on `device` in `dtype` runs on them; None: torch's ops."""
    if device.type != "cpu" or dtype not in KERNEL_DTYPES:
        return None
    return cpu_ops()
