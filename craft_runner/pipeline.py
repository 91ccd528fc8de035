"""One run, one point of a paper table, as named stages:

prepare ─► diagnostics before (cached) ─► train or load (cached) ─► diagnostics after (cached)
        ─► evaluate ─► compress and evaluate ─► export (real artifact, when asked) ─► record

Each stage is a function a test or a notebook can call; :func:`execute` calls them in that order on what
:func:`prepare` built, :func:`run` skips a run done already, prepares and executes. Around the stages: the
checks (:mod:`.validate`), the training cache (:mod:`.cache`), the cached diagnostics
(:mod:`.cached_diagnostics`), results.json (:mod:`.results`), what is recorded of the machine
(:mod:`.fingerprint`), the tracker (:mod:`.tracking`) and the dry-run plan (:mod:`.plan`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from craft_runner import distributed, results, train
from craft_runner.cache import cache_entry, digest, load_cached_weights, locked, store_weights, weights_key
from craft_runner.cache import cache_key as cache_key  # re-exported: craft_runner.bench.smoke_paper uses it
from craft_runner.cached_diagnostics import Diagnostics
from craft_runner.compress import CompressContext, apply_compression, check_compression
from craft_runner.compress.bn import recalibrate_bn
from craft_runner.config import to_run_config
from craft_runner.data import build_data
from craft_runner.device import resolve_device
from craft_runner.export import check_export, export_cell
from craft_runner.fingerprint import machine
from craft_runner.identity import recorded
from craft_runner.models import create_model, model_data_config
from craft_runner.optim import build_optimizer
from craft_runner.runtime import release_freed_memory
from craft_runner.schema import ConfigError, RunConfig
from craft_runner.tracking import NullTracker, export_scalars, make_tracker, replay_cached, start_training
from craft_runner.validate import check_writable as check_writable  # re-exported: as cache_key
from craft_runner.validate import validate

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Prepared:
    """What every later stage works on: the checked config, the device, the data and the model."""

    rc: RunConfig
    device: torch.device
    data: Any  # craft_runner.data.DataBundle
    model: nn.Module
    key_inputs: dict = dataclasses.field(default_factory=dict)  # what the training's key hashes (weights_key)
    key: str = ""  # the training's cache key, computed once

    def __post_init__(self):
        if not self.key:
            self.key_inputs = weights_key(self.rc)
            self.key = digest(self.key_inputs)

    @property
    def cache_dir(self) -> Path:
        return Path(self.rc.paths.cache_dir) / self.key


def prepare(cfg) -> Prepared:
    """Everything that can fail on bad input, before anything is trained or written."""
    rc = to_run_config(cfg)
    validate(rc, world=distributed.world_size())  # e.g. the _small CrAFT backbones before `make pretrained`
    device = distributed.local_device(resolve_device(rc.device))
    train.seed_everything(rc.seed)
    data_config = model_data_config(rc.model.name)
    data = build_data(rc.dataset, img_size=data_config["input_size"][-1], data_dir=rc.paths.data_dir,
                      data_config=data_config)
    # The SNT transform is applied inside, between pretrained weights and a full checkpoint.
    model = create_model(rc.model, num_classes=data.num_classes, in_chans=data.in_chans, arch=rc.arch)
    check_compression(model, rc.compress)
    if rc.export is not None:
        check_export(rc.export, rc.compress, model)
    model = model.to(device)
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(rc, device, data, model)


def train_or_load(p: Prepared, tracker=None) -> dict:
    """Load the cached weights for this key, or train (resuming from the last epoch) and cache them.

    Weights are cached only when every loss, gradient and weight of the training was finite
    (:class:`craft_runner.train.NonFiniteError` otherwise, the last good epoch's state kept). ``tracker`` gets
    the per-epoch records as training goes (those of cached weights at once) and the W&B id is kept in the
    training state. In a distributed run every rank trains its share under DistributedDataParallel; rank 0
    alone reads or writes the cache entry (the other ranks return ``{"trained": None}`` when it is cached).
    """
    tracker = tracker or NullTracker()
    rc, cache_dir = p.rc, p.cache_dir
    final, state_path = cache_dir / "model.pt", cache_dir / "state.pt"
    if distributed.broadcast(final.exists() if distributed.is_main() else None):
        if not distributed.is_main():
            return {"trained": None}
        st = load_cached_weights(final, p.device, cache_dir.name)
        p.model.load_state_dict(st["model"])
        log.info("loaded cached weights %s (no training)", final)
        replay_cached(tracker, st["meta"].get("history", []))
        return {**st["meta"], "trained": False}
    state = train.load_state(state_path)  # resumed from its last epoch, and its W&B run continued
    extra = start_training(tracker, state, dataclasses.asdict(rc))
    model, world = distributed.wrap(p.model, p.device), distributed.world_size()
    opt = build_optimizer(model, rc.optimizer)
    loader = p.data.train_loader(rc.train.batch_size, rc.seed, p.device, rc.dataset, distributed.rank(), world)
    info = train.fit(model, loader, opt, rc.train, p.device, state_path=state_path, desc=rc.optimizer.name,
                     on_epoch=tracker.log_epoch, state=state, extra_state=extra, save_state=distributed.is_main())
    meta = {k: info[k] for k in ("train_seconds", "history", "epochs", "steps", "second_pass_fraction",
                                 "optimizer_extra_bytes")}
    meta["world_size"] = world
    meta["autocast"] = train.autocast_name(p.device, rc.train.amp) or "off"  # train.amp as in effect here
    if distributed.is_main():
        store_weights(final, p.model, meta, p.key_inputs, rc.optimizer.name)
        state_path.unlink(missing_ok=True)
    distributed.barrier()  # the other ranks leave once the weights are cached
    return {**meta, "trained": True, "resumed_from": info["resumed_from"]}


def evaluate(p: Prepared, model: Optional[nn.Module] = None, split: str = "test") -> float:
    """Top-1 accuracy (%) on the test split (or the validation one, ``split="val"``), in float32 (bf16 would
    round quantized values again)."""
    loader = p.data.eval_loader(p.rc.train.eval_batch_size, p.device, p.rc.dataset, split)
    return train.evaluate(model if model is not None else p.model, loader, p.data.num_classes, p.device, "off",
                          p.rc.train.channels_last)


def compress(p: Prepared) -> tuple[nn.Module, dict]:
    """A compressed (simulated) copy of the trained model, as ``rc.compress`` says, and the record."""
    rc = p.rc
    # Compressors see the standard memory layout (torch.nn.utils.prune needs it).
    model = copy.deepcopy(p.model).to(memory_format=torch.contiguous_format)
    calib = p.data.calib_batches(rc.compress.calib_size, rc.train.eval_batch_size, rc.compress.calib_seed,
                                 p.device)

    def fine_tune(m: nn.Module, epochs: int) -> dict:
        loader = p.data.train_loader(rc.train.batch_size, rc.seed + 1, p.device, rc.dataset)
        return train.fit(m, loader, build_optimizer(m, rc.optimizer), dataclasses.replace(rc.train, epochs=epochs),
                         p.device, desc="fine-tune")

    info = apply_compression(model, rc.compress, CompressContext(p.device, calib, fine_tune,
                                                                     progress=None if rc.train.progress else False))
    if rc.compress.bn_recalib:
        loader = p.data.train_loader(rc.train.batch_size, rc.seed + 2, p.device, rc.dataset)
        info["bn_recalib"] = recalibrate_bn(model, itertools.islice(loader, rc.compress.bn_recalib))
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def export(p: Prepared, model: nn.Module, simulated_accuracy: float, run_dir: Path) -> Optional[dict]:
    """The real artifact of ``model`` (the compressed, simulated one) as ``rc.export`` says, under
    ``run_dir/export``; returns results.json's ``export`` record (None: export=none). Nothing is retrained:
    the calibration batches are the compression's, the test split the one every accuracy is measured on."""
    rc = p.rc
    if rc.export is None or rc.export.name == "none":
        return None
    calib = p.data.calib_batches(rc.compress.calib_size, rc.train.eval_batch_size, rc.compress.calib_seed,
                                 p.device)
    test = p.data.eval_loader(rc.train.eval_batch_size, p.device, rc.dataset)
    return export_cell(model.eval(), rc.export, rc.compress, calib, test, simulated_accuracy, run_dir / "export",
                       p.device)


# --------------------------------------------------------------------------------------------- record


def optimized_value(name: Optional[str], metrics: dict) -> Optional[float]:
    """The metric ``optimized_metric`` names (null: compressed_acc when compressing, else fp_acc; their val_
    versions when there is a validation split, so that a sweeper never tunes on the test split by default)."""
    name = name or (("val_" if "val_fp_acc" in metrics else "")
                    + ("compressed_acc" if "compressed_acc" in metrics else "fp_acc"))
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} is not allowed: expected one of {', '.join(sorted(metrics))}")
    return metrics[name]


def record(rec: dict, run_dir: Path, tracker) -> None:
    """A finished run: results.json (atomically, whatever W&B does), then the tracker's summary."""
    rec["status"] = "ok"
    results.write(rec, run_dir)
    metrics = rec["metrics"]
    tracker.log({**metrics, **export_scalars(rec.get("export")), "world_size": rec.get("world_size", 1)})
    log.info("%s: fp %.2f%%%s, λmax %s", rec["config"]["name"], metrics["fp_acc"],
             f", compressed {metrics['compressed_acc']:.2f}% ({metrics['drop']:+.2f})"
             if "compressed_acc" in metrics else "",
             f"{metrics['lambda_max_after']:.4g}" if "lambda_max_after" in metrics else "n/a")


def run(cfg) -> Optional[dict]:
    """Run every stage; returns the metrics dict and writes ``results.json`` in ``paths.run_dir``.

    A run whose ``results.json`` is already ok for the same config is skipped (its metrics returned) unless
    ``rerun``; otherwise :func:`prepare` then :func:`execute`.
    """
    rc = to_run_config(cfg)
    done = results.done(rc)
    return done if done is not None else execute(prepare(rc))


def execute(p: Prepared) -> Optional[dict]:
    """Every stage after :func:`prepare`, recorded: results.json says ``running`` while the run works, then
    ``ok`` or ``failed`` with the reason. In a distributed run (craft_runner.distributed) rank 0 writes
    everything and returns the metrics; the other ranks help train and return None."""
    rc = p.rc
    run_dir = Path(rc.paths.run_dir or "outputs/last")
    if not distributed.is_main():
        train_or_load(p)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(rc)
    cache_dir = cache_entry(p.cache_dir, p.key_inputs)
    # Continue the W&B run of this directory unless its last attempt finished ok (then this is a new run).
    tracker = make_tracker(rc.logger, config_dict, run_dir,
                           reuse_run_dir_id=results.previous_status(run_dir) != "ok")
    # identity: the inputs of the training key and the cell's, so that craft-report needs no RunConfig
    record_ = {"config": config_dict, "cache_key": cache_dir.name, "identity": recorded(rc, p.key_inputs),
               "world_size": distributed.world_size(), "status": "running",
               "splits": p.data.splits(),  # val_* metrics: the validation split, held out of train
               **machine(p.device, train.autocast_name(p.device, rc.train.amp), getattr(rc.train, "tf32", False))}
    status = "failed"
    results.write(record_, run_dir)  # a run that dies hard stays "running", never "ok"
    try:
        diagnostics = Diagnostics(p)
        with locked(cache_dir):
            diagnostics.measure("before")
            train_info = train_or_load(p, tracker)
            diagnostics.measure("after")
        tracker.start()
        if train_info.get("steps") == 0:  # train.epochs=0: the initial weights, evaluated as they are
            train_info.update(trained=False, weights="initial (train.epochs=0: not trained)")
        metrics = {**diagnostics.metrics(), "train_seconds": train_info["train_seconds"],
                   "trained": train_info["trained"], "second_pass_fraction": train_info.get("second_pass_fraction")}
        t0 = time.perf_counter()
        metrics["fp_acc"] = evaluate(p)
        if p.data.n_val:
            metrics["val_fp_acc"] = evaluate(p, split="val")
        model = p.model
        if rc.compress.name != "none":
            model, record_["compression"] = compress(p)
            metrics["compressed_acc"] = evaluate(p, model)
            metrics["drop"] = metrics["compressed_acc"] - metrics["fp_acc"]
            if p.data.n_val:
                metrics["val_compressed_acc"] = evaluate(p, model, split="val")
        metrics["eval_seconds"] = time.perf_counter() - t0
        if rc.export is not None and rc.export.name != "none":
            t0 = time.perf_counter()
            record_["export"] = export(p, model, metrics.get("compressed_acc", metrics["fp_acc"]), run_dir)
            metrics["export_seconds"] = time.perf_counter() - t0
        record_.update(metrics=metrics, train=train_info, sharpness=diagnostics.record())
        record_["wandb"] = tracker.info() or None
        record(record_, run_dir, tracker)
        tracker.log_images(diagnostics.figures())
        status = "ok"
        return metrics
    except BaseException as e:
        record_["wandb"] = tracker.info() or None
        results.write_failed(record_, run_dir, f"{type(e).__name__}: {e}")  # if it cannot, stderr says why
        raise
    finally:
        tracker.finish(status)
        release_freed_memory()  # the next cell of a multirun starts from what is live, not this one's peak
