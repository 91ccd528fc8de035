"""BatchNorm folded into the Conv2d before it: what the deployed (ONNX) model computes.

With σ = √(running_var + eps), a Conv2d (W, b) followed by an eval-mode BatchNorm2d (γ, β, running_mean)
is the single Conv2d with W' = W·γ/σ (per output channel) and b' = β + (b − running_mean)·γ/σ. Used by
``compress.fold_bn`` (BasePTQ, PTQ4ViT, PACT: the scales are searched / trained on the deployed grid)
and by the ONNX export's deployable copy.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """W' = W·γ/σ, b' = β + (b − mean)·γ/σ into ``conv`` itself (the same module object, so lists of layers
    and hooks that hold it stay valid); computed in float64, stored in the weight's dtype."""
    dtype = conv.weight.dtype
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(factor)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    conv.weight.copy_((conv.weight.double() * factor.reshape(-1, *([1] * (conv.weight.dim() - 1)))).to(dtype))
    bias = (shift + (b - bn.running_mean.double()) * factor).to(dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


@torch.no_grad()
def fold_bn(model: nn.Module, sample: torch.Tensor | None = None, tol: float = 1e-4) -> int:
    """Fold each BatchNorm2d (with running statistics) into the Conv2d registered just before it in the same
    parent — the order the models here run them in — and replace it by nn.Identity; returns how many.

    With ``sample``: the eval-mode outputs on it before and after must agree within ``tol`` (max difference
    relative to max |output|), else RuntimeError (the model is then left folded: pass a copy to keep it).
    """
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        pairs += [(parent, bn_name, conv, bn) for (_, conv), (bn_name, bn) in zip(children, children[1:])
                  if _foldable(conv, bn)]
    if not pairs:
        return 0
    before = None
    if sample is not None:
        was_training = model.training
        model.eval()
        before = model(sample)
    for parent, bn_name, conv, bn in pairs:
        fold_conv_bn_(conv, bn)
        setattr(parent, bn_name, nn.Identity())
    if before is not None:
        after = model(sample)
        model.train(was_training)
        err = ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item()
        if err > tol:
            raise RuntimeError(f"folding BatchNorm changed the outputs (max relative difference {err:.2e}): a "
                               f"BatchNorm does not follow the Conv registered before it")
    return len(pairs)


def fold_for_compression(model: nn.Module, enabled: bool, calib_batches) -> dict:
    """``compress.fold_bn``: fold before the compressor runs (checked on a few calibration images); the
    record's ``fold_bn`` and ``bn_folded`` fields."""
    if not enabled:
        return {"fold_bn": False}
    sample = calib_batches[0][0][:8] if calib_batches else None
    n = fold_bn(model, sample)
    log.info("fold_bn: %d BatchNorm folded into the Conv2d before them", n)
    return {"fold_bn": True, "bn_folded": n}


__all__ = ["fold_bn", "fold_conv_bn_", "fold_for_compression"]
