"""SmoothQuant's migration of activation outliers into the weights (Xiao et al., ICML 2023; mit-han-lab/smoothquant
``smooth.py``, ``smooth_ln_fcs``), for the LayerNorm → Linear pairs of timm ViTs and Mixers.

For a LayerNorm whose output feeds Linear layers directly, with a_j = max |X_j| of input channel j over the
calibration data and w_j = max |W_ij| over the rows of those Linears,

    s_j = a_j^α / w_j^(1−α)     (both maxima clamped at 1e-5, s too, as the reference does)

and the LayerNorm's weight and bias are divided by s, the Linears' input columns multiplied by it: X·diag(s)⁻¹
and diag(s)·W compute the same output, with the channel ranges evened out between activations and weights.
The pairs (the reference's per-architecture lists): a timm ViT block's norm1 → attn.qkv and norm2 → mlp.fc1, a
Mixer block's norm2 → mlp_channels.fc1 (its norm1 feeds the token-mixing MLP, which mixes along the other dim).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from craft_runner.calibration import forward_with_hooks
from craft_runner.schema import ConfigError, _check

log = logging.getLogger(__name__)

# (norm attribute, path of the Linear it feeds) inside one block
PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"), ("norm2", "mlp_channels.fc1"))
CLAMP = 1e-5


def smooth_pairs(model: nn.Module) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(block name, LayerNorm, Linear) for every pair of :data:`PAIRS` whose LayerNorm is affine over the Linear's
    input features. A Mixer's norm1 → mlp_tokens is not one: the token MLP reads the transposed output."""
    found = []
    for name, block in model.named_modules():
        for norm_name, fc_path in PAIRS:
            norm = getattr(block, norm_name, None)
            try:
                fc = block.get_submodule(fc_path)
            except AttributeError:
                continue
            if (isinstance(norm, nn.LayerNorm) and isinstance(fc, nn.Linear) and norm.elementwise_affine
                    and norm.bias is not None and tuple(norm.normalized_shape) == (fc.in_features,)):
                found.append((f"{name}.{norm_name}" if name else norm_name, norm, fc))
    return found


def check_smooth_alpha(alpha) -> None:
    _check(alpha is None or 0.0 <= alpha <= 1.0, "compress.smooth_alpha", alpha,
           "null (off) or a migration strength in [0, 1] (SmoothQuant's 0.5)")


def check_smooth(model: nn.Module, cfg) -> None:
    """Before training: ``compress.smooth_alpha`` needs a model with LayerNorm → Linear pairs."""
    if getattr(cfg, "smooth_alpha", None) is not None:
        check_smoothable(model)


def check_smoothable(model: nn.Module) -> None:
    if not smooth_pairs(model):
        raise ConfigError(f"compress.smooth_alpha is not allowed with model {type(model).__name__}: SmoothQuant "
                          f"migrates LayerNorm → Linear pairs (timm ViT norm1→qkv / norm2→fc1, Mixer "
                          f"norm2→mlp_channels.fc1) and this model has none")


@torch.no_grad()
def input_channel_max(model: nn.Module, modules: list[nn.Module], batches) -> dict[nn.Module, torch.Tensor]:
    """max |X_j| per input feature j of each Linear over the calibration batches."""
    out: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, args, _out):
        a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(0)
        out[mod] = torch.maximum(out[mod], a) if mod in out else a

    forward_with_hooks(model, batches, forward_hooks=[(m, hook) for m in dict.fromkeys(modules)])
    return out


@torch.no_grad()
def smooth_model(model: nn.Module, alpha: float, batches) -> dict:
    """Migrate every pair of :func:`smooth_pairs` in place with strength ``alpha``; returns the record."""
    pairs = smooth_pairs(model)
    if not pairs:
        check_smoothable(model)
    if not batches:
        raise ValueError("SmoothQuant needs calibration batches")
    act = input_channel_max(model, [fc for _, _, fc in pairs], batches)
    before, after = [], []
    for _, norm, fc in pairs:
        a = act[fc].clamp_min(CLAMP)
        w = fc.weight.detach().abs().amax(0).float().clamp_min(CLAMP)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(CLAMP)
        norm.weight.div_(s.to(norm.weight))
        norm.bias.div_(s.to(norm.bias))
        fc.weight.mul_(s.to(fc.weight).unsqueeze(0))
        before.append(float(a.max()))
        after.append(float((a / s).max()))
    log.info("SmoothQuant (alpha %.2f): %d LayerNorm → Linear pairs, largest |x| %.3g → %.3g", alpha, len(pairs),
             max(before), max(after))
    return {"smooth_alpha": alpha, "smoothed_pairs": len(pairs), "act_absmax_before": max(before),
            "act_absmax_after": max(after)}
