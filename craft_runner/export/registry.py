"""The export format registry: name → ``fn(job) -> dict`` (one entry per format, as the compressor registry).

A format module registers its function with :func:`register_format`; the modules of this package are
imported on the first lookup. ``none`` is the format of a cell that exports nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from craft_runner.discovery import Registry

_REGISTRY: Registry[Callable] = Registry("export.name", "export format", __file__, __package__,
                                         same=lambda a, b: a is b, order=lambda e: sorted(["none", *e]))


def register_format(name: str):
    def deco(fn: Callable) -> Callable:
        return _REGISTRY.register(name, fn)

    return deco


def format_names() -> list[str]:
    return _REGISTRY.names()


def get_format(name: str) -> Callable:
    return _REGISTRY.get(name)
