"""One-shot pruning through ``torch.nn.utils.prune``; masks are made permanent before evaluation."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import prune as tprune

log = logging.getLogger(__name__)


def layer_sparsity(module: nn.Module) -> float:
    w = module.weight
    return float((w == 0).sum()) / w.numel()


def magnitude_prune(layers: list[tuple[str, nn.Module]], sparsity: float) -> dict:
    """Unstructured: in each layer, zero the ``sparsity`` share of weights with the smallest |w|."""
    for _, m in layers:
        tprune.l1_unstructured(m, "weight", amount=sparsity)
        tprune.remove(m, "weight")
    per_layer = {name: layer_sparsity(m) for name, m in layers}
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    log.info("magnitude pruning to %.0f%% on %d layers", 100 * sparsity, len(layers))
    return {"layer_sparsity": per_layer, "sparsity": zeros / max(total, 1)}


@torch.no_grad()
def global_zero_share(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
