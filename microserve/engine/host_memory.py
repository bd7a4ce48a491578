"""Host memory on 2 MiB pages where Linux gives them: the KV pool, and the engine process's malloc.

A decode step's attention reads every running sequence's blocks, scattered over a pool of hundreds of
megabytes: with 4 KiB pages most of those reads also miss the TLB and wait on a page walk. The pool is
mapped with `MADV_HUGEPAGE` (transparent huge pages, honoured in Linux's default `madvise` mode), so one
TLB entry covers 2 MiB instead of 4 KiB. Measured on the bundled model's decode attention (32 sequences
of 192 tokens, 30 layers, blocks scattered over a 1 GiB pool as they are once the prefix cache has
churned): 13.3 -> 10.8 ms; no change while a fresh pool still hands out neighbouring blocks.
Elsewhere, or where the kernel refuses, plain pages.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import platform
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), in huge pages on a Linux host; every page faulted in now, not mid-step."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or advice is None or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    # One page more than needed, so that the tensor can start on a 2 MiB boundary.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` mapped while it lives
    start = -raw.data_ptr() % HUGE_PAGE
    try:
        region.madvise(advice, start, len(region) - start)
    except OSError as error:  # e.g. THP compiled out or set to "never": plain pages
        log.debug("no huge pages for the KV pool (%s)", error)
    tensor = raw[start : start + nbytes].view(dtype).view(shape)
    tensor.zero_()  # the faults (and the kernel's zeroing) at startup, where they cost nothing
    return tensor


def huge_page_malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with glibc's malloc on transparent huge pages, or None where that cannot apply or
    already does (not glibc >= 2.35 on Linux, THP off, `MICROSERVE_HUGE_PAGES=0`)."""
    if sys.platform != "linux" or environ.get("MICROSERVE_HUGE_PAGES", "1") == "0":
        return None
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return None
    except (ValueError, OSError):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, MALLOC_TUNABLE]))}


def reexec_with_huge_page_malloc() -> None:
    """Start this `python -m microserve ...` again with glibc's malloc on huge pages, where it is not yet.

    glibc reads its tunables only when a process starts; with `glibc.malloc.hugetlb=1` malloc advises THP
    for its heap and its large chunks, so the activations and weights torch allocates sit on 2 MiB pages
    too. An engine's 32-sequence decode is ~3% faster (docs/engine-benchmark.md). Costs one more
    interpreter start (~0.3 s) when the engine starts; the process keeps its pid.
    """
    env = huge_page_malloc_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "microserve", *sys.argv[1:]], env)
