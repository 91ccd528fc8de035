"""Run identity, in one place: each config field declares its role, and every key, digest and comparison that
says which runs are the same is derived from those declarations.

A field's role is ``metadata={"role": ...}`` on its dataclass field (craft_runner.schema); a field without one
takes its section's (the role of the ``RunConfig`` field that holds the section), so a whole section such as
``optimizer`` or ``model`` is declared once. The roles:

- ``weights``: determines the trained weights, so it enters the training cache key;
- ``diagnostics``: determines the diagnostics of given weights (λmax, trace, ...): the diagnostics cache key;
- ``cell``: part of what a cell is beyond its training (the compression, the export, the experiment, and how
  the run goes: device, loader workers, progress bars — these were always part of a cell, and stay so that the
  digests of finished cells hold);
- ``nothing``: where files go, logging and control flags (paths, logger, rerun, dry_run).

Derived from them (:func:`inputs`): the training key's inputs (``weights``), the diagnostics key's
(``diagnostics``), and the cell's (every role but ``nothing``), which give the cell digest, the run's name and
the done-check that skips a finished cell. Two more declarations a field may make:

- ``"absent_when": v`` (or a tuple of values): in the identity of its own role the field is left out at ``v``
  (a section: when its ``name`` is ``v``), so that the keys made before the field existed still hold;
- ``"key": "module:function"``: the section's part of its own role's key is ``function(section)`` (the
  optimizer's: only the fields the chosen optimizer uses), computed by the family that owns the section.

This module imports no torch: the report reads the inputs results.json records through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import typing
from typing import Any, Optional, Union

from craft_runner import schema
from craft_runner.schema import RunConfig

WEIGHTS, DIAGNOSTICS, CELL, NOTHING = "weights", "diagnostics", "cell", "nothing"
ROLES = (WEIGHTS, DIAGNOSTICS, CELL, NOTHING)
# The roles each identity covers: a cell is its training, its diagnostics and the rest of the cell.
_COVERS = {WEIGHTS: (WEIGHTS,), DIAGNOSTICS: (DIAGNOSTICS,), CELL: (WEIGHTS, DIAGNOSTICS, CELL)}
# An entry of every cache key that is no config field: the format's version (craft_runner.cache.CACHE_VERSION).
KEY_VERSION = "version"
_UNSET = object()


def digest(inputs: dict, n: int = 16) -> str:
    """A key's short name: the first ``n`` hex digits of the SHA-256 of its inputs as sorted JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:n]


def role_of(f: dataclasses.Field, section: Optional[str] = None) -> str:
    """The role ``f`` declares, else its section's; a top-level field must declare one."""
    role = f.metadata.get("role", section)
    if role not in ROLES:
        raise TypeError(f"config field {f.name!r} declares no role in the run's identity (metadata={{'role': ...}}, "
                        f"one of {', '.join(ROLES)}); got {role!r}")
    return role


def _sections() -> tuple[type, dict[str, dict[str, dataclasses.Field]]]:
    """The run's schema (looked up when asked) and the fields of each section it declares by type. A section
    typed by its family (``optimizer``, ``compress``, ``export``: ``Any`` here) has no field list: each of its
    fields has the section's role, the same whether read from a RunConfig or from a recorded config."""
    run = schema.RunConfig
    hints = typing.get_type_hints(run)
    return run, {f.name: {g.name: g for g in dataclasses.fields(hints[f.name])}
                 for f in dataclasses.fields(run) if dataclasses.is_dataclass(hints.get(f.name))}


def _absent(meta: typing.Mapping, value: Any) -> bool:
    """The field's value (a section: its name) is one its ``absent_when`` names (a value or a tuple of them)."""
    marker = meta.get("absent_when", _UNSET)
    if marker is _UNSET:
        return False
    markers = marker if isinstance(marker, tuple) else (marker,)
    return (value.get("name") if isinstance(value, dict) else value) in markers


def _plain(value: Any) -> Any:
    """``value`` as results.json records it (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _hook(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def inputs(config: Union[RunConfig, dict], role: str) -> dict:
    """What the identity ``role`` (``weights``, ``diagnostics`` or ``cell``) of ``config`` is made of: its fields
    of the covered roles, sections as nested dicts, plain JSON values. ``config`` is a RunConfig or a recorded
    config (results.json's); a field absent from an older record is absent here. A section with a ``key`` hook
    needs the RunConfig for its own role's inputs."""
    covers = _COVERS[role]
    live = None if isinstance(config, dict) else config
    run, sections = _sections()
    plain = _plain(dataclasses.asdict(config) if live is not None else config)
    out: dict = {}
    for f in dataclasses.fields(run):
        own = role_of(f)
        if f.name not in plain:
            continue
        value = plain[f.name]
        if own == role and _absent(f.metadata, value):
            continue
        if own == role and "key" in f.metadata:
            if live is None:
                raise TypeError(f"the {role} inputs of {f.name} are its family's ({f.metadata['key']}): they need "
                                f"the RunConfig, not a recorded config")
            out[f.name] = _plain(_hook(f.metadata["key"])(getattr(live, f.name)))
            continue
        if not isinstance(value, dict):
            if own in covers:
                out[f.name] = value
            continue
        sub = sections.get(f.name, {})
        part = {}
        for k, v in value.items():
            g = sub.get(k)
            r = role_of(g, own) if g is not None else own
            if r in covers and not (g is not None and r == role and _absent(g.metadata, v)):
                part[k] = v
        if part or own in covers:
            out[f.name] = part
    return out


def leaves(role: Optional[str] = None) -> dict[str, str]:
    """Every field path of the schema (``"dataset.num_workers"``; a section typed by its family, e.g.
    ``optimizer``, as one path) with its role; ``role`` None: all, else only the fields of that role."""
    out = {}
    run, sections = _sections()
    for f in dataclasses.fields(run):
        own = role_of(f)
        if f.name in sections:
            out.update({f"{f.name}.{g.name}": role_of(g, own) for g in sections[f.name].values()})
        else:
            out[f.name] = own
    return {p: r for p, r in out.items() if role is None or r == role}


def recorded(rc: RunConfig, weights: dict) -> dict:
    """What results.json records of the run's identity: the training key's inputs as hashed (``weights``, with
    its version) and the cell's, so that a reader needs no RunConfig to group records."""
    return {WEIGHTS: _plain(weights), CELL: inputs(rc, CELL)}


def same_cell(a: dict, b: dict) -> bool:
    """Two recorded configs are the same cell: equal in every field that is not of role ``nothing``."""
    return inputs(a, CELL) == inputs(b, CELL)
