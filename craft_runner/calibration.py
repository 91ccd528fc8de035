"""Run calibration batches through a model with hooks attached (used by PTQ, Wanda, QAT, diagnostics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


@torch.no_grad()
def forward_with_hooks(model: nn.Module, batches: Iterable,
                       forward_hooks: Sequence[tuple[nn.Module, Callable]] = (),
                       pre_hooks: Sequence[tuple[nn.Module, Callable]] = ()) -> None:
    """Forward every ``(x, y)`` batch in eval mode; the hooks are removed and the mode restored after."""
    handles = [m.register_forward_hook(fn) for m, fn in forward_hooks]
    handles += [m.register_forward_pre_hook(fn) for m, fn in pre_hooks]
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
