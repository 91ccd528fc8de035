"""A file in a data set's folder that is not an image (issue 22, item 7): reading it fails in one line naming the
file, in the main process or in a DataLoader worker; dataset.verify=true finds it before any work."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, compose_run
from PIL import Image
from test_data import MAKERS
from test_robust import cli, error_lines

from craft_runner import pipeline
from craft_runner.data import DataRootError, ImageReadError, build_data, dataset_root
from craft_runner.data.readers import image_paths, sample_path
from craft_runner.schema import DatasetConfig

CPU = torch.device("cpu")
WNIDS = ("n01440764", "n01443537")
NOT_AN_IMAGE = "this is not an image\n"


def _image(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, fmt)


def image_folder(root: Path, bad: bool = True) -> Path:
    """A tiny ImageNet-style ImageFolder: JPEGs and PNGs made by PIL, and (``bad``) a text file named bad.JPEG."""
    for c, w in enumerate(WNIDS):
        for i in range(3):
            _image(root / "train" / w / f"{w}_{i}.JPEG", 10 * c + i, "JPEG")
        _image(root / "train" / w / f"{w}_png.png", 50 + c, "PNG")
        _image(root / "val" / w / f"val_{c}.JPEG", 100 + c, "JPEG")
    if bad:
        (root / "train" / WNIDS[1] / "bad.JPEG").write_text(NOT_AN_IMAGE)
    return root / "train" / WNIDS[1] / "bad.JPEG"


def cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(**{"name": "imagenet", "root": str(root), "img_size": 16, "augment": False, "num_workers": 0,
                            "persistent_workers": False, **kw})


def one_line_naming(e: BaseException, path: Path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_reading_a_file_that_is_no_image_names_it(tmp_path):
    bad = image_folder(tmp_path / "imagenet")
    data = build_data(cfg(tmp_path / "imagenet"), device=CPU)
    i = image_paths(data.train_dataset.base).index(str(bad))
    with pytest.raises(ImageReadError) as e:
        data.train_dataset[i]
    msg = one_line_naming(e.value, bad)
    assert msg == f"cannot read image {bad}: cannot identify image file; run with dataset.verify=true to check " \
                  f"every image of the data set before any work"
    with pytest.raises(ImageReadError, match="cannot read image .*bad.JPEG"):  # the calibration subset reads it too
        data.calib_batches(data.n_train, 4, 0, CPU)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_error_names_the_file_through_the_loader_and_its_workers(tmp_path, workers):
    bad = image_folder(tmp_path / "imagenet")
    c = cfg(tmp_path / "imagenet", num_workers=workers)
    data = build_data(c, device=CPU)
    with pytest.raises(ImageReadError) as e:
        for _ in data.train_loader(4, 0, CPU, c):
            pass
    assert one_line_naming(e.value, bad).startswith(f"cannot read image {bad}: cannot identify image file;")
    if workers:  # torch's wrapping kept aside, not in the message
        assert "DataLoader worker process" in e.value.worker_traceback


def test_verify_refuses_a_folder_with_a_bad_file_naming_it_and_the_count(tmp_path):
    bad = image_folder(tmp_path / "imagenet")
    (tmp_path / "imagenet" / "val" / WNIDS[0] / "empty.png").write_bytes(b"")
    with pytest.raises(DataRootError) as e:
        build_data(cfg(tmp_path / "imagenet", verify=True, num_workers=2), device=CPU)
    msg = one_line_naming(e.value, bad)
    assert msg.startswith(f"dataset.verify=true: 2 of 12 image files of ImageNet-1k (imagenet) in "
                          f"{tmp_path / 'imagenet'} cannot be read: ")
    assert f"{bad} (cannot identify image file)" in msg and "empty.png (cannot identify image file)" in msg


def test_verify_passes_a_clean_folder(tmp_path):
    image_folder(tmp_path / "imagenet", bad=False)
    data = build_data(cfg(tmp_path / "imagenet", verify=True), device=CPU)
    assert (data.n_train, data.n_test) == (8, 2)


@pytest.mark.parametrize("name", ["flowers102", "stanford_cars", "oxford_pets", "fgvc_aircraft", "food101"])
def test_every_reader_of_image_files_names_the_bad_one(tmp_path, name):
    folder = Path(dataset_root(DatasetConfig(name=name), str(tmp_path)))
    MAKERS[name](folder)
    c = DatasetConfig(name=name, root=str(folder), img_size=16, augment=False, num_workers=0)
    base = build_data(c, device=CPU).train_dataset.base
    i = len(base) - 1  # Flowers-102: the second part of its train+val ConcatDataset
    bad = sample_path(base, i)
    assert bad is not None and image_paths(base)[i] == bad
    Path(bad).write_text(NOT_AN_IMAGE)
    with pytest.raises(ImageReadError) as e:
        build_data(c, device=CPU).train_dataset[i]
    one_line_naming(e.value, bad)
    with pytest.raises(DataRootError, match=r"dataset.verify=true: 1 of \d+ image files .* cannot be read: "
                                            + f"{bad} "):
        build_data(DatasetConfig(name=name, root=str(folder), img_size=16, verify=True, num_workers=0), device=CPU)


def test_cifar_has_no_image_files_to_verify(tmp_path):
    folder = Path(dataset_root(DatasetConfig(name="cifar10"), str(tmp_path)))
    MAKERS["cifar10"](folder)
    data = build_data(DatasetConfig(name="cifar10", root=str(folder), verify=True, num_workers=0), device=CPU)
    assert data.n_train == 15


FAST = (*TINY, "train.epochs=1", "sharpness.enabled=false")


def test_verify_refuses_before_any_work(tmp_path):
    bad = image_folder(tmp_path / "imagenet")
    run = compose_run(*FAST, "dataset=imagenet", f"dataset.root={tmp_path / 'imagenet'}", "dataset.verify=true",
                      "dataset.num_workers=0", tmp_path=tmp_path)
    with pytest.raises(DataRootError, match=f"cannot be read: {bad} "):
        pipeline.run(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]  # no run directory, no cache


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True])
def test_cli_a_bad_image_fails_in_one_line_naming_it(tmp_path, verify):
    bad = image_folder(tmp_path / "imagenet")
    p = cli(*FAST, "dataset=imagenet", f"dataset.root={tmp_path / 'imagenet'}", "dataset.num_workers=2",
            f"dataset.verify={str(verify).lower()}", f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    lines = error_lines(p.stderr)
    # 2: refused before any work; found mid-epoch, the run directory stays (results.json: failed): 1
    assert p.returncode == (2 if verify else 1) and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    if verify:  # refused before any work: nothing written
        assert lines[0] == f"craft-run: error: dataset.verify=true: 1 of 11 image files of ImageNet-1k (imagenet) " \
                           f"in {tmp_path / 'imagenet'} cannot be read: {bad} (cannot identify image file); " \
                           f"remove or replace them"
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    else:  # mid-epoch, in a loader worker
        assert lines[0] == f"craft-run: error: cannot read image {bad}: cannot identify image file; run with " \
                           f"dataset.verify=true to check every image of the data set before any work"
