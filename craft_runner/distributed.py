"""Several processes training one run with DistributedDataParallel.

Started the standard way — ``torchrun --nproc_per_node=N -m craft_runner.run ...`` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT set by torchrun), or as N SLURM tasks of one job (``srun``/submitit with tasks_per_node=N: the
SLURM_* variables are translated here). One process per GPU (nccl), or CPU processes (gloo). Rank 0 owns
everything that is written: the run directory, results.json, the cache entry and the W&B run.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def _from_slurm() -> None:
    """SLURM tasks of one job (one per GPU) as torch.distributed's environment variables."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        import subprocess

        nodes = env.get("SLURM_JOB_NODELIST", "localhost")
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            first = []
        env["MASTER_ADDR"] = first[0] if first else nodes.split(",")[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def setup(device: str = "auto") -> bool:
    """Join the process group when started as several processes; returns whether this run is distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    _from_slurm()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: rank 0 measures the diagnostics while the others wait at the first collective.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each rank its own GPU."""
    if initialized() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel when several processes train it, else ``model`` itself."""
    if world_size() <= 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def agree_on_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory on every rank (each process composed its own, ``${now:...}`` may differ by a
    second); the directory Hydra made for another rank is removed when it is empty."""
    if not initialized():
        return run_dir
    chosen = Path(broadcast(str(run_dir)))
    if chosen != run_dir:
        try:
            run_dir.rmdir()
        except OSError:
            pass
    return chosen


def shutdown() -> None:
    """Leave the process group (the end of a run under torchrun or SLURM tasks)."""
    if initialized():
        torch.distributed.destroy_process_group()


def launched_rank() -> int:
    """The rank this process was started as (torchrun's RANK, SLURM's SLURM_PROCID), group or not."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    return int(env.get("SLURM_PROCID", "0")) if int(env.get("SLURM_NTASKS", "1")) > 1 else 0
