"""dataset.val_fraction (issue 28 item 16): a seeded, stratified hold-out of the training split, never of the test
split; the record names the splits and the metrics on each; refusals in one line before any work."""

import json
from collections import Counter

import pytest
import torch
from helpers import TINY, compose_run
from test_data import RESNET20_DC, make_oxford_pets

from craft_runner import pipeline
from craft_runner.cache import cache_key, weights_key
from craft_runner.config import to_run_config
from craft_runner.data import build_data, dataset_root, stratified_holdout
from craft_runner.schema import ConfigError, DatasetConfig

CPU = torch.device("cpu")


def rows(x: torch.Tensor) -> set:
    return {tuple(r.flatten().tolist()) for r in x}


def test_holdout_takes_the_rounded_share_of_every_class_and_is_disjoint():
    labels = [0] * 10 + [1] * 5 + [2] * 3
    tr, va = stratified_holdout(labels, 0.3, seed=0)
    # by hand: 0.3 * 10 = 3, 0.3 * 5 = 1.5 -> 2 (half up), 0.3 * 3 = 0.9 -> 1
    assert Counter(labels[i] for i in va.tolist()) == {0: 3, 1: 2, 2: 1}
    assert set(tr.tolist()).isdisjoint(va.tolist()) and sorted(tr.tolist() + va.tolist()) == list(range(18))


def test_holdout_is_reproducible_per_seed():
    labels = [i % 4 for i in range(200)]
    a, b = stratified_holdout(labels, 0.2, seed=3), stratified_holdout(labels, 0.2, seed=3)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], stratified_holdout(labels, 0.2, seed=4)[1])


def _digits(**kw):
    return build_data(DatasetConfig(name="digits", **kw), img_size=8)


def test_digits_val_comes_out_of_train_and_test_is_untouched():
    whole, held = _digits(), _digits(val_fraction=0.25, split_seed=0)
    assert torch.equal(whole.test_x, held.test_x) and torch.equal(whole.test_y, held.test_y)
    assert held.n_train + held.n_val == whole.n_train and held.n_val > 0
    train, val, test = rows(held.train_x), rows(held.val_x), rows(held.test_x)
    assert train.isdisjoint(val) and val.isdisjoint(test)
    assert train | val == rows(whole.train_x)
    # stratified: each class's share of the validation split is its rounded quarter of the training split
    n_class = Counter(whole.train_y.tolist())
    assert Counter(held.val_y.tolist()) == {c: int(n * 0.25 + 0.5) for c, n in n_class.items()}
    # the evaluation loader of the validation split yields exactly its samples
    xs = torch.cat([x for x, _ in held.eval_loader(64, CPU, DatasetConfig(), split="val")])
    assert rows(xs) == val
    # calibration (PTQ, diagnostics) draws from what is left of train
    calib = torch.cat([x for x, _ in held.calib_batches(10_000, 512, 0, CPU)])
    assert rows(calib) == train


def test_digits_val_split_depends_on_split_seed_only():
    a, b, c = _digits(val_fraction=0.2, split_seed=1), _digits(val_fraction=0.2, split_seed=1), \
        _digits(val_fraction=0.2, split_seed=2)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)
    assert rows(a.val_x) != rows(c.val_x)


def test_on_disk_set_holds_out_training_images(tmp_path):
    folder = dataset_root(DatasetConfig(name="oxford_pets"), str(tmp_path))
    from pathlib import Path

    make_oxford_pets(Path(folder))  # 3 classes, 2 training images each, 3 test images
    cfg = DatasetConfig(name="oxford_pets", num_workers=0, val_fraction=0.5, augment=True)
    b = build_data(cfg, data_dir=str(tmp_path), data_config=RESNET20_DC)
    assert b.splits() == {"train": 3, "val": 3, "test": 3}
    val_files = {b.val_dataset.dataset.base._images[i] for i in b.val_dataset.indices}
    train_files = {b.train_dataset.dataset.base._images[i] for i in b.train_dataset.indices}
    test_files = set(b.test_dataset.base._images)
    assert val_files.isdisjoint(train_files) and val_files.isdisjoint(test_files)
    assert sorted(y for _, y in b.val_dataset) == [0, 1, 2]  # one image of each breed
    x, y = next(iter(b.eval_loader(8, CPU, cfg, split="val")))
    assert x.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", "nan"])
def test_fraction_outside_0_1_refused_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        to_run_config(compose_run(f"dataset.val_fraction={value}"))
    assert "dataset.val_fraction" in str(e.value) and "[0, 1)" in str(e.value) and "\n" not in str(e.value)


def test_fraction_that_empties_a_class_refused_before_any_work(tmp_path):
    # synthetic: 4 classes of 24 training images; 0.01 * 24 rounds to 0 validation images per class
    with pytest.raises(ConfigError) as e:
        pipeline.run(compose_run(*TINY, "dataset.val_fraction=0.01", tmp_path=tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "dataset.val_fraction=0.01" in msg and "no validation sample" in msg
    assert "[0.0208, 0.979)" in msg  # 0.5 / 24 and 23.5 / 24
    with pytest.raises(ConfigError, match="no training sample"):
        pipeline.run(compose_run(*TINY, "dataset.val_fraction=0.99", tmp_path=tmp_path))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_record_names_the_splits_and_the_metrics_on_each(tmp_path):
    cfg = compose_run(*TINY, "dataset.val_fraction=0.25", "compress=ptq", "compress.bits=W8A8",
                      "sharpness.enabled=false", tmp_path=tmp_path)
    m = pipeline.run(cfg)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["splits"] == {"train": 72, "val": 24, "test": 48}  # 96 training images, a quarter held out
    for k in ("fp_acc", "compressed_acc", "val_fp_acc", "val_compressed_acc"):
        assert res["metrics"][k] == m[k]
    # a validation accuracy is a multiple of 1/24, the test one of 1/48
    assert round(m["val_fp_acc"] * 24 / 100, 6) == round(m["val_fp_acc"] * 24 / 100)
    # the value a sweeper gets: the validation metric by default once there is a validation split
    assert pipeline.optimized_value(None, m) == m["val_compressed_acc"]
    assert pipeline.optimized_value("val_fp_acc", m) == m["val_fp_acc"]


def test_no_val_split_records_zero_and_keeps_the_cache_key(tmp_path):
    cfg = compose_run(*TINY, "sharpness.enabled=false", tmp_path=tmp_path)
    m = pipeline.run(cfg)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["splits"] == {"train": 96, "val": 0, "test": 48}
    assert not any(k.startswith("val_") for k in m) and pipeline.optimized_value(None, m) == m["fp_acc"]
    rc = to_run_config(cfg)
    assert "val_fraction" not in weights_key(rc)["dataset"]  # keys cached before the field still hold
    held = to_run_config(compose_run(*TINY, "dataset.val_fraction=0.25"))
    assert weights_key(held)["dataset"]["val_fraction"] == 0.25
    assert cache_key(held) != cache_key(rc)
