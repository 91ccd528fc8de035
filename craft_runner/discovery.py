"""How a registry finds its entries: by importing every module beside it."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path


def import_siblings(module_file: str, package: str) -> None:
    """Import every module of ``package`` (the folder of ``module_file``), found by path rather than by
    importing the package itself: a package's ``__init__`` imports its registry, so that would be a circle."""
    for mod in pkgutil.iter_modules([str(Path(module_file).parent)]):
        importlib.import_module(f"{package}.{mod.name}")
