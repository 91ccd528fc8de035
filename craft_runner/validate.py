"""Input checks made before any work: each raises a one-line :class:`~craft_runner.schema.ConfigError`."""

from __future__ import annotations

import os
from pathlib import Path

from craft_runner.schema import ConfigError

# Where `make pretrained` writes the tiny backbones of the _small CrAFT experiments (conf/shared/small_craft.yaml).
PRETRAINED_DIR = "outputs/pretrained"


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
        raise ConfigError(f"{head}; the _small CrAFT experiments fine-tune the tiny backbones that `make pretrained` "
                          f"writes (experiment craft_pretrain_small): run it first from the repository root, or set "
                          f"CRAFT_PRETRAINED_DIR to the folder that holds {p.name}")
    raise ConfigError(head)
