"""Assemble an engine from its configuration: tokenizer, runner (torch or sim), KV cache, scheduler."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from microserve.engine.async_engine import AsyncEngine
from microserve.engine.config import CacheConfig, EngineConfig, resolve_dtype
from microserve.engine.core import EngineCore, Runner
from microserve.engine.kv_cache import KVCacheManager
from microserve.engine.kv_storage import KVLayout, KVStorage
from microserve.engine.scheduler import Scheduler, SchedulerConfig
from microserve.model.config import ModelConfig
from microserve.model.loader import load_config, resolve_model
from microserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 8192


def build_core(config: EngineConfig) -> EngineCore:
    """Load everything an engine needs; raises ValueError/ModelNotFound with a one-line reason."""
    assert config.cache is not None and config.scheduler is not None
    if config.threads:
        torch.set_num_threads(config.threads)
    path = resolve_model(config.model)
    tokenizer = Tokenizer.load(path)
    runner, model_config, capacity_layout, storage_layout = _build_runner(config, path, tokenizer)

    max_model_len = config.max_model_len or min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {max_model_len} exceeds the model's context length "
            f"{model_config.max_position_embeddings}"
        )
    cache = config.cache
    num_blocks = cache.num_blocks or cache.memory_bytes // capacity_layout.bytes_per_block
    check_capacity(num_blocks, cache.block_size, max_model_len)
    log.info(
        "engine: backend=%s model=%s blocks=%d x %d tokens, max_model_len=%d",
        config.backend,
        path.name,
        num_blocks,
        cache.block_size,
        max_model_len,
    )
    return assemble_core(
        runner,
        tokenizer,
        storage_layout,
        num_blocks,
        cache,
        config.scheduler,
        max_model_len,
        device=config.device,
        reservation_ttl_s=config.reservation_ttl_s,
        reservation_share=config.reservation_share,
    )


def check_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """A KV cache must hold at least one whole request; a ValueError says which flag to change."""
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks ({num_blocks * block_size} tokens), less than one "
            f"request of max_model_len={max_model_len} tokens: raise --kv-cache-memory / --num-kv-blocks "
            "or lower --max-model-len"
        )


def assemble_core(
    runner: Runner,
    tokenizer: Tokenizer,
    storage_layout: KVLayout,
    num_blocks: int,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
    max_model_len: int,
    *,
    device: str = "cpu",
    reservation_ttl_s: float = 30.0,
    reservation_share: float = 0.5,
    detokenize: bool = True,
) -> EngineCore:
    """The one assembly of an engine core (KV storage bound to the runner, cache, scheduler, core), for
    the engine process and the simulator's replicas alike."""
    storage = KVStorage(storage_layout, num_blocks, device)
    runner.bind(storage)
    kv = KVCacheManager(num_blocks, cache.block_size, storage, cache.enable_prefix_caching)
    limits = SchedulerConfig(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, max_model_len)
    return EngineCore(
        Scheduler(limits, kv),
        runner,
        tokenizer,
        max_model_len,
        reservation_ttl_s,
        detokenize=detokenize,
        reservation_share=reservation_share,
    )


def build_engine(config: EngineConfig) -> AsyncEngine:
    core = build_core(config)
    name = config.served_model_name or config.model
    return AsyncEngine(core, model_name=name, max_waiting=config.max_waiting)


def _build_runner(
    config: EngineConfig, path: Path, tokenizer: Tokenizer
) -> tuple[Runner, ModelConfig, KVLayout, KVLayout]:
    assert config.cache is not None
    block_size = config.cache.block_size
    dtype = resolve_dtype(config.dtype, config.device)
    if config.backend == "torch":
        from microserve.model.loader import load_model, resolve_quantization
        from microserve.runner.torch_runner import TorchRunner

        quantization = resolve_quantization(config.quantization, path, config.device, dtype)
        log.info("quantization: %s (asked: %s)", quantization, config.quantization)
        model_config, weights, quantized = load_model(path, quantization)
        runner = TorchRunner(
            model_config,
            weights,
            dtype=dtype,
            device=config.device,
            block_size=block_size,
            eos_token_ids=tokenizer.eos_token_ids,
            quantized=quantized,
        )
        return runner, model_config, runner.layout, runner.layout

    from microserve.runner.cost_model import CostModel
    from microserve.runner.sim_runner import SimRunner, plain_word_tokens

    model_config = load_config(path)
    cost = CostModel.from_json(config.sim_profile) if config.sim_profile else CostModel.default()
    sim = SimRunner(cost, plain_word_tokens(tokenizer))
    # Capacity is modelled on the real model's KV size; the bytes actually stored are tiny.
    capacity = KVLayout(
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    return sim, model_config, capacity, SimRunner.storage_layout(block_size)
