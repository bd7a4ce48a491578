"""The SwiGLU MLP: down(SiLU(x @ gate.T) * (x @ up.T)), gate and up fused in one projection."""

from __future__ import annotations

import torch

from microserve.kernels import CpuOps
from microserve.model.layers.linear import Activation, Linear, torch_silu_mul


def silu_and_mul(kernels: CpuOps | None) -> Activation:
    """SiLU(gate) * up over the gate/up projection's output: microserve's kernel where `kernels` are given
    (see `layers.kernels_for`; it takes [rows, 2 * half] float32 or bf16), else torch's eager ops."""
    return torch_silu_mul if kernels is None else kernels.silu_mul


class MLP:
    """`mlp(x)` = down(silu_mul(gate_up(x))); on AMX tiles paired gate/up, SiLU(gate) * up is the GEMM's
    epilogue (`Linear.silu_mul`), elsewhere `act` runs on its output."""

    def __init__(self, gate_up: Linear, down: Linear, act: Activation) -> None:
        self.gate_up = gate_up
        self.down = down
        self.act = act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up.silu_mul(x, self.act))
