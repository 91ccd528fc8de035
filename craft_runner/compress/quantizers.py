"""Quantizer primitives shared by BasePTQ, PTQ4ViT, their scale search and PACT: uniform fake
quantization, twin uniform quantization (PTQ4ViT), the quantizer modules and the hook that puts one on a
layer's input.

Integer range for b bits: [−2^(b−1), 2^(b−1)−1]; 16 or more bits means "not quantized".

Rounding passes gradients straight through (STE) and values clipped by the integer range get zero
gradient, as with ``torch.fake_quantize_per_channel_affine``; scales get no gradient.
Quantizers compute in float32 and return the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from craft_runner.calibration import forward_with_hooks

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
