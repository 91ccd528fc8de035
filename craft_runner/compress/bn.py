"""BatchNorm re-calibration after compression (``compress.bn_recalib``; beyond the two papers).

Pruning or quantizing the weights shifts the statistics of every BatchNorm input, while the
running mean/variance still describe the dense float network. :func:`recalibrate_bn` recomputes
them on the compressed model, as NNCF's batch-norm adaptation and CrAM's BN tuning (BNT) do:
running statistics reset, ``momentum=None`` (PyTorch's cumulative average: every batch weighs the
same), BatchNorm layers in train mode and every other module in eval mode (dropout off, quantizers
and pruning masks as they are), forward passes without gradients, then the modes and momenta
restored. No weight changes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from craft_runner.device import full_fp32

log = logging.getLogger(__name__)


@full_fp32()  # the statistics are measured like λmax: TF32 would round every batch's inputs on a GPU
@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> dict:
    """Recompute the running statistics of every BatchNorm of ``model`` on ``batches`` (``(x, y)`` pairs or
    input tensors); returns how many layers, batches and samples were used.

    Afterwards each running mean is the average over the batches of the batch means of that layer's
    input, each running variance the average of the unbiased batch variances (a layer sees the
    inputs produced by the layers before it, themselves normalised with batch statistics).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        log.info("BN re-calibration: the model has no BatchNorm with running statistics")
        return {"bn_layers": 0, "batches": 0, "samples": 0}
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    device = next(model.parameters()).device
    n_batches = n_samples = 0
    try:
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            if n_batches == 0:
                # Reset only once a batch is there: an empty iterable leaves the model untouched.
                model.eval()
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                    m.train()
            model(x.to(device))
            n_batches += 1
            n_samples += len(x)
    finally:
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum
    if n_batches == 0:
        raise ValueError("BN re-calibration needs at least one batch")
    log.info("BN re-calibration: %d BatchNorm layers on %d batches (%d samples)", len(bns), n_batches, n_samples)
    return {"bn_layers": len(bns), "batches": n_batches, "samples": n_samples}


__all__ = ["recalibrate_bn"]
