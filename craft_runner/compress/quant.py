"""Uniform fake quantization and BasePTQ (symmetric, round to nearest).

Integer range for b bits: [−2^(b−1), 2^(b−1)−1]. Weights get one scale per output channel
from max |w|; the input activation of each Conv2d/Linear gets one scale per tensor, from the
largest |x| seen on calibration data. 16 or more bits means "not quantized".
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FULL_PRECISION_BITS = 16


def qrange(n_bits: int) -> tuple[int, int]:
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


def fake_quant(x: torch.Tensor, n_bits: int, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to signed n-bit integers with ``scale`` (broadcast against x), then dequantize."""
    qmin, qmax = qrange(n_bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def symmetric_scale(max_abs: torch.Tensor, n_bits: int) -> torch.Tensor:
    # A zero range would divide by zero; any positive scale maps zeros to zero.
    return (max_abs / qrange(n_bits)[1]).clamp_min(1e-12)


def per_channel_scale(w: torch.Tensor, n_bits: int) -> torch.Tensor:
    """One scale per output channel (dim 0), shaped to broadcast against w."""
    max_abs = w.detach().abs().flatten(1).amax(dim=1)
    return symmetric_scale(max_abs, n_bits).view(-1, *([1] * (w.dim() - 1)))


def quantize_weight_(module: nn.Module, n_bits: int) -> None:
    with torch.no_grad():
        w = module.weight
        w.copy_(fake_quant(w, n_bits, per_channel_scale(w, n_bits)))


class ActQuantizer(nn.Module):
    """Per-tensor symmetric quantizer of a layer's input; records max |x| while calibrating."""

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits
        self.calibrating = True
        self.register_buffer("max_abs", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.max_abs = torch.maximum(self.max_abs, x.detach().abs().max().to(self.max_abs))
            return x
        return fake_quant(x, self.n_bits, symmetric_scale(self.max_abs, self.n_bits).to(x))

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


def _quantize_input_hook(module: nn.Module, args):
    return (module.input_quantizer(args[0]), *args[1:])


def attach_act_quantizer(module: nn.Module, n_bits: int) -> ActQuantizer:
    module.input_quantizer = ActQuantizer(n_bits).to(module.weight.device)
    module.register_forward_pre_hook(_quantize_input_hook)
    return module.input_quantizer


@torch.no_grad()
def calibrate(model: nn.Module, quantizers: list[ActQuantizer], batches) -> None:
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating = True
    for x, _ in batches:
        model(x)
    for q in quantizers:
        q.calibrating = False
    model.train(was_training)


def base_ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], w_bits: int, a_bits: int,
             calib_batches) -> dict:
    """BasePTQ in place on ``layers``; returns what was quantized."""
    quantizers = []
    for _, m in layers:
        if w_bits < FULL_PRECISION_BITS:
            quantize_weight_(m, w_bits)
        if a_bits < FULL_PRECISION_BITS:
            quantizers.append(attach_act_quantizer(m, a_bits))
    if quantizers:
        calibrate(model, quantizers, calib_batches)
    log.info("BasePTQ W%dA%d on %d layers", w_bits, a_bits, len(layers))
    return {"quantized_layers": len(layers), "w_bits": w_bits, "a_bits": a_bits}
