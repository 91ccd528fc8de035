"""The training cache: what a key hashes, its entries (``<cache_dir>/<key>/``: ``key.json``, ``model.pt``, the
training state, ``diagnostics/<digest>/``), the lock that lets one process at a time train a key, and the
storing and loading of cached weights.

A key is the digest of everything that determines the trained weights (:func:`weights_key`); the diagnostics of
given weights have their own (:func:`diagnostics_key`). What enters each is the fields' declared roles
(:mod:`craft_runner.identity`). Both record their inputs beside them (``key.json``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from craft_runner import distributed, identity
from craft_runner.atomic import atomic_save, atomic_write_json
from craft_runner.identity import DIAGNOSTICS, KEY_VERSION, WEIGHTS, digest  # noqa: F401  (digest: re-exported)
from craft_runner.schema import RunConfig
from craft_runner.train import CheckpointError, NonFiniteError, load_checkpoint, nonfinite_weights

log = logging.getLogger("craft_runner.pipeline")  # what a run logs reads as one logger's, as before

# Bumped whenever what a key hashes changes meaning (2: only the fields that apply; key.json).
CACHE_VERSION = 2


def weights_key(rc: RunConfig) -> dict:
    """Everything that determines the trained weights (the fields of role ``weights``; not the compression):
    the inputs of the cache key."""
    # Several processes train differently (per-process BatchNorm statistics, SAM's per-process perturbation).
    world = {"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}
    return {**identity.inputs(rc, WEIGHTS), KEY_VERSION: CACHE_VERSION, **world}


def cache_key(rc: RunConfig) -> str:
    return digest(weights_key(rc))


def diagnostics_key(rc: RunConfig) -> dict:
    """What determines the diagnostics of given weights (the fields of role ``diagnostics``): the sharpness
    section's at the top, as the keys cached before; any other such field beside them."""
    inputs = identity.inputs(rc, DIAGNOSTICS)
    return {**inputs.pop("sharpness", {}), **inputs, KEY_VERSION: CACHE_VERSION}


def cache_entry(directory: Path, inputs: dict) -> Path:
    """``directory`` with ``key.json`` (the inputs of its key) written once, so the entry explains itself."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "key.json").exists():
        atomic_write_json(inputs, directory / "key.json")
    return directory


def read_json(path: Path) -> dict:
    """A cache entry's JSON file; a truncated or foreign one raises a one-line CheckpointError."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read: it is truncated or not JSON ({e}); delete it to measure "
                              f"again") from None


@contextlib.contextmanager
def locked(directory: Path):
    """One process at a time trains a given cache key (jobs of a sweep share keys); a job that has to wait
    says so, naming the holder."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    with open(path, "a+") as f:  # "a+": never truncates what the holder wrote
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another job"
            log.info("waiting for the training lock %s, held by %s: it trains or measures this cache key, which "
                     "this job then loads", path, holder)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("got the lock %s after %.0f s", path, time.perf_counter() - t0)
        with contextlib.suppress(OSError):  # the holder's name only informs; a full disk fails at a real write
            f.seek(0)
            f.truncate()
            os.write(f.fileno(), f"pid {os.getpid()} on {platform.node()}\n".encode())  # unbuffered
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cached_weights(path: Path, device: torch.device, key: Optional[str] = None) -> dict:
    """The cache entry ``model.pt``, read with weights_only=True; a damaged, foreign or non-finite one raises
    a one-line CheckpointError naming it (delete it to train again). With ``key``, the cache key the
    checkpoint records must be that of its folder; one written before keys were recorded is used, with a
    warning."""
    fix = f"delete it (rm {path}) to train again"
    st = load_checkpoint(path, device, ("model", "meta"), fix=fix)
    if not isinstance(st["model"], dict) or nonfinite_weights(st["model"]):
        raise CheckpointError(f"{path} cannot be used: its weights are not all finite; {fix}")
    if key is not None:
        recorded = st.get("cache_key")
        if recorded is None:
            log.warning("%s records no cache key (written by an older craft-run): it is used as the weights of "
                        "key %s unchecked", path, key)
        elif recorded != key:
            raise CheckpointError(f"{path} holds the weights of training {recorded}, not of {key} (its folder's "
                                  f"key): it was moved or copied there; {fix}")
    return st


def store_weights(path: Path, model: torch.nn.Module, meta: dict, key_inputs: dict, what: str) -> None:
    """``model``'s weights as the cache entry ``path`` (``model.pt``), with ``meta`` (the training's record), the
    entry's key and what it hashes (checked when loaded). Non-finite weights are never cached: a one-line
    NonFiniteError naming ``what`` (the optimizer) instead."""
    if nonfinite_weights(model):  # fit checks every epoch; never cache what it would have refused
        raise NonFiniteError(f"non-finite weights after training {what}: nothing cached")
    inputs = json.loads(json.dumps(key_inputs, sort_keys=True, default=str))
    atomic_save({"model": model.state_dict(), "meta": meta, "cache_key": path.parent.name, "key_inputs": inputs},
                path)


def uncertified_lambda_min_dropped(results: dict) -> dict:
    """Diagnostics cached before λmin needed its own certificate: their λmin is dropped, never reported."""
    for d in results.values():
        lam = d.get("lambda_max") if isinstance(d, dict) else None
        if isinstance(lam, dict) and "lambda_min_converged" not in lam:
            lam.update(lambda_min=None, lambda_min_converged=False, lambda_min_residual=None)
            d.get("scalars", {}).pop("lambda_min", None)
    return results
