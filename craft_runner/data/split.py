"""A validation split held out of the training split (``dataset.val_fraction``), never out of the test split.

The hold-out is stratified: every class gives ``round(val_fraction * n_class)`` of its training samples, drawn with
a generator seeded by ``dataset.split_seed`` (the same seed gives the same split whatever the run's seed, so
the trials of a search are compared on the same images). A fraction that leaves a class without a validation or
a training sample is refused, in one line, before any model is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch.utils.data import Subset

from craft_runner.data.core import DataBundle
from craft_runner.schema import ConfigError


def _per_class(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))  # round half up, the same on every platform


def stratified_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val), each sorted, of a stratified hold-out of ``fraction`` of ``labels``.

    Raises ConfigError (one line) when a class would end up with no sample in one of the two parts."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    classes, counts = torch.unique(y, return_counts=True)
    empty = [(int(c), int(n)) for c, n in zip(classes, counts) if not 0 < _per_class(fraction, int(n)) < int(n)]
    if empty:
        c, n = min(empty, key=lambda cn: cn[1])
        smallest = int(counts.min())
        # the fractions that keep every class in both parts: round(f * n) in 1..n-1 for the smallest class
        ok = f"[{0.5 / smallest:.3g}, {(smallest - 0.5) / smallest:.3g})" if smallest >= 2 else "none (a class has 1)"
        part = "validation" if _per_class(fraction, n) == 0 else "training"
        raise ConfigError(f"dataset.val_fraction={fraction!r} is not allowed: it leaves class {c} ({n} training "
                          f"samples) with no {part} sample ({len(empty)} classes so); expected 0 (no validation "
                          f"split) or a fraction in {ok}")
    g = torch.Generator().manual_seed(seed)
    val = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        members = torch.nonzero(y == c).flatten()
        val.append(members[torch.randperm(n, generator=g)[:_per_class(fraction, n)]])
    val_idx = torch.sort(torch.cat(val)).values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val_idx] = False
    return torch.nonzero(keep).flatten(), val_idx


def train_labels(bundle: DataBundle) -> list[int]:
    """The label of every training sample, without reading an image."""
    if bundle.train_y is not None:
        return bundle.train_y.tolist()
    if bundle.train_targets is None:
        raise ConfigError(f"dataset.val_fraction is not available for {bundle.name}: its training labels are not "
                          f"known without reading every sample")
    return list(bundle.train_targets)


def hold_out_val(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``bundle`` with ``fraction`` of its training split moved into a validation split (evaluation transforms,
    no augmentation); the test split is untouched. Calibration and diagnostics then draw from what is left."""
    if fraction <= 0:
        return bundle
    tr, va = stratified_holdout(train_labels(bundle), fraction, seed)
    if bundle.train_x is not None:
        x, y = bundle.train_x, bundle.train_y
        return dataclasses.replace(bundle, train_x=x[tr.to(x.device)], train_y=y[tr.to(y.device)],
                                   val_x=x[va.to(x.device)], val_y=y[va.to(y.device)])
    eval_ds = bundle.train_eval_dataset or bundle.train_dataset
    targets = None if bundle.train_targets is None else [bundle.train_targets[i] for i in tr.tolist()]
    return dataclasses.replace(bundle, train_dataset=Subset(bundle.train_dataset, tr.tolist()),
                               train_eval_dataset=Subset(eval_ds, tr.tolist()),
                               val_dataset=Subset(eval_ds, va.tolist()), train_targets=targets)
