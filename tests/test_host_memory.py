"""The KV pool's host memory: zeros like torch.zeros, on 2 MiB pages where Linux gives them."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from microserve.engine import host_memory
from microserve.engine.kv_storage import KVLayout, KVStorage


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.parametrize("shape", [(3, 5), (4, 1 << 20), (2, 3 << 20, 3)])
def test_zeros_are_torch_zeros(shape):
    t = host_memory.zeros(shape, torch.bfloat16, torch.device("cpu"))
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any()
    t[-1] = 1  # writable to its last element
    assert t.sum().item() == t[-1].numel()


def test_a_big_pool_starts_on_a_huge_page_and_gets_huge_pages():
    before = _anon_huge_kib()
    t = host_memory.zeros((64 << 20,), torch.uint8, torch.device("cpu"))
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    if _thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        # The kernel may fail to find free 2 MiB frames; most of 64 MiB should still come as huge pages.
        assert _anon_huge_kib() - before >= 32 << 10
    del t


def test_kv_storage_is_zeroed_and_keeps_its_writes():
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=64, block_size=16, dtype="bfloat16")
    storage = KVStorage(layout, num_blocks=512)
    assert storage.k.shape == (2, 512 * 16, 3, 64) and not storage.k.any() and not storage.v.any()
    storage.k[1, 17] = 2.0
    storage.copy_block(1, 5)
    assert torch.equal(storage.k[1, 5 * 16 + 1], storage.k[1, 17])


def test_the_malloc_tunable_joins_the_others_once(monkeypatch):
    if host_memory.huge_page_malloc_env({}) is None:
        pytest.skip("not glibc >= 2.35 on Linux with THP on")
    env = host_memory.huge_page_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    assert host_memory.huge_page_malloc_env(env) is None  # already there: no second exec
    assert host_memory.huge_page_malloc_env({"MICROSERVE_HUGE_PAGES": "0"}) is None
    calls = []
    monkeypatch.setattr(host_memory.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory.sys, "argv", ["/usr/bin/microserve", "engine", "--port", "9"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    host_memory.reexec_with_huge_page_malloc()
    ((executable, argv, env),) = calls
    assert executable == sys.executable
    assert argv[1:] == ["-m", "microserve", "engine", "--port", "9"]
    assert env["GLIBC_TUNABLES"] == host_memory.MALLOC_TUNABLE


def test_an_engine_process_runs_with_malloc_on_huge_pages():
    from microserve.processes import start_engine

    if host_memory.huge_page_malloc_env({}) is None:
        pytest.skip("not glibc >= 2.35 on Linux with THP on")
    engine = start_engine("--max-model-len", "256", "--kv-cache-memory", "64MiB")
    try:
        environ = Path(f"/proc/{engine.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"GLIBC_TUNABLES=" + host_memory.MALLOC_TUNABLE.encode() in environ
    finally:
        engine.stop()
