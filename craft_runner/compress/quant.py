"""Uniform fake quantization, twin uniform quantization (PTQ4ViT) and BasePTQ.

Integer range for b bits: [−2^(b−1), 2^(b−1)−1]; 16 or more bits means "not quantized".

BasePTQ (``search=cosine``, the default) is PTQ4ViT's ``configs/BasePTQ.py``: symmetric uniform,
one weight scale per layer (q, k and v apart in a fused qkv Linear), one scale per input tensor
and per head of each attention matmul operand, each searched for the highest cosine similarity of
the op's output to the full-precision output (:mod:`craft_runner.compress.search`); the image
input of the stem stays in float. ``search=none`` is the max-based variant: weight scales from
max |w| (per output channel with ``weight_granularity=channel``), input scales from the largest |x|
seen on calibration data by the model with quantized weights.

Rounding passes gradients straight through (STE) and values clipped by the integer range get zero
gradient, as with ``torch.fake_quantize_per_channel_affine``; scales get no gradient.
Quantizers compute in float32 and return the input's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.calibration import forward_with_hooks
from craft_runner.compress.registry import CompressConfig, parse_bits, register_compressor
from craft_runner.schema import _check, _check_choice

log = logging.getLogger(__name__)

FULL_PRECISION_BITS = 16
# |min GELU(x)| = 0.16997 (at x ≈ −0.7518): post-GELU values never fall below −GELU_NEG_RANGE.
GELU_NEG_RANGE = 0.16997124254703522


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return _RoundSTE.apply(x)


def qrange(n_bits: int) -> tuple[int, int]:
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        q = torch.round(x / scale)
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return torch.clamp(q, qmin, qmax) * scale

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None


def fake_quant(x: torch.Tensor, n_bits: int, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to signed n-bit integers with ``scale`` (broadcast against x), then dequantize.

    Gradient (w.r.t. x only): passed straight through where round(x/scale) is inside the integer
    range, zero where it is clipped — the rule of ``torch.fake_quantize_per_channel_affine``.
    """
    qmin, qmax = qrange(n_bits)
    return _FakeQuant.apply(x, scale, qmin, qmax)


def symmetric_scale(max_abs: torch.Tensor, n_bits: int) -> torch.Tensor:
    # A zero range would divide by zero; any positive scale maps zeros to zero.
    return (max_abs / qrange(n_bits)[1]).clamp_min(1e-12)


def init_scale(max_abs: torch.Tensor, n_bits: int) -> torch.Tensor:
    """The PTQ4ViT code's initial scale max/(2^(b−1) − ½): the max lands half a step past the top level."""
    return (max_abs / (2 ** (n_bits - 1) - 0.5)).clamp_min(1e-12)


def per_channel_scale(w: torch.Tensor, n_bits: int) -> torch.Tensor:
    """One scale per output channel (dim 0), shaped to broadcast against w."""
    max_abs = w.detach().abs().flatten(1).amax(dim=1)
    return symmetric_scale(max_abs, n_bits).view(-1, *([1] * (w.dim() - 1)))


def quantize_weight_(module: nn.Module, n_bits: int) -> None:
    with torch.no_grad():
        w = module.weight
        w.copy_(fake_quant(w, n_bits, per_channel_scale(w, n_bits)))


# --------------------------------------------------------------------------- twin uniform (PTQ4ViT)


def twin_uniform_softmax(x: torch.Tensor, n_bits: int, shift: int) -> torch.Tensor:
    """PTQ4ViT's twin uniform quantization of post-softmax values (in [0, 1]) with k = n_bits.

    Two unsigned (k−1)-bit grids, the k-th bit picks one: R2 has Δ_R2 = 1/(2^(k−1) − 1), so its
    2^(k−1) levels cover [0, 1] with 1 exact (as in the reference code); R1 has
    Δ_R1 = Δ_R2 / 2^shift (Δ_R2 = 2^m Δ_R1, a bit shift apart). A value is quantized on R1 when
    R1's grid holds it without clipping, i.e. x < (2^(k−1) − ½)·Δ_R1, otherwise on R2.
    """
    levels = 2 ** (n_bits - 1)
    d2 = 1.0 / (levels - 1)
    d1 = d2 / 2 ** shift
    xf = x.float()
    q1 = round_ste(xf / d1)
    fine = torch.clamp(q1, 0, levels - 1) * d1
    coarse = torch.clamp(round_ste(xf / d2), 0, levels - 1) * d2
    return torch.where(q1 <= levels - 1, fine, coarse).to(x.dtype)


def twin_softmax_reference(x: torch.Tensor, n_bits: int, shift: int) -> torch.Tensor:
    """The PTQ4ViT code's post-softmax twin uniform quantizer (``SoSPTQSLBatchingQuantMatMul``).

    Split s = 2^−shift, t = 2^(k−1) − 1 levels above zero per range:
    q(x) = round(clip(x, s, 1)·t)/t + round(clip(x, 0, s)/Δ_R1)·Δ_R1 with Δ_R1 = s/t, both
    rounded values clipped to [0, t]. Below s only the fine range R1 moves; above s the coarse one
    (Δ_R2 = 1/t) does, on top of R1's full value s — the sum as the code writes it.
    """
    top = 2 ** (n_bits - 1) - 1
    split = 2.0 ** -shift
    d1 = split / top
    xf = x.float()
    high = torch.clamp(round_ste(xf.clamp(split, 1.0) * top), 0, top) / top
    low = torch.clamp(round_ste(xf.clamp(0.0, split) / d1), 0, top) * d1
    return (high + low).to(x.dtype)


def twin_softmax(x: torch.Tensor, n_bits: int, shift: int, kind: str = "reference") -> torch.Tensor:
    """Twin uniform post-softmax quantization: ``reference`` (the PTQ4ViT code's) or ``paper``."""
    if kind == "reference":
        return twin_softmax_reference(x, n_bits, shift)
    if kind == "paper":
        return twin_uniform_softmax(x, n_bits, shift)
    raise ValueError(f"twin softmax kind must be 'reference' or 'paper', got {kind!r}")


def twin_uniform_gelu(x: torch.Tensor, n_bits: int, delta_pos: torch.Tensor | float,
                      delta_neg: float | None = None) -> torch.Tensor:
    """PTQ4ViT's twin uniform quantization of post-GELU values with k = n_bits.

    R1 holds the negative values on Δ_R1 = 0.16997/2^(k−1), so R1 = [−2^(k−1)Δ_R1, 0] is exactly
    GELU's negative range; R2 holds the positive values on 2^(k−1) levels of the searched Δ_R2,
    R2 = [0, (2^(k−1) − 1)Δ_R2]. The sign picks the range.
    """
    levels = 2 ** (n_bits - 1)
    delta_neg = GELU_NEG_RANGE / levels if delta_neg is None else delta_neg
    xf = x.float()
    neg = torch.clamp(round_ste(xf / delta_neg), -levels, 0) * delta_neg
    pos = torch.clamp(round_ste(xf / delta_pos), 0, levels - 1) * delta_pos
    return torch.where(xf < 0, neg, pos).to(x.dtype)


# --------------------------------------------------------------------------- quantizer modules


class ActQuantizer(nn.Module):
    """Symmetric quantizer of a layer's input; records max |x| while calibrating — over the whole
    tensor, or per index of dim ``keep_dim`` (1: per head of a (batch, heads, ·, ·) operand)."""

    def __init__(self, n_bits: int, keep_dim: int | None = None):
        super().__init__()
        self.n_bits = n_bits
        self.keep_dim = keep_dim
        self.calibrating = True
        self.register_buffer("max_abs", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            a = x.detach().abs()
            m = a.max() if self.keep_dim is None else a.amax([d for d in range(a.dim()) if d != self.keep_dim],
                                                             keepdim=True)
            self.max_abs = torch.maximum(self.max_abs, m.to(self.max_abs))
            return x
        return fake_quant(x.float(), self.n_bits, symmetric_scale(self.max_abs, self.n_bits)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


class UniformQuantizer(nn.Module):
    """Symmetric uniform fake quantizer with a fixed scale (broadcast against the input)."""

    def __init__(self, n_bits: int, scale: torch.Tensor):
        super().__init__()
        self.n_bits = n_bits
        self.register_buffer("scale", torch.as_tensor(scale).detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x.float(), self.n_bits, self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, scale_shape={tuple(self.scale.shape)}"


class SoftmaxTwinQuantizer(nn.Module):
    """Post-softmax twin uniform quantizer (:func:`twin_softmax`) with a fixed shift."""

    def __init__(self, n_bits: int, shift: int, kind: str = "reference"):
        super().__init__()
        self.n_bits, self.shift, self.kind = n_bits, int(shift), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_softmax(x, self.n_bits, self.shift, self.kind)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, shift={self.shift}, kind={self.kind}"


class GeluTwinQuantizer(nn.Module):
    """Post-GELU twin uniform quantizer (:func:`twin_uniform_gelu`) with a fixed Δ_R2."""

    def __init__(self, n_bits: int, delta_pos: torch.Tensor):
        super().__init__()
        self.n_bits = n_bits
        self.register_buffer("delta_pos", torch.as_tensor(delta_pos).detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_uniform_gelu(x, self.n_bits, self.delta_pos)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


class WeightFakeQuant(nn.Module):
    """Parametrization: the layer sees its weight fake-quantized, the float weight gets STE gradients.

    ``scale`` None: one scale per output channel from the current max |w| (recomputed each call);
    otherwise that fixed scale.
    """

    def __init__(self, n_bits: int, scale: torch.Tensor | None = None):
        super().__init__()
        self.n_bits = n_bits
        if scale is None:
            self.scale = None
        else:
            self.register_buffer("scale", scale.detach().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = per_channel_scale(w, self.n_bits) if self.scale is None else self.scale
        return fake_quant(w, self.n_bits, s)


def _quantize_input_hook(module: nn.Module, args):
    return (module.input_quantizer(args[0]), *args[1:])


def attach_input_quantizer(module: nn.Module, quantizer: nn.Module) -> nn.Module:
    """Quantize the first positional input of ``module`` with ``quantizer`` (a forward pre-hook)."""
    module.input_quantizer = quantizer
    module.register_forward_pre_hook(_quantize_input_hook)
    return quantizer


def attach_act_quantizer(module: nn.Module, n_bits: int) -> ActQuantizer:
    return attach_input_quantizer(module, ActQuantizer(n_bits).to(module.weight.device))


@torch.no_grad()
def calibrate(model: nn.Module, quantizers: list[ActQuantizer], batches) -> None:
    for q in quantizers:
        q.calibrating = True
    forward_with_hooks(model, batches)
    for q in quantizers:
        q.calibrating = False


def base_ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, calib_batches) -> tuple[dict, dict]:
    """BasePTQ in place on ``layers`` (and, with ``cfg.quant_attention``, the operands of timm ViT
    attention's q·kᵀ and attn·v, run as explicit matmuls). ``cfg``: a ``PTQConfig``.

    Returns (record, {layer: fixed weight scale}); layers with per-output-channel max-based scales
    are left out, so fine-tuning recomputes their scales from the current weight.
    """
    if cfg.search != "none":
        from craft_runner.compress.search import run_ptq

        return run_ptq(model, layers, cfg, calib_batches, "base")
    from craft_runner.compress.search import stem_layers, weight_groups

    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    groups = weight_groups(model, layers, cfg.weight_granularity)
    float_in = set() if cfg.quant_stem_input else stem_layers(model, layers)
    quantizers, scales, n_in = [], {}, 0
    for _, m in layers:
        if w_bits < FULL_PRECISION_BITS:
            g = groups.get(m, 1)
            if g == m.weight.shape[0]:
                quantize_weight_(m, w_bits)
            else:
                with torch.no_grad():
                    rows = symmetric_scale(m.weight.detach().abs().reshape(g, -1).amax(1), w_bits)
                    s = rows.repeat_interleave(m.weight.shape[0] // g).reshape(-1, *([1] * (m.weight.dim() - 1)))
                    s = s.reshape(()) if g == 1 else s
                    m.weight.copy_(fake_quant(m.weight, w_bits, s))
                scales[m] = s
        if a_bits < FULL_PRECISION_BITS and m not in float_in:
            quantizers.append(attach_act_quantizer(m, a_bits))
            n_in += 1
    matmuls = []
    if cfg.quant_attention and a_bits < FULL_PRECISION_BITS:
        from craft_runner.compress.attention import make_attention_explicit

        keep = 1 if cfg.operand_granularity == "head" else None
        for _, mm in make_attention_explicit(model):
            dev = next(model.parameters()).device
            mm.quant_a, mm.quant_b = ActQuantizer(a_bits, keep).to(dev), ActQuantizer(a_bits, keep).to(dev)
            quantizers += [mm.quant_a, mm.quant_b]
            matmuls.append(mm)
    if quantizers:
        calibrate(model, quantizers, calib_batches)
    n_w = len(layers) if w_bits < FULL_PRECISION_BITS else 0
    log.info("BasePTQ (max) W%dA%d: %d weights, %d inputs, %d attention matmuls", w_bits, a_bits, n_w, n_in,
             len(matmuls))
    info = {"method": "base", "search": "none", "w_bits": w_bits, "a_bits": a_bits, "quantized_layers": len(layers),
            "quantized_weights": n_w, "quantized_inputs": n_in, "quantized_matmuls": len(matmuls),
            "weight_granularity": cfg.weight_granularity, "operand_granularity": cfg.operand_granularity,
            "calib_images": sum(len(x) for x, _ in calib_batches)}
    return info, scales


def fine_tune_quantized(model: nn.Module, layers: list[tuple[str, nn.Module]], w_bits: int, epochs: int,
                        fine_tune, scales: dict | None = None) -> None:
    """Fine-tune with every layer's weight fake-quantized (STE), then keep the quantized weights.

    ``scales`` maps a layer to a fixed weight scale (PTQ4ViT's searched ones); other layers use
    the per-channel max scale of their current weight. Activation quantizers stay as calibrated.
    """
    if fine_tune is None:
        raise ValueError("fine-tuning needs CompressContext.fine_tune")
    if w_bits < FULL_PRECISION_BITS:
        for _, m in layers:
            s = (scales or {}).get(m)
            parametrize.register_parametrization(m, "weight", WeightFakeQuant(w_bits, s))
    try:
        fine_tune(model, epochs)
    finally:
        for _, m in layers:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


# --------------------------------------------------------------------------------------------- the compressor


@dataclass
class PTQConfig(CompressConfig):
    """Post-training quantization: ``method`` base (BasePTQ) or ptq4vit (PTQ4ViT).

    Defaults (null fields resolved here) are the PTQ4ViT code's configs/BasePTQ.py and
    configs/PTQ4ViT.py: symmetric uniform; weights one scale per layer (q, k, v apart in a fused
    qkv; PTQ4ViT: one per output channel for Conv2d), activations (the input of every quantized
    Conv2d/Linear except the stem's image input and, with ``quant_attention``, both operands of
    the attention matmuls q·kᵀ and attn·v of timm ViTs, per head) quantized statically, every
    scale searched on full-precision calibration data — BasePTQ by cosine similarity of the op's
    output, PTQ4ViT by the Hessian-guided metric (see :mod:`craft_runner.compress.search`,
    :mod:`craft_runner.compress.ptq4vit`). ``search=none`` is BasePTQ with max-based scales
    (per output channel, per-tensor inputs including the stem's: the previous BasePTQ).
    ``finetune_epochs`` > 0 then fine-tunes the quantized model (SNT Table 3: W4 + one epoch) with
    straight-through fake quantization, so the weights are still on their grid afterwards.
    """

    name: str = "ptq"
    method: str = "base"
    # "WxAy" shorthand (e.g. W6A16) for sweeps; when set it overrides w_bits and a_bits.
    bits: Optional[str] = None
    w_bits: int = 8
    a_bits: int = 8
    calib_size: int = 32
    # Keep the first and last layers in full precision.
    skip_first_last: bool = False
    # Quantize q·kᵀ and attn·v of timm ViT attention too (when a_bits < 16).
    quant_attention: bool = True
    finetune_epochs: int = 0
    # BasePTQ's scales: cosine (searched, the reference) or none (from max |x|, no search).
    search: str = "cosine"
    # Weight scales: tensor (one per layer; q, k, v apart in a fused qkv), channel (one per output
    # channel) or mixed (channel for Conv2d, tensor for Linear). null: tensor for BasePTQ, mixed
    # for PTQ4ViT, channel with search=none.
    weight_granularity: Optional[str] = None
    # Attention matmul operand scales: head (one per head) or tensor. null: head; tensor with search=none.
    operand_granularity: Optional[str] = None
    # Quantize the stem's image input too. null: false (the reference leaves it in float); true with search=none.
    quant_stem_input: Optional[bool] = None
    # Candidates r·s0 (s0 = max/(2^(b-1) - 0.5)), r = scale_min + i·(scale_max - scale_min)/scale_steps,
    # i = 0..scale_steps-1; search_rounds rounds of weight-then-input search.
    # null: BasePTQ 0.5 and 1 round, PTQ4ViT 0.01 and 3 rounds.
    search_rounds: Optional[int] = None
    scale_min: Optional[float] = None
    scale_max: float = 1.2
    scale_steps: int = 100
    # PTQ4ViT only. hessian: mean[(dL/dO)^2 (O^ - O)^2]; mse: mean[(O^ - O)^2] (ablation).
    metric: str = "hessian"
    # L of the hessian metric: kl (the reference code's: KL to the full-precision prediction, taken
    # at the full-precision model) or ce (the paper's: cross-entropy with the calibration labels).
    hessian_loss: str = "kl"
    # Twin uniform quantization of post-softmax and post-GELU activations (False: plain uniform).
    twin: bool = True
    # Post-softmax twin: reference (the code's split quantizer) or paper (ranges picked per value).
    twin_softmax: str = "reference"
    # Post-softmax twin ranges: Δ_R1 = Δ_R2 / 2^m (split 2^-m), m searched in 0..max_softmax_shift.
    max_softmax_shift: int = 19

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)
        _check_choice("compress.method", self.method, ("base", "ptq4vit"))
        _check_choice("compress.search", self.search, ("cosine", "none"))
        base = self.method == "base"
        _check(base or self.search == "cosine", "compress.search", self.search,
               "cosine with method=ptq4vit (search=none is BasePTQ's max-based variant)")
        maxed = base and self.search == "none"
        if self.weight_granularity is None:
            self.weight_granularity = "channel" if maxed else "tensor" if base else "mixed"
        if self.operand_granularity is None:
            self.operand_granularity = "tensor" if maxed else "head"
        if self.quant_stem_input is None:
            self.quant_stem_input = maxed
        if self.search_rounds is None:
            self.search_rounds = 1 if base else 3
        if self.scale_min is None:
            self.scale_min = 0.5 if base else 0.01
        _check(self.finetune_epochs >= 0, "compress.finetune_epochs", self.finetune_epochs, "an integer >= 0")
        _check(self.search_rounds >= 1, "compress.search_rounds", self.search_rounds, "an integer >= 1")
        _check(self.scale_min > 0, "compress.scale_min", self.scale_min, "a positive number")
        _check(self.scale_max > self.scale_min, "compress.scale_max", self.scale_max,
               f"a number > compress.scale_min ({self.scale_min})")
        _check(self.scale_steps >= 1, "compress.scale_steps", self.scale_steps, "an integer >= 1")
        _check_choice("compress.metric", self.metric, ("hessian", "mse"))
        _check_choice("compress.hessian_loss", self.hessian_loss, ("kl", "ce"))
        _check_choice("compress.twin_softmax", self.twin_softmax, ("reference", "paper"))
        _check(0 <= self.max_softmax_shift <= 30, "compress.max_softmax_shift", self.max_softmax_shift,
               "an integer in 0..30")
        _check_choice("compress.weight_granularity", self.weight_granularity, ("tensor", "channel", "mixed"))
        # A cosine over one output channel is its sign: BasePTQ's search scores whole output vectors.
        _check(not (base and self.search == "cosine") or self.weight_granularity == "tensor",
               "compress.weight_granularity", self.weight_granularity, "tensor with method=base search=cosine")
        _check_choice("compress.operand_granularity", self.operand_granularity, ("head", "tensor"))


def ptq_label(c: dict) -> str:
    method = "" if c.get("method", "base") == "base" else f"{c['method']} "
    ft = f" +ft{c['finetune_epochs']}" if c.get("finetune_epochs") else ""
    maxed = " max" if c.get("search") == "none" else ""  # max-based scales, not the searched ones
    return f"{method}W{c['w_bits']}A{c['a_bits']}{maxed}{ft}"


@register_compressor("ptq", PTQConfig, label=ptq_label)
def ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: PTQConfig, ctx) -> dict:
    """BasePTQ or PTQ4ViT, then (``finetune_epochs`` > 0) fine-tuning with the weights kept quantized."""
    if cfg.method == "ptq4vit":
        from craft_runner.compress.ptq4vit import ptq4vit

        info, scales = ptq4vit(model, layers, cfg, ctx.calib_batches)
    else:
        info, scales = base_ptq(model, layers, cfg, ctx.calib_batches)
    fits = []  # what ctx.fine_tune returns (train.fit's record): its per-epoch history goes to results.json
    if cfg.finetune_epochs:
        fine_tune_quantized(model, layers, cfg.w_bits, cfg.finetune_epochs,
                            ctx.fine_tune and (lambda m, e: fits.append(ctx.fine_tune(m, e))), scales)
    history = [h for f in fits if isinstance(f, dict) for h in f.get("history", [])]
    return {**info, "finetune_epochs": cfg.finetune_epochs, **({"finetune_history": history} if history else {})}
