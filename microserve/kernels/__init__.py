"""microserve's own CPU kernels (`cpu_ops.cpp`), compiled for this machine at first use.

On a CPU a decode step spends much of its time outside the GEMMs: torch's attention over paged K/V
gathers every context into a padded copy and runs SDPA over it, and the glue between the GEMMs (norms,
RoPE, SwiGLU, residuals) is some thirty eager ops per layer. These kernels read the K/V straight from the
blocks and do each piece of glue in one pass; on a CPU with AMX they also run the bf16 GEMMs
(`amx_linear`, on weights packed as tiles at load), which oneDNN runs at ~2/3 of the speed for a decode
step's few rows, the same GEMM on a GGUF's int4 and int8 groups (`amx_linear_q4`, `amx_linear_q8`),
the MLP's gate/up GEMM with SiLU(gate) * up on its output (`amx_silu_mul`), and greedy sampling's argmax.
They are built with the C++ toolchain torch's extension loader uses (g++, ninja) and cached under
torch's extensions directory, one build per checkout, version of the source and CPU, so only the first
engine pays the ~30 s build; `scripts/setup.sh` builds it ahead (`python -m microserve.kernels`).

Where they cannot be built or loaded (no compiler, another platform), or with `MICROSERVE_KERNELS=0`,
`cpu_ops()` returns None and the model runs on torch's ops alone: the same results within float rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_lock = threading.Lock()
_loaded: list[ModuleType | None] = []  # empty until the first call


def cpu_ops() -> ModuleType | None:
    """The compiled kernels, or None where they are off or cannot be built (logged once)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_load())
    return _loaded[0]


def _load() -> ModuleType | None:
    if os.environ.get("MICROSERVE_KERNELS", "1") == "0":
        log.info("microserve CPU kernels off (MICROSERVE_KERNELS=0)")
        return None
    flags = ["-O3", "-march=native", "-fopenmp"]
    # One build directory per source file, content, flags and CPU: no checkout ever rebuilds another's
    # build, and a home directory shared between machines never loads code built for another CPU.
    key = b"\0".join([str(SOURCE).encode(), SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_flags()])
    digest = hashlib.sha256(key).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        with _ninja_on_path():
            return load(
                name=f"microserve_cpu_ops_{digest}",
                sources=[str(SOURCE)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as error:  # any build or load failure means: run on torch's ops
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # A failed build's message starts with the compile command; its cause is a line naming an error.
        cause = next((line for line in lines[1:] if "error" in line.lower()), lines[-1])
        why = lines[0][:100] if len(lines) == 1 else f"{lines[0][:100]}... {cause}"
        log.warning("microserve CPU kernels unavailable, using torch's ops (%s)", why)
        return None


def _cpu_flags() -> bytes:
    """The CPU's feature flags (what -march=native compiles for), where Linux says."""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            return next((line for line in info if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The `ninja` wheel's binary on PATH while torch looks for it: a venv's bin is often not on PATH."""
    saved = os.environ.get("PATH", "")
    try:
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + saved
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = saved
