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

    def __post_init__(self):
        _check_choice("compress.name", self.name, ("none", "ptq", "prune", "qat"))
        _check(self.calib_size >= 1, "compress.calib_size", self.calib_size, "an integer >= 1")


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
        _parse_bits(self)
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


@dataclass
class PruneConfig(CompressConfig):
    """Weight pruning of Conv2d and Linear layers through ``torch.nn.utils.prune``.

    criterion: ``magnitude`` scores |W_ij|; ``wanda`` scores |W_ij| · ‖X_j‖₂, the L2 norm of input
    feature j over every calibration token (Linear) or every unfold position (Conv2d, where the
    feature of weight column (c, kh, kw) is that element of the input patch).

    scope (unstructured only): which weights compete. ``layer``: all weights of a layer;
    ``row``: the weights of one output row (output channel), each row pruned to ``sparsity``;
    ``auto`` (default): ``row`` for wanda (Wanda's own choice), ``layer`` for magnitude.

    pattern: ``unstructured`` prunes round(sparsity · group size) weights per group (layer or row).
    ``nm`` (N:M): in every group of M consecutive weights along the input dimension, the N with the
    lowest scores are zeroed (N pruned of M, sparsity N/M; Wanda and NVIDIA count N kept of M
    instead — the two agree at 50 %, which covers the papers' 2:4, 16:32 and 32:64). The input
    dimension of a Conv2d is its weight flattened over
    (in_channels, kh, kw) in PyTorch's row-major order; ``sparsity`` is set to n/m.

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
        _parse_bits(self)
        _check_choice("compress.method", self.method, ("pact",))
        _check(self.epochs >= 0, "compress.epochs", self.epochs, "an integer >= 0")
        _check(self.alpha_init is None or self.alpha_init > 0, "compress.alpha_init", self.alpha_init,
               "null (calibrated) or a positive number")
        _check(self.alpha_weight_decay >= 0, "compress.alpha_weight_decay", self.alpha_weight_decay, "a number >= 0")


COMPRESS_SCHEMAS = {"none": CompressConfig, "ptq": PTQConfig, "prune": PruneConfig, "qat": QATConfig}
