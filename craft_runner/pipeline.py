"""One run, one point of a paper table:

config ─► data ─► model (+ arch transform) ─► train or load cached ─► λmax ─► compress ─► evaluate ─► record
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
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from craft_runner import __version__
from craft_runner.config import RunConfig, to_run_config
from craft_runner.tracking import atomic_write_json, make_tracker

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Settings that change how fast a run is, not what it computes.
_NOT_IN_KEY = {"progress", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "root",
               "download", "on_device"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _NOT_IN_KEY}


def cache_key(rc: RunConfig) -> str:
    """Hash of everything that determines the trained weights (not the compression)."""
    parts = {name: _strip(dataclasses.asdict(getattr(rc, name)))
             for name in ("model", "dataset", "arch", "optimizer", "train")}
    parts.update(seed=rc.seed, version=CACHE_VERSION)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def model_data_config(name: str) -> dict:
    """The model's own input size and normalisation, without building it."""
    import timm
    from timm.data import resolve_data_config

    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # a name timm has no pretrained config for
        pcfg = None
    return resolve_data_config(pretrained_cfg=pcfg.to_dict()) if pcfg else {"input_size": (3, 224, 224)}


def prepare(cfg: DictConfig | RunConfig):
    """Everything that can fail on bad input, before anything is trained or written."""
    from craft_runner.data import build_data, check_dataset
    from craft_runner.models import check_model_name, create_model

    rc = to_run_config(cfg)
    check_model_name(rc.model.name)
    check_dataset(rc.dataset, data_dir=rc.paths.data_dir)
    device = resolve_device(rc.device)
    from craft_runner.train import seed_everything

    seed_everything(rc.seed)
    data_config = model_data_config(rc.model.name)
    data = build_data(rc.dataset, img_size=data_config["input_size"][-1], data_dir=rc.paths.data_dir,
                      data_config=data_config)
    # The SNT transform is applied inside, between pretrained weights and a full checkpoint.
    model = create_model(rc.model, num_classes=data.num_classes, in_chans=data.in_chans, arch=rc.arch)
    from craft_runner.compress import check_compression

    check_compression(model, rc.compress)
    model = model.to(device)
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return rc, device, data, model


def train_or_load(rc: RunConfig, model, data, device, cache_dir: Path) -> dict:
    """Load the cached weights for this key, or train (resuming from the last epoch) and cache them."""
    from craft_runner.optim import build_optimizer
    from craft_runner.train import atomic_save, fit

    final = cache_dir / "model.pt"
    if final.exists():
        st = torch.load(final, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        log.info("loaded cached weights %s (no training)", final)
        return {**st["meta"], "trained": False}
    opt = build_optimizer(model, rc.optimizer)
    loader = data.train_loader(rc.train.batch_size, rc.seed, device, rc.dataset)
    info = fit(model, loader, opt, rc.train, device, state_path=cache_dir / "state.pt",
               desc=f"{rc.optimizer.name}")
    meta = {k: info[k] for k in ("train_seconds", "history", "epochs", "steps", "second_pass_fraction")}
    atomic_save({"model": model.state_dict(), "meta": meta}, final)
    (cache_dir / "state.pt").unlink(missing_ok=True)
    return {**meta, "trained": True, "resumed_from": info["resumed_from"]}


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


def run(cfg: DictConfig | RunConfig, run_dir: Optional[Path] = None, prepared: Optional[tuple] = None) -> dict:
    """Run the whole pipeline; returns the metrics dict (what a Hydra sweeper optimises).

    ``prepared`` is the result of :func:`prepare` when the caller already checked the input.
    """
    from craft_runner.compress import CompressContext, apply_compression
    from craft_runner.diagnostics import run_diagnostics
    from craft_runner.optim import build_optimizer
    from craft_runner.train import evaluate, fit

    rc, device, data, model = prepared or prepare(cfg)
    run_dir = Path(run_dir or rc.paths.run_dir or "outputs/last")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(rc)
    key = cache_key(rc)
    cache_dir = Path(rc.paths.cache_dir) / key
    tracker = make_tracker(rc.logger, config_dict, run_dir, rc.name)
    results = {"config": config_dict, "cache_key": key, "versions": _versions(), "device": _device_name(device),
               "status": "running", **({"slurm": job} if (job := _scheduler_job()) else {})}
    status = "failed"
    try:
        metrics: dict = {}
        s = rc.sharpness
        sharp_batches = data.calib_batches(s.n_samples, s.batch_size, s.seed, device) if s.enabled else None
        skey = hashlib.sha256(json.dumps(dataclasses.asdict(rc.sharpness), sort_keys=True).encode()).hexdigest()[:8]
        with locked(cache_dir):
            # Diagnostics are cached beside the weights they describe (plots too).
            sharp_path = cache_dir / f"sharpness-{skey}.json"
            sharp = _read_json(sharp_path)

            def diagnose(when: str) -> None:
                if sharp_batches and getattr(rc.sharpness, when) and when not in sharp:
                    sharp[when] = run_diagnostics(model, sharp_batches, rc.sharpness,
                                                  cache_dir / f"diagnostics-{skey}", tag=when)
                    atomic_write_json(sharp, sharp_path)

            diagnose("before")
            train_info = train_or_load(rc, model, data, device, cache_dir)
            diagnose("after")
        for when in ("before", "after"):
            if when in sharp and getattr(rc.sharpness, when):
                d = sharp[when]
                if "lambda_max" in d:
                    metrics[f"lambda_max_{when}"] = d["lambda_max"]["value"]
                    metrics[f"lambda_max_{when}_iterations"] = d["lambda_max"]["iterations"]
                metrics.update({f"{when}/{k}": v for k, v in d.get("scalars", {}).items()})
        metrics.update(train_seconds=train_info["train_seconds"], trained=train_info["trained"],
                       second_pass_fraction=train_info.get("second_pass_fraction"))

        eval_loader = data.eval_loader(rc.train.eval_batch_size, device, rc.dataset)
        t0 = time.perf_counter()
        # Evaluated in float32: bf16 would round the quantized values again.
        metrics["fp_acc"] = evaluate(model, eval_loader, data.num_classes, device, "off", rc.train.channels_last)
        if rc.compress.name != "none":
            # Compressors see the standard memory layout (torch.nn.utils.prune needs it).
            cmodel = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
            calib = data.calib_batches(rc.compress.calib_size, rc.train.eval_batch_size, rc.compress.calib_seed,
                                       device)

            def fine_tune(m, epochs):
                ft_cfg = dataclasses.replace(rc.train, epochs=epochs)
                loader = data.train_loader(rc.train.batch_size, rc.seed + 1, device, rc.dataset)
                fit(m, loader, build_optimizer(m, rc.optimizer), ft_cfg, device, desc="fine-tune")

            info = apply_compression(cmodel, rc.compress, CompressContext(device, calib, fine_tune))
            if rc.train.channels_last:
                cmodel = cmodel.to(memory_format=torch.channels_last)
            metrics["compressed_acc"] = evaluate(cmodel, eval_loader, data.num_classes, device, "off",
                                                 rc.train.channels_last)
            metrics["drop"] = metrics["compressed_acc"] - metrics["fp_acc"]
            results["compression"] = info
        metrics["eval_seconds"] = time.perf_counter() - t0
        results.update(metrics=metrics, train=train_info, sharpness=sharp, status="ok")
        atomic_write_json(results, run_dir / "results.json")
        tracker.log(metrics)
        status = "ok"
        log.info("%s: fp %.2f%%%s, λmax %s", rc.name, metrics["fp_acc"],
                 f", compressed {metrics['compressed_acc']:.2f}% ({metrics['drop']:+.2f})"
                 if "compressed_acc" in metrics else "",
                 f"{metrics['lambda_max_after']:.4g}" if "lambda_max_after" in metrics else "n/a")
        return metrics
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        atomic_write_json(results, run_dir / "results.json")
        raise
    finally:
        tracker.finish(status)
