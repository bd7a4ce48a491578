"""Sim engine processes for the end-to-end tests: a cost model of a fixed step time, one engine's
command, and a fleet of them started side by side and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson

from microserve.processes import ManagedProcess, free_port

MODEL = "smollm2-135m"  # what the sim engines call their model


def write_profile(path: Path, step_s: float) -> Path:
    """A sim cost model that takes `step_s` a step whatever the batch."""
    coefficients = {
        "step_overhead_s": step_s,
        "per_token_s": 0.0,
        "per_attention_pair_s": 0.0,
        "per_kv_gather_token_s": 0.0,
        "per_sample_s": 0.0,
    }
    path.write_bytes(
        orjson.dumps({"format": "microserve-cost-model", "version": 1, "coefficients": coefficients})
    )
    return path


def sim_engine(profile: Path | str, *flags: str, port: int | None = None) -> ManagedProcess:
    """A sim engine process on `port` (a free one by default), started but not yet ready."""
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "microserve", "--log-level", "warning", "engine", "--backend", "sim",
           "--sim-profile", str(profile), "--port", str(port), "--threads", "1", *flags]  # fmt: skip
    return ManagedProcess(cmd, f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def sim_fleet(directory: Path, count: int, step_s: float) -> Iterator[list[ManagedProcess]]:
    """`count` sim engines of `step_s` a step, started side by side (one at a time would take `count`
    times as long); each is stopped at the end, continued first (a failed test may leave one SIGSTOPped)."""
    profile = write_profile(directory / "profile.json", step_s)
    started: list[ManagedProcess] = []
    try:
        for _ in range(count):
            started.append(sim_engine(profile))
        for engine in started:
            engine.wait_ready(timeout=180)
        yield started
    finally:
        for engine in started:
            if engine.proc.poll() is None:
                os.kill(engine.proc.pid, signal.SIGCONT)
            engine.stop()
