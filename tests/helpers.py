"""Compose the real configs, as craft-run does, for tests."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from craft_runner.config import register_configs

CONF = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()

# A tiny, fast run: synthetic data, ResNet-20 at 16x16, one epoch.
TINY = [
    "dataset=synthetic", "dataset.img_size=16", "dataset.n_train=96", "dataset.n_test=48", "dataset.num_classes=4",
    "train.epochs=2", "train.batch_size=32", "train.progress=false",
    "sharpness.n_samples=32", "sharpness.batch_size=32", "sharpness.max_iter=5",
    "compress.calib_size=16",
]


def compose_run(*overrides, tmp_path=None):
    extra = []
    if tmp_path is not None:
        extra = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("run", overrides=list(overrides) + extra)
