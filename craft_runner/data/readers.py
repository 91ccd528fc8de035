"""torchvision's dataset classes pointed at a configured folder, and the DataBundle of an on-disk set.

torchvision joins a fixed folder name to the root it is given (``root/flowers-102``). Each subclass
here takes the data set's folder itself, passes its parent as torchvision's root, and re-points the
paths torchvision derived in the existence check torchvision calls before it reads anything; that
check tests presence instead of md5 sums (the hashes cost seconds every run and reject the miniature
copies the tests write). Everything else (parsing the split files, reading items) is torchvision's.
The classes live at module level so that DataLoader workers can unpickle them under any start method.

A sample that cannot be read raises :class:`~craft_runner.data.core.ImageReadError`, one line naming the file;
``dataset.verify=true`` opens every image file of the set with PIL before any work (:func:`verify_images`).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from craft_runner.data.core import DataBundle, ImageReadError
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


# ------------------------------------------------------------------------------------------ image files

# Where each reader keeps its samples' files: a list of (path, label) pairs or a list of paths.
_PAIRS = ("samples", "_samples")  # ImageFolder, Stanford Cars
_PATHS = ("_image_files", "_images")  # Flowers-102, FGVC Aircraft, Food-101; Oxford-IIIT Pets


def image_paths(ds) -> Optional[list[str]]:
    """The image file of each sample of ``ds`` (one of the readers above, or a ConcatDataset of them), in sample
    order; None for a set that is not read from image files (CIFAR's arrays)."""
    if isinstance(ds, ConcatDataset):
        parts = [image_paths(d) for d in ds.datasets]
        return None if any(p is None for p in parts) else [f for p in parts for f in p]
    for attr in _PAIRS:
        if isinstance(getattr(ds, attr, None), list):
            return [str(s[0]) for s in getattr(ds, attr)]
    for attr in _PATHS:
        if isinstance(getattr(ds, attr, None), list):
            return [str(f) for f in getattr(ds, attr)]
    return None


def sample_path(ds, i: int) -> Optional[str]:
    """The image file of sample ``i`` of ``ds``, or None (see :func:`image_paths`)."""
    try:
        if isinstance(ds, ConcatDataset):
            j = bisect.bisect_right(ds.cumulative_sizes, i)
            return sample_path(ds.datasets[j], i - (ds.cumulative_sizes[j - 1] if j else 0))
        for attr in _PAIRS:
            if isinstance(getattr(ds, attr, None), list):
                return str(getattr(ds, attr)[i][0])
        for attr in _PATHS:
            if isinstance(getattr(ds, attr, None), list):
                return str(getattr(ds, attr)[i])
    except (IndexError, TypeError):
        pass
    return None


def _reason(e: BaseException, path: Optional[str]) -> str:
    """An exception's first line without the path it repeats: PIL's "cannot identify image file '/a/b.JPEG'"."""
    lines = str(e).strip().splitlines()
    reason = lines[0] if lines else type(e).__name__
    if path:
        # torchvision opens the file first: "cannot identify image file <_io.BufferedReader name='/a/b.JPEG'>"
        quoted = r"['\"]?" + re.escape(path) + r"['\"]?"
        reason = re.sub(r":? ?(?:<[\w.]+ name=" + quoted + ">|" + quoted + ")", "", reason).strip() or type(e).__name__
    if not isinstance(e, OSError) and not reason.startswith(type(e).__name__):  # PIL's OSErrors read alone
        reason = f"{type(e).__name__}: {reason}"
    return reason


class Transformed(Dataset):
    """A view of an untransformed data set with its own transform: one parse of the metadata (one scan of
    ImageNet's 1.28 M files) serves both the training and the evaluation view of the training split.

    A sample that cannot be read raises :class:`ImageReadError`, one line naming its file."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        try:
            img, y = self.base[i]
        except Exception as e:
            path = sample_path(self.base, i)
            what = f"image {path}" if path else f"sample {i} of {type(self.base).__name__}"
            raise ImageReadError(f"cannot read {what}: {_reason(e, path)}; run with dataset.verify=true to check "
                                 f"every image of the data set before any work") from e
        return self.transform(img), y


def _unreadable(path: str) -> Optional[str]:
    """Why PIL cannot open ``path`` as an image (its verify(): the header and, for PNG, the chunks' checksums),
    or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError (PIL's parsers), DecompressionBombError
        return _reason(e, path)
    return None


def verify_images(spec: VisionSpec, folder: Path, datasets, workers: int = 4, show: int = 3) -> int:
    """Open every image file of ``datasets`` (the set's splits) with PIL's verify(), in ``workers`` threads;
    raise :class:`DataRootError` (one line: the first ``show`` bad files, why, and the count) if any fails.
    Returns the number of files checked (0 for a set held in arrays, such as CIFAR)."""
    lists = [image_paths(d) for d in datasets]
    if any(p is None for p in lists):
        log.info("dataset.verify: %s (%s) is stored as arrays, not image files: nothing to check", spec.title,
                 spec.name)
        return 0
    paths = list(dict.fromkeys(p for ps in lists for p in ps))  # a file shared by two splits once
    t0 = time.perf_counter()
    chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
    with ThreadPoolExecutor(max(1, min(workers, 32))) as ex:
        bad = [(p, r) for chunk, reasons in zip(chunks, ex.map(lambda c: [_unreadable(p) for p in c], chunks))
               for p, r in zip(chunk, reasons) if r is not None]
    if bad:
        listed = ", ".join(f"{p} ({r})" for p, r in bad[:show])
        more = f" and {len(bad) - show} more" if len(bad) > show else ""
        raise DataRootError(f"dataset.verify=true: {len(bad)} of {len(paths)} image files of {spec.title} "
                            f"({spec.name}) in {folder} cannot be read: {listed}{more}; remove or replace them")
    log.info("dataset.verify: %d image files of %s (%s) read by PIL in %.1f s: all good", len(paths), spec.title,
             spec.name, time.perf_counter() - t0)
    return len(paths)


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
    if cfg.verify:  # before any model is built or anything written
        verify_images(spec, folder, [train, test], cfg.num_workers)

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
                      train_targets=list(ytr), **common)
