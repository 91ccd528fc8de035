"""One atomic writer for results, checkpoints and artifacts: a temporary file beside the target, fsynced, then
renamed.

A reader (or a resumed run) sees the old file or the new one, never a half-written one. A full disk raises
:class:`DiskFullError`, one line naming the file and the free space left, whatever the writer (torch.save
turns the OSError of its file into a RuntimeError "unexpected pos ..."; the original is kept and raised).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Optional

# ENOSPC: the filesystem is full; EDQUOT: the user's quota is.
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """No space left where craft-run writes: one line with the file and the free space."""

    def __str__(self) -> str:
        return self.strerror


def free_space(path) -> str:
    """The free space of the filesystem holding ``path`` (its nearest existing folder), e.g. "0 B free"."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        n = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit} free" if unit == "B" else f"{n:.1f} {unit} free"
        n /= 1024
    return f"{n} free"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def disk_full(e: BaseException, path=None) -> Optional[DiskFullError]:
    """``e`` as a one-line :class:`DiskFullError` naming ``path`` (else the file the OSError names), or None
    when ``e`` is not a full disk."""
    if not is_disk_full(e):
        return None
    if isinstance(e, DiskFullError):
        return e
    where = path if path is not None else e.filename
    place = f"cannot write {where}" if where else "cannot write"
    full = DiskFullError(e.errno, f"no space left on device: {place} ({free_space(where or '.')})")
    full.filename = str(where) if where else None
    return full


class _Watched:
    """A file object that remembers the OSError its writes raised (torch.save replaces it with its own)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def _replacing(path: Path, tmp: Path, cause: Callable[[BaseException], BaseException] = lambda e: e):
    """The shared end of the atomic writers: a disk-full failure raised as one line naming ``path``, the
    temporary always removed (after a success it is already renamed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except Exception as e:
        full = disk_full(cause(e), path)
        if full is not None:
            raise full from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    watched = None

    def cause(e: BaseException) -> BaseException:  # the OSError the writer swallowed, if any
        return watched.error if watched is not None and watched.error is not None else e

    with _replacing(path, tmp, cause):
        with open(tmp, "wb") as f:
            watched = _Watched(f)
            write(watched)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """For writers that take a file name (ONNX, ONNX Runtime): yields a temporary name beside ``path`` with
    the same suffix; on success the file is fsynced and renamed to ``path``, on failure removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    with _replacing(path, tmp):
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` made atomic."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
