"""Quantization-aware training with PACT (Choi et al. 2018), see :class:`~craft_runner.compress.config.QATConfig`.

Module surgery on the compression copy: every ``nn.ReLU``/``nn.ReLU6`` is replaced by
:class:`PACT`; every activation whose output can be negative (PReLU, SNT's ``RPReLU``, found by
class name, LeakyReLU, GELU, SiLU, Hardswish, ELU) becomes ``Sequential(activation,
SignedPACT)``. Target-layer weights are fake-quantized per output channel through a
straight-through parametrization during training and left quantized afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from craft_runner.calibration import forward_with_hooks
from craft_runner.compress.quant import FULL_PRECISION_BITS, fine_tune_quantized
from craft_runner.compress.registry import CompressConfig, parse_bits, register_compressor
from craft_runner.schema import _check, _check_choice

log = logging.getLogger(__name__)

UNSIGNED_ACTS = (nn.ReLU, nn.ReLU6)
SIGNED_ACTS = (nn.PReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU)
# By class name: SNT's RPReLU (craft_runner.models.snt) and timm's own activation classes.
SIGNED_ACT_NAMES = ("RPReLU", "GELU", "GELUTanh", "Swish", "HardSwish", "Mish", "PReLU")


class _PACTFn(torch.autograd.Function):
    """y_q = round(clip(x, 0, α)·(2^k−1)/α)·α/(2^k−1) with PACT's straight-through gradients."""

    @staticmethod
    def forward(ctx, x, alpha, n_bits):
        xf = x.float()
        a = alpha.float().clamp_min(1e-8)
        ctx.save_for_backward(xf, a)
        step = a / (2 ** n_bits - 1)
        y = torch.minimum(xf.clamp_min(0), a)
        return (torch.round(y / step) * step).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        gf = g.float()
        gx = gf * ((x >= 0) & (x < a))
        ga = (gf * (x >= a)).sum().reshape(a.shape)
        return gx.to(g.dtype), ga, None


class _SignedPACTFn(torch.autograd.Function):
    """Asymmetric uniform quantization of clip(x, α_lo, α_hi) on 2^k levels with zero on the grid;
    straight-through gradients: 1 inside (α_lo, α_hi) for x, 1 beyond each bound for that bound."""

    @staticmethod
    def forward(ctx, x, lo, hi, n_bits):
        xf = x.float()
        lo_, hi_ = lo.float().clamp_max(0), hi.float().clamp_min(0)
        ctx.save_for_backward(xf, lo_, hi_)
        levels = 2 ** n_bits - 1
        step = ((hi_ - lo_) / levels).clamp_min(1e-8)
        zero = torch.round(-lo_ / step)
        y = torch.minimum(torch.maximum(xf, lo_), hi_)
        q = torch.clamp(torch.round(y / step) + zero, 0, levels)
        return ((q - zero) * step).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, lo, hi = ctx.saved_tensors
        gf = g.float()
        gx = gf * ((x > lo) & (x < hi))
        return gx.to(g.dtype), (gf * (x <= lo)).sum().reshape(lo.shape), (gf * (x >= hi)).sum().reshape(hi.shape), None


class _L2Grad(torch.autograd.Function):
    """Identity forward; backward adds λ·α, the gradient of PACT's penalty (λ/2)·α²."""

    @staticmethod
    def forward(ctx, alpha, lam):
        ctx.save_for_backward(alpha)
        ctx.lam = lam
        return alpha.clone()

    @staticmethod
    def backward(ctx, g):
        (alpha,) = ctx.saved_tensors
        return g + ctx.lam * alpha, None


def pact_quant(x: torch.Tensor, alpha: torch.Tensor, n_bits: int) -> torch.Tensor:
    return _PACTFn.apply(x, alpha, n_bits)


def signed_pact_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_bits: int) -> torch.Tensor:
    return _SignedPACTFn.apply(x, lo, hi, n_bits)


class PACT(nn.Module):
    """ReLU replacement: clip to [0, α], quantize unsigned on 2^n_bits levels; α learnable."""

    def __init__(self, n_bits: int, alpha: float, weight_decay: float = 0.0):
        super().__init__()
        self.n_bits, self.weight_decay = n_bits, weight_decay
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _L2Grad.apply(self.alpha, self.weight_decay) if self.training and self.weight_decay else self.alpha
        return pact_quant(x, a, self.n_bits)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


class SignedPACT(nn.Module):
    """Follows an activation with negative outputs: clip to [α_lo, α_hi], quantize on 2^n_bits levels."""

    def __init__(self, n_bits: int, lo: float, hi: float, weight_decay: float = 0.0):
        super().__init__()
        self.n_bits, self.weight_decay = n_bits, weight_decay
        self.alpha_lo = nn.Parameter(torch.tensor(float(min(lo, 0.0))))
        self.alpha_hi = nn.Parameter(torch.tensor(float(max(hi, 0.0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.alpha_lo, self.alpha_hi
        if self.training and self.weight_decay:
            lo, hi = _L2Grad.apply(lo, self.weight_decay), _L2Grad.apply(hi, self.weight_decay)
        return signed_pact_quant(x, lo, hi, self.n_bits)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, UNSIGNED_ACTS):
        return "unsigned"
    if isinstance(m, SIGNED_ACTS) or type(m).__name__ in SIGNED_ACT_NAMES:
        return "signed"
    return None


def find_activations(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "unsigned" | "signed") of every activation module PACT handles."""
    return [(n, m, k) for n, m in model.named_modules() if n and (k := _kind(m)) is not None]


@torch.no_grad()
def _output_ranges(model: nn.Module, modules: list[nn.Module], batches) -> dict:
    ranges: dict = {}

    def hook(mod, _args, out):
        lo, hi = float(out.min()), float(out.max())
        old = ranges.get(mod, (lo, hi))
        ranges[mod] = (min(lo, old[0]), max(hi, old[1]))

    forward_with_hooks(model, batches, forward_hooks=[(m, hook) for m in modules])
    return ranges


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def insert_pact(model: nn.Module, n_bits: int, batches, alpha_init: float | None, weight_decay: float) -> dict:
    """Module surgery: PACT for ReLU/ReLU6, activation + SignedPACT for the others; returns the
    initial clipping levels by module name."""
    acts = find_activations(model)
    ranges = _output_ranges(model, [m for _, m, _ in acts], batches) if alpha_init is None and acts else {}
    init = {}
    for name, m, kind in acts:
        lo, hi = ranges.get(m, (0.0, 1.0)) if alpha_init is None else (-alpha_init, alpha_init)
        if kind == "unsigned":
            hi = min(hi, 6.0) if isinstance(m, nn.ReLU6) else hi
            new = PACT(n_bits, max(hi, 1e-3), weight_decay)
            init[name] = {"alpha": new.alpha.item()}
        else:
            new = nn.Sequential(m, SignedPACT(n_bits, lo, max(hi, 1e-3), weight_decay))
            init[name] = {"alpha_lo": new[1].alpha_lo.item(), "alpha_hi": new[1].alpha_hi.item()}
        _set_submodule(model, name, new.to(next(model.parameters()).device))
    return init


def pact_qat(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, ctx) -> dict:
    """PACT QAT in place: insert activation quantizers, train ``cfg.epochs`` with fake-quantized weights."""
    init = {}
    if cfg.a_bits < FULL_PRECISION_BITS:
        init = insert_pact(model, cfg.a_bits, ctx.calib_batches, cfg.alpha_init, cfg.alpha_weight_decay)
        if not init:
            log.warning("QAT: no activation module found, activations stay in float")
    if cfg.epochs:
        fine_tune_quantized(model, layers, cfg.w_bits, cfg.epochs, ctx.fine_tune)
    elif cfg.w_bits < FULL_PRECISION_BITS:
        fine_tune_quantized(model, layers, cfg.w_bits, 0, lambda m, e: None)
    final = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PACT):
            final[name] = {"alpha": mod.alpha.item()}
        elif isinstance(mod, SignedPACT):
            final[name.rpartition(".")[0]] = {"alpha_lo": mod.alpha_lo.item(), "alpha_hi": mod.alpha_hi.item()}
    n_signed = sum("alpha_lo" in v for v in init.values())
    log.info("PACT QAT W%dA%d: %d activations (%d signed), %d layers, %d epochs", cfg.w_bits, cfg.a_bits, len(init),
             n_signed, len(layers), cfg.epochs)
    return {"method": "pact", "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "epochs": cfg.epochs,
            "act_quantizers": len(init), "signed_act_quantizers": n_signed, "quantized_layers": len(layers),
            "alpha_init": init, "alpha": final}


# --------------------------------------------------------------------------------------------- the compressor


@dataclass
class QATConfig(CompressConfig):
    """Quantization-aware training with PACT (Choi et al. 2018), from the trained weights.

    Every ReLU/ReLU6 becomes a PACT activation y = clip(x, 0, α), quantized unsigned on
    2^a_bits levels, y_q = round(y·(2^k−1)/α)·α/(2^k−1), with a learnable α per activation and
    PACT's straight-through gradients (∂y_q/∂x = 1 on [0, α), ∂y_q/∂α = 1 where x ≥ α). Activations
    whose output can be negative (PReLU, SNT's RPReLU, LeakyReLU, GELU, SiLU, Hardswish, ELU) keep
    their function and are followed by a signed variant with two learnable bounds α_lo ≤ 0 ≤ α_hi
    (asymmetric uniform grid on [α_lo, α_hi] with zero exactly representable; ∂/∂α_hi = 1 where
    x ≥ α_hi, ∂/∂α_lo = 1 where x ≤ α_lo). Weights of the target layers are quantized symmetric per
    output channel with a straight-through estimator. Trains ``epochs`` epochs with the run's
    optimizer and data.

    ``alpha_init``: null sets each α from calibration data (max of that activation's output,
    min for α_lo); a number sets α = alpha_init (α_lo = −alpha_init). ``alpha_weight_decay`` is
    PACT's L2 penalty (λ/2)·α² on every clipping level, added to its gradient (the optimizer's
    weight decay skips these 0-dim parameters).
    """

    name: str = "qat"
    method: str = "pact"
    bits: Optional[str] = None
    w_bits: int = 4
    a_bits: int = 4
    epochs: int = 10
    alpha_init: Optional[float] = None
    alpha_weight_decay: float = 1e-4
    # PACT keeps the first and last layers' weights in full precision.
    skip_first_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)
        _check_choice("compress.method", self.method, ("pact",))
        _check(self.epochs >= 0, "compress.epochs", self.epochs, "an integer >= 0")
        _check(self.alpha_init is None or self.alpha_init > 0, "compress.alpha_init", self.alpha_init,
               "null (calibrated) or a positive number")
        _check(self.alpha_weight_decay >= 0, "compress.alpha_weight_decay", self.alpha_weight_decay, "a number >= 0")


def qat_label(c: dict) -> str:
    return f"QAT W{c['w_bits']}A{c['a_bits']}"


register_compressor("qat", QATConfig, label=qat_label)(pact_qat)
