"""BasePTQ and the ``ptq`` compressor (BasePTQ or PTQ4ViT, then optional quantized fine-tuning).

BasePTQ (``search=cosine``, the default) is PTQ4ViT's ``configs/BasePTQ.py``: symmetric uniform,
one weight scale per layer (q, k and v apart in a fused qkv Linear), one scale per input tensor
and per head of each attention matmul operand, each searched (:mod:`craft_runner.compress.search`)
for the best score of the op's output against the full-precision output — by default its cosine
similarity, as configs/BasePTQ.py has it; ``metric=hessian`` is the Hessian-guided distance that
the reference's driver example/test_all.py sets for BasePTQ as well. The image input of the stem
stays in float. ``search=none`` is the max-based variant: weight scales from max |w| (per output
channel with ``weight_granularity=channel``), input scales from the largest |x| seen on calibration
data by the model with quantized weights.

The quantizers themselves are in :mod:`craft_runner.compress.quantizers` (re-exported here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.compress.attention import make_attention_explicit
from craft_runner.compress.fold import fold_for_compression
from craft_runner.compress.ptq4vit import ptq4vit
from craft_runner.compress.quantizers import (  # noqa: F401  (re-exported: the quantizers' former home)
    FULL_PRECISION_BITS,
    GELU_NEG_RANGE,
    ActQuantizer,
    GeluTwinQuantizer,
    SoftmaxTwinQuantizer,
    UniformQuantizer,
    WeightFakeQuant,
    attach_act_quantizer,
    attach_input_quantizer,
    calibrate,
    fake_quant,
    init_scale,
    per_channel_scale,
    qrange,
    quantize_weight_,
    round_ste,
    symmetric_scale,
    twin_softmax,
    twin_softmax_reference,
    twin_uniform_gelu,
    twin_uniform_softmax,
)
from craft_runner.compress.registry import Capabilities, CompressConfig, parse_bits, register_compressor
from craft_runner.compress.search import run_ptq, stem_layers, weight_groups
from craft_runner.compress.smooth import check_smooth, check_smooth_alpha, smooth_model
from craft_runner.schema import _check, _check_choice
from craft_runner.train import float32_fine_tune

log = logging.getLogger(__name__)

# The search's scores (craft_runner.compress.search._Scorer).
METRICS = ("cosine", "hessian", "mse")


def base_ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, calib_batches,
             progress: bool | None = None) -> tuple[dict, dict]:
    """BasePTQ in place on ``layers`` (and, with ``cfg.quant_attention``, the operands of timm ViT
    attention's q·kᵀ and attn·v, run as explicit matmuls). ``cfg``: a ``PTQConfig``; ``progress``: the
    search's per-op report (see :class:`craft_runner.compress.search.SearchProgress`).

    Returns (record, {layer: fixed weight scale}); layers with per-output-channel max-based scales
    are left out, so fine-tuning recomputes their scales from the current weight.
    """
    if cfg.search != "none":
        return run_ptq(model, layers, cfg, calib_batches, "base", progress)
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
    Autocast is off for the whole fine-tuning, whatever ``train.amp`` says
    (:func:`craft_runner.train.float32_fine_tune`).
    """
    if fine_tune is None:
        raise ValueError("fine-tuning needs CompressContext.fine_tune")
    if w_bits < FULL_PRECISION_BITS:
        for _, m in layers:
            s = (scales or {}).get(m)
            parametrize.register_parametrization(m, "weight", WeightFakeQuant(w_bits, s))
    try:
        with float32_fine_tune():  # bf16 autocast would round the fake-quantized values off their grid
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
    scale searched on full-precision calibration data for the best ``metric`` of the op's output —
    by default BasePTQ's cosine similarity and PTQ4ViT's Hessian-guided distance (see
    :mod:`craft_runner.compress.search`, :mod:`craft_runner.compress.ptq4vit`). ``search=none`` is BasePTQ with
    max-based scales
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
    # BasePTQ's scales: cosine (searched, the reference; the score is ``metric``, cosine by default
    # for BasePTQ — hence the name) or none (from max |x|, no search).
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
    # The search's score of an op output O^ against the full-precision O: cosine (cosine similarity,
    # configs/BasePTQ.py), hessian (mean[(dL/dO)^2 (O^ - O)^2], configs/PTQ4ViT.py, and what the
    # reference's example/test_all.py sets for BasePTQ too) or mse (mean[(O^ - O)^2], an ablation).
    # null: cosine for BasePTQ, hessian for PTQ4ViT; none with search=none (nothing is searched).
    metric: Optional[str] = None
    # L of the hessian metric: kl (the reference code's: KL to the full-precision prediction, taken
    # at the full-precision model) or ce (the paper's: cross-entropy with the calibration labels).
    hessian_loss: str = "kl"
    # Twin uniform quantization of post-softmax and post-GELU activations (False: plain uniform).
    twin: bool = True
    # Post-softmax twin: reference (the code's split quantizer) or paper (ranges picked per value).
    twin_softmax: str = "reference"
    # Post-softmax twin ranges: Δ_R1 = Δ_R2 / 2^m (split 2^-m), m searched in 0..max_softmax_shift.
    max_softmax_shift: int = 19
    # Fold each BatchNorm into the Conv2d before it first, so the searched grid is the one that deploys
    # (craft_runner.compress.fold; the ONNX export folds them). false: the papers' unfolded weights.
    fold_bn: bool = False
    # SmoothQuant's migration strength α before quantizing (craft_runner.compress.smooth); null: off, 0.5 its own.
    smooth_alpha: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)
        check_smooth_alpha(self.smooth_alpha)
        _check(not (self.fold_bn and self.bn_recalib), "compress.bn_recalib", self.bn_recalib,
               "0 with compress.fold_bn=true (folding leaves no BatchNorm to re-calibrate)")
        _check_choice("compress.method", self.method, ("base", "ptq4vit"))
        _check_choice("compress.search", self.search, ("cosine", "none"))
        base = self.method == "base"
        _check(base or self.search == "cosine", "compress.search", self.search,
               "cosine with method=ptq4vit (search=none is BasePTQ's max-based variant)")
        maxed = base and self.search == "none"
        _check(not maxed or self.metric is None, "compress.metric", self.metric,
               "null with compress.search=none (max-based scales: nothing is searched)")
        if self.metric is None and not maxed:
            self.metric = "cosine" if base else "hessian"
        if not maxed:
            _check_choice("compress.metric", self.metric, METRICS)
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
        _check_choice("compress.hessian_loss", self.hessian_loss, ("kl", "ce"))
        _check_choice("compress.twin_softmax", self.twin_softmax, ("reference", "paper"))
        _check(0 <= self.max_softmax_shift <= 30, "compress.max_softmax_shift", self.max_softmax_shift,
               "an integer in 0..30")
        _check_choice("compress.weight_granularity", self.weight_granularity, ("tensor", "channel", "mixed"))
        # A cosine over one output channel is its sign: the cosine search scores whole output vectors.
        _check(self.metric != "cosine" or self.weight_granularity == "tensor", "compress.weight_granularity",
               self.weight_granularity, "tensor with compress.metric=cosine (a cosine over one output channel is "
               "its sign)")
        _check_choice("compress.operand_granularity", self.operand_granularity, ("head", "tensor"))


def ptq_label(c: dict) -> str:
    method = "" if c.get("method", "base") == "base" else f"{c['method']} "
    ft = f" +ft{c['finetune_epochs']}" if c.get("finetune_epochs") else ""
    maxed = " max" if c.get("search") == "none" else ""  # max-based scales, not the searched ones
    default = "cosine" if c.get("method", "base") == "base" else "hessian"
    metric = f" {c['metric']}" if c.get("metric") not in (None, default) else ""  # a search score not the method's
    fold = " +foldBN" if c.get("fold_bn") else ""
    sq = f" +SQ{c['smooth_alpha']:g}" if c.get("smooth_alpha") is not None else ""
    return f"{method}W{c['w_bits']}A{c['a_bits']}{maxed}{metric}{sq}{fold}{ft}"


def ptq_no_kernel(cfg) -> Optional[str]:
    if cfg.method == "ptq4vit" and cfg.twin and cfg.a_bits < FULL_PRECISION_BITS:
        return "PTQ4ViT's twin-uniform grids (post-softmax / post-GELU) have no ONNX Runtime kernel"
    return None


@register_compressor("ptq", PTQConfig, label=ptq_label, check=check_smooth,
                     caps=Capabilities(quantizes=True, injects_scales=True, no_kernel=ptq_no_kernel))
def ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: PTQConfig, ctx) -> dict:
    """BasePTQ or PTQ4ViT, then (``finetune_epochs`` > 0) fine-tuning with the weights kept quantized."""
    # train.progress (None: tqdm's own rule, a bar only on a terminal; False: log lines only)
    progress = ctx.progress
    smoothed = smooth_model(model, cfg.smooth_alpha, ctx.calib_batches) if cfg.smooth_alpha is not None else {}
    folded = fold_for_compression(model, cfg.fold_bn, ctx.calib_batches)
    if cfg.method == "ptq4vit":
        info, scales = ptq4vit(model, layers, cfg, ctx.calib_batches, progress)
    else:
        info, scales = base_ptq(model, layers, cfg, ctx.calib_batches, progress)
    fits = []  # what ctx.fine_tune returns (train.fit's record): its per-epoch history goes to results.json
    if cfg.finetune_epochs:
        fine_tune_quantized(model, layers, cfg.w_bits, cfg.finetune_epochs,
                            ctx.fine_tune and (lambda m, e: fits.append(ctx.fine_tune(m, e))), scales)
    history = [h for f in fits if isinstance(f, dict) for h in f.get("history", [])]
    return {**info, **folded, **smoothed, "finetune_epochs": cfg.finetune_epochs,
            **({"finetune_history": history} if history else {})}
