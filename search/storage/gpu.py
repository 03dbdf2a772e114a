"""FAISS on the GPU: whether there is one, the device setting, each GPU's shared resources and lock, and
which indexes a GPU copy can serve.

A GPU FAISS build (``faiss-gpu``) trains and searches ``flat``/``ivf``/``ivfpq`` on the GPU (``ivfpq`` only
with at most 96 code bytes, which GPU IVFPQ supports: not at 512-d); the CPU form stays in memory for
``reconstruct``, exact re-scoring and ``save``. The CPU build gives the same answers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

try:
    import faiss
except ImportError:  # neither FAISS build: they are extras so that the two never land together
    raise ImportError(
        "FAISS is not installed: pip install 'histosearch[cpu]' (or 'histosearch[gpu]' on a CUDA machine, never both)"
    ) from None

from search.core.errors import ConfigError
from search.storage.index_types import _inner

log = logging.getLogger(__name__)

# FAISS GPU k-selection limit (k and nprobe).
_GPU_MAX_K = 2048
# Sub-quantizer counts (code bytes) the GPU IVFPQ kernels support.
_GPU_PQ_CODE_BYTES = frozenset({1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96})


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(frozen=True)
class _Gpu:
    """One GPU's FAISS resources and the lock every use of them takes.

    One StandardGpuResources per device and process (each reserves scratch memory on the GPU), shared by
    every index on that device: a live reload clones the new build onto it while request threads search the
    old one. The resources are not thread-safe, so clone, train, add, search and free all hold ``lock``.
    Re-entrant: a GPU index freed by the garbage collector inside a locked call must not deadlock.
    """

    number: int
    resources: object
    lock: threading.RLock


_gpus: dict[int, _Gpu] = {}
_gpus_lock = threading.Lock()


def _gpu_for(gpu: int) -> _Gpu:
    with _gpus_lock:
        if gpu not in _gpus:
            _gpus[gpu] = _Gpu(gpu, faiss.StandardGpuResources(), threading.RLock())
        return _gpus[gpu]


def _resolve_device(device: str) -> int | None:
    """The GPU number to use, or None for the CPU."""
    if device == "cpu":
        return None
    number = device.partition(":")[2]
    if device not in ("auto", "cuda") and not (device.startswith("cuda:") and number.isdigit()):
        raise ConfigError(f"device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not gpu_available():
        if device != "auto":
            # The device setting is shared with the model, which may well run on CUDA through torch
            # while FAISS is the CPU build: the index then runs on the CPU, with the same answers.
            log.warning("device=%s: this FAISS build has no GPU support, the index runs on the CPU", device)
        return None
    gpu = int(number or 0)
    if gpu >= faiss.get_num_gpus():
        raise ConfigError(f"device {device!r}: FAISS sees {faiss.get_num_gpus()} GPU(s)")
    return gpu


def _gpu_capable(kind: str, index: faiss.Index) -> bool:
    if kind == "hnsw":
        return False
    # GPU IVF refuses an nprobe past its k-selection limit when cloned: such an index searches on the CPU.
    if kind in ("ivf", "ivfpq") and _inner(index).nprobe > _GPU_MAX_K:
        return False
    if kind == "ivfpq":
        return _inner(index).pq.M in _GPU_PQ_CODE_BYTES
    return True


def _to_gpu(kind: str, index: faiss.Index, gpu: _Gpu) -> faiss.Index:
    options = faiss.GpuClonerOptions()
    # For IVFPQ this means float16 lookup tables, which GPU PQ needs past 48 code bytes to fit in
    # shared memory; for flat it would store float16 vectors, so it is left off there.
    options.useFloat16 = kind == "ivfpq"
    with gpu.lock:
        return faiss.index_cpu_to_gpu(gpu.resources, gpu.number, index, options)
