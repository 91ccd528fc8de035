"""One run, one point of a paper table, as named stages:

prepare ─► diagnostics before (cached) ─► train or load (cached) ─► diagnostics after (cached)
        ─► evaluate ─► compress and evaluate ─► export (real artifact, when asked) ─► record

Each stage is a function a test or a notebook can call; :func:`run` calls them in that order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import itertools
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
from craft_runner import device as device_module
from craft_runner.atomic import atomic_save, atomic_write_json
from craft_runner.config import to_run_config
from craft_runner.fingerprint import environment
from craft_runner.results import read_results, write_failed
from craft_runner.results import write as write_results
from craft_runner.schema import ConfigError, RunConfig
from craft_runner.tracking import export_scalars, make_tracker, without_export_none
from craft_runner.validate import check_checkpoint

log = logging.getLogger(__name__)

# Bumped whenever what a key hashes changes meaning (2: only the fields that apply; key.json).
CACHE_VERSION = 2
# Settings that change how fast a run is, not what it computes.
# train.tf32 as the device: a GPU's float32 rounding, not what is computed (neither is in the key).
_NOT_IN_KEY = {"tf32", "progress", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "root",
               "download", "on_device"}
# Diagnostics switches that decide when and how results are shown, not what is measured.
_NOT_IN_DIAGNOSTICS_KEY = {"enabled", "before", "after", "plots"}


def resolve_device(name: str) -> torch.device:
    # auto on a CUDA build without a usable GPU says so in one line (craft_runner.device)
    return device_module.resolve_device(name)


def check_device(name: str) -> None:
    """A CUDA device that this machine does not have is refused before any data is read."""
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} is not allowed: torch sees no CUDA GPU on this machine "
                          f"(torch.cuda.is_available() is False); use device=auto or device=cpu")
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} is not allowed: this machine has {torch.cuda.device_count()} CUDA "
                          f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_writable(path, key: str) -> None:
    """``path`` (``key`` names it) is a folder craft-run can create or write in; checked before any work, so
    that a read-only place or a file in the way fails in one line with nothing written."""
    p = Path(path).expanduser().absolute()
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{key}={path} is not allowed: {p} is a broken symbolic link")
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{key}={path} is not allowed: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not allowed: {p} is not writable")


# --------------------------------------------------------------------------------------------- cache keys


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_key(rc: RunConfig) -> dict:
    """Everything that determines the trained weights (not the compression): the inputs of the cache key."""
    from craft_runner import distributed
    from craft_runner.optim.registry import optimizer_key

    parts = {name: {k: v for k, v in dataclasses.asdict(getattr(rc, name)).items() if k not in _NOT_IN_KEY}
             for name in ("model", "dataset", "arch", "train")}
    if not rc.dataset.val_fraction:  # no validation split: the keys cached before the field existed still hold
        parts["dataset"].pop("val_fraction", None)
    # Several processes train differently (per-process BatchNorm statistics, SAM's per-process perturbation).
    world = {"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}
    return {**parts, "optimizer": optimizer_key(rc.optimizer), "seed": rc.seed, "version": CACHE_VERSION, **world}


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


def _read_json(path: Path) -> dict:
    from craft_runner.train import CheckpointError

    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read: it is truncated or not JSON ({e}); delete it to measure "
                              f"again") from None


@contextlib.contextmanager
def locked(directory: Path):
    """One process at a time trains a given cache key (jobs of a sweep share keys); a job that has to wait
    says so, naming the holder."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    with open(path, "a+") as f:  # "a+": never truncates what the holder wrote
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another job"
            log.info("waiting for the training lock %s, held by %s: it trains or measures this cache key, which "
                     "this job then loads", path, holder)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("got the lock %s after %.0f s", path, time.perf_counter() - t0)
        with contextlib.suppress(OSError):  # the holder's name only informs; a full disk fails at a real write
            f.seek(0)
            f.truncate()
            os.write(f.fileno(), f"pid {os.getpid()} on {platform.node()}\n".encode())  # unbuffered
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- skip and plan

# Fields that say how to run a cell, not what it computes: a rerun with another value still skips.
_NOT_COMPARED = ("rerun", "dry_run")


def _comparable(config: dict) -> dict:
    c = without_export_none(json.loads(json.dumps(config, sort_keys=True, default=str)))
    return {k: v for k, v in c.items() if k not in _NOT_COMPARED}


def previous_result(rc: RunConfig) -> Optional[dict]:
    """The run directory's results.json when it is ok and was made by the same config, else None."""
    if not rc.paths.run_dir:
        return None
    r = read_results(Path(rc.paths.run_dir) / "results.json")
    if r is None:
        return None
    if r.get("status") == "ok" and isinstance(r.get("config"), dict) and \
            _comparable(r["config"]) == _comparable(dataclasses.asdict(rc)):
        return r
    return None


def plan_cell(cfg) -> dict:
    """What running ``cfg`` would do, without doing it: its training's cache key, whether the weights are
    cached, whether the run is done already (skipped), or why its config is refused."""
    paths = cfg.get("paths") if hasattr(cfg, "get") else getattr(cfg, "paths", None)
    run_dir = paths.get("run_dir") if hasattr(paths, "get") else getattr(paths, "run_dir", None)
    from craft_runner.data import DataRootError, check_dataset
    from craft_runner.export import check_export

    try:
        rc = to_run_config(cfg)
        if rc.export is not None:
            check_export(rc.export, rc.compress)  # against the model too once built (prepare)
    except (ConfigError, TypeError) as e:
        return {"run_dir": run_dir, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    key = cache_key(rc)
    plan = {"run_dir": rc.paths.run_dir, "cache_key": key,
            "cached": (Path(rc.paths.cache_dir) / key / "model.pt").exists(),
            "done": previous_result(rc) is not None and not rc.rerun}
    if not plan["done"]:
        try:  # the check a run makes first (prepare); a download is not tried here
            check_dataset(rc.dataset, rc.paths.data_dir)
        except DataRootError as e:
            plan["data_missing"] = str(e).splitlines()[0]
        except ConfigError as e:
            return {"run_dir": run_dir, "error": str(e).splitlines()[0]}
        try:
            check_checkpoint(rc.model)
        except ConfigError as e:
            plan["pretrained_missing"] = str(e).splitlines()[0]
    return plan


def runnable(cells: list[dict]) -> int:
    """How many of the planned ``cells`` would run or are done (not invalid, not missing data or weights)."""
    return sum("error" not in c and not c.get("data_missing") and not c.get("pretrained_missing") for c in cells)


def describe_plan(cells: list[dict]) -> str:
    """A listing of :func:`plan_cell` results: one line per cell, then the unique trainings among them. A
    reason shared by several cells is written once, under the list, and referred to by its number."""
    counts: dict = {}
    for c in cells:
        for k in ("error", "data_missing", "pretrained_missing"):
            if c.get(k):
                counts[c[k]] = counts.get(c[k], 0) + 1
    shared: dict = {}

    def why(text: str) -> str:
        if counts[text] < 2:
            return text
        shared.setdefault(text, len(shared) + 1)
        return f"[{shared[text]}]"

    lines = []
    for c in cells:
        name = c.get("label") or (Path(c["run_dir"]).name if c.get("run_dir") else "(run)")
        if "error" in c:
            lines.append(f"  {name}: invalid: {why(c['error'])}")
            continue
        state = ("done (results.json ok): skipped" if c["done"]
                 else f"data missing: {why(c['data_missing'])}" if c.get("data_missing")
                 else f"pretrained weights missing: {why(c['pretrained_missing'])}" if c.get("pretrained_missing")
                 else "runs")
        lines.append(f"  {name}: training {c['cache_key']} ({'cached' if c['cached'] else 'to train'}), {state}")
    valid = [c for c in cells if "error" not in c]
    cached = {c["cache_key"]: c["cached"] for c in valid}
    to_train = {c["cache_key"] for c in valid if not c["done"] and not c["cached"]}
    missing = sum(bool(c.get("data_missing")) for c in valid)
    weights = sum(bool(c.get("pretrained_missing")) for c in valid)
    summary = (f"{len(cells)} cells, {len(cached)} unique trainings ({sum(cached.values())} cached, "
               f"{len(to_train)} to train), {sum(c['done'] for c in valid)} cells done already, "
               f"{len(cells) - len(valid)} invalid" + (f", {missing} without their data" if missing else "")
               + (f", {weights} without their pretrained weights" if weights else ""))
    if not runnable(cells):
        summary += "; no cell can run"
    notes = [f"  [{n}] {text}" for text, n in shared.items()]
    return "\n".join(["craft-run plan:", *lines, *notes, summary])


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
    from craft_runner import distributed
    from craft_runner.compress import check_compression
    from craft_runner.data import build_data
    from craft_runner.export import check_export
    from craft_runner.models import check_model_name, create_model, model_data_config
    from craft_runner.train import seed_everything

    rc = to_run_config(cfg)
    check_device(rc.device)
    check_writable(rc.paths.cache_dir, "paths.cache_dir")
    check_writable(rc.paths.run_dir or "outputs/last", "paths.run_dir")
    if rc.dataset.download:
        from craft_runner.data import dataset_root

        root = dataset_root(rc.dataset, rc.paths.data_dir)
        if root is not None:
            check_writable(root, "dataset.root" if rc.dataset.root else "paths.data_dir")
    check_model_name(rc.model.name)
    check_checkpoint(rc.model)  # e.g. the _small CrAFT backbones before `make pretrained`
    world = distributed.world_size()
    if rc.train.batch_size % world:
        raise ConfigError(f"train.batch_size={rc.train.batch_size} is not allowed: expected a multiple of the "
                          f"{world} processes (it is the global batch; each process takes an equal share)")
    device = distributed.local_device(resolve_device(rc.device))
    seed_everything(rc.seed)
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


def _uncertified_lambda_min_dropped(results: dict) -> dict:
    """Diagnostics cached before λmin needed its own certificate: their λmin is dropped, never reported."""
    for d in results.values():
        lam = d.get("lambda_max") if isinstance(d, dict) else None
        if isinstance(lam, dict) and "lambda_min_converged" not in lam:
            lam.update(lambda_min=None, lambda_min_converged=False, lambda_min_residual=None)
            d.get("scalars", {}).pop("lambda_min", None)
    return results


class Diagnostics:
    """The diagnostics of the weights of one cache entry, measured once per key and kept beside them."""

    def __init__(self, p: Prepared):
        self.p = p
        s = p.rc.sharpness
        inputs = diagnostics_key(p.rc)
        self.dir = p.cache_dir / "diagnostics" / _digest(inputs)
        self._inputs = inputs
        self.path = self.dir / "diagnostics.json"
        self.results: dict = _uncertified_lambda_min_dropped(_read_json(self.path)) if self.path.exists() else {}
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
            used = sum(len(y) for _, y in self._batches)
            if used < s.n_samples:  # the training set is smaller: all of it, said and recorded
                log.warning("sharpness.n_samples=%d is more than the training split holds: %d used", s.n_samples,
                            used)
        cache_entry(self.dir, self._inputs)
        self.results[when] = run_diagnostics(self.p.model, self._batches, s, self.dir, tag=when)
        self.results[when]["n_samples_used"] = sum(len(y) for _, y in self._batches)
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


def load_cached_weights(path: Path, device: torch.device, key: Optional[str] = None) -> dict:
    """The cache entry ``model.pt``, read with weights_only=True; a damaged, foreign or non-finite one raises
    a one-line CheckpointError naming it (delete it to train again). With ``key``, the cache key the
    checkpoint records must be that of its folder; one written before keys were recorded is used, with a
    warning."""
    from craft_runner.train import CheckpointError, load_checkpoint, nonfinite_weights

    fix = f"delete it (rm {path}) to train again"
    st = load_checkpoint(path, device, ("model", "meta"), fix=fix)
    if not isinstance(st["model"], dict) or nonfinite_weights(st["model"]):
        raise CheckpointError(f"{path} cannot be used: its weights are not all finite; {fix}")
    if key is not None:
        recorded = st.get("cache_key")
        if recorded is None:
            log.warning("%s records no cache key (written by an older craft-run): it is used as the weights of "
                        "key %s unchecked", path, key)
        elif recorded != key:
            raise CheckpointError(f"{path} holds the weights of training {recorded}, not of {key} (its folder's "
                                  f"key): it was moved or copied there; {fix}")
    return st


def train_or_load(p: Prepared, tracker=None) -> dict:
    """Load the cached weights for this key, or train (resuming from the last epoch) and cache them.

    Weights are cached only when every loss, gradient and weight of the training was finite
    (:class:`craft_runner.train.NonFiniteError` otherwise, the last good epoch's state kept). ``tracker`` gets
    the per-epoch records as training goes (those of cached weights at once) and the W&B id is kept in the
    training state. In a distributed run every rank trains its share under DistributedDataParallel; rank 0
    alone reads or writes the cache entry (the other ranks return ``{"trained": None}`` when it is cached).
    """
    from craft_runner import distributed, train
    from craft_runner.optim import build_optimizer
    from craft_runner.tracking import NullTracker, cell_digest

    tracker = tracker or NullTracker()
    rc, cache_dir = p.rc, p.cache_dir
    final, state_path = cache_dir / "model.pt", cache_dir / "state.pt"
    if distributed.broadcast(final.exists() if distributed.is_main() else None):
        if not distributed.is_main():
            return {"trained": None}
        st = load_cached_weights(final, p.device, cache_dir.name)
        p.model.load_state_dict(st["model"])
        log.info("loaded cached weights %s (no training)", final)
        tracker.start()
        if not tracker.resumed:  # the curves of the training that made these weights
            for record in st["meta"].get("history", []):
                tracker.log_epoch(record)
        return {**st["meta"], "trained": False}
    state = train.load_state(state_path)
    cell = cell_digest(dataclasses.asdict(rc))
    previous = (state or {}).get("wandb") or {}
    tracker.start(previous.get("id") if previous.get("cell") == cell else None)
    if state is not None:
        # The epochs trained before: a new W&B run has none of them; a continued one may lack some (SIGTERM of a
        # requeue ends the W&B service of the job before the job itself) and drops the steps it already has.
        for record in state["history"]:
            if record["epoch"] >= tracker.next_step:
                tracker.log_epoch(record)
    model, world = p.model, distributed.world_size()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(p.model, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    opt = build_optimizer(model, rc.optimizer)
    loader = p.data.train_loader(rc.train.batch_size, rc.seed, p.device, rc.dataset, distributed.rank(), world)
    extra = {"wandb": {"id": tracker.run_id, "cell": cell}} if tracker.run_id else {}
    info = train.fit(model, loader, opt, rc.train, p.device, state_path=state_path, desc=rc.optimizer.name,
                     on_epoch=tracker.log_epoch, state=state, extra_state=extra, save_state=distributed.is_main())
    meta = {k: info[k] for k in ("train_seconds", "history", "epochs", "steps", "second_pass_fraction",
                                 "optimizer_extra_bytes")}
    meta["world_size"] = world
    meta["autocast"] = _autocast(p) or "off"  # train.amp as it was in effect on this device
    if distributed.is_main():
        if train.nonfinite_weights(p.model):  # fit checks every epoch; never cache what it would have refused
            raise train.NonFiniteError(f"non-finite weights after training {rc.optimizer.name}: nothing cached")
        # The key and what it hashes: the checkpoint says which training it is (checked when loaded).
        inputs = json.loads(json.dumps(weights_key(rc), sort_keys=True, default=str))
        atomic_save({"model": p.model.state_dict(), "meta": meta, "cache_key": cache_dir.name,
                     "key_inputs": inputs}, final)
        state_path.unlink(missing_ok=True)
    distributed.barrier()  # the other ranks leave once the weights are cached
    return {**meta, "trained": True, "resumed_from": info["resumed_from"]}


def evaluate(p: Prepared, model: Optional[nn.Module] = None, split: str = "test") -> float:
    """Top-1 accuracy (%) on the test split (or the validation one, ``split="val"``), in float32 (bf16 would
    round quantized values again)."""
    from craft_runner import train

    loader = p.data.eval_loader(p.rc.train.eval_batch_size, p.device, p.rc.dataset, split)
    return train.evaluate(model if model is not None else p.model, loader, p.data.num_classes, p.device, "off",
                          p.rc.train.channels_last)


def compress_and_evaluate(p: Prepared) -> tuple[float, dict]:
    """Compress a copy of the trained model as ``rc.compress`` says; returns its accuracy and the record."""
    model, info = compress(p)
    return evaluate(p, model), info


def compress(p: Prepared) -> tuple[nn.Module, dict]:
    """A compressed (simulated) copy of the trained model, as ``rc.compress`` says, and the record."""
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

    info = apply_compression(model, rc.compress, CompressContext(p.device, calib, fine_tune,
                                                                     progress=None if rc.train.progress else False))
    if rc.compress.bn_recalib:
        from craft_runner.compress.bn import recalibrate_bn

        loader = p.data.train_loader(rc.train.batch_size, rc.seed + 2, p.device, rc.dataset)
        info["bn_recalib"] = recalibrate_bn(model, itertools.islice(loader, rc.compress.bn_recalib))
    if rc.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def export(p: Prepared, model: nn.Module, simulated_accuracy: float, run_dir: Path) -> Optional[dict]:
    """The real artifact of ``model`` (the compressed, simulated one) as ``rc.export`` says, under
    ``run_dir/export``; returns results.json's ``export`` record (None: export=none). Nothing is retrained:
    the calibration batches are the compression's, the test split the one every accuracy is measured on."""
    from craft_runner.export import export_cell

    rc = p.rc
    if rc.export is None or rc.export.name == "none":
        return None
    calib = p.data.calib_batches(rc.compress.calib_size, rc.train.eval_batch_size, rc.compress.calib_seed,
                                 p.device)
    test = p.data.eval_loader(rc.train.eval_batch_size, p.device, rc.dataset)
    return export_cell(model.eval(), rc.export, rc.compress, calib, test, simulated_accuracy, run_dir / "export",
                       p.device)


# --------------------------------------------------------------------------------------------- record


def _versions() -> dict:
    import timm

    return {"craft_runner": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _scheduler_job() -> dict:
    """Where the run ran, when a cluster scheduler started it."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def _autocast(p: Prepared) -> Optional[str]:
    """The autocast dtype training runs under on this device (train.amp resolved), None for float32."""
    from craft_runner.train import amp_dtype

    dtype = amp_dtype(p.device, p.rc.train.amp)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def optimized_value(name: Optional[str], metrics: dict) -> Optional[float]:
    """The metric ``optimized_metric`` names (null: compressed_acc when compressing, else fp_acc; their val_
    versions when there is a validation split, so that a sweeper never tunes on the test split by default)."""
    name = name or (("val_" if "val_fp_acc" in metrics else "")
                    + ("compressed_acc" if "compressed_acc" in metrics else "fp_acc"))
    if name not in metrics:
        raise ConfigError(f"optimized_metric={name!r} is not allowed: expected one of {', '.join(sorted(metrics))}")
    return metrics[name]


def record(results: dict, run_dir: Path, tracker) -> None:
    """A finished run: results.json (atomically, whatever W&B does), then the tracker's summary."""
    results["status"] = "ok"
    write_results(results, run_dir)
    metrics = results["metrics"]
    tracker.log({**metrics, **export_scalars(results.get("export")), "world_size": results.get("world_size", 1)})
    log.info("%s: fp %.2f%%%s, λmax %s", results["config"]["name"], metrics["fp_acc"],
             f", compressed {metrics['compressed_acc']:.2f}% ({metrics['drop']:+.2f})"
             if "compressed_acc" in metrics else "",
             f"{metrics['lambda_max_after']:.4g}" if "lambda_max_after" in metrics else "n/a")


def _previous_status(run_dir: Path) -> Optional[str]:
    r = read_results(run_dir / "results.json")
    return r.get("status") if r is not None else None


def _figures(sharpness: dict) -> dict:
    """The diagnostics' PNG plots as ``{"diagnostics/<when>/<name>": path}``."""
    out = {}
    for when, d in sharpness.items():
        plots = d.get("plots") or {}
        items = plots.items() if isinstance(plots, dict) else ((Path(p).stem, p) for p in plots)
        out.update({f"diagnostics/{when}/{name}": path for name, path in items if Path(path).exists()})
    return out


def run(cfg, on_start: Optional[Callable[[RunConfig], None]] = None) -> Optional[dict]:
    """Run every stage; returns the metrics dict and writes ``results.json`` in ``paths.run_dir``.

    A run whose ``results.json`` is already ok for the same config is skipped (its metrics returned) unless
    ``rerun``; the file says ``running`` while the run works, then ``ok`` or ``failed`` with the reason.

    ``on_start(rc)`` runs once the input is known to be good (config, data root, model, compression),
    before anything is trained or written. In a distributed run (craft_runner.distributed) rank 0 writes
    everything and returns the metrics; the other ranks help train and return None.
    """
    from craft_runner import distributed

    rc = to_run_config(cfg)
    previous = Path(rc.paths.run_dir) / "results.json" if rc.paths.run_dir else None
    if previous is not None and previous.exists() and read_results(previous) is None:
        log.warning("%s is not a results record (unreadable, not JSON, or JSON other than an object): the run "
                    "is done again and replaces it", previous)
    done = previous_result(rc)
    if done is not None and not rc.rerun:
        log.info("%s: already done (results.json ok, same config): skipped; rerun=true runs it again",
                 rc.paths.run_dir)
        return done["metrics"]
    p = prepare(rc)
    run_dir = Path(rc.paths.run_dir or "outputs/last")
    if on_start is not None:
        on_start(rc)
    if not distributed.is_main():
        train_or_load(p)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = dataclasses.asdict(rc)
    cache_dir = cache_entry(p.cache_dir, weights_key(rc))
    # Continue the W&B run of this directory unless its last attempt finished ok (then this is a new run).
    tracker = make_tracker(rc.logger, config_dict, run_dir, reuse_run_dir_id=_previous_status(run_dir) != "ok")
    results = {"config": config_dict, "cache_key": cache_dir.name, "versions": _versions(),
               "device": _device_name(p.device), "world_size": distributed.world_size(), "status": "running",
               "splits": p.data.splits(),  # val_* metrics: the validation split, held out of train
               "environment": environment(p.device, _autocast(p), getattr(rc.train, "tf32", False)),
               **({"slurm": job} if (job := _scheduler_job()) else {})}
    status = "failed"
    write_results(results, run_dir)  # a run that dies hard stays "running", never "ok"
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
            model, results["compression"] = compress(p)
            metrics["compressed_acc"] = evaluate(p, model)
            metrics["drop"] = metrics["compressed_acc"] - metrics["fp_acc"]
            if p.data.n_val:
                metrics["val_compressed_acc"] = evaluate(p, model, split="val")
        metrics["eval_seconds"] = time.perf_counter() - t0
        if rc.export is not None and rc.export.name != "none":
            t0 = time.perf_counter()
            results["export"] = export(p, model, metrics.get("compressed_acc", metrics["fp_acc"]), run_dir)
            metrics["export_seconds"] = time.perf_counter() - t0
        results.update(metrics=metrics, train=train_info, sharpness=diagnostics.record())
        results["wandb"] = tracker.info() or None
        record(results, run_dir, tracker)
        tracker.log_images(_figures(results["sharpness"]))
        status = "ok"
        return metrics
    except BaseException as e:
        results["wandb"] = tracker.info() or None
        write_failed(results, run_dir, f"{type(e).__name__}: {e}")  # if it cannot, stderr says why
        raise
    finally:
        tracker.finish(status)
