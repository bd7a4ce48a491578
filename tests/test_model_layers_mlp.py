"""model.layers.mlp: the SwiGLU MLP over fused gate/up and down projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microserve.kernels import cpu_ops
from microserve.model.layers.linear import DenseLinear, torch_silu_mul
from microserve.model.layers.mlp import MLP, silu_and_mul

ops = cpu_ops()


def test_silu_and_mul_is_chosen_once_from_the_kernels():
    assert silu_and_mul(None) is torch_silu_mul
    if ops is not None:
        assert silu_and_mul(ops) == ops.silu_mul


@pytest.mark.parametrize("with_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_is_down_of_silu_gate_times_up(with_kernels, dtype):
    """(In bf16 on AMX the gate/up tiles are paired and SiLU(gate) * up is the GEMM's epilogue.)"""
    if with_kernels and ops is None:
        pytest.skip("microserve's CPU kernels could not be built here")
    kernels = ops if with_kernels else None
    torch.manual_seed(0)
    gate, up, down = torch.randn(64, 32), torch.randn(64, 32), torch.randn(32, 64)
    x = torch.randn(7, 32).to(dtype)
    mlp = MLP(
        DenseLinear(torch.cat([gate, up]).to(dtype), gate_up=True),
        DenseLinear(down.to(dtype)),
        silu_and_mul(kernels),
    )
    want = F.linear(F.silu(F.linear(x, gate.to(dtype))) * F.linear(x, up.to(dtype)), down.to(dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(mlp(x), want, atol=tol * want.abs().max().item(), rtol=tol)
