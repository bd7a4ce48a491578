"""RMSNorm with the residual add before it: `norm(x, residual)` is x += residual (in place), then
rms_norm(x) * weight, rounded as transformers rounds it."""

from __future__ import annotations

import torch

from microserve.kernels import CpuOps


class RMSNorm:
    """torch's eager ops: normalise in float32, cast back before the weight, exactly as transformers."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight
        self.eps = eps

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            x += residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KernelRMSNorm(RMSNorm):
    """The add and the norm in one pass of microserve's kernel (`kernels.add_rms_norm`): x [rows, dim]
    contiguous, float32 or bfloat16; the same values as `RMSNorm`."""

    def __init__(self, weight: torch.Tensor, eps: float, kernels: CpuOps) -> None:
        super().__init__(weight, eps)
        self._add_rms_norm = kernels.add_rms_norm

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._add_rms_norm(x, residual, self.weight, self.eps)


def rms_norm(weight: torch.Tensor, eps: float, kernels: CpuOps | None) -> RMSNorm:
    """The kernel's RMSNorm where `kernels` are given (see `layers.kernels_for`), else torch's."""
    return RMSNorm(weight, eps) if kernels is None else KernelRMSNorm(weight, eps, kernels)
