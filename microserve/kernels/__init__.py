"""microserve's own CPU kernels (`csrc/`, one file per op family), compiled for this machine at first use.

On a CPU a decode step spends much of its time outside the GEMMs: torch's attention over paged K/V
gathers every context into a padded copy and runs SDPA over it, and the glue between the GEMMs (norms,
RoPE, SwiGLU, residuals) is some thirty eager ops per layer. These kernels read the K/V straight from the
blocks and do each piece of glue in one pass; on a CPU with AMX they also run the bf16 GEMMs
(`amx_linear`, on weights packed as tiles at load), which oneDNN runs at ~2/3 of the speed for a decode
step's few rows, the same GEMM on a GGUF's int4 and int8 groups (`amx_linear_q4`, `amx_linear_q8`),
the MLP's gate/up GEMM with SiLU(gate) * up on its output (`amx_silu_mul`), and greedy sampling's argmax.
The sources are split by op family as sgl-kernel's `csrc/cpu` is: `vec.h` (the AVX-512 helpers every
file shares), `attention.cpp`, `norm.cpp`, `activation.cpp`, `rope.cpp`, `gemm/amx.h` and
`gemm/linear.cpp` (the AMX tile GEMM), `quant.cpp` (the same GEMM on int4/int8 groups), `decode.cpp`,
`sampling.cpp`, and `bindings.cpp`, which binds them as one extension (`ops.h` declares what crosses
files; `ops.py` types it for Python). They are built with the C++ toolchain torch's extension loader
uses (g++, ninja) and cached under torch's extensions directory (`microserve/cpu_ops_<key>`), one build
per checkout, version of the sources (every file under `csrc/`, headers included) and CPU, so only the
first engine pays the build (~30 s; ninja compiles the files in parallel); `scripts/setup.sh` builds it
ahead (`python -m microserve.kernels`). Builders take turns on an flock, which dies with its holder, so
a build killed midway never leaves the next one waiting forever on torch's own lock file.

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

from microserve.kernels.ops import CpuOps

__all__ = ["CpuOps", "build_directory", "cpu_ops", "loaded_cpu_ops"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.rglob("*.cpp"))  # compiled, then linked as one extension
_lock = threading.Lock()
_loaded: list[CpuOps | None] = []  # empty until the first call
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def cpu_ops() -> CpuOps | None:
    """The compiled kernels, or None where they are off or cannot be built (logged once)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_load())
    return _loaded[0]


def loaded_cpu_ops() -> CpuOps:
    """The compiled kernels, for code that only runs where they are loaded (e.g. on weights packed for
    them); a RuntimeError where they are not, which is a bug in the caller."""
    ops = cpu_ops()
    if ops is None:
        raise RuntimeError("microserve CPU kernels are not loaded, yet something packed for them ran")
    return ops


def _load() -> CpuOps | None:
    if os.environ.get("MICROSERVE_KERNELS", "1") == "0":
        log.info("microserve CPU kernels off (MICROSERVE_KERNELS=0)")
        return None
    digest = _build_key()
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory(digest)
        with _ninja_on_path(), _build_turn(directory):
            module: CpuOps = load(  # the compiled module, with what ops.py says it binds
                name=f"microserve_cpu_ops_{digest}",
                sources=[str(source) for source in SOURCES],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=False,
            )
            return module
    except Exception as error:  # any build or load failure means: run on torch's ops
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # A failed build's message starts with the compile command; its cause is a line naming an error.
        cause = next((line for line in lines[1:] if "error" in line.lower()), lines[-1])
        why = lines[0][:100] if len(lines) == 1 else f"{lines[0][:100]}... {cause}"
        log.warning("microserve CPU kernels unavailable, using torch's ops (%s)", why)
        return None


def _build_key() -> str:
    """One build per set of source files, their contents, flags and CPU: no checkout ever rebuilds
    another's build, and a home directory shared between machines never loads code built for another CPU.
    Headers count as sources: every .cpp and .h beside and below the compiled files."""
    parts = [" ".join(_FLAGS).encode(), _cpu_flags()]
    for path in _key_files():
        parts += [str(path).encode(), path.read_bytes()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _key_files() -> list[Path]:
    """The compiled sources and every C++ file (headers too) in their folders and below."""
    files = set(SOURCES)
    for folder in {source.parent for source in SOURCES}:
        files.update(p for p in folder.rglob("*") if p.suffix in (".cpp", ".h") and p.is_file())
    return sorted(files)


def build_directory(digest: str) -> Path:
    """Where the build for `digest` lives: under torch's extensions root (`TORCH_EXTENSIONS_DIR` or its
    per-user cache), in a folder of microserve's own."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    directory = Path(root) / "microserve" / f"cpu_ops_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextmanager
def _build_turn(directory: Path) -> Iterator[None]:
    """This process's turn to build in `directory`, behind an flock the kernel drops when its holder dies.

    torch's loader guards a build with a `lock` file that only the builder removes: one killed midway
    leaves it behind and every later load waits on it forever. Every builder here holds the flock first,
    so a `lock` file found while holding it is such a leftover and is removed."""
    import fcntl  # here, not at the top: Windows has none, and there the kernels fall back anyway

    with open(directory / "microserve.flock", "a+b") as turn:
        try:
            fcntl.flock(turn, fcntl.LOCK_EX)
        except OSError as error:  # a filesystem without flock: torch's lock file alone, as before
            log.warning("no flock on %s (%s): a killed build there can block later ones", directory, error)
        else:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
        yield  # closing the file releases the flock


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
