"""torchvision's dataset classes pointed at a configured folder, and the DataBundle of an on-disk set.

torchvision joins a fixed folder name to the root it is given (``root/flowers-102``). Each subclass
here takes the data set's folder itself, passes its parent as torchvision's root, and re-points the
paths torchvision derived in the existence check torchvision calls before it reads anything; that
check tests presence instead of md5 sums (the hashes cost seconds every run and reject the miniature
copies the tests write). Everything else (parsing the split files, reading items) is torchvision's.
The classes live at module level so that DataLoader workers can unpickle them under any start method.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import (
    CIFAR10,
    CIFAR100,
    FGVCAircraft,
    Flowers102,
    Food101,
    ImageFolder,
    OxfordIIITPet,
    StanfordCars,
    VisionDataset,
)
from torchvision.datasets.folder import default_loader

from craft_runner.data import transforms as T
from craft_runner.data.core import DataBundle
from craft_runner.data.vision import (
    SPECS,
    DataRootError,
    VisionSpec,
    check_root,
    loadmat,
    num_classes,
    present,
    read_pickle,
)
from craft_runner.schema import DatasetConfig

log = logging.getLogger(__name__)


class _CifarFromFolder:
    def __init__(self, folder: Path, train: bool, download: bool = False):
        self.base_folder = folder.name  # shadows the class's fixed folder name
        super().__init__(str(folder.parent), train=train, download=download)

    def _check_integrity(self) -> bool:
        files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in files)

    def _load_meta(self) -> None:
        data = read_pickle(Path(self.root, self.base_folder, self.meta["filename"]))
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class Cifar10Folder(_CifarFromFolder, CIFAR10):
    pass


class Cifar100Folder(_CifarFromFolder, CIFAR100):
    pass


class Flowers102Folder(Flowers102):
    def __init__(self, folder: Path, split: str, download: bool = False):
        self._folder = Path(folder)
        super().__init__(str(self._folder.parent), split=split, download=download)

    def _check_integrity(self) -> bool:
        self._base_folder, self._images_folder = self._folder, self._folder / "jpg"
        return all(present(self._folder, f) for f in SPECS["flowers102"].files)


class StanfordCarsFolder(StanfordCars):
    """torchvision's __init__ builds the devkit path from root/"stanford_cars" in a local variable, so this
    one repeats its few lines with the given folder; reading items is torchvision's."""

    def __init__(self, folder: Path, split: str):
        VisionDataset.__init__(self, str(folder))
        folder = Path(folder)
        self._split = split
        self._base_folder = folder
        if split == "train":
            self._annotations_mat_path = folder / "devkit" / "cars_train_annos.mat"
            self._images_base_path = folder / "cars_train"
        else:
            self._annotations_mat_path = folder / "cars_test_annos_withlabels.mat"
            self._images_base_path = folder / "cars_test"
        self._samples = [(str(self._images_base_path / a["fname"]), int(a["class"]) - 1)  # 1-based on disk
                         for a in loadmat(self._annotations_mat_path)["annotations"]]
        self.classes = loadmat(folder / "devkit" / "cars_meta.mat")["class_names"].tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.loader = default_loader


class OxfordPetFolder(OxfordIIITPet):
    def __init__(self, folder: Path, split: str, download: bool = False):
        self._folder = Path(folder)
        super().__init__(str(self._folder.parent), split=split, download=download)

    def _check_exists(self) -> bool:
        self._base_folder = self._folder
        self._images_folder, self._anns_folder = self._folder / "images", self._folder / "annotations"
        self._segs_folder = self._anns_folder / "trimaps"
        return self._images_folder.is_dir() and self._anns_folder.is_dir()


class FGVCAircraftFolder(FGVCAircraft):
    def __init__(self, folder: Path, split: str, download: bool = False):
        self._folder = Path(folder)
        super().__init__(str(self._folder.parent), split=split, annotation_level="variant", download=download)

    def _check_exists(self) -> bool:
        self._data_path = str(self._folder)
        return self._folder.is_dir()


class Food101Folder(Food101):
    def __init__(self, folder: Path, split: str, download: bool = False):
        self._folder = Path(folder)
        super().__init__(str(self._folder.parent), split=split, download=download)

    def _check_exists(self) -> bool:
        self._base_folder = self._folder
        self._meta_folder, self._images_folder = self._folder / "meta", self._folder / "images"
        return self._meta_folder.is_dir() and self._images_folder.is_dir()


class ImageFolderWithClasses(ImageFolder):
    """An ImageFolder numbered by a given class list (train/'s), so a val/ lacking a class shifts no label."""

    def __init__(self, root: str, classes: list[str], **kwargs):
        self._given_classes = list(classes)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        return self._given_classes, {c: i for i, c in enumerate(self._given_classes)}


# Each opener: (spec, folder, download) -> (train, test, train labels, test labels, class names).

def _open_cifar(spec: VisionSpec, folder: Path, download: bool):
    cls = Cifar10Folder if spec.name == "cifar10" else Cifar100Folder
    train, test = cls(folder, True, download), cls(folder, False)
    return train, test, list(train.targets), list(test.targets), list(train.classes)


def _open_flowers(spec: VisionSpec, folder: Path, download: bool):
    parts = [Flowers102Folder(folder, "train", download), Flowers102Folder(folder, "val")]
    test = Flowers102Folder(folder, "test")
    n = num_classes(spec, folder)
    return (ConcatDataset(parts), test, [y for p in parts for y in p._labels], list(test._labels),
            list(Flowers102.classes[:n]))


def _open_cars(spec: VisionSpec, folder: Path, download: bool):
    train, test = StanfordCarsFolder(folder, "train"), StanfordCarsFolder(folder, "test")
    return train, test, [y for _, y in train._samples], [y for _, y in test._samples], list(train.classes)


def _open_pets(spec: VisionSpec, folder: Path, download: bool):
    train, test = OxfordPetFolder(folder, "trainval", download), OxfordPetFolder(folder, "test")
    return train, test, list(train._labels), list(test._labels), list(train.classes)


def _open_aircraft(spec: VisionSpec, folder: Path, download: bool):
    train, test = FGVCAircraftFolder(folder, "trainval", download), FGVCAircraftFolder(folder, "test")
    return train, test, list(train._labels), list(test._labels), list(train.classes)


def _open_food(spec: VisionSpec, folder: Path, download: bool):
    train, test = Food101Folder(folder, "train", download), Food101Folder(folder, "test")
    if train.classes != test.classes:  # torchvision numbers each split's classes on its own
        raise DataRootError(f"Food-101 (food101): meta/train.json and meta/test.json in {folder} name "
                            f"different classes")
    return train, test, list(train._labels), list(test._labels), list(train.classes)


def _open_imagenet(spec: VisionSpec, folder: Path, download: bool):
    train = ImageFolder(str(folder / "train"))
    test = ImageFolderWithClasses(str(folder / "val"), train.classes, allow_empty=True)
    return train, test, list(train.targets), list(test.targets), list(train.classes)


OPENERS: dict[str, Callable] = {
    "cifar10": _open_cifar, "cifar100": _open_cifar, "flowers102": _open_flowers, "stanford_cars": _open_cars,
    "oxford_pets": _open_pets, "fgvc_aircraft": _open_aircraft, "food101": _open_food,
    "imagenet": _open_imagenet,
}


class Transformed(Dataset):
    """A view of an untransformed data set with its own transform: one parse of the metadata (one scan of
    ImageNet's 1.28 M files) serves both the training and the evaluation view of the training split."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, y = self.base[i]
        return self.transform(img), y


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _open_downloading(spec: VisionSpec, folder: Path):
    """The opener with download=True; when it fails (no network, a bad archive) everything it created is
    removed — archives, the set's folder, parent folders it made — and one line says what happened."""
    missing_parents = []
    p = folder
    while not p.exists() and p != p.parent:
        missing_parents.append(p)
        p = p.parent
    parent = folder.parent
    in_parent = set(os.listdir(parent)) if parent.is_dir() else set()
    in_folder = set(os.listdir(folder)) if folder.is_dir() else None
    try:
        return OPENERS[spec.name](spec, folder, True)
    except Exception as e:
        if folder.is_dir():
            if in_folder is None:
                _remove(folder)
            else:
                for name in set(os.listdir(folder)) - in_folder:
                    _remove(folder / name)
        if parent.is_dir():
            for name in set(os.listdir(parent)) - in_parent - {folder.name}:
                _remove(parent / name)  # torchvision's archive, beside the folder
        for d in missing_parents:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataRootError(
            f"{spec.title} ({spec.name}): dataset.download=true could not download it into {folder} "
            f"({type(e).__name__}: {reason}); nothing was left behind. Without network, copy it there by hand "
            f"(expected: {', '.join(spec.files)})") from None


def build_vision(cfg: DatasetConfig, folder: Path, data_config: Optional[dict], fallback_size: int,
                 device: Optional[torch.device] = None) -> DataBundle:
    """The DataBundle of the on-disk set ``cfg.name`` read from ``folder``."""
    spec = SPECS[cfg.name]
    n_classes = check_root(spec, folder, cfg.download)
    if cfg.download:
        train, test, ytr, yte, classes = _open_downloading(spec, folder)
    else:
        train, test, ytr, yte, classes = OPENERS[spec.name](spec, folder, False)
    if cfg.download:  # check_root could only give the nominal count before the download
        n_classes = num_classes(spec, folder)
    bad = [y for y in ytr + yte if not 0 <= y < n_classes]
    if bad:
        raise DataRootError(f"{spec.title} ({spec.name}) in {folder}: label {bad[0]} outside 0..{n_classes - 1}")

    mean, std = (T.CIFAR_MEAN, T.CIFAR_STD) if spec.small_images else (T.IMAGENET_MEAN, T.IMAGENET_STD)
    dc = T.resolve_data_config(data_config, cfg.img_size, fallback_size, mean, std)
    w = T.image_hw(dc)[1]
    common = dict(name=spec.name, num_classes=n_classes, in_chans=3, img_size=w, classes=classes,
                  data_config=dc, root=str(folder))

    if spec.small_images and cfg.on_device:
        # Decoded once into uint8 tensors at the stored 32x32 (CIFAR: 184 MB); each batch is augmented
        # (pad-crop + flip), resized to the model's size and normalised where it lies, on the device.
        def tensors(ds, labels):
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            x = x.to(device) if device is not None else x
            return x, torch.as_tensor(labels, dtype=torch.long, device=x.device)

        xtr, ytr_t = tensors(train, ytr)
        xte, yte_t = tensors(test, yte)
        augment = T.BatchPadCropFlip(T.pad_for(tuple(xtr.shape[-2:]))) if cfg.augment else None
        return DataBundle(train_x=xtr, train_y=ytr_t, test_x=xte, test_y=yte_t, augment=augment,
                          transform=T.BatchResizeNormalize(dc), **common)

    if cfg.on_device and not spec.small_images:
        log.info("%s: dataset.on_device applies to small-image sets only; reading with %d loader workers",
                 spec.name, cfg.num_workers)
    if spec.small_images:
        eval_tf, train_tf = T.small_image_transform(dc, False), T.small_image_transform(dc, True)
    else:
        eval_tf, train_tf = T.image_eval_transform(dc), T.image_train_transform(dc)
    return DataBundle(train_x=None, train_y=None, test_x=None, test_y=None,
                      train_dataset=Transformed(train, train_tf if cfg.augment else eval_tf),
                      train_eval_dataset=Transformed(train, eval_tf), test_dataset=Transformed(test, eval_tf),
                      **common)
