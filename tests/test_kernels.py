"""microserve's CPU kernels against the torch ops they replace; the engine with and without them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from microserve.kernels import cpu_ops
from tests.conftest import completion_ids, greedy, make_core, run_to_completion

ops = cpu_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="microserve's CPU kernels could not be built here")


def _reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    """What the model computes without the kernel: gather each context, then SDPA per sequence."""
    outs = []
    kv_heads = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        pos = torch.arange(n)
        slots = tables[b][pos // block_size] * block_size + pos % block_size
        k = k_cache.index_select(0, slots).transpose(0, 1).float()  # [kv_heads, n, dim]
        v = v_cache.index_select(0, slots).transpose(0, 1).float()
        qb = q[b].float().view(kv_heads, -1, q.shape[-1])  # [kv_heads, group, dim]
        outs.append(F.scaled_dot_product_attention(qb, k, v, scale=scale).reshape(q.shape[1:]))
    return torch.stack(outs)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(9, 3, 64, 16), (8, 8, 64, 16), (32, 8, 128, 16), (12, 4, 64, 8), (6, 2, 32, 16), (4, 2, 48, 4)],
)
def test_paged_decode_attention_matches_gather_and_sdpa(dtype, heads, kv_heads, dim, block_size):
    torch.manual_seed(heads * dim + block_size)
    lens = torch.tensor([1, 2, block_size, block_size + 1, 37, 200, 63])  # ends inside and on block edges
    per_seq = -(-int(lens.max()) // block_size)
    num_blocks = per_seq * len(lens) + 5
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim).to(dtype)
    tables = torch.randperm(num_blocks)[: per_seq * len(lens)].view(len(lens), per_seq)  # scattered blocks
    q = torch.randn(len(lens), heads, dim).to(dtype)
    scale = dim**-0.5
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, scale)
    want = _reference(q, k_cache, v_cache, tables, lens, block_size, scale)
    assert got.dtype == dtype and got.shape == q.shape
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.float(), want, **tol)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b, element by element (their bit patterns, ordered)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -32768 - bits, bits)

    return (ordered(a) - ordered(b)).abs()


def assert_same_bf16_up_to_sum_order(got: torch.Tensor, want: torch.Tensor) -> None:
    """The norm's float32 sum of squares runs in the kernel's order (16 lanes with AVX-512, one by one
    without) and in torch's: the two differ in the last float bit now and then, which moves a result across
    a bf16 rounding boundary. So: the same bits almost everywhere, one bf16 step (two after the weight's own
    rounding) in the rare element that crossed, never more."""
    ulps = bf16_ulps(got, want)
    assert int(ulps.max()) <= 2, f"{int(ulps.max())} bf16 steps apart"
    assert float((ulps > 0).float().mean()) <= 0.01, f"{int((ulps > 0).sum())} of {ulps.numel()} differ"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(1, 576), (32, 576), (300, 576), (5, 40)])
def test_add_rms_norm_and_silu_mul_round_as_the_eager_ops(dtype, rows, dim):
    torch.manual_seed(rows + dim)
    x, delta = torch.randn(rows, dim).to(dtype), torch.randn(rows, dim).to(dtype)
    w = torch.randn(dim).to(dtype)
    gate_up = (3 * torch.randn(rows, 2 * dim)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    x_in_place = x.clone()
    normed = ops.add_rms_norm(x_in_place, delta, w, 1e-5)
    assert torch.equal(x_in_place, x + delta)  # the residual lands in x, rounded as `x + delta` is
    if dtype == torch.bfloat16:
        assert_same_bf16_up_to_sum_order(normed, _rms_norm(x + delta, w))
        assert_same_bf16_up_to_sum_order(ops.add_rms_norm(x, None, w, 1e-5), _rms_norm(x, w))
        assert torch.equal(ops.silu_mul(gate_up), F.silu(gate) * up)
    else:
        torch.testing.assert_close(normed, _rms_norm(x + delta, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 128), (2, 1, 40)])
def test_rope_qkv_rotates_and_fills_the_cache_as_the_eager_ops(dtype, heads, kv_heads, dim):
    from microserve.model.layers.rope import apply_rope

    torch.manual_seed(dim)
    tokens, num_slots = 11, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    angles = torch.rand(tokens, dim // 2).repeat(1, 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(num_slots)[:tokens]
    k_cache, v_cache = (
        torch.zeros(num_slots, kv_heads, dim, dtype=dtype),
        torch.zeros(num_slots, kv_heads, dim, dtype=dtype),
    )
    q, k = ops.rope_qkv(qkv, cos, sin, heads, kv_heads, slots, k_cache, v_cache)
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref = apply_rope(q_ref.view(tokens, heads, dim), cos[:, None], sin[:, None])
    k_ref = apply_rope(k_ref.reshape(tokens, kv_heads, dim), cos[:, None], sin[:, None])
    if dtype == torch.bfloat16:
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    else:
        torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(k_cache[slots], k) and torch.equal(
        v_cache[slots], v_ref.reshape(tokens, kv_heads, dim)
    )
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_qkv(qkv, cos, sin, heads, kv_heads, slots + num_slots, k_cache, v_cache)


@needs_kernels
def test_paged_decode_attention_refuses_what_it_cannot_read():
    q, cache = torch.randn(2, 4, 64), torch.randn(32, 2, 64)
    tables, lens = torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 4])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.paged_decode_attention(q.bfloat16(), cache, cache, tables, lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(q, cache, cache, tables.int(), lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="one table and length per row"):
        ops.paged_decode_attention(q, cache, cache, tables[:1], lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="head layout"):
        ops.paged_decode_attention(torch.randn(2, 3, 64), cache, cache, tables, lens, 16, 0.125)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_decode_attention(q, cache, cache, tables + 2, lens, 16, 0.125)  # 32 slots: blocks 0, 1
    with pytest.raises(RuntimeError, match="outside its block table"):
        ops.paged_decode_attention(q, cache, cache, tables, lens + 30, 16, 0.125)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.randn(4), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.silu_mul(torch.randn(2, 8).half())


needs_amx = pytest.mark.skipif(
    ops is None or not ops.amx_available(), reason="no AMX on this CPU (or the kernels could not be built)"
)


@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 32])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (96, 576), (576, 1536)])
def test_amx_linear_is_onednn_to_the_bit_up_to_32_rows(rows, n, k):
    torch.manual_seed(rows * n + k)
    w, b, x = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16(), torch.randn(rows, k).bfloat16()
    tiles = ops.amx_pack(w)
    assert tiles.shape == (n // 16, k // 32, 16, 16, 2)
    assert torch.equal(ops.amx_linear(x, tiles, None), F.linear(x, w))  # oneDNN's AMX GEMM
    assert torch.equal(ops.amx_linear(x, tiles, b), F.linear(x, w, b))


@needs_amx
@pytest.mark.parametrize("rows", [0, 33, 100, 512])
def test_amx_linear_rows_do_not_depend_on_the_batch(rows):
    """Any row count: within a rounding of F.linear, and each row exactly what it is computed alone."""
    torch.manual_seed(rows)
    w, x = torch.randn(80, 96).bfloat16(), torch.randn(rows, 96).bfloat16()
    tiles = ops.amx_pack(w)
    got = ops.amx_linear(x, tiles, None)
    assert got.shape == (rows, 80)
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2**-7, atol=1e-3)
    for i in range(0, rows, 31):
        assert torch.equal(got[i], ops.amx_linear(x[i : i + 1], tiles, None)[0])


def _q4_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF-like int4 groups (fp16 scales, zero = m + 8 d) and the bf16 weights they dequantize to."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.randn(n, k // 32, generator=g) * 0.01).half().float()
    zero = (torch.randn(n, k // 32, generator=g) * 0.01).half().float() + 8 * scale
    dense = (q.reshape(n, -1, 32).float() - 8) * scale[..., None] + zero[..., None]
    return q, scale, zero, dense.reshape(n, k).bfloat16()


@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 32, 33, 100])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (960, 576), (576, 1536)])
def test_amx_linear_q4_is_the_dense_gemm_to_the_bit(rows, n, k):
    """Tiles dequantized in registers as the GEMM reaches them equal the weights dequantized at load."""
    q, scale, zero, dense = _q4_weights(n, k, rows + n)
    tiles = ops.amx_pack_q4(q, scale, zero)
    assert tiles.shape == (n // 16, k // 32, 384) and tiles.dtype == torch.uint8
    x, b = torch.randn(rows, k).bfloat16(), torch.randn(n).bfloat16()
    dense_tiles = ops.amx_pack(dense)
    assert torch.equal(ops.amx_linear_q4(x, tiles, None), ops.amx_linear(x, dense_tiles, None))
    assert torch.equal(ops.amx_linear_q4(x, tiles, b), ops.amx_linear(x, dense_tiles, b))
    assert torch.equal(ops.amx_linear_q4(x[:0], tiles, None), torch.empty(0, n).bfloat16())


@needs_amx
def test_amx_q4_refuses_what_it_cannot_pack_or_multiply():
    q, scale, zero, _ = _q4_weights(48, 64, 0)
    with pytest.raises(RuntimeError, match=r"0\.\.15"):
        ops.amx_pack_q4(q | 16, scale, zero)
    with pytest.raises(RuntimeError, match=r"\[N, K/32\] float32"):
        ops.amx_pack_q4(q, scale[:, :1], zero[:, :1])
    with pytest.raises(RuntimeError, match="N % 16 == 0"):
        ops.amx_pack_q4(q[:40], scale[:40], zero[:40])
    with pytest.raises(RuntimeError, match="uint8"):
        ops.amx_pack_q4(q.int(), scale, zero)
    tiles = ops.amx_pack_q4(q, scale, zero)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\] bfloat16"):
        ops.amx_linear_q4(torch.randn(2, 64), tiles, None)
    with pytest.raises(RuntimeError, match="from amx_pack_q4"):
        ops.amx_linear_q4(torch.randn(2, 64).bfloat16(), ops.amx_pack(torch.randn(48, 64).bfloat16()), None)


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 17, 32, 33, 100, 512])
@pytest.mark.parametrize(("n", "k"), [(64, 64), (3072, 576), (96, 1536)])
def test_gate_up_tiles_give_the_same_gemm_and_silu_mul_to_the_bit(rows, n, k):
    """Paired gate/up tiles: amx_linear writes what the plain tiles write, and amx_silu_mul is
    silu_mul(amx_linear(...)) to the bit, on bf16 tiles and on int4 tiles alike."""
    q, scale, zero, dense = _q4_weights(n, k, rows * 7 + n)
    x, b = torch.randn(rows, k).bfloat16(), torch.randn(n).bfloat16()
    plain, paired = ops.amx_pack(dense), ops.amx_pack(dense, gate_up=True)
    assert paired.shape == (n // 32, 2, k // 32, 16, 16, 2)
    assert torch.equal(ops.amx_linear(x, paired, b), ops.amx_linear(x, plain, b))
    expected = ops.silu_mul(ops.amx_linear(x, plain, None))
    assert expected.shape == (rows, n // 2)
    assert torch.equal(ops.amx_silu_mul(x, paired), expected)
    q4_plain, q4_paired = ops.amx_pack_q4(q, scale, zero), ops.amx_pack_q4(q, scale, zero, gate_up=True)
    assert q4_paired.shape == (n // 32, 2, k // 32, 384)
    assert torch.equal(ops.amx_linear_q4(x, q4_paired, b), ops.amx_linear_q4(x, q4_plain, b))
    assert torch.equal(ops.amx_silu_mul(x, q4_paired), expected)


@needs_amx
def test_amx_silu_mul_refuses_tiles_that_are_not_gate_up_pairs():
    q, scale, zero, dense = _q4_weights(48, 64, 0)
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="needs gate/up tiles"):
        ops.amx_silu_mul(x, ops.amx_pack(dense))
    with pytest.raises(RuntimeError, match="needs gate/up tiles"):
        ops.amx_silu_mul(x, ops.amx_pack_q4(q, scale, zero))
    with pytest.raises(RuntimeError, match="N % 32 == 0"):
        ops.amx_pack(dense, gate_up=True)  # 48 rows: three blocks, not pairs
    with pytest.raises(RuntimeError, match="N % 32 == 0"):
        ops.amx_pack_q4(q, scale, zero, gate_up=True)


@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 16, 32, 33, 100])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (96, 576)])
def test_amx_linear_q8_is_the_dense_gemm_to_the_bit(rows, n, k):
    """Q8_0 tiles (q int8, fp16-valued scales) dequantized in registers equal the dense bf16 weights."""
    g = torch.Generator().manual_seed(rows + n)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.randn(n, k // 32, generator=g) * 0.01).half().float()
    dense = (q.float().view(n, -1, 32) * scale[..., None]).view(n, k).bfloat16()
    tiles = ops.amx_pack_q8(q, scale)
    assert tiles.shape == (n // 16, k // 32, 576) and tiles.dtype == torch.uint8
    x, b = torch.randn(rows, k).bfloat16(), torch.randn(n).bfloat16()
    assert torch.equal(ops.amx_linear_q8(x, tiles, b), ops.amx_linear(x, ops.amx_pack(dense), b))
    with pytest.raises(RuntimeError, match="from amx_pack_q8"):
        ops.amx_linear_q8(x, ops.amx_pack_q4(q.to(torch.uint8) & 15, scale, scale), None)
    with pytest.raises(RuntimeError, match="int8"):
        ops.amx_pack_q8(q.to(torch.uint8), scale)


@needs_amx
def test_amx_linear_as_the_first_amx_user_of_a_process():
    """No oneDNN GEMM ran before it: the kernel asks Linux for AMX and loads its own tile configuration."""
    code = (
        "import torch\n"
        "from microserve.kernels import cpu_ops\n"
        "k = cpu_ops()\n"
        "w, x = torch.randn(48, 64).bfloat16(), torch.randn(3, 64).bfloat16()\n"
        "got = k.amx_linear(x, k.amx_pack(w), None)\n"
        "assert torch.equal(got, torch.nn.functional.linear(x, w))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)


@needs_amx
def test_amx_linear_refuses_what_it_cannot_multiply():
    with pytest.raises(RuntimeError, match="N % 16 == 0 and K % 32 == 0"):
        ops.amx_pack(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="N % 16 == 0 and K % 32 == 0"):
        ops.amx_pack(torch.randn(48, 72).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.amx_pack(torch.randn(48, 64))
    tiles = ops.amx_pack(torch.randn(48, 64).bfloat16())
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\] bfloat16"):
        ops.amx_linear(torch.randn(2, 32).bfloat16(), tiles, None)
    with pytest.raises(RuntimeError, match=r"x must be"):
        ops.amx_linear(torch.randn(2, 64), tiles, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[48\] bfloat16"):
        ops.amx_linear(torch.randn(2, 64).bfloat16(), tiles, torch.randn(47).bfloat16())
    with pytest.raises(RuntimeError, match="from amx_pack"):
        ops.amx_linear(torch.randn(2, 64).bfloat16(), torch.randn(48, 64).bfloat16(), None)


@needs_kernels
@pytest.mark.parametrize(("rows", "vocab"), [(1, 5), (3, 17), (4, 16), (32, 49152)])
def test_argmax_rows_is_torch_max_indices(rows, vocab):
    """The first largest value wins a tie; a row with a NaN gives its first NaN, as torch.max does."""
    torch.manual_seed(vocab)
    x = torch.randn(rows, vocab)
    x[0, 1] = x[0, -1] = x[0].max() + 1  # a tie
    x[-1, :] = float("-inf")
    assert torch.equal(ops.argmax_rows(x), x.max(dim=-1).indices)
    if rows > 1:
        x[1, 3:] = float("nan")
        assert torch.equal(ops.argmax_rows(x), x.max(dim=-1).indices)
    b = x.bfloat16()  # bf16 logits: the same rules on the values they hold
    assert torch.equal(ops.argmax_rows(b), b.max(dim=-1).indices)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.argmax_rows(x.half())


@needs_amx
@pytest.mark.parametrize("bias", [False, True])
def test_a_decode_step_in_one_call_equals_the_layer_loop(bias):
    """kernels.decode_layers runs the loop's kernels on the same tensors: the same logits to the bit."""
    core = make_core(dtype="bfloat16")
    model = core.runner.model
    assert model.fused_decode
    if bias:  # q/k/v bias as Qwen2 has it, random: the fused call must add it where the loop does
        torch.manual_seed(0)
        width = model.q_size + 2 * model.kv_size
        for layer in model.layers:
            layer.qkv_bias = torch.randn(width).bfloat16()
        model._qkv_biases = [layer.qkv_bias for layer in model.layers]
    forward, compared = model.forward, []

    def both(input_ids, positions, meta, k_cache, v_cache, logit_rows):
        args = (input_ids, positions, meta, k_cache, v_cache, logit_rows)
        if model._decode_tiles(meta, len(input_ids)) is None:
            return forward(*args)
        fused = forward(*args)
        model.fused_decode = False
        try:
            loop = forward(*args)  # rewrites the same K/V into the same slots
        finally:
            model.fused_decode = True
        assert torch.equal(fused, loop)
        compared.append(len(input_ids))
        return fused

    model.forward = both
    prompts = {f"p{i}": list(range(500 + 31 * i, 520 + 40 * i)) for i in range(8)}
    run_to_completion(core, {rid: (p, greedy(6, ignore_eos=True)) for rid, p in prompts.items()})
    assert compared and max(compared) == 8  # every decode step of the 8 went through both


@needs_kernels
def test_the_engine_decodes_the_same_with_and_without_the_kernel(monkeypatch):
    import microserve.kernels as kernels

    prompts = {f"p{i}": list(range(1000 + 97 * i, 1000 + 97 * i + 20 + 13 * i)) for i in range(6)}
    core = make_core()
    assert core.runner.model.kernels is ops
    with_kernel = run_to_completion(
        core, {rid: (p, greedy(24, ignore_eos=True)) for rid, p in prompts.items()}
    )
    monkeypatch.setattr(kernels, "_loaded", [None])  # as where they cannot be built
    core = make_core()  # every layer chooses torch's ops; the runner prepares the gather path
    assert core.runner.model.kernels is None
    without = run_to_completion(core, {rid: (p, greedy(24, ignore_eos=True)) for rid, p in prompts.items()})
    assert {r: completion_ids(o) for r, o in with_kernel.items()} == {
        r: completion_ids(o) for r, o in without.items()
    }


def test_kernels_can_be_turned_off(monkeypatch):
    import microserve.kernels as kernels

    monkeypatch.setattr(kernels, "_loaded", [])
    monkeypatch.setenv("MICROSERVE_KERNELS", "0")
    assert kernels.cpu_ops() is None


def test_kernels_that_cannot_be_built_fall_back_and_say_why(monkeypatch, tmp_path, caplog):
    import microserve.kernels as kernels

    bad = tmp_path / "cpu_ops.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCES", [bad])
    monkeypatch.setenv("MICROSERVE_KERNELS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    with caplog.at_level(logging.WARNING, logger="microserve.kernels"):
        assert kernels._load() is None
    assert "microserve CPU kernels unavailable, using torch's ops" in caplog.text
    assert "error" in caplog.text.lower()  # the compiler's reason, not only the command line


_TINY_EXTENSION = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""


def _tiny_source(monkeypatch, tmp_path):
    """A one-function extension in place of csrc/ (seconds to build, not half a minute), built
    under tmp_path; returns the build directory `_load` will use."""
    import microserve.kernels as kernels

    source = tmp_path / "tiny_ops.cpp"
    source.write_text(_TINY_EXTENSION)
    monkeypatch.setattr(kernels, "SOURCES", [source])
    monkeypatch.setenv("MICROSERVE_KERNELS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    return kernels.build_directory(kernels._build_key())


@pytest.mark.slow
@pytest.mark.timeout(300)  # before the fix this build waited on the lock forever
def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_runs(monkeypatch, tmp_path, caplog):
    import microserve.kernels as kernels

    directory = _tiny_source(monkeypatch, tmp_path)
    assert directory == tmp_path / "build" / "microserve" / directory.name
    (directory / "lock").touch()  # what torch's loader leaves when its builder is killed mid-build
    with caplog.at_level(logging.WARNING, logger="microserve.kernels"):
        module = kernels._load()
    assert module is not None and module.answer() == 42  # built, not waiting forever on the lock
    assert not (directory / "lock").exists()
    assert f"removing {directory / 'lock'}, left by a kernel build that did not finish" in caplog.text


def test_a_live_builder_is_waited_for_and_its_lock_left_alone(tmp_path):
    import fcntl
    import threading

    import microserve.kernels as kernels

    directory = tmp_path / "build"
    directory.mkdir()
    entered = threading.Event()

    def next_builder():
        with kernels._build_turn(directory):
            entered.set()

    with open(directory / "microserve.flock", "a+b") as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # a builder at work: it holds the flock and torch's lock file
        (directory / "lock").touch()
        waiter = threading.Thread(target=next_builder)
        waiter.start()
        assert not entered.wait(0.5)  # still the live builder's turn
        assert (directory / "lock").exists()
        (directory / "lock").unlink()  # the live builder finishes: torch removes its lock,
    waiter.join(timeout=30)  # then the flock goes with the closed file
    assert entered.is_set() and not (directory / "lock").exists()


@needs_kernels
def test_the_compiled_module_binds_what_ops_py_declares():
    from microserve.kernels.ops import CpuOps

    declared = {name for name in vars(CpuOps) if not name.startswith("_")}
    bound = {name for name in dir(ops) if not name.startswith("_")}
    assert declared == bound


def test_loaded_cpu_ops_says_when_the_kernels_are_not_there(monkeypatch):
    import microserve.kernels as kernels

    monkeypatch.setattr(kernels, "_loaded", [None])
    with pytest.raises(RuntimeError, match="not loaded"):
        kernels.loaded_cpu_ops()
    monkeypatch.setattr(kernels, "_loaded", [kernels])
    assert kernels.loaded_cpu_ops() is kernels
