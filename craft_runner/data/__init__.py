"""Data sets as a :class:`DataBundle`: train/eval iterables and a seeded calibration subset.

In-memory sets (sklearn's digits, synthetic images) are built here; the papers' on-disk sets
(CIFAR-10/100, Flowers-102, Stanford Cars, Oxford-IIIT Pets, FGVC Aircraft, Food-101, ImageNet) are
described in :mod:`.vision` and read through torchvision in :mod:`.readers`, which is imported only
when one is built. :func:`check_dataset` validates a config and the data set's folder before any
model is built; :func:`build_data` then builds the bundle with the model's own transforms. An image that
cannot be read raises :class:`ImageReadError` (one line naming the file); ``dataset.verify=true`` opens every
image of an on-disk set before any work and refuses, naming the bad files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from craft_runner.data.core import DataBundle, ImageReadError, TensorLoader, _torch_loader, calib_indices
from craft_runner.data.split import hold_out_val, stratified_holdout
from craft_runner.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchPadCropFlip, pad_for
from craft_runner.data.vision import SPECS, DataRootError, VisionSpec, check_root, dataset_folder
from craft_runner.schema import ConfigError, DatasetConfig

__all__ = ["DataBundle", "TensorLoader", "DataRootError", "ImageReadError", "DatasetInfo", "VisionSpec", "SPECS",
           "BUILDERS", "build_data", "build_digits", "build_synthetic", "calib_indices", "check_dataset",
           "dataset_names", "dataset_root", "hold_out_val", "stratified_holdout", "IMAGENET_MEAN", "IMAGENET_STD",
           "_torch_loader"]

log = logging.getLogger(__name__)


def _resize_normalize(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean) / std


def build_digits(cfg: DatasetConfig, img_size: int) -> DataBundle:
    """sklearn's 8x8 digits, resized, three channels, normalised, stratified fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images, target = d.images, d.target
    if cfg.classes is not None:  # a subset of the classes, relabelled in the order given
        keep = [i for i, t in enumerate(target) if t in cfg.classes]
        images, target = images[keep], [cfg.classes.index(target[i]) for i in keep]
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=cfg.test_fraction, stratify=target,
                              random_state=cfg.split_seed)
    x = x.expand(-1, 3, -1, -1)
    x = _resize_normalize(x, img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tr, te = torch.tensor(tr), torch.tensor(te)
    # Digits are not mirror-symmetric: shifts only (CIFAR's padding, scaled), padded with the background (-1).
    augment = BatchPadCropFlip(pad_for((img_size, img_size)), flip=False, fill=-1.0) if cfg.augment else None
    return DataBundle("digits", len(cfg.classes or range(10)), 3, img_size, x[tr].contiguous(), y[tr],
                      x[te].contiguous(), y[te], augment=augment)


def build_synthetic(cfg: DatasetConfig, img_size: int) -> DataBundle:
    """Separable random images: each class has its own mean pattern plus noise."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    protos = torch.randn(cfg.num_classes, cfg.in_chans, img_size, img_size, generator=g)

    def sample(n):
        y = torch.arange(n) % cfg.num_classes
        x = protos[y] + 0.5 * torch.randn(n, cfg.in_chans, img_size, img_size, generator=g)
        return x, y

    xtr, ytr = sample(cfg.n_train)
    xte, yte = sample(cfg.n_test)
    return DataBundle("synthetic", cfg.num_classes, cfg.in_chans, img_size, xtr, ytr, xte, yte)


BUILDERS: dict[str, Callable[[DatasetConfig, int], DataBundle]] = {
    "digits": build_digits,
    "synthetic": build_synthetic,
}


@dataclass(frozen=True)
class DatasetInfo:
    """What check_dataset learns without reading images: enough to size a model's head."""

    name: str
    num_classes: int
    root: Optional[str] = None  # the folder read, for on-disk sets


def dataset_names() -> list[str]:
    return sorted([*BUILDERS, *SPECS])


def dataset_root(cfg: DatasetConfig, data_dir: str = "data") -> Optional[str]:
    """The folder an on-disk set is read from: dataset.root, else <data_dir>/<torchvision's folder name>."""
    spec = SPECS.get(cfg.name)
    return str(dataset_folder(spec, cfg.root, data_dir)) if spec else None


def check_dataset(cfg: DatasetConfig, data_dir: str = "data") -> DatasetInfo:
    """Fail fast, before any model is built: an unknown name raises ConfigError, a missing or incomplete
    folder DataRootError (a ConfigError) naming the files expected and dataset.download=true. Opens no image."""
    if cfg.classes is not None and cfg.name != "digits":
        raise ConfigError(f"dataset.classes={cfg.classes!r} is not allowed for dataset.name={cfg.name!r}: "
                          f"expected null (class subsets: digits only)")
    if cfg.classes is not None and cfg.name == "digits" and not set(cfg.classes) <= set(range(10)):
        raise ConfigError(f"dataset.classes={cfg.classes!r} is not allowed: expected digits 0..9")
    if cfg.name in BUILDERS:
        return DatasetInfo(cfg.name, len(cfg.classes or range(10)) if cfg.name == "digits" else cfg.num_classes)
    spec = SPECS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"dataset.name={cfg.name!r} is not allowed: expected one of {', '.join(dataset_names())}")
    folder = dataset_folder(spec, cfg.root, data_dir)
    return DatasetInfo(cfg.name, check_root(spec, folder, cfg.download), str(folder))


def build_data(cfg: DatasetConfig, img_size: int = 32, data_dir: str = "data", data_config: Optional[dict] = None,
               device: Optional[torch.device | str] = None) -> DataBundle:
    """The data set ``cfg.name`` at the model's input size.

    ``data_config`` is the model's timm data config (``timm.data.resolve_data_config({}, model=model)``): its
    input size, interpolation, mean/std and crop_pct drive the on-disk sets' transforms. Size: dataset.img_size,
    else the data config's input size, else ``img_size``. ``device``: where a set held as tensors is decoded and
    kept (CIFAR with dataset.on_device); the loaders move it there anyway when not given.
    """
    check_dataset(cfg, data_dir)
    if cfg.name in BUILDERS:
        size = cfg.img_size or (int(data_config["input_size"][-1]) if data_config else img_size)
        bundle = BUILDERS[cfg.name](cfg, size)
    else:
        from craft_runner.data.readers import build_vision

        folder = dataset_folder(SPECS[cfg.name], cfg.root, data_dir)
        bundle = build_vision(cfg, folder, data_config, img_size, torch.device(device) if device else None)
    # Before any model is built: a fraction that empties a class is refused here.
    bundle = hold_out_val(bundle, cfg.val_fraction, cfg.split_seed)
    where = f"tensors on {bundle.train_x.device}" if bundle.train_x is not None else f"{cfg.num_workers} workers"
    val = f", {bundle.n_val} validation (held out of train)" if bundle.n_val else ""
    log.info("data %s: %d train%s, %d test, %d classes, %dx%d, %s", bundle.name, bundle.n_train, val, bundle.n_test,
             bundle.num_classes, bundle.img_size, bundle.img_size, where)
    return bundle
