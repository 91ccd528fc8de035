"""Data sets: miniature on-disk copies of every format, written here in the layout torchvision reads."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from helpers import compose_run
from PIL import Image

from craft_runner.config import ConfigError, DatasetConfig, to_run_config
from craft_runner.data import (
    SPECS,
    DataRootError,
    build_data,
    calib_indices,
    check_dataset,
    dataset_names,
    dataset_root,
)
from craft_runner.data.transforms import BatchPadCropFlip

CONF = Path(__file__).resolve().parent.parent / "conf" / "dataset"
CPU = torch.device("cpu")
RESNET20_DC = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465),
               "std": (0.247, 0.2435, 0.2616), "crop_pct": 1.0, "crop_mode": "center"}
VIT_B_DC = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center"}
ON_DISK = ["cifar10", "cifar100", "flowers102", "stanford_cars", "oxford_pets", "fgvc_aircraft", "food101", "imagenet"]


def _jpeg(path: Path, seed: int, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def _pickle(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(n, seed, label_key, n_classes):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, n_classes, n).tolist(), "filenames": [f"img{i}.png" for i in range(n)]}


def make_cifar10(d: Path):
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", _cifar_batch(3, i, "labels", 10))
    _pickle(d / "test_batch", _cifar_batch(4, 9, "labels", 10))
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return dict(num_classes=10, n_train=15, n_test=4)


def make_cifar100(d: Path):
    _pickle(d / "train", {**_cifar_batch(12, 1, "fine_labels", 100), "coarse_labels": [0] * 12})
    _pickle(d / "test", {**_cifar_batch(5, 2, "fine_labels", 100), "coarse_labels": [0] * 5})
    _pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"g{i}" for i in range(20)]})
    return dict(num_classes=100, n_train=12, n_test=5)


def make_flowers102(d: Path):
    for i in range(1, 13):
        _jpeg(d / "jpg" / f"image_{i:05d}.jpg", i, (50 + i, 40))
    scipy.io.savemat(d / "imagelabels.mat", {"labels": np.array([[1, 2, 3] * 4], dtype=np.uint8)})
    scipy.io.savemat(d / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                       "tstid": np.array([[7, 8, 9, 10, 11, 12]])})
    return dict(num_classes=3, n_train=6, n_test=6, test_labels=[0, 1, 2, 0, 1, 2])


def _cars_annos(fnames, classes):
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    a = np.zeros((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for i, (fn, c) in enumerate(zip(fnames, classes)):
        a[0, i] = (np.uint8(1), np.uint8(1), np.uint8(20), np.uint8(20), np.uint8(c), fn)
    return {"annotations": a}


def make_stanford_cars(d: Path):
    (d / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 2012"],
                     dtype=object).reshape(1, -1)
    scipy.io.savemat(d / "devkit" / "cars_meta.mat", {"class_names": names})
    tr = [f"{i:05d}.jpg" for i in range(1, 7)]
    te = [f"{i:05d}.jpg" for i in range(1, 5)]
    for i, f in enumerate(tr):
        _jpeg(d / "cars_train" / f, 100 + i)
    for i, f in enumerate(te):
        _jpeg(d / "cars_test" / f, 200 + i)
    scipy.io.savemat(d / "devkit" / "cars_train_annos.mat", _cars_annos(tr, [1, 2, 3, 4, 1, 2]))
    scipy.io.savemat(d / "cars_test_annos_withlabels.mat", _cars_annos(te, [4, 3, 2, 1]))
    return dict(num_classes=4, n_train=6, n_test=4, test_labels=[3, 2, 1, 0])


def make_oxford_pets(d: Path):
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]
    lines = {"trainval": [], "test": []}
    for name, label, species in breeds:
        for k in range(1, 4):
            split = "test" if k == 3 else "trainval"
            lines[split].append(f"{name}_{k} {label} {species} {label}")
            _jpeg(d / "images" / f"{name}_{k}.jpg", label * 10 + k)
    (d / "annotations").mkdir(parents=True)
    for split, ls in lines.items():
        (d / "annotations" / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return dict(num_classes=3, n_train=6, n_test=3, test_labels=[0, 1, 2])


def make_fgvc_aircraft(d: Path):
    variants = ["707-320", "A300B4", "Cessna 172"]
    data = d / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"trainval": [], "test": []}
    for i in range(9):
        split = "test" if i % 3 == 2 else "trainval"
        lines[split].append(f"{1000000 + i} {variants[i % 3]}")
        _jpeg(data / "images" / f"{1000000 + i}.jpg", 300 + i, (60, 45))
    for split, ls in lines.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(ls) + "\n")
    return dict(num_classes=3, n_train=6, n_test=3, test_labels=[2, 2, 2])


def make_food101(d: Path):
    meta = {"train": {}, "test": {}}
    for c, cls in enumerate(["apple_pie", "baby_back_ribs"]):
        for i in range(5):
            split = "test" if i >= 3 else "train"
            meta[split].setdefault(cls, []).append(f"{cls}/{100 + i}")
            _jpeg(d / "images" / cls / f"{100 + i}.jpg", 400 + 10 * c + i)
    (d / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (d / "meta" / f"{split}.json").write_text(json.dumps(m))
    return dict(num_classes=2, n_train=6, n_test=4, test_labels=[0, 0, 1, 1])


def make_imagenet(d: Path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for c, w in enumerate(wnids):
        for i in range(2):
            _jpeg(d / "train" / w / f"{w}_{i}.JPEG", 500 + 10 * c + i)
    for c, w in enumerate(wnids[1:], 1):  # val lacks the first class: labels must still follow train/
        _jpeg(d / "val" / w / f"ILSVRC2012_val_{c:08d}.JPEG", 600 + c)
    return dict(num_classes=3, n_train=6, n_test=2, test_labels=[1, 2])


MAKERS = {"cifar10": make_cifar10, "cifar100": make_cifar100, "flowers102": make_flowers102,
          "stanford_cars": make_stanford_cars, "oxford_pets": make_oxford_pets, "fgvc_aircraft": make_fgvc_aircraft,
          "food101": make_food101, "imagenet": make_imagenet}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Every set under one data_dir, each in torchvision's folder; ``expected`` maps name -> sizes."""
    root = tmp_path_factory.mktemp("data")
    expected = {}
    for name, make in MAKERS.items():
        folder = Path(dataset_root(DatasetConfig(name=name), str(root)))
        expected[name] = make(folder)
    return root, expected


def cfg_for(name, **kw):
    return DatasetConfig(name=name, num_workers=0, **kw)


def first(loader):
    return next(iter(loader))


def test_every_on_disk_set_has_a_yaml_that_is_a_valid_dataset_config():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} == set(dataset_names()) == set(ON_DISK) | {"digits", "synthetic"}
    for f in files:
        # Composed as craft-run does (the files share conf/shared/vision_dataset.yaml through their defaults).
        cfg = to_run_config(compose_run(f"dataset={f.stem}")).dataset
        assert isinstance(cfg, DatasetConfig) and cfg.name == f.stem and cfg.download is False


def test_default_root_is_torchvision_folder_under_data_dir(tmp_path):
    assert dataset_root(cfg_for("flowers102"), str(tmp_path)) == str(tmp_path / "flowers-102")
    assert dataset_root(cfg_for("cifar100"), str(tmp_path)) == str(tmp_path / "cifar-100-python")
    assert dataset_root(cfg_for("cifar10", root=str(tmp_path / "x")), "elsewhere") == str(tmp_path / "x")
    assert dataset_root(cfg_for("digits"), str(tmp_path)) is None


@pytest.mark.parametrize("name", ON_DISK)
def test_check_dataset_reads_class_count_without_images(name, data_dir):
    root, expected = data_dir
    info = check_dataset(cfg_for(name), data_dir=str(root))
    assert info.num_classes == expected[name]["num_classes"]
    assert info.root == dataset_root(cfg_for(name), str(root))


@pytest.mark.parametrize("name", ON_DISK)
def test_splits_classes_and_shapes_at_the_models_size(name, data_dir):
    root, expected = data_dir
    exp = expected[name]
    cfg = cfg_for(name, augment=True, on_device=False)
    b = build_data(cfg, data_dir=str(root), data_config=RESNET20_DC)
    assert (b.num_classes, b.n_train, b.n_test, b.img_size) == (exp["num_classes"], exp["n_train"], exp["n_test"], 32)
    x, y = first(b.train_loader(4, 0, CPU, cfg))
    assert x.shape == (min(4, exp["n_train"]), 3, 32, 32) and x.dtype == torch.float32
    assert ((0 <= y) & (y < b.num_classes)).all()
    xt, yt = first(b.eval_loader(64, CPU, cfg))
    assert xt.shape == (exp["n_test"], 3, 32, 32)
    if "test_labels" in exp:  # the official split files, read in their order
        assert yt.tolist() == exp["test_labels"]
    pickle.dumps(b.train_dataset)  # DataLoader workers started by spawn must unpickle it


def test_vit_b_config_gives_224_and_its_normalisation(data_dir):
    root, _ = data_dir
    cfg = cfg_for("flowers102", augment=True)
    b = build_data(cfg, data_dir=str(root), data_config=VIT_B_DC)
    assert b.img_size == 224 and b.data_config["mean"] == (0.5, 0.5, 0.5)
    assert first(b.eval_loader(8, CPU, cfg))[0].shape == (6, 3, 224, 224)
    x = first(b.train_loader(8, 0, CPU, cfg))[0]
    assert x.shape == (6, 3, 224, 224)
    # mean/std 0.5 maps [0, 1] to [-1, 1]; ImageNet statistics would reach beyond
    assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5


def test_timm_model_data_configs(data_dir):
    timm = pytest.importorskip("timm")
    root, _ = data_dir
    dc = timm.data.resolve_data_config({}, model=timm.create_model("test_vit"))
    b = build_data(cfg_for("oxford_pets"), data_dir=str(root), data_config=dc)
    side = dc["input_size"][-1]
    assert b.img_size == side and b.calib_batches(3, 3, 0, CPU)[0][0].shape == (3, 3, side, side)
    pytest.importorskip("craft_runner.models.cifar")  # registers resnet20 in timm
    dc = timm.data.resolve_data_config({}, model=timm.create_model("resnet20"))
    b = build_data(cfg_for("cifar10"), data_dir=str(root), data_config=dc)
    assert b.img_size == 32 and b.data_config["std"] == pytest.approx((0.247, 0.2435, 0.2616))
    # dataset.img_size overrides the model's size
    b = build_data(cfg_for("cifar10", img_size=48), data_dir=str(root), data_config=dc)
    assert b.img_size == 48 and first(b.eval_loader(2, CPU, cfg_for("cifar10")))[0].shape == (2, 3, 48, 48)


@pytest.mark.parametrize("name,on_device", [("flowers102", False), ("cifar10", True), ("cifar10", False)])
def test_calibration_subset_is_seeded_and_uses_eval_transforms(name, on_device, data_dir):
    root, _ = data_dir
    b = build_data(cfg_for(name, augment=True, on_device=on_device), data_dir=str(root), data_config=RESNET20_DC)
    a1, a2 = b.calib_batches(4, 3, 7, CPU), b.calib_batches(4, 3, 7, CPU)
    assert [len(y) for _, y in a1] == [3, 1]
    for (x1, y1), (x2, y2) in zip(a1, a2):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(calib_indices(b.n_train, 4, 7), calib_indices(b.n_train, 4, 8))
    other = torch.cat([x for x, _ in b.calib_batches(4, 3, 8, CPU)])
    assert not torch.equal(torch.cat([x for x, _ in a1]), other)
    # exactly the training images at those indices, through the evaluation transform
    idx = calib_indices(b.n_train, 4, 7)
    if b.train_x is None:
        ref = torch.stack([b.train_eval_dataset[int(i)][0] for i in idx])
    else:
        ref = b.transform(b.train_x[idx])
    assert torch.allclose(torch.cat([x for x, _ in a1]), ref)


@pytest.mark.parametrize("dc", [RESNET20_DC, {**VIT_B_DC, "input_size": (3, 48, 48)}])
def test_cifar_on_device_matches_the_loader_path(dc, data_dir):
    root, _ = data_dir
    dev = build_data(cfg_for("cifar10", on_device=True), data_dir=str(root), data_config=dc, device="cpu")
    disk = build_data(cfg_for("cifar10", on_device=False), data_dir=str(root), data_config=dc)
    side = dc["input_size"][-1]
    # stored as decoded (uint8, 32x32), resized to the model's size per batch
    assert dev.train_x.dtype == torch.uint8 and dev.train_x.shape == (15, 3, 32, 32) and dev.img_size == side
    assert first(dev.train_loader(4, 0, CPU, cfg_for("cifar10")))[0].shape == (4, 3, side, side)
    x_dev, y_dev = first(dev.eval_loader(64, CPU, cfg_for("cifar10")))
    x_disk, y_disk = first(disk.eval_loader(64, CPU, cfg_for("cifar10")))
    assert torch.equal(y_dev, y_disk)
    assert torch.allclose(x_dev, x_disk, atol=1e-5)


def test_cifar_on_device_augmentation_is_seeded_and_keeps_shapes(data_dir):
    root, _ = data_dir
    cfg = cfg_for("cifar10", on_device=True, augment=True)
    b = build_data(cfg, data_dir=str(root), data_config=RESNET20_DC)
    assert isinstance(b.augment, BatchPadCropFlip) and b.augment.pad == 4

    def epochs(seed, n=2):
        loader = b.train_loader(4, seed, CPU, cfg)
        return [batch for _ in range(n) for batch in loader]

    e1, e2, e3 = epochs(0), epochs(0), epochs(1)
    assert len(e1) == 2 * 4 and all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in e1)
    assert all(torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1]) for a, b_ in zip(e1, e2))
    assert not all(torch.equal(a[0], c[0]) for a, c in zip(e1, e3))
    # the first batch holds the same images without augmentation (the order is drawn first), and they differ
    b.augment = None
    x_plain, y_plain = first(b.train_loader(4, 0, CPU, cfg))
    assert torch.equal(y_plain, e1[0][1]) and not torch.equal(x_plain, e1[0][0])


def test_batch_pad_crop_flip_equals_per_image_crop_then_flip():
    x = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8)
    out = BatchPadCropFlip(2)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    dy, dx = torch.randint(0, 5, (2, 6), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    assert flip.any() and not flip.all()
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 10]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


@pytest.mark.parametrize("name", ON_DISK)
def test_a_renamed_folder_given_as_dataset_root(name, data_dir, tmp_path):
    root, expected = data_dir
    custom = tmp_path / f"my_{name}"
    shutil.copytree(dataset_root(cfg_for(name), str(root)), custom)
    b = build_data(cfg_for(name, root=str(custom), on_device=False), data_dir="nowhere", data_config=RESNET20_DC)
    assert (b.n_train, b.n_test, b.num_classes) == (expected[name]["n_train"], expected[name]["n_test"],
                                                     expected[name]["num_classes"])
    assert b.test_dataset[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", [n for n in ON_DISK if n not in ("stanford_cars", "imagenet")])
def test_missing_root_error_names_files_and_download_option(name, tmp_path):
    with pytest.raises(DataRootError) as e:
        check_dataset(cfg_for(name), data_dir=str(tmp_path))
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert "dataset.download=true" in msg and "does not exist" in msg
    folder = dataset_root(cfg_for(name), str(tmp_path))
    assert folder in msg
    assert all(f in msg for f in SPECS[name].files)
    # with the download switched on, the check passes (the download happens when the data is built)
    info = check_dataset(cfg_for(name, download=True), data_dir=str(tmp_path))
    assert info.num_classes == SPECS[name].nominal_classes


@pytest.mark.parametrize("name,module,folder", [("cifar10", "cifar", "cifar-10-batches-py"),
                                                 ("food101", "food101", "food-101")])
def test_download_true_fetches_through_torchvision(name, module, folder, tmp_path, monkeypatch):
    import importlib

    calls = []

    def fake_download(url, download_root, *args, **kwargs):  # what the archive would unpack to
        calls.append(url)
        MAKERS[name](Path(download_root) / folder)

    monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"), "download_and_extract_archive",
                        fake_download)
    cfg = cfg_for(name, download=True, on_device=False)
    assert check_dataset(cfg, data_dir=str(tmp_path)).num_classes == SPECS[name].nominal_classes
    b = build_data(cfg, data_dir=str(tmp_path), data_config=RESNET20_DC)
    assert len(calls) == 1 and (tmp_path / folder).is_dir()
    exp = MAKERS[name](tmp_path / "again")
    assert (b.n_train, b.n_test, b.num_classes) == (exp["n_train"], exp["n_test"], exp["num_classes"])


def test_incomplete_root_names_what_is_missing(data_dir, tmp_path):
    root, _ = data_dir
    shutil.copytree(Path(root) / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataRootError, match=r"lacks data_batch_3;.*dataset\.download=true"):
        check_dataset(cfg_for("cifar10"), data_dir=str(tmp_path))
    with pytest.raises(DataRootError, match="lacks data_batch_3"):  # build_data checks first as well
        build_data(cfg_for("cifar10"), data_dir=str(tmp_path))


@pytest.mark.parametrize("name,hint", [("stanford_cars", "can no longer be downloaded"),
                                       ("imagenet", "cannot be downloaded automatically")])
def test_sets_without_download_say_how_to_get_them(name, hint, tmp_path):
    for download in (False, True):
        with pytest.raises(DataRootError, match=hint) as e:
            check_dataset(cfg_for(name, download=download), data_dir=str(tmp_path))
        assert "dataset.download=true" not in str(e.value)


def test_imagenet_val_must_be_sorted_into_class_folders(tmp_path):
    _jpeg(tmp_path / "imagenet" / "train" / "n01440764" / "a.JPEG", 0)
    _jpeg(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    with pytest.raises(DataRootError, match=r"val/<wnid>"):
        check_dataset(cfg_for("imagenet"), data_dir=str(tmp_path))


def test_download_into_a_renamed_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        check_dataset(cfg_for("cifar10", root=str(tmp_path / "cifar10"), download=True))


def test_unknown_name():
    with pytest.raises(ConfigError, match="dataset.name='mnist' is not allowed"):
        check_dataset(cfg_for("mnist"))


def test_in_memory_sets_unchanged():
    info = check_dataset(cfg_for("synthetic", num_classes=4))
    assert info.num_classes == 4 and info.root is None
    b = build_data(cfg_for("synthetic", num_classes=4, n_train=8, n_test=4), img_size=12)
    assert b.train_x.shape == (8, 3, 12, 12) and b.transform is None
    # the model's data config sets the size of in-memory sets too
    b = build_data(cfg_for("digits"), img_size=8, data_config=RESNET20_DC)
    assert b.train_x.shape[1:] == (3, 32, 32) and b.num_classes == 10 and b.n_train + b.n_test == 1797
