"""One run, one point of a paper table, as named stages:

prepare ─► diagnostics before (cached) ─► train or load (cached) ─► diagnostics after (cached)
        ─► evaluate ─► compress and evaluate ─► record

Each stage is a function a test or a notebook can call; :func:`run` calls them in that order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from craft_runner import __version__
from craft_runner.atomic import atomic_save, atomic_write_json
from craft_runner.config import to_run_config
from craft_runner.schema import ConfigError, RunConfig
from craft_runner.tracking import make_tracker

log = logging.getLogger(__name__)

# Bumped whenever what a key hashes changes meaning (2: only the fields that apply; key.json).
CACHE_VERSION = 2
# Settings that change how fast a run is, not what it computes.
_NOT_IN_KEY = {"progress", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "root",
               "download", "on_device"}
# Diagnostics switches that decide when and how results are shown, not what is measured.
_NOT_IN_DIAGNOSTICS_KEY = {"enabled", "before", "after", "plots"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------- cache keys


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_key(rc: RunConfig) -> dict:
    """Everything that determines the trained weights (not the compression): the inputs of the cache key."""
    from craft_runner.optim.registry import optimizer_key

    parts = {name: {k: v for k, v in dataclasses.asdict(getattr(rc, name)).items() if k not in _NOT_IN_KEY}
             for name in ("model", "dataset", "arch", "train")}
    return {**parts, "optimizer": optimizer_key(rc.optimizer), "seed": rc.seed, "version": CACHE_VERSION}


def cache_key(rc: RunConfig) -> str:
    return _digest(weights_key(rc))


def diagnostics_key(rc: RunConfig) -> dict:
    """What determines the diagnostics of given weights."""
    s = dataclasses.asdict(rc.sharpness)
    return {**{k: v for k, v in s.items() if k not in _NOT_IN_DIAGNOSTICS_KEY}, "version": CACHE_VERSION}


def cache_entry(directory: Path, inputs: dict) -> Path:
    """``directory`` with ``key.json`` (the inputs of its key) written once, so the entry explains itself."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "key.json").exists():
        atomic_write_json(inputs, directory / "key.json")
    return directory


@contextlib.contextmanager
def locked(directory: Path):
    """One process at a time trains a given cache key (jobs of a sweep share keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Prepared:
    """What every later stage works on: the checked config, the device, the data and the model."""

    rc: RunConfig
    device: torch.device
    data: Any  # craft_runner.data.DataBundle
    model: nn.Module

    @property
    def cache_dir(self) -> Path:
        return Path(self.rc.paths.cache_dir) / cache_key(self.rc)


def prepare(cfg) -> Prepared:
    """Everything that can fail on bad input, before anything is trained or written."""
    from craft_runner.compress import check_compression
    from craft_runner.data import build_data
    from craft_runner.models import check_model_name, create_model, model_data_config
    from craft_runner.train import seed_everything

    rc = to_run_config(cfg)
    check_model_name(rc.model.name)
    device = resolve_device(rc.device)
    seed_everything(rc.seed)
    data_config = model_data_config(rc.model.name)
    data = build_data(rc.dataset, img_size=data_config["input_size"][-1], data_dir=rc.paths.data_dir,
                      data_config=data_config)
    # The SNT transform is applied inside, between pretrained weights and a full checkpoint.
    model = create_model(rc.model, num_classes=data.num_classes, in_chans=data.in_chans, arch=rc.arch)
    check_compression(model, rc.compress)
    model = model.to(device)
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(rc, device, data, model)


class Diagnostics:
    """The diagnostics of the weights of one cache entry, measured once per key and kept beside them."""

    def __init__(self, p: Prepared):
        self.p = p
        s = p.rc.sharpness
        inputs = diagnostics_key(p.rc)
        self.dir = p.cache_dir / "diagnostics" / _digest(inputs)
        self._inputs = inputs
        self.path = self.dir / "diagnostics.json"
        self.results: dict = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._batches = None
        self.enabled = s.enabled

    def measure(self, when: str) -> None:
        """Measure ``when`` ("before" or "after" training) unless switched off or already cached."""
        from craft_runner.diagnostics import run_diagnostics

        s = self.p.rc.sharpness
        if not (self.enabled and getattr(s, when)) or when in self.results:
            return
        if self._batches is None:
            self._batches = self.p.data.calib_batches(s.n_samples, s.batch_size, s.seed, self.p.device)
        cache_entry(self.dir, self._inputs)
        self.results[when] = run_diagnostics(self.p.model, self._batches, s, self.dir, tag=when)
        atomic_write_json(self.results, self.path)

    def metrics(self) -> dict:
        """λmax and every diagnostic scalar, as ``lambda_max_{when}`` and ``{when}/{name}``."""
        out = {}
        for when in ("before", "after"):
            d = self.results.get(when)
            if d is None or not getattr(self.p.rc.sharpness, when):
                continue
            if "lambda_max" in d:
                out[f"lambda_max_{when}"] = d["lambda_max"]["value"]
                out[f"lambda_max_{when}_iterations"] = d["lambda_max"]["iterations"]
            out.update({f"{when}/{k}": v for k, v in d.get("scalars", {}).items()})
        return out

    def record(self) -> dict:
        s = self.p.rc.sharpness
        return {when: d for when, d in self.results.items() if getattr(s, when)}


def train_or_load(p: Prepared) -> dict:
    """Load the cached weights for this key, or train (resuming from the last epoch) and cache them."""
    from craft_runner import train
    from craft_runner.optim import build_optimizer

    rc, cache_dir = p.rc, p.cache_dir
    final = cache_dir / "model.pt"
    if final.exists():
        st = torch.load(final, map_location=p.device, weights_only=False)
        p.model.load_state_dict(st["model"])
        log.info("loaded cached weights %s (no training)", final)
        return {**st["meta"], "trained": False}
    opt = build_optimizer(p.model, rc.optimizer)
    loader = p.data.train_loader(rc.train.batch_size, rc.seed, p.device, rc.dataset)
    info = train.fit(p.model, loader, opt, rc.train, p.device, state_path=cache_dir / "state.pt",
                     desc=rc.optimizer.name)
    meta = {k: info[k] for k in ("train_seconds", "history", "epochs", "steps", "second_pass_fraction")}
    atomic_save({"model": p.model.state_dict(), "meta": meta}, final)
    (cache_dir / "state.pt").unlink(missing_ok=True)
    return {**meta, "trained": True, "resumed_from": info["resumed_from"]}


def evaluate(p: Prepared, model: Optional[nn.Module] = None) -> float:
    """Top-1 accuracy (%) on the test split, in float32 (bf16 would round quantized values again)."""
    from craft_runner import train

    loader = p.data.eval_loader(p.rc.train.eval_batch_size, p.device, p.rc.dataset)
    return train.evaluate(model if model is not None else p.model, loader, p.data.num_classes, p.device, "off",
                          p.rc.train.channels_last)


def compress_and_evaluate(p: Prepared) -> tuple[float, dict]:
    """Compress a copy of the trained model as ``rc.compress`` says; returns its accuracy and the record."""
    from craft_runner import train
    from craft_runner.compress import CompressContext, apply_compression
    from craft_runner.optim import build_optimizer

    rc = p.rc
    # Compressors see the standard memory layout (torch.nn.utils.prune needs it).
    model = copy.deepcopy(p.model).to(memory_format=torch.contiguous_format)
    calib = p.data.calib_batches(rc.compress.calib_size, rc.train.eval_batch_size, rc.compress.calib_seed,
                                 p.device)

    def fine_tune(m: nn.Module, epochs: int) -> dict:
        loader = p.data.train_loader(rc.train.batch_size, rc.seed + 1, p.device, rc.dataset)
        return train.fit(m, loader, build_optimizer(m, rc.optimizer), dataclasses.replace(rc.train, epochs=epochs),
                         p.device, desc="fine-tune")

    info = apply_compression(model, rc.compress, CompressContext(p.device, calib, fine_tune))
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return evaluate(p, model), info


# --------------------------------------------------------------------------------------------- record


def _versions() -> dict:
    import timm

    return {"craft_runner": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _scheduler_job() -> dict:
    """Where the run ran, when a cluster scheduler started it."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def optimized_value(name: Optional[str], metrics: dict) -> Optional[float]:
    """The metric ``optimized_metric`` names (null: compressed_acc when compressing, else fp_acc)."""
    name = name or ("compressed_acc" if "compressed_acc" in metrics else "fp_acc")
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} is not allowed: expected one of {', '.join(sorted(metrics))}")
    return metrics[name]


def record(results: dict, run_dir: Path, tracker) -> None:
    """A finished run: results.json (atomically, whatever W&B does), then the tracker."""
    results["status"] = "ok"
    atomic_write_json(results, run_dir / "results.json")
    metrics = results["metrics"]
    tracker.log(metrics)
    log.info("%s: fp %.2f%%%s, λmax %s", results["config"]["name"], metrics["fp_acc"],
             f", compressed {metrics['compressed_acc']:.2f}% ({metrics['drop']:+.2f})"
             if "compressed_acc" in metrics else "",
             f"{metrics['lambda_max_after']:.4g}" if "lambda_max_after" in metrics else "n/a")


def run(cfg, on_start: Optional[Callable[[RunConfig], None]] = None) -> dict:
    """Run every stage; returns the metrics dict and writes ``results.json`` in ``paths.run_dir``.

    ``on_start(rc)`` runs once the input is known to be good (config, data root, model, compression),
    before anything is trained or written.
    """
    p = prepare(cfg)
    rc = p.rc
    run_dir = Path(rc.paths.run_dir or "outputs/last")
    if on_start is not None:
        on_start(rc)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(rc)
    cache_dir = cache_entry(p.cache_dir, weights_key(rc))
    tracker = make_tracker(rc.logger, config_dict, run_dir, rc.name)
    results = {"config": config_dict, "cache_key": cache_dir.name, "versions": _versions(),
               "device": _device_name(p.device), "status": "running",
               **({"slurm": job} if (job := _scheduler_job()) else {})}
    status = "failed"
    try:
        diagnostics = Diagnostics(p)
        with locked(cache_dir):
            diagnostics.measure("before")
            train_info = train_or_load(p)
            diagnostics.measure("after")
        metrics = {**diagnostics.metrics(), "train_seconds": train_info["train_seconds"],
                   "trained": train_info["trained"], "second_pass_fraction": train_info.get("second_pass_fraction")}
        t0 = time.perf_counter()
        metrics["fp_acc"] = evaluate(p)
        if rc.compress.name != "none":
            metrics["compressed_acc"], results["compression"] = compress_and_evaluate(p)
            metrics["drop"] = metrics["compressed_acc"] - metrics["fp_acc"]
        metrics["eval_seconds"] = time.perf_counter() - t0
        results.update(metrics=metrics, train=train_info, sharpness=diagnostics.record())
        record(results, run_dir, tracker)
        status = "ok"
        return metrics
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        atomic_write_json(results, run_dir / "results.json")
        raise
    finally:
        tracker.finish(status)
