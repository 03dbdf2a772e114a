"""A one-line description of the machine a benchmark ran on, printed under every table."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine() -> str:
    """CPU model, cores, RAM, GPU (when torch sees one), torch and faiss versions."""
    parts = [f"{_cpu_model()}, {os.cpu_count()} cores"]
    ram = _ram_gib()
    if ram is not None:
        parts.append(f"{ram:.0f} GiB RAM")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        parts += [gpu, f"torch {torch.__version__}"]
    except ImportError:
        parts.append("torch not installed")
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
        build = f"GPU build, {gpus} GPU(s)" if gpus else "CPU build"
        parts.append(f"faiss {faiss.__version__} ({build})")
    except ImportError:
        parts.append("faiss not installed")
    return "; ".join(parts)


if __name__ == "__main__":
    print(describe_machine())
