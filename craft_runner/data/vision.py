"""The papers' real image data sets: where each lives on disk, and a check of that folder.

Each set lives in one folder: ``dataset.root`` or else ``<paths.data_dir>/<torchvision's folder name>``
(the folder torchvision's ``download=True`` creates under ``paths.data_dir``). ImageNet is an
ImageFolder tree ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``. Reading is in :mod:`.readers`;
this module imports no torchvision, so checking a config stays cheap.

Splits are the papers' (the official ones): CIFAR train/test, Flowers-102 train+val/test, Stanford Cars
train/test, Oxford-IIIT Pets trainval/test, FGVC Aircraft trainval/test (100 variants), Food-101
train/test, ImageNet train/val.

:func:`check_root` validates a folder from its file names and metadata only (no image is opened), so a
pipeline can fail on a missing data set before it builds a model.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from craft_runner.schema import ConfigError


class DataRootError(ConfigError):
    """A data set folder that is missing or incomplete; the message is one line."""


@dataclass(frozen=True)
class VisionSpec:
    name: str
    title: str
    folder: str  # torchvision's folder name under its root (and the default under paths.data_dir)
    files: tuple[str, ...]  # what must exist in the folder; a trailing "/" marks a directory
    nominal_classes: int  # of the full official set; the actual count is read from the folder
    downloadable: bool = True
    small_images: bool = False  # fixed 32x32 images: no crop at evaluation, may be held on the device
    how_to_get: str = ""  # for sets torchvision cannot download


_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

SPECS: dict[str, VisionSpec] = {s.name: s for s in (
    VisionSpec("cifar10", "CIFAR-10", "cifar-10-batches-py", _CIFAR10_FILES, 10, small_images=True),
    VisionSpec("cifar100", "CIFAR-100", "cifar-100-python", ("train", "test", "meta"), 100, small_images=True),
    VisionSpec("flowers102", "Flowers-102", "flowers-102", ("jpg/", "imagelabels.mat", "setid.mat"), 102),
    VisionSpec("stanford_cars", "Stanford Cars", "stanford_cars",
               ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat",
                "cars_train/", "cars_test/"), 196, downloadable=False,
               how_to_get="Stanford Cars can no longer be downloaded (its URL is gone): copy it there by hand"),
    VisionSpec("oxford_pets", "Oxford-IIIT Pets", "oxford-iiit-pet",
               ("images/", "annotations/trainval.txt", "annotations/test.txt"), 37),
    VisionSpec("fgvc_aircraft", "FGVC Aircraft", "fgvc-aircraft-2013b",
               ("data/images/", "data/variants.txt", "data/images_variant_trainval.txt",
                "data/images_variant_test.txt"), 100),
    VisionSpec("food101", "Food-101", "food-101", ("images/", "meta/train.json", "meta/test.json"), 101),
    VisionSpec("imagenet", "ImageNet-1k", "imagenet", ("train/", "val/"), 1000, downloadable=False,
               how_to_get="ImageNet cannot be downloaded automatically: get ILSVRC2012 from image-net.org and "
                          "arrange it as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"),
)}


def dataset_folder(spec: VisionSpec, root: Optional[str], data_dir: str) -> Path:
    return Path(root).expanduser() if root else Path(data_dir).expanduser() / spec.folder


def present(folder: Path, rel: str) -> bool:
    p = folder / rel.rstrip("/")
    return p.is_dir() if rel.endswith("/") else p.is_file()


def check_root(spec: VisionSpec, folder: Path, download: bool) -> int:
    """Raise :class:`DataRootError` unless ``folder`` holds the set (or will after a download);
    return its number of classes, read from the metadata (no image is opened)."""
    if download and spec.downloadable and folder.name != spec.folder:
        # torchvision downloads into <parent>/<its folder name>.
        raise ConfigError(f"dataset.download=true writes {spec.title} to {folder.parent / spec.folder}, "
                          f"not {folder}: set dataset.root to a path ending in {spec.folder!r}, or download "
                          f"without dataset.root into paths.data_dir")
    missing = [f for f in spec.files if not present(folder, f)]
    if missing and download and spec.downloadable:
        return spec.nominal_classes  # torchvision fetches it when the data is built
    if missing:
        fix = (spec.how_to_get if not spec.downloadable
               else "or set dataset.download=true to download it there")
        where = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        raise DataRootError(
            f"{spec.title} ({spec.name}) not found: {folder} {where}; expected in it: {', '.join(spec.files)}. "
            f"Set dataset.root to the folder holding them, or paths.data_dir (env CRAFT_DATA_DIR) to the folder "
            f"above {spec.folder}/, {fix}")
    if spec.name == "imagenet":
        _check_imagenet(folder)
    return num_classes(spec, folder)


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir())


def _check_imagenet(folder: Path) -> None:
    train, val = _subdirs(folder / "train"), _subdirs(folder / "val")
    if not train:
        raise DataRootError(f"ImageNet (imagenet): {folder / 'train'} has no class folders; expected "
                            f"train/<wnid>/*.JPEG (one folder per class)")
    if not val:
        raise DataRootError(f"ImageNet (imagenet): {folder / 'val'} has no class folders; sort the validation "
                            f"images into val/<wnid>/*.JPEG (e.g. with the usual valprep.sh)")
    extra = sorted(set(val) - set(train))
    if extra:
        raise DataRootError(f"ImageNet (imagenet): val/ has class folders absent from train/: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))


# --------------------------------------------------------------------------- class counts from the metadata


def loadmat(path: Path) -> dict:
    import scipy.io

    return scipy.io.loadmat(str(path), squeeze_me=True)


def read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _split_labels(path: Path, col: int = 1) -> list[int]:
    with open(path) as f:
        return [int(line.split()[col]) for line in f if line.strip() and not line.startswith("#")]


def num_classes(spec: VisionSpec, folder: Path) -> int:
    """Classes of the set in ``folder``: the full official count on a full copy, fewer on a subset."""
    name = spec.name
    if name == "cifar10":
        return len(read_pickle(folder / "batches.meta")["label_names"])
    if name == "cifar100":
        return len(read_pickle(folder / "meta")["fine_label_names"])
    if name == "flowers102":
        return int(loadmat(folder / "imagelabels.mat")["labels"].max())  # 1-based labels
    if name == "stanford_cars":
        return len(loadmat(folder / "devkit" / "cars_meta.mat")["class_names"])
    if name == "oxford_pets":  # 1-based class ids in the split lists
        ann = folder / "annotations"
        return max(_split_labels(ann / "trainval.txt") + _split_labels(ann / "test.txt"))
    if name == "fgvc_aircraft":
        with open(folder / "data" / "variants.txt") as f:
            return sum(1 for line in f if line.strip())
    if name == "food101":  # torchvision's classes are the keys of train.json
        with open(folder / "meta" / "train.json") as f:
            return len(json.load(f))
    if name == "imagenet":
        return len(_subdirs(folder / "train"))
    raise ValueError(f"no class count known for data set {name!r}")
