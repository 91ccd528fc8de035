"""Typed schemas of every config group: plain dataclasses, no Hydra or OmegaConf.

Range checks run in ``__post_init__``, so a bad value raises :class:`ConfigError` (one line) when the
config is built — by :func:`craft_runner.config.to_run_config` from Hydra, or directly in library code.
Families own their schemas, beside their registries: ``compress`` (:mod:`craft_runner.compress`),
``optimizer`` (:class:`craft_runner.optim.registry.OptimizerConfig`) and ``export``
(:class:`craft_runner.export.config.ExportConfig`); this module imports none of them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A config value that is out of range or unknown; the message is one line."""


# A field's role in the run's identity (craft_runner.identity derives every key, digest and comparison from it):
# "weights" (the training cache key), "diagnostics" (the λmax cache key), "cell" (what the cell is beyond its
# training: the cell digest, the skip comparison, the run's name) or "nothing". A field without one takes its section's.
_CELL = {"role": "cell"}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _check_choice(key: str, value: Any, choices) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


@dataclass
class PathsConfig:
    data_dir: str = field(default_factory=lambda: os.environ.get("CRAFT_DATA_DIR", "data"))
    # Trained checkpoints, keyed by a hash of what determines them; shared by every run.
    cache_dir: str = "outputs/cache"
    # The run's own directory; run.py fills it from Hydra, tests pass their own.
    run_dir: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "resnet20"
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    # None: the dataset's number of classes (a new head for fine-tuning).
    num_classes: Optional[int] = None
    drop_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: Optional[str] = field(default=None, metadata=_CELL)  # None: ${paths.data_dir}/<torchvision's folder name>
    download: bool = field(default=False, metadata=_CELL)
    # On-disk sets: open every image file with PIL (verify()) before any work; refuse, naming the bad ones.
    verify: bool = False
    img_size: Optional[int] = None  # None: the model's own input size
    # Synthetic data only: its shape and size.
    num_classes: int = 10
    in_chans: int = 3
    n_train: int = 256
    n_test: int = 128
    test_fraction: float = 0.2  # digits: held-out share of the stratified split
    # Seeds digits' train/test split and the validation hold-out.
    split_seed: int = 0
    # A stratified validation split held out of the TRAINING split (never the test split), for tuning; 0: none.
    # At 0 it stays out of the training key: the keys cached before the field existed still hold.
    val_fraction: float = field(default=0.0, metadata={"role": "weights", "absent_when": 0.0})
    # digits only: keep these classes, relabelled 0..len-1 in this order (a transfer task, e.g. 0-4 then 5-9).
    classes: Optional[list] = None
    augment: bool = False
    # Hold a small data set as tensors on the run's device (no loader workers).
    on_device: bool = field(default=True, metadata=_CELL)
    num_workers: int = field(default=4, metadata=_CELL)
    pin_memory: bool = field(default=True, metadata=_CELL)
    persistent_workers: bool = field(default=True, metadata=_CELL)

    def __post_init__(self):
        _check(0.0 < self.test_fraction < 1.0, "dataset.test_fraction", self.test_fraction, "a value in (0, 1)")
        _check(isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0,
               "dataset.val_fraction", self.val_fraction, "a value in [0, 1) (0: no validation split)")
        _check(self.num_classes >= 2, "dataset.num_classes", self.num_classes, "an integer >= 2")
        _check(self.n_train >= 1 and self.n_test >= 1, "dataset.n_train", self.n_train, "positive sizes")
        _check(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "an integer >= 0")
        if self.classes is not None:
            ok = (len(self.classes) >= 2 and all(isinstance(c, int) for c in self.classes)
                  and len(set(self.classes)) == len(self.classes))
            _check(ok, "dataset.classes", self.classes, "null or a list of two or more distinct class indices")


def _finite_positive(key: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key, value,
           "a finite positive number")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = field(default=256, metadata=_CELL)
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    # Mixed precision: auto = bf16 autocast on CUDA with compute capability >= 8.0, else float32;
    # bf16 = bf16 autocast on any device.
    amp: str = "auto"
    # TF32 (10-bit mantissa) for float32 matmuls and cuDNN convolutions while training on an Ampere+ GPU.
    # false: training in float32 is float32 (CPU-comparable); amp=auto already trains in bf16 on those GPUs.
    # Measuring, searching and evaluating always run with TF32 off (craft_runner.device.full_fp32).
    tf32: bool = field(default=False, metadata=_CELL)
    # NHWC activations: faster convolutions on CPU and on tensor cores.
    channels_last: bool = True
    progress: bool = field(default=True, metadata=_CELL)

    def __post_init__(self):
        _check(self.epochs >= 0, "train.epochs", self.epochs, "an integer >= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        _check_choice("train.scheduler", self.scheduler, ("cosine", "none"))
        _check_choice("train.amp", self.amp, ("auto", "bf16", "off"))
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", self.grad_clip, "null or > 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a value in [0, 1)")


@dataclass
class SharpnessConfig:
    """Diagnostics measured before and after training (craft_runner.diagnostics.run_diagnostics)."""

    # When the diagnostics are measured and shown, not what they are: out of the diagnostics key.
    enabled: bool = field(default=True, metadata=_CELL)
    before: bool = field(default=True, metadata=_CELL)
    after: bool = field(default=True, metadata=_CELL)
    # Calibration data for the Hessian and the activation ranges.
    n_samples: int = 256
    batch_size: int = 256
    # lambda_max: the largest Hessian eigenvalue (and lambda_min) by Lanczos (full reorthogonalisation), or by
    # power iteration (shifted when the dominant eigenvalue is negative). Both stop on the residual bound.
    lambda_max: bool = True
    method: str = "lanczos"
    max_iter: int = 100
    tol: float = 1e-3
    seed: int = 0
    # Keep each batch's gradient graph across Hessian-vector products (faster, more memory).
    reuse_graph: bool = True
    # Hessian trace by Hutchinson's estimator with Rademacher probes.
    trace: bool = False
    trace_probes: int = 100
    # Weight spectrum (CrAFT Fig. 1): share of variance in the top-k principal components of each
    # Linear/Conv weight; k >= 1 is a count, 0 < k < 1 a fraction of each matrix's components.
    spectrum: bool = False
    spectrum_k: float = 0.25
    # Per-channel min/max of each block's input (CrAFT Fig. 2).
    act_ranges: bool = False
    # PNG plots of the spectrum and the ranges, when the caller gives an output folder.
    plots: bool = field(default=True, metadata=_CELL)

    def __post_init__(self):
        _check(self.n_samples >= 1, "sharpness.n_samples", self.n_samples, "an integer >= 1")
        _check(self.batch_size >= 1, "sharpness.batch_size", self.batch_size, "an integer >= 1")
        _check_choice("sharpness.method", self.method, ("lanczos", "power"))
        _check(self.max_iter >= 1, "sharpness.max_iter", self.max_iter, "an integer >= 1")
        _check(self.tol > 0, "sharpness.tol", self.tol, "a positive number")
        _check(self.trace_probes >= 1, "sharpness.trace_probes", self.trace_probes, "an integer >= 1")
        _check(self.spectrum_k > 0, "sharpness.spectrum_k", self.spectrum_k,
               "a count >= 1 or a fraction in (0, 1)")


@dataclass
class ArchConfig:
    name: str = "base"
    preact: bool = False
    rprelu: bool = False

    def __post_init__(self):
        _check_choice("arch.name", self.name, ("base", "snt"))


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "craft-runner"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    # auto: online when an API key is configured, otherwise offline.
    mode: str = "auto"

    def __post_init__(self):
        _check_choice("logger.name", self.name, ("none", "wandb"))
        _check_choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"role": "weights"})
    dataset: DatasetConfig = field(default_factory=DatasetConfig, metadata={"role": "weights"})
    # The optimizer group's schema (craft_runner.optim.registry.OptimizerConfig: the common keys and each registered
    # optimizer's own, set by craft_runner.config).
    # Its training-key part is the registry's (only the fields the chosen optimizer uses).
    optimizer: Any = field(default="???",
                           metadata={"role": "weights", "key": "craft_runner.optim.registry:optimizer_key"})
    arch: ArchConfig = field(default_factory=ArchConfig, metadata={"role": "weights"})
    # The compress group's schema, chosen by its YAML (see craft_runner.compress.registry).
    compress: Any = field(default="???", metadata=_CELL)
    logger: LoggerConfig = field(default_factory=LoggerConfig, metadata={"role": "nothing"})
    # The export group's schema (craft_runner.export.config.ExportConfig); None: no export, as export=none.
    # None or none: out of the cell's identity, the cell it was before the export group existed.
    export: Any = field(default=None, metadata={"role": "cell", "absent_when": (None, "none")})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"role": "weights"})
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig, metadata={"role": "diagnostics"})
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"role": "nothing"})
    seed: int = field(default=0, metadata={"role": "weights"})
    device: str = field(default="auto", metadata=_CELL)
    name: str = field(default="run", metadata=_CELL)
    # The metric craft-run returns to a Hydra sweeper; null: compressed_acc when compressing, else fp_acc.
    optimized_metric: Optional[str] = field(default=None, metadata=_CELL)
    # A run whose results.json is already ok for the same config is skipped unless rerun=true.
    rerun: bool = field(default=False, metadata={"role": "nothing"})
    # List the cells, the trainings they need (cache keys) and what is cached or done, then stop.
    dry_run: bool = field(default=False, metadata={"role": "nothing"})
    # The experiment this run belongs to (craft-run fills it from Hydra's experiment choice); the report's layout.
    experiment: Optional[str] = field(default=None, metadata=_CELL)

    def __post_init__(self):
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", self.device,
               "auto, cpu or cuda[:N]")
        # the chosen optimizer's checks against the training settings (SAF's and MESA's epoch window)
        check_run = getattr(self.optimizer, "check_run", None)
        if callable(check_run) and isinstance(self.train, TrainConfig):
            check_run(self.train)
