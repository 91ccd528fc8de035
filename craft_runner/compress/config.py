"""Schemas of the ``compress`` group: one dataclass per method, picked by ``name``.

Each conf/compress/<option>.yaml names its schema in its defaults list (``<name>_schema``).
Out-of-range values raise :class:`~craft_runner.config.ConfigError` with a one-line message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from craft_runner.config import _check, _check_choice


def _check_bits(key: str, bits: int) -> None:
    _check(2 <= bits <= 32, key, bits, "an integer in 2..32 (16 or more: not quantized)")


def _parse_bits(cfg) -> None:
    """``bits: WxAy`` (e.g. W6A16) overrides ``w_bits`` and ``a_bits``."""
    if cfg.bits is not None:
        m = re.fullmatch(r"W(\d+)A(\d+)", str(cfg.bits).upper())
        _check(m is not None, "compress.bits", cfg.bits, "the form WxAy, e.g. W8A8 or W4A16")
        cfg.w_bits, cfg.a_bits = int(m.group(1)), int(m.group(2))
    _check_bits("compress.w_bits", cfg.w_bits)
    _check_bits("compress.a_bits", cfg.a_bits)


@dataclass
class CompressConfig:
    """Fields shared by every compression method; ``name`` picks the method."""

    name: str = "none"
    calib_size: int = 32  # training images used for calibration
    calib_seed: int = 0
    # Recompute BatchNorm running statistics on this many training batches after compression
    # (0: off); see craft_runner.compress.bn.recalibrate_bn.
    bn_recalib: int = 0

    def __post_init__(self):
        _check_choice("compress.name", self.name, ("none", "ptq", "prune", "qat"))
        _check(self.calib_size >= 1, "compress.calib_size", self.calib_size, "an integer >= 1")
        _check(self.bn_recalib >= 0, "compress.bn_recalib", self.bn_recalib, "an integer >= 0 (0: off)")


@dataclass
class PTQConfig(CompressConfig):
    """Post-training quantization: ``method`` base (BasePTQ) or ptq4vit (PTQ4ViT).

    Both: symmetric uniform weights, one scale per output channel; activations (the input of
    every quantized Conv2d/Linear and, with ``quant_attention``, both operands of the attention
    matmuls q·kᵀ and attn·v of timm ViTs) quantized statically from calibration data.
    BasePTQ takes each scale from max|x|; PTQ4ViT searches the scales (see
    :mod:`craft_runner.compress.ptq4vit`). ``finetune_epochs`` > 0 then fine-tunes the quantized
    model (SNT Table 3: W4 + one epoch) with straight-through fake quantization, so the weights
    are still on their quantization grid afterwards.
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
    # PTQ4ViT only. Scale candidates: ratio × the max-based scale, ratio in
    # linspace(scale_min, scale_max, scale_steps + 1) plus 1.0; weights and activations are searched
    # alternately for search_rounds rounds (PTQ4ViT's defaults: 0.01, 1.2, 100, 3).
    search_rounds: int = 3
    scale_min: float = 0.01
    scale_max: float = 1.2
    scale_steps: int = 100
    # hessian: E[(∂L/∂O)² (Ô − O)²]; mse: E[(Ô − O)²] (ablation).
    metric: str = "hessian"
    # Twin uniform quantization of post-softmax and post-GELU activations (False: plain uniform).
    twin: bool = True
    # Post-softmax twin ranges: Δ_R1 = Δ_R2 / 2^m, m searched in 0..max_softmax_shift.
    max_softmax_shift: int = 19
    # channel: one searched weight scale per output channel; tensor: one per layer.
    weight_granularity: str = "channel"

    def __post_init__(self):
        super().__post_init__()
        _parse_bits(self)
        _check_choice("compress.method", self.method, ("base", "ptq4vit"))
        _check(self.finetune_epochs >= 0, "compress.finetune_epochs", self.finetune_epochs, "an integer >= 0")
        _check(self.search_rounds >= 1, "compress.search_rounds", self.search_rounds, "an integer >= 1")
        _check(self.scale_min > 0, "compress.scale_min", self.scale_min, "a positive number")
        _check(self.scale_max > self.scale_min, "compress.scale_max", self.scale_max,
               f"a number > compress.scale_min ({self.scale_min})")
        _check(self.scale_steps >= 1, "compress.scale_steps", self.scale_steps, "an integer >= 1")
        _check_choice("compress.metric", self.metric, ("hessian", "mse"))
        _check(0 <= self.max_softmax_shift <= 30, "compress.max_softmax_shift", self.max_softmax_shift,
               "an integer in 0..30")
        _check_choice("compress.weight_granularity", self.weight_granularity, ("channel", "tensor"))


@dataclass
class PruneConfig(CompressConfig):
    """Weight pruning of Conv2d and Linear layers through ``torch.nn.utils.prune``.

    criterion: ``magnitude`` scores |W_ij|; ``wanda`` scores |W_ij| · ‖X_j‖₂, the L2 norm of input
    feature j over every calibration token (Linear) or every unfold position (Conv2d, where the
    feature of weight column (c, kh, kw) is that element of the input patch). ``wanda_inputs``
    says on which model the norms are measured: ``block`` (default) block by block, each block's
    inputs on the model with every earlier block pruned and the block itself dense (locuslab/wanda
    ``prune_wanda``); ``layer`` layer by layer, every earlier layer pruned; ``dense`` all from the
    dense model (what Wanda's own ViT/ConvNeXt code amounts to).

    scope (unstructured only): which weights compete. ``layer``: all weights of a layer;
    ``row``: the weights of one output row (output channel), each row pruned to ``sparsity``;
    ``auto`` (default): ``row`` for wanda (Wanda's own choice), ``layer`` for magnitude.

    pattern: ``unstructured`` prunes round(sparsity · group size) weights per group (layer or row).
    ``nm`` (N:M): in every group of M consecutive weights along the input dimension, the N with the
    lowest scores are zeroed (N pruned of M, sparsity N/M, as Wanda's code reads "2:4"; NVIDIA
    counts N kept of M instead — the two agree at 50 %, which covers the papers' 2:4, 16:32 and
    32:64). The input
    dimension of a Conv2d is its weight flattened over
    (in_channels, kh, kw) in PyTorch's row-major order (``nm_layout=pytorch``), or its input channels
    at each kernel position (``nm_layout=nvidia``, NVIDIA ASP's grouping); ``sparsity`` is set to n/m.

    schedule: ``oneshot`` prunes once; ``iterative`` (iterative magnitude pruning) prunes in
    ``steps`` steps to ``sparsity`` following ``schedule_kind`` — cubic (AGP):
    s_t = s_f + (s_i − s_f)(1 − t/T)³; exponential: the same share of the remaining weights per
    step, 1 − s_t = (1 − s_i)·((1 − s_f)/(1 − s_i))^(t/T) — and fine-tunes ``finetune_epochs``
    after every step (after the single step of ``oneshot`` too) with the masks held.
    """

    name: str = "prune"
    criterion: str = "magnitude"
    scope: str = "auto"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    # A layer whose input size is not a multiple of m: error, or skip (left dense, listed).
    nm_indivisible: str = "error"
    # N:M groups of a Conv2d: pytorch = along the weight flattened over (in, kh, kw); nvidia = along
    # the input channels at each kernel position (NVIDIA ASP). The same for Linear and 1x1 convs.
    nm_layout: str = "pytorch"
    # Wanda: where each layer's input norms are measured. block = block by block on the model as
    # pruned so far (locuslab/wanda prune_wanda); layer = layer by layer likewise; dense = every
    # norm from the dense model in one pass (Wanda's image_classifiers code).
    wanda_inputs: str = "block"
    schedule: str = "oneshot"
    schedule_kind: str = "cubic"
    steps: int = 10
    initial_sparsity: float = 0.0
    finetune_epochs: int = 0
    skip_first_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_choice("compress.criterion", self.criterion, ("magnitude", "wanda"))
        _check_choice("compress.scope", self.scope, ("auto", "layer", "row"))
        _check_choice("compress.pattern", self.pattern, ("unstructured", "nm"))
        _check(0.0 <= self.sparsity < 1.0, "compress.sparsity", self.sparsity, "a value in [0, 1)")
        _check_choice("compress.nm_indivisible", self.nm_indivisible, ("error", "skip"))
        _check_choice("compress.nm_layout", self.nm_layout, ("pytorch", "nvidia"))
        _check_choice("compress.wanda_inputs", self.wanda_inputs, ("block", "layer", "dense"))
        _check_choice("compress.schedule", self.schedule, ("oneshot", "iterative"))
        _check_choice("compress.schedule_kind", self.schedule_kind, ("cubic", "exponential"))
        _check(self.steps >= 1, "compress.steps", self.steps, "an integer >= 1")
        _check(0.0 <= self.initial_sparsity <= self.sparsity, "compress.initial_sparsity", self.initial_sparsity,
               f"a value in [0, compress.sparsity={self.sparsity}]")
        _check(self.finetune_epochs >= 0, "compress.finetune_epochs", self.finetune_epochs, "an integer >= 0")
        if self.pattern == "nm":
            _check(self.m >= 2, "compress.m", self.m, "an integer >= 2")
            _check(1 <= self.n < self.m, "compress.n", self.n, f"an integer in 1..m-1 = 1..{self.m - 1}")
            _check(self.schedule == "oneshot", "compress.schedule", self.schedule, "oneshot with pattern=nm")
            self.sparsity = self.n / self.m

    @property
    def resolved_scope(self) -> str:
        if self.scope != "auto":
            return self.scope
        return "row" if self.criterion == "wanda" else "layer"


@dataclass
class QATConfig(CompressConfig):
    """Quantization-aware training with PACT (Choi et al. 2018) as distiller's ``PACTQuantizer`` (which SNT
    used), from the trained weights; trains ``epochs`` epochs with the run's optimizer and data.

    Activations: a ReLU/ReLU6 becomes y = clip(x, 0, α), quantized unsigned on 2^a_bits levels,
    y_q = round(y·(2^k−1)/α)·α/(2^k−1), with a learnable α per activation and PACT's straight-through
    gradients (∂y_q/∂x = 1 on [0, α), ∂y_q/∂α = 1 where x ≥ α) — distiller's
    LearnedClippedLinearQuantization. Activations whose output can be negative (PReLU, SNT's RPReLU,
    LeakyReLU, GELU, SiLU, Hardswish, ELU) keep their function and are followed by a signed variant
    with two learnable bounds α_lo ≤ 0 ≤ α_hi (asymmetric grid with zero on it; ∂/∂α_hi = 1 where
    x ≥ α_hi, ∂/∂α_lo = 1 where x ≤ α_lo; not in distiller, which only replaces ReLUs).

    ``act_quant``: ``layer_inputs`` (default) quantizes the input of every target layer — the
    activation that feeds it where there is one, else a quantizer on the layer itself (signed when
    its calibration inputs go below zero: LayerNorm outputs, residual sums), so every architecture
    gets the same coverage; ``activations`` quantizes every activation module and nothing else.

    ``weight_quant``: ``dorefa`` (default, distiller's PACTQuantizer): per layer,
    w_q = 2·Q_k(tanh(w)/(2·max|tanh(w)|) + ½) − 1 with Q_k(v) = round(v·(2^k−1))/(2^k−1), 2^k levels in
    [−1, 1]; ``symmetric``: integers in [−2^(k−1), 2^(k−1)−1] with one scale per output channel from
    max|w|. Both with a straight-through estimator; biases stay in float.

    ``alpha_init``: every α starts at this value (α_lo at −alpha_init): distiller's
    act_clip_init_val = 8; null sets each from calibration data (max of the quantized tensor, min for
    α_lo). ``alpha_weight_decay`` is PACT's L2 penalty (λ/2)·α² on every clipping level, added to its
    gradient (the optimizer's own weight decay skips these 0-dim parameters); conf/compress/qat.yaml
    sets it to ``${optimizer.weight_decay}``, as distiller's act_clip_decay=None gives α the
    optimizer's weight decay.
    """

    name: str = "qat"
    method: str = "pact"
    bits: Optional[str] = None
    w_bits: int = 4
    a_bits: int = 4
    epochs: int = 10
    weight_quant: str = "dorefa"
    act_quant: str = "layer_inputs"
    alpha_init: Optional[float] = 8.0
    alpha_weight_decay: float = 0.0
    # PACT keeps the first and last layers (weights and inputs) in full precision.
    skip_first_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        _parse_bits(self)
        _check_choice("compress.method", self.method, ("pact",))
        _check(self.epochs >= 0, "compress.epochs", self.epochs, "an integer >= 0")
        _check_choice("compress.weight_quant", self.weight_quant, ("dorefa", "symmetric"))
        _check_choice("compress.act_quant", self.act_quant, ("layer_inputs", "activations"))
        _check(self.alpha_init is None or self.alpha_init > 0, "compress.alpha_init", self.alpha_init,
               "null (calibrated) or a positive number")
        _check(self.alpha_weight_decay >= 0, "compress.alpha_weight_decay", self.alpha_weight_decay, "a number >= 0")


COMPRESS_SCHEMAS = {"none": CompressConfig, "ptq": PTQConfig, "prune": PruneConfig, "qat": QATConfig}
