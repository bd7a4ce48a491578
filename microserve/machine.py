"""What machine a measurement ran on: benchmarks print it beside their figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine() -> str:
    """E.g. 'Intel(R) Xeon(R) Processor, 2 cores, Linux 6.1'."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release().split('-')[0]}"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu' (asked only when an engine starts: importing
    torch costs a second and a few hundred thousand objects that the router and bench never need)."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
