"""The registries' one mechanism: :class:`Registry`, name → entry, whose entries are found by importing every
module beside the registry (a new compressor, optimizer or export format is one module that registers itself)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, Optional, TypeVar

from craft_runner.schema import ConfigError

T = TypeVar("T")


def import_siblings(module_file: str, package: str) -> None:
    """Import every module of ``package`` (the folder of ``module_file``), found by path rather than by
    importing the package itself: a package's ``__init__`` imports its registry, so that would be a circle."""
    for mod in pkgutil.iter_modules([str(Path(module_file).parent)]):
        importlib.import_module(f"{package}.{mod.name}")


class Registry(Generic[T]):
    """Name → entry of one family. ``key`` is the config key that names an entry (``compress.name``), for the
    one-line error of an unknown name; ``kind`` names the family in the error of a name registered twice.
    The modules beside ``module_file`` (in ``package``) are imported on the first lookup. ``same(a, b)``: a second
    registration of the same entry (a module imported twice) is no conflict. ``order(names)``: the names as errors
    and listings show them (default: sorted)."""

    def __init__(self, key: str, kind: str, module_file: str, package: str,
                 same: Callable[[T, T], bool] = lambda a, b: a == b,
                 order: Optional[Callable[[dict], Iterable[str]]] = None):
        self.key, self.kind, self._file, self._package = key, kind, module_file, package
        self._same, self._order = same, order or (lambda entries: sorted(entries))
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and not self._same(self._entries[name], entry):
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def pop(self, name: str, default: Optional[T] = None) -> Optional[T]:
        """Remove an entry (a test's temporary one)."""
        return self._entries.pop(name, default)

    def entries(self) -> dict[str, T]:
        """Every entry, the modules beside the registry imported first (once)."""
        if not self._discovered:
            self._discovered = True
            import_siblings(self._file, self._package)
        return dict(self._entries)

    def names(self) -> list[str]:
        return list(self._order(self.entries()))

    def get(self, name: str) -> T:
        """The entry, or a one-line ConfigError listing the known names."""
        entries = self.entries()
        if name not in entries:
            raise ConfigError(f"{self.key}={name!r} is not allowed: expected one of {', '.join(self.names())}")
        return entries[name]
