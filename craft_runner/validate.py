"""Input checks made before any work, each a one-line :class:`~craft_runner.schema.ConfigError`.

:func:`validate` makes every check of a config that needs neither its data nor its model; ``prepare`` (before a
run), the dry-run plan (per cell) and the sweep's callback (before the first cell: the places and the
checkpoints) call it or its parts. What needs the built model (the compression's and the export's checks
against its layers) is ``prepare``'s.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from craft_runner.data import dataset_root
from craft_runner.export import check_export
from craft_runner.models import check_model_name
from craft_runner.schema import ConfigError, RunConfig

# Where `make pretrained` writes the tiny backbones of the _small CrAFT experiments (conf/shared/small_craft.yaml).
PRETRAINED_DIR = "outputs/pretrained"


class MissingFile(ConfigError):
    """A file the config names is not there (the dry run lists it apart from invalid values)."""


def validate(rc: RunConfig, *, world: int = 1, device: bool = True, places: bool = True,
             checkpoint: bool = True) -> None:
    """Every check of ``rc`` that needs no data and no model, in the order a run meets them: the device
    (``device``; a launcher may run the cells elsewhere), the folders it writes (``places``), the model's name,
    the batch against ``world`` processes, the export against the compression, the checkpoint it loads
    (``checkpoint``)."""
    if device:
        check_device(rc.device)
    if places:
        check_writable(rc.paths.cache_dir, "paths.cache_dir")
        check_writable(rc.paths.run_dir or "outputs/last", "paths.run_dir")
        if rc.dataset.download:
            root = dataset_root(rc.dataset, rc.paths.data_dir)
            if root is not None:
                check_writable(root, "dataset.root" if rc.dataset.root else "paths.data_dir")
    check_model_name(rc.model.name)
    if rc.train.batch_size % world:
        raise ConfigError(f"train.batch_size={rc.train.batch_size} is not allowed: expected a multiple of the "
                          f"{world} processes (it is the global batch; each process takes an equal share)")
    if rc.export is not None:
        check_export(rc.export, rc.compress)  # against the model too, once built (prepare)
    if checkpoint:
        check_checkpoint(rc.model)


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


def _pretrained_dir() -> Path:
    return Path(os.environ.get("CRAFT_PRETRAINED_DIR") or PRETRAINED_DIR).expanduser()


def check_checkpoint(model) -> None:
    """``model.checkpoint_path``, when set, is a file. A tiny pretrained backbone that is not there yet names
    ``make pretrained`` (the path is relative to the working directory, so a run from another folder misses
    it too)."""
    path = getattr(model, "checkpoint_path", None)
    if not path:
        return
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return
    where = "" if p.is_absolute() else f" (relative to {Path.cwd()})"
    head = f"model.checkpoint_path={path} is not allowed: no such file{where}"
    if p.stem == getattr(model, "name", None) and p.parent.absolute() == _pretrained_dir().absolute():
        raise MissingFile(f"{head}; the _small CrAFT experiments fine-tune the tiny backbones that `make pretrained` "
                          f"writes (experiment craft_pretrain_small): run it first from the repository root, or set "
                          f"CRAFT_PRETRAINED_DIR to the folder that holds {p.name}")
    raise MissingFile(head)
