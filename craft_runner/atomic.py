"""One atomic writer for results and checkpoints: a temporary file beside the target, fsynced, then renamed.

A reader (or a resumed run) sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(obj, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` made atomic."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
