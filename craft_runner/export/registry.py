"""The export format registry: name → ``fn(job) -> dict`` (one entry per format, as the compressor registry).

A format module registers its function with :func:`register_format`; the modules of this package are
imported on the first lookup. ``none`` is the format of a cell that exports nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from craft_runner.discovery import import_siblings
from craft_runner.schema import ConfigError

_REGISTRY: dict[str, Callable] = {}
_discovered = False


def register_format(name: str):
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"export format {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import_siblings(__file__, __package__)


def format_names() -> list[str]:
    _discover()
    return sorted(["none", *_REGISTRY])


def get_format(name: str) -> Callable:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"export.name={name!r} is not allowed: expected one of {', '.join(format_names())}")
    return _REGISTRY[name]
