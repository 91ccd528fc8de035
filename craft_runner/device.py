"""Where a run computes and at which float32 precision: ``device=auto``, TF32, free memory.

TF32: on Ampere and later GPUs cuDNN convolutions (and matmuls, when allowed) may round float32 inputs to
a 10-bit mantissa. PyTorch's defaults allow it for cuDNN and not for matmuls, so on CUDA a float32
measurement would differ from the CPU's by more than summation order. Every measuring path (curvature,
PTQ scale searches, pruning scores, evaluation, the export check) runs under :func:`full_fp32`; training
sets what ``train.tf32`` says (:func:`tf32`). Both restore the flags they found; results.json records them
(:mod:`craft_runner.fingerprint`). On a machine without CUDA
the flags are plain Python settings: setting them changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Optional

import torch

from craft_runner.runtime import libc_function

log = logging.getLogger(__name__)

__all__ = ["available_memory", "full_fp32", "resolve_device", "tf32"]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on (``enabled``) or off for matmuls and cuDNN convolutions alike; the previous flags restored.

    Also a decorator (``@tf32(False)``), as any ``contextlib.contextmanager``."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def full_fp32():
    """Measure in full float32: TF32 off for matmuls and convolutions (a context manager and a decorator)."""
    return tf32(False)


# --------------------------------------------------------------------------------------------- device=auto


def _gpu_present() -> bool:
    """Signs of an NVIDIA GPU whatever torch thinks: its driver's /proc entry or device nodes."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


@functools.cache
def _cuda_usable() -> tuple[bool, str]:
    """(torch can use a GPU, torch's own warning when it tried and failed). Asked once per process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    why = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
    return ok, why


@functools.cache
def _say_cpu_fallback() -> None:
    """One line, once per process: why device=auto chose the CPU although this torch is a CUDA build."""
    _, why = _cuda_usable()
    build = f"torch {torch.__version__} is a CUDA {torch.version.cuda} build"
    reason = f" ({why})" if why else ""
    if _gpu_present() or why:
        log.warning("device=auto: %s but no GPU is usable%s, e.g. a driver older than CUDA %s or "
                    "CUDA_VISIBLE_DEVICES empty: running on the CPU", build, reason, torch.version.cuda)
    else:
        log.info("device=auto: no NVIDIA GPU on this machine (%s): running on the CPU", build)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when torch can use one, else the CPU, said in one line when this torch
    was built for CUDA (a GPU may be there that torch cannot use); any other name as given."""
    if name != "auto":
        return torch.device(name)
    if _cuda_usable()[0]:
        return torch.device("cuda")
    if torch.version.cuda is not None:
        _say_cpu_fallback()
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a computation on ``device`` may still allocate: free GPU memory plus what torch's caching
    allocator holds unused; on the CPU, the kernel's MemAvailable plus what this process's heap holds freed
    (glibc keeps freed memory, :func:`craft_runner.runtime.keep_freed_memory`). None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 + _heap_free()
        except OSError:
            return None
    return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_free() -> int:
    """Bytes free inside this process's glibc heap (all arenas), 0 where mallinfo2 is missing."""
    fn = libc_function("mallinfo2")
    if fn is None:
        return 0
    fn.restype = _Mallinfo2
    return int(fn().fordblks)
