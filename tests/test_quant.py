"""Int4 weights kept from a GGUF's Q4_0/Q4_1 blocks: exact unpacking, the kernel, the model and the engine."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from microserve.cli import build_parser, engine_config
from microserve.engine.config import EngineConfig
from microserve.kernels import cpu_ops
from microserve.model.layers import linear as linear_layers
from microserve.model.layers.linear import (
    INT4_AMX_MAX_ROWS,
    INT4_KERNEL_MAX_ROWS,
    INT4_TORCH_MAX_ROWS_WITH_AMX,
    Q8_KERNEL_MIN_ROWS,
    DenseLinear,
    Int4Linear,
    Int8Linear,
)
from microserve.model.llama import AttentionMetadata, Llama, PrefillChunk
from microserve.model.loader import load_quantized, load_weights, resolve_quantization, unpermute_rotary_rows
from microserve.model.quant import INT4_TYPES, Q8_TYPES, QuantizedTensor, dequantize_int4, int4_groups
from microserve.model.tokenizer import Tokenizer
from tests.conftest import completion_ids, greedy, make_core, run_to_completion
from tests.test_loader import TINY, _gguf_name, _llama_cpp_permute, _tiny_hf_weights, _write_gguf


def _blocks(values: np.ndarray, qtype: QT) -> QuantizedTensor:
    n, k = values.shape
    return QuantizedTensor("w", qtype.name, (n, k), quantize(values, qtype).reshape(n, -1))


def _weights(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    # Rows of very different magnitudes and offsets, so blocks exercise both d and m.
    return (rng.standard_normal((n, k)) * rng.uniform(1e-3, 2, (n, 1)) + rng.uniform(-1, 1, (n, 1))).astype(
        np.float32
    )


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_int4_groups_equal_gguf_dequantize_bit_for_bit(qtype: QT) -> None:
    t = _blocks(_weights(np.random.default_rng(0), 96, 256), qtype)

    q, scale, zero = int4_groups(t)

    assert q.dtype == np.uint8 and q.min() >= 0 and q.max() <= 15 and (q.min(), q.max()) == (0, 15)
    expected = dequantize(t.blocks, qtype).reshape(t.shape)
    unpacked = dequantize_int4(q, scale, zero)
    assert np.array_equal(unpacked, expected)
    if qtype == QT.Q4_1:
        assert np.array_equal(unpacked.view(np.uint32), expected.view(np.uint32))
    else:  # d * 0 is -0.0 for a negative d where we add +0.0; nothing a matmul can tell apart
        assert np.array_equal(np.abs(unpacked).view(np.uint32), np.abs(expected).view(np.uint32))


def test_row_permutation_commutes_with_blockwise_quantization() -> None:
    values = _weights(np.random.default_rng(1), 64, 64)
    t = _blocks(values, QT.Q4_1)
    permuted = QuantizedTensor("w", "Q4_1", t.shape, unpermute_rotary_rows(t.blocks, 4))

    unpacked = dequantize_int4(*int4_groups(permuted))

    assert np.array_equal(unpacked, unpermute_rotary_rows(dequantize(t.blocks, QT.Q4_1).reshape(64, 64), 4))


def _tiny_gguf(path: Path, qtype: QT, *, untied: bool = False, other: dict[str, QT] | None = None) -> Path:
    """The loader tests' tiny llama, every matrix in `qtype` (or `other[part]` for names containing that
    part), q/k permuted as llama.cpp stores them."""
    tensors = {}
    for name, values in _tiny_hf_weights(np.random.default_rng(2), bias=False, untied=untied).items():
        if "q_proj" in name:
            values = _llama_cpp_permute(values, TINY["heads"])
        elif "k_proj" in name:
            values = _llama_cpp_permute(values, TINY["kv_heads"])
        matrix_type = next((t for part, t in (other or {}).items() if part in name), qtype)
        tensors[_gguf_name(name)] = (values, matrix_type if values.ndim == 2 else QT.F32)
    _write_gguf(path, "llama", tensors)
    return path


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1])
def test_load_quantized_keeps_the_blocks_load_weights_dequantizes(tmp_path: Path, qtype: QT) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf", qtype)

    config, dense = load_weights(path)
    config_q, weights, quantized = load_quantized(path, INT4_TYPES)

    assert config_q == config
    # The embedding is looked up, so it is always dequantized; the projections stay packed.
    assert "model.embed_tokens.weight" in weights and "model.embed_tokens.weight" not in quantized
    assert len(quantized) == 7 * TINY["layers"]
    assert sorted([*weights, *quantized]) == sorted(dense)
    for name, t in quantized.items():
        assert t.qtype == qtype.name and t.shape == tuple(dense[name].shape)
        assert torch.equal(torch.from_numpy(dequantize_int4(*int4_groups(t))), dense[name]), name


@pytest.fixture(params=["amx", "torch"])
def int4_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The int4 kernel `Int4Linear` is built on: microserve's AMX one (bf16 where the CPU has AMX; its
    results are the dense GEMM's to the bit) or torch's CPU kernel (its own rounding)."""
    if request.param == "torch":
        monkeypatch.setattr(linear_layers, "pack_q4_for_amx", lambda *args: None)
    else:
        kernels = cpu_ops()
        if kernels is None or not kernels.amx_available():
            pytest.skip("no AMX on this CPU (or the kernels could not be built)")
    return request.param


def test_tiny_int4_model_runs_every_projection_through_the_kernel(tmp_path: Path, int4_kernel: str) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf", QT.Q4_1, untied=True)
    config, dense = load_weights(path)
    _, weights, quantized = load_quantized(path, INT4_TYPES)
    assert "lm_head.weight" in quantized  # an untied head is a projection like any other
    reference = Llama(config, dense, torch.bfloat16, torch.device("cpu"))
    int4 = Llama(config, weights, torch.bfloat16, torch.device("cpu"), quantized)
    ids = list(range(3, 40))

    a, b = _teacher_forced_logits(reference, ids), _teacher_forced_logits(int4, ids)

    # 37 rows: beyond the kernel's limit, so the int4 layers use their dequantized copy, exactly.
    assert torch.equal(a, b)
    for lin in [int4.lm_head, *(lin for layer in int4.layers for lin in layer.linears())]:
        assert isinstance(lin, Int4Linear)
        lin.max_kernel_rows = None
    b = _teacher_forced_logits(int4, ids)
    if int4_kernel == "amx":  # dequantized in registers exactly as at load: the dense model's logits
        assert all(lin.tiles is not None for lin in [int4.lm_head, *(layer.qkv for layer in int4.layers)])
        assert torch.equal(a, b)
        return
    # Random weights amplify bf16 rounding, so measure both against float32 rather than each other.
    exact = _teacher_forced_logits(Llama(config, dense, torch.float32, torch.device("cpu")), ids)
    assert not torch.equal(a, b)
    assert (b - exact).abs().mean() <= 1.5 * (a - exact).abs().mean()


def test_a_fused_layer_of_mixed_types_runs_on_its_dequantized_weights(tmp_path: Path) -> None:
    """v stored as Q8_0 beside Q4_1 q/k (llama.cpp's fallback where a row does not fit the block): the
    fused q/k/v is dense, the other projections stay int4."""
    path = _tiny_gguf(tmp_path / "mixed.gguf", QT.Q4_1, other={"v_proj": QT.Q8_0})
    config, dense = load_weights(path)
    _, weights, quantized = load_quantized(path, INT4_TYPES)
    assert "model.layers.0.self_attn.q_proj.weight" in quantized
    assert "model.layers.0.self_attn.v_proj.weight" in weights

    model = Llama(config, weights, torch.bfloat16, torch.device("cpu"), quantized)

    assert all(isinstance(layer.qkv, DenseLinear) for layer in model.layers)
    assert all(isinstance(layer.mlp.gate_up, Int4Linear) for layer in model.layers)
    reference = Llama(config, dense, torch.bfloat16, torch.device("cpu"))
    ids = list(range(3, 40))  # 37 rows: the int4 layers use their dequantized copy, exactly
    assert torch.equal(_teacher_forced_logits(model, ids), _teacher_forced_logits(reference, ids))


@pytest.fixture(scope="module")
def bundled(model_path: Path):
    return load_weights(model_path), load_quantized(model_path, INT4_TYPES)


@pytest.mark.slow
def test_bundled_model_unpacks_to_exactly_the_dequantized_weights(bundled) -> None:
    (_, dense), (_, _, quantized) = bundled

    assert {t.qtype for t in quantized.values()} == {"Q4_1"} and len(quantized) == 7 * 30
    for name, t in quantized.items():
        unpacked = dequantize_int4(*int4_groups(t))
        assert np.array_equal(unpacked.view(np.uint32), dense[name].numpy().view(np.uint32)), name


def _qkv(quantized: dict[str, QuantizedTensor], dtype: torch.dtype, rows: int | None) -> Int4Linear:
    names = [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    return Int4Linear.from_gguf([quantized[n] for n in names], dtype, max_kernel_rows=rows)


def _qkv_dense(dense: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([dense[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv"])


@pytest.mark.slow
def test_int4_kernel_equals_matmul_with_dequantized_weights(bundled) -> None:
    (_, dense), (_, _, quantized) = bundled
    w = _qkv_dense(dense)
    x = torch.randn(7, w.shape[1], generator=torch.Generator().manual_seed(0))

    # float32: the unpacked weights are exact, only the summation order differs.
    ref = x @ w.T
    out = _qkv(quantized, torch.float32, None)(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()

    # bfloat16: scales and zeros are rounded to bf16 (2^-9 relative) and so is the output.
    xb = x.bfloat16()
    ref = xb.float() @ w.T
    out = _qkv(quantized, torch.bfloat16, None)(xb).float()
    dense_err = ((xb @ w.bfloat16().T).float() - ref).abs().max()
    assert (out - ref).abs().max() <= max(2 * dense_err, 4 * 2**-8 * ref.abs().max())


@pytest.mark.slow
def test_fused_rows_compute_each_part_exactly_as_alone(bundled) -> None:
    (_, _, quantized) = bundled[1]
    names = [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1)).bfloat16()

    fused = Int4Linear.from_gguf([quantized[n] for n in names], torch.bfloat16, max_kernel_rows=None)
    parts = [Int4Linear.from_gguf([quantized[n]], torch.bfloat16, max_kernel_rows=None) for n in names]

    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


@pytest.mark.slow
def test_big_batches_use_the_dequantized_weights_small_ones_the_kernel(bundled, int4_kernel: str) -> None:
    (_, dense), (_, _, quantized) = bundled
    layer = _qkv(quantized, torch.bfloat16, "auto")
    limit = INT4_AMX_MAX_ROWS if int4_kernel == "amx" else INT4_KERNEL_MAX_ROWS
    assert layer.max_kernel_rows == limit
    kernel_only = _qkv(quantized, torch.bfloat16, None)
    same_as_none = DenseLinear(_qkv_dense(dense).bfloat16())
    x = torch.randn(limit + 1, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    bias = torch.randn(960).bfloat16()

    assert torch.equal(layer(x, bias), same_as_none(x, bias))
    small = x[:limit]
    assert torch.equal(layer(small, bias), kernel_only(small, bias))
    layer.dense = None  # from here on only the kernel can answer
    if int4_kernel == "amx":  # the dense weights' results, at any row count the AMX kernel takes
        assert torch.equal(layer(small, bias), same_as_none(small, bias))
        assert torch.equal(layer(x), same_as_none(x))
        fewest = x[:INT4_TORCH_MAX_ROWS_WITH_AMX]  # these go to torch's kernel, with its own rounding
        assert not torch.equal(layer(fewest), same_as_none(fewest))
    else:
        assert not torch.equal(layer(small), same_as_none(small))  # its own rounding


@pytest.mark.slow
def test_activations_in_another_dtype_are_refused(bundled) -> None:
    layer = _qkv(bundled[1][2], torch.bfloat16, None)
    with pytest.raises(TypeError, match="bfloat16"):
        layer(torch.zeros(1, 576))


def _teacher_forced_logits(model: Llama, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids` as one prefill (every row through the same linear layers)."""
    c = model.config
    n = len(ids)
    cache = torch.zeros(c.num_layers, n, c.num_kv_heads, c.head_dim, dtype=model.rotary.cos.dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillChunk(0, n, None, None)])
    rows = torch.arange(n)
    return model(torch.tensor(ids), rows, meta, cache, cache.clone(), rows)


@pytest.mark.slow
def test_int4_model_agrees_with_the_dequantized_bf16_model(
    bundled, model_path: Path, int4_kernel: str
) -> None:
    """Top-1 agreement, not greedy equality: bf16 near-ties flip (the first differs after 6 tokens on one
    prompt), so greedy runs can diverge and then disagree everywhere after."""
    (config, dense), (_, weights, quantized) = bundled
    reference = Llama(config, dense, torch.bfloat16, torch.device("cpu"))
    int4 = Llama(config, weights, torch.bfloat16, torch.device("cpu"), quantized)
    linears = [lin for layer in int4.layers for lin in layer.linears()]
    assert len(linears) == 4 * 30 and all(isinstance(lin, Int4Linear) for lin in linears)
    for lin in linears:  # every row through the int4 kernel, as in decode
        lin.max_kernel_rows = None
    tokenizer = Tokenizer.load(model_path)
    texts = [
        "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum, and its cafes. "
        "Every year, millions of tourists visit the city to enjoy its art, food and history.",
        "def fibonacci(n):\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n\nfor i in range(10):\n    print(i, fibonacci(i))\n",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
        "glucose and oxygen. It takes place in the chloroplasts of the leaf cells.",
    ]
    agree = total = 0
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) >= 30
        a, b = _teacher_forced_logits(reference, ids), _teacher_forced_logits(int4, ids)
        if int4_kernel == "amx":  # the dequantized weights' results exactly, from the int4 weights
            assert torch.equal(a, b)
        else:
            assert not torch.equal(a, b)  # torch's int4 kernel, not the dequantized weights, made `b`
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    assert total >= 100 and agree / total >= 0.95, f"top-1 agreement {agree}/{total}"


@pytest.mark.slow
def test_engine_serves_with_int4() -> None:
    core = make_core(dtype="bfloat16", quantization="int4")
    assert core.runner.quantization == "int4"
    assert isinstance(core.runner.model.layers[0].mlp.gate_up, Int4Linear)
    tok = core.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in ("What is the capital of France?", "What is 2 + 2?", "Name a color.")
    ]
    outs = run_to_completion(core, {f"r{i}": (p, greedy(12)) for i, p in enumerate(prompts)})
    # Three prompts prefill together (the dequantized path), then decode three rows (the kernel).
    assert "Paris" in tok.decode(completion_ids(outs["r0"]))
    assert all(outs[r][-1].finished and completion_ids(outs[r]) for r in outs)
    load = core.load()
    assert load["kv_blocks_free"] == load["kv_blocks_total"]


def test_resolve_quantization(model_path: Path, tmp_path: Path) -> None:
    assert resolve_quantization("auto", model_path, "cpu", "bfloat16") == "int4"
    assert resolve_quantization("int4", model_path, "cpu", "bfloat16") == "int4"
    assert resolve_quantization("none", model_path, "cpu", "bfloat16") == "none"
    # auto falls back to the dequantized weights wherever the kernel cannot serve...
    assert resolve_quantization("auto", model_path, "cpu", "float32") == "none"
    assert resolve_quantization("auto", model_path, "cuda", "bfloat16") == "none"
    assert resolve_quantization("auto", tmp_path, "cpu", "bfloat16") == "none"
    f32 = tmp_path / "f32.gguf"
    _write_gguf(f32, "llama", {"token_embd.weight": (np.zeros((4, 32), np.float32), QT.F32)})
    assert gguf.GGUFReader(f32).tensors[0].tensor_type == QT.F32
    assert resolve_quantization("auto", f32, "cpu", "bfloat16") == "none"
    # ...while asking for int4 there is an error that says why.
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_quantization("int4", model_path, "cpu", "float32")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int4", model_path, "cuda", "bfloat16")
    with pytest.raises(ValueError, match="no Q4_0/Q4_1"):
        resolve_quantization("int4", f32, "cpu", "bfloat16")
    with pytest.raises(ValueError, match="auto, none, int4"):
        resolve_quantization("int8", model_path, "cpu", "bfloat16")


def test_flag_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["engine", "--quantization", "none"])
    assert engine_config(args).quantization == "none"
    assert engine_config(build_parser().parse_args(["engine"])).quantization == "auto"
    assert build_parser().parse_args(["engine", "profile", "--quantization", "int4"]).quantization == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "--quantization", "int8"])
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int8")


def test_dense_linear_is_f_linear() -> None:
    w, x, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5)
    assert torch.equal(DenseLinear(w)(x, b), F.linear(x, w, b))


@pytest.mark.parametrize("rows", [0, 1, 7, 32, 513])
def test_packed_bf16_linear_is_f_linear(rows: int) -> None:
    """To the bit up to 32 rows (AMX tiles or oneDNN's layout alike); beyond, oneDNN reorders its sums."""
    torch.manual_seed(rows)
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    lin = DenseLinear(w)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert (lin.tiles is not None or lin.packed is not None) and lin.weight is None  # the only copy
    same = torch.equal if rows <= 32 else functools.partial(torch.allclose, rtol=2**-7, atol=1e-3)
    x = torch.randn(rows, 64).bfloat16()
    assert same(lin(x), F.linear(x, w))
    assert same(lin(x, b), F.linear(x, w, b))
    x3 = torch.randn(2, rows, 64).bfloat16()
    assert same(lin(x3), F.linear(x3, w))


def test_fp32_weights_stay_plain() -> None:
    w = torch.randn(8, 16)
    lin = DenseLinear(w)
    assert lin.tiles is None and lin.packed is None and lin.weight is w


@pytest.mark.parametrize("rows", [0, 1, 4, 5, 32, 33, 513])
def test_gate_up_layers_silu_mul_equals_silu_mul_of_their_output(int4_kernel: str, rows: int) -> None:
    """`silu_mul` of a gate/up layer, fused into the AMX kernels' output where they run, is the MLP's
    SiLU(gate) * up of the layer's own output to the bit, on every path a row count takes."""
    rng = np.random.default_rng(rows)
    values = _weights(rng, 64, 96)
    q, scale, zero = (torch.from_numpy(a) for a in int4_groups(_blocks(values, QT.Q4_1)))
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).bfloat16()
    int4 = Int4Linear(q, scale, zero, torch.bfloat16, gate_up=True)
    weights = dequantize_int4(q.numpy(), scale.numpy(), zero.numpy())
    dense = DenseLinear(torch.from_numpy(weights).bfloat16(), gate_up=True)
    for layer in (int4, dense):
        got = layer.silu_mul(x)
        assert got.shape == (rows, 32)
        assert torch.equal(got, linear_layers.silu_mul(layer(x)))
    if int4_kernel == "amx":
        assert int4.tiles.shape == (2, 2, 3, 384) and dense.tiles.shape == (2, 2, 3, 16, 16, 2)  # paired


def test_a_tied_q8_0_embedding_gives_an_int8_lm_head_with_the_dense_heads_logits(tmp_path: Path) -> None:
    """The embedding stays dequantized for the lookup; its Q8_0 blocks also come back, and the tied head
    runs on them: the dense head's logits to the bit, kernel or not (37 rows here, 1 row below)."""
    path = _tiny_gguf(tmp_path / "tiny.gguf", QT.Q4_1, other={"embed_tokens": QT.Q8_0})
    config, dense = load_weights(path)
    _, weights, quantized = load_quantized(path, INT4_TYPES, keep_embedding=Q8_TYPES)
    assert quantized["model.embed_tokens.weight"].qtype == "Q8_0"
    assert torch.equal(weights["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert load_quantized(path, INT4_TYPES)[2].keys() == quantized.keys() - {"model.embed_tokens.weight"}

    reference = Llama(config, dense, torch.bfloat16, torch.device("cpu"))
    int4 = Llama(config, weights, torch.bfloat16, torch.device("cpu"), quantized)
    assert isinstance(int4.lm_head, Int8Linear)
    kernels = cpu_ops()
    if kernels is not None and kernels.amx_available():
        assert int4.lm_head.tiles is not None
    ids = list(range(3, 40))
    assert torch.equal(_teacher_forced_logits(int4, ids), _teacher_forced_logits(reference, ids))
    x = torch.randn(1, TINY["hidden"]).bfloat16()
    assert torch.equal(int4.lm_head(x), reference.lm_head(x))


@pytest.mark.parametrize("rows", [1, Q8_KERNEL_MIN_ROWS - 1, Q8_KERNEL_MIN_ROWS, 32, 100])
def test_int8_linear_is_its_dense_copy_to_the_bit(rows: int) -> None:
    rng = np.random.default_rng(rows)
    values = _weights(rng, 64, 96)
    blocks = _blocks(values, QT.Q8_0)
    weight = torch.from_numpy(dequantize(blocks.blocks, QT.Q8_0).reshape(64, 96)).bfloat16()
    layer = Int8Linear.from_gguf(blocks, DenseLinear(weight))
    x, b = torch.randn(rows, 96).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(layer(x), F.linear(x, weight) if rows <= 32 else layer.dense(x))
    assert torch.equal(layer(x, b), layer.dense(x, b))
    with pytest.raises(ValueError, match="not Q8_0"):
        Int8Linear.from_gguf(_blocks(values, QT.Q4_1), DenseLinear(weight))


def test_gate_up_halves_not_in_whole_tile_pairs_keep_plain_tiles(int4_kernel: str) -> None:
    """N = 48 (halves of 24): the tiles cannot pair gate and up blocks, so they stay plain and `silu_mul`
    runs on the GEMM's output, still on the AMX kernels."""
    values = _weights(np.random.default_rng(0), 48, 96)
    q, scale, zero = (torch.from_numpy(a) for a in int4_groups(_blocks(values, QT.Q4_1)))
    int4 = Int4Linear(q, scale, zero, torch.bfloat16, gate_up=True)
    weights = dequantize_int4(q.numpy(), scale.numpy(), zero.numpy())
    dense = DenseLinear(torch.from_numpy(weights).bfloat16(), gate_up=True)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    for layer in (int4, dense):
        assert torch.equal(layer.silu_mul(x), linear_layers.silu_mul(layer(x)))
    if int4_kernel == "amx":
        assert int4.tiles.dim() == 3 and dense.tiles.dim() == 5
