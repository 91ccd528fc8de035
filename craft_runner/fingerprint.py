"""The environment a run computed in, recorded in results.json (``environment``) so that a table mixing
machines or library versions can say so: library versions, CPU and GPU, CUDA and driver, and the numeric flags
that change results beyond summation order (TF32, deterministic algorithms, autocast).

:data:`COMPARED` names the fields that make two cells' numbers not comparable; the CPU thread count, the host
and the Python patch level are recorded but not compared (they change speed, not what is computed).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from craft_runner import __version__

# What craft-report compares across the cells of one table (dotted paths into ``environment``).
COMPARED = ("versions.torch", "versions.timm", "versions.onnxruntime", "versions.numpy", "cpu.model", "gpu.name",
            "gpu.cuda", "gpu.driver", "flags.matmul_allow_tf32", "flags.cudnn_allow_tf32",
            "flags.deterministic_algorithms", "flags.cudnn_deterministic", "flags.float32_matmul_precision",
            "tf32.training", "tf32.measuring", "autocast")


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver(path: str = "/proc/driver/nvidia/version") -> Optional[str]:
    """The NVIDIA kernel driver's version (e.g. 550.54.15), None without one."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def flags() -> dict:
    """The backend switches that change a float32 result beyond summation order, as they are now."""
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def environment(device: torch.device, autocast: Optional[str] = None, training_tf32: bool = False) -> dict:
    """The fingerprint of this process on ``device``; ``autocast``: the training's autocast dtype in effect
    ("bfloat16"), or None for float32; ``training_tf32``: train.tf32. ``flags`` are the backend switches as the
    run found them; ``tf32`` what was in effect where (measurements switch TF32 off, craft_runner.device;
    TF32 exists on CUDA only)."""
    cuda = device.type == "cuda"
    gpu = {"name": None, "cuda": torch.version.cuda, "driver": nvidia_driver(), "count": 0}
    if device.type == "cuda":
        gpu.update(name=torch.cuda.get_device_name(device), count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return {"versions": {"torch": torch.__version__, "timm": _version("timm"), "onnxruntime": _version("onnxruntime"),
                         "numpy": _version("numpy"), "python": platform.python_version()},
            "cpu": {"model": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count()},
            "gpu": gpu, "device": str(device), "flags": flags(), "autocast": autocast or "off",
            "tf32": {"training": bool(training_tf32) and cuda, "measuring": False}}


def versions() -> dict:
    """results.json's ``versions`` (the fingerprint has more)."""
    return {"craft_runner": __version__, "torch": torch.__version__, "timm": _version("timm"),
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    """results.json's ``device``: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def scheduler_job() -> dict:
    """Where the run ran, when a cluster scheduler started it."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def machine(device: torch.device, autocast: Optional[str] = None, training_tf32: bool = False) -> dict:
    """What results.json records of the machine a run computes on: ``versions``, ``device``, ``environment``
    (see :func:`environment` for the arguments) and, when a cluster scheduler started it, ``slurm``."""
    job = scheduler_job()
    return {"versions": versions(), "device": device_name(device),
            "environment": environment(device, autocast, training_tf32), **({"slurm": job} if job else {})}


def _get(env: dict, path: str):
    node = env
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def differences(environments: list) -> dict:
    """{compared field: sorted distinct values} over the recorded ``environments`` (None: not recorded, skipped)
    for each field of :data:`COMPARED` that differs between them."""
    known = [e for e in environments if isinstance(e, dict) and e]  # {}: a run from before the fingerprint
    out = {}
    for path in COMPARED:
        values = {str(_get(e, path)) for e in known}
        if len(values) > 1:
            out[path] = sorted(values)
    return out
