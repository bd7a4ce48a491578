"""model.layers.norm: RMSNorm with the residual add, torch's or the kernel's, chosen when built."""

from __future__ import annotations

import pytest
import torch

from microserve.kernels import cpu_ops
from microserve.model.layers import kernels_for
from microserve.model.layers.norm import KernelRMSNorm, RMSNorm, rms_norm
from tests.test_kernels import assert_same_bf16_up_to_sum_order

ops = cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="microserve's CPU kernels could not be built here")


def test_kernels_apply_only_to_cpu_float32_and_bfloat16():
    assert kernels_for(torch.device("cpu"), torch.float32) is ops
    assert kernels_for(torch.device("cpu"), torch.bfloat16) is ops
    assert kernels_for(torch.device("cpu"), torch.float16) is None
    assert kernels_for(torch.device("cuda"), torch.bfloat16) is None
    assert type(rms_norm(torch.ones(8), 1e-5, None)) is RMSNorm


def test_torch_norm_adds_the_residual_in_place_then_normalises_as_transformers():
    torch.manual_seed(0)
    x, residual, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    summed = x + residual
    y = RMSNorm(w, 1e-6)(x, residual)
    assert torch.equal(x, summed)
    expected = w * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y, expected)
    assert torch.equal(RMSNorm(w, 1e-6)(summed.clone()), y)  # no residual: x alone


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_norm_is_the_torch_norm(dtype):
    torch.manual_seed(1)
    x, residual, w = torch.randn(5, 576).to(dtype), torch.randn(5, 576).to(dtype), torch.randn(576).to(dtype)
    norm = rms_norm(w, 1e-5, ops)
    assert isinstance(norm, KernelRMSNorm)
    x_kernel, x_torch = x.clone(), x.clone()
    got, want = norm(x_kernel, residual), RMSNorm(w, 1e-5)(x_torch, residual)
    assert torch.equal(x_kernel, x_torch)  # the residual landed in x, rounded alike
    if dtype == torch.bfloat16:
        assert_same_bf16_up_to_sum_order(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
