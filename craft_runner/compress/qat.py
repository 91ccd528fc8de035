"""Quantization-aware training with PACT (Choi et al. 2018) as IntelLabs/distiller's ``PACTQuantizer``
implements it (SNT used distiller), see :class:`~craft_runner.compress.config.QATConfig`.

Module surgery on the compression copy:

- ``act_quant=distiller`` (default, distiller's coverage): every ``nn.ReLU`` becomes :class:`PACT` (its
  ``replacement_factory`` holds nn.ReLU only); with ``skip_first_last`` the first and the last ReLU a
  forward pass calls (the stem's output, the classifier's pooled input) stay in float, as distiller's
  PACT example overrides ``layer1.0.pre_relu`` and ``final_relu``. Other activations (RPReLU, GELU, ...)
  and layer inputs not fed by a ReLU stay in float.
- ``act_quant=layer_inputs``: the input of every target Conv2d/Linear is quantized. Where
  the layer reads the output of an activation module (directly or through a view: transpose,
  flatten, eval-mode dropout), that activation is quantized: ReLU/ReLU6 becomes :class:`PACT`, an
  activation whose output can be negative (PReLU, SNT's ``RPReLU``, GELU, SiLU, ...) becomes
  ``Sequential(activation, SignedPACT)``. Any other input (a LayerNorm output, a residual sum, a
  pooled feature) gets a quantizer on the layer itself (a forward pre-hook): :class:`PACT` when the
  calibration inputs are all >= 0, else :class:`SignedPACT`. Activations that feed no target
  layer stay in float.
- ``act_quant=activations``: every activation module is quantized, layer inputs are not
  otherwise touched (the coverage then depends on the architecture).

Target-layer weights are fake-quantized through a straight-through parametrization during
training and left quantized afterwards: ``dorefa`` (distiller's ``dorefa_quantize_param``) or
``symmetric`` (per output channel).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.calibration import forward_with_hooks
from craft_runner.compress.fold import fold_for_compression
from craft_runner.compress.quant import FULL_PRECISION_BITS, WeightFakeQuant, attach_input_quantizer, round_ste
from craft_runner.compress.registry import Capabilities, CompressConfig, parse_bits, register_compressor
from craft_runner.schema import _check, _check_choice
from craft_runner.train import float32_fine_tune

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


# --------------------------------------------------------------------------- weights


def dorefa_weight(w: torch.Tensor, n_bits: int) -> torch.Tensor:
    """distiller's DoReFa weights (k = n_bits >= 2): w_q = 2·Q_k(tanh(w) / (2·max|tanh(w)|) + ½) − 1 with
    Q_k(v) = round(v·(2^k − 1)) / (2^k − 1) and the max over the whole tensor: 2^k levels in [−1, 1]
    (zero is not one of them). round passes its gradient straight through; tanh and the max are
    differentiated, as in distiller's autograd graph."""
    t = torch.tanh(w.float())
    v = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
    levels = 2 ** n_bits - 1
    return (2 * round_ste(v * levels) / levels - 1).to(w.dtype)


class DoReFaWeight(nn.Module):
    """Parametrization: the layer computes with :func:`dorefa_weight` of its float weight."""

    def __init__(self, n_bits: int):
        super().__init__()
        self.n_bits = n_bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return dorefa_weight(w, self.n_bits)


def _weight_quantizer(kind: str, n_bits: int) -> nn.Module:
    if kind == "dorefa":
        return DoReFaWeight(n_bits)
    if kind == "symmetric":
        return WeightFakeQuant(n_bits)
    raise ValueError(f"unknown weight quantizer {kind!r}: expected dorefa or symmetric")


def train_with_quantized_weights(model: nn.Module, layers: list[tuple[str, nn.Module]], n_bits: int, kind: str,
                                 epochs: int, fine_tune) -> None:
    """Fine-tune ``epochs`` with every layer's weight fake-quantized (STE), then keep the quantized weights
    (with ``epochs`` = 0 the weights are only quantized). The fine-tuning runs with autocast off, whatever
    ``train.amp`` says (:func:`craft_runner.train.float32_fine_tune`)."""
    if epochs and fine_tune is None:
        raise ValueError("QAT needs CompressContext.fine_tune")
    if n_bits < FULL_PRECISION_BITS:
        for _, m in layers:
            parametrize.register_parametrization(m, "weight", _weight_quantizer(kind, n_bits))
    try:
        if epochs:
            with float32_fine_tune():  # bf16 autocast would round the fake-quantized values off their grid
                fine_tune(model, epochs)
    finally:
        for _, m in layers:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


# --------------------------------------------------------------------------- activations


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


@torch.no_grad()
def _input_ranges(model: nn.Module, modules: list[nn.Module], batches) -> dict:
    ranges: dict = {}

    def hook(mod, args):
        x = args[0]
        lo, hi = float(x.min()), float(x.max())
        old = ranges.get(mod, (lo, hi))
        ranges[mod] = (min(lo, old[0]), max(hi, old[1]))

    forward_with_hooks(model, batches, pre_hooks=[(m, hook) for m in modules])
    return ranges


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def insert_pact(model: nn.Module, n_bits: int, batches, alpha_init: float | None, weight_decay: float,
                names=None) -> dict:
    """Module surgery: PACT for ReLU/ReLU6, activation + SignedPACT for the others (only the activations
    named in ``names`` when given); returns the initial clipping levels by module name."""
    acts = [a for a in find_activations(model) if names is None or a[0] in names]
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
        _set_submodule(model, name, new.to(_device(model)))
    return init


@torch.no_grad()
def call_order(model: nn.Module, modules: list[nn.Module], x) -> list[nn.Module]:
    """``modules`` in the order one eval-mode forward of ``x`` first calls them (uncalled ones left out)."""
    order: list[nn.Module] = []
    forward_with_hooks(model, [(x, None)],
                       forward_hooks=[(m, lambda mod, _a, _o: order.append(mod) if mod not in order else None)
                                      for m in modules])
    return order


def distiller_relus(model: nn.Module, batches, skip_first_last: bool) -> list[str]:
    """Names of the ReLUs distiller's PACTQuantizer replaces: type nn.ReLU exactly (its factory looks the
    module's type up), less the first and last one called when the first and last layers stay float."""
    relus = {m: n for n, m in model.named_modules() if n and type(m) is nn.ReLU}
    if not relus:
        return []
    order = call_order(model, list(relus), _probe(batches))
    if skip_first_last:
        order = order[1:-1]
    return [relus[m] for m in order]


def _probe(batches) -> torch.Tensor:
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        return x[:2]
    raise ValueError("QAT needs calibration batches to find what feeds each layer")


@torch.no_grad()
def layer_input_sources(model: nn.Module, layers: list[tuple[str, nn.Module]], candidates: dict, x) -> dict:
    """Which candidate module's output each layer reads, from one eval-mode forward of ``x``.

    ``candidates`` maps module -> name. A layer reads a candidate's output when its first input shares
    that output's storage (the tensor itself or a view of it: transpose, flatten, eval-mode dropout;
    any op that computes new values breaks the link). Returns layer name -> candidate name, or None
    where the layer reads anything else, was called more than once with different sources, or never.
    """
    produced: dict[int, str] = {}
    keep = []  # outputs stay alive so that no later tensor can reuse their memory
    seen: dict[str, set] = {}
    name_of = {m: n for n, m in layers}

    def out_hook(mod, _args, out):
        if torch.is_tensor(out) and out.numel():
            keep.append(out)
            produced[out.untyped_storage().data_ptr()] = candidates[mod]

    def pre_hook(mod, args):
        x = args[0] if args else None
        src = produced.get(x.untyped_storage().data_ptr()) if torch.is_tensor(x) and x.numel() else None
        seen.setdefault(name_of[mod], set()).add(src)

    forward_with_hooks(model, [(x, None)], forward_hooks=[(m, out_hook) for m in candidates],
                       pre_hooks=[(m, pre_hook) for _, m in layers])
    return {n: next(iter(seen[n])) if len(seen.get(n, ())) == 1 else None for n, _ in layers}


def quantize_layer_inputs(model: nn.Module, layers: list[tuple[str, nn.Module]], n_bits: int, batches,
                          alpha_init: float | None, weight_decay: float) -> dict:
    """``act_quant=layer_inputs`` surgery: the activation that feeds a layer gets PACT (or SignedPACT
    after it); a layer fed by anything else gets its own input quantizer, signed when its calibration
    inputs go below zero. Returns the initial clipping levels by quantizer name (an activation's name,
    or ``<layer>.input_quantizer``)."""
    acts = {m: n for n, m, _ in find_activations(model)}
    sources = layer_input_sources(model, layers, acts, _probe(batches))
    feeding = {s for s in sources.values() if s is not None}
    own = [(n, m) for n, m in layers if sources[n] is None]
    in_ranges = _input_ranges(model, [m for _, m in own], batches) if own else {}
    init = insert_pact(model, n_bits, batches, alpha_init, weight_decay, names=feeding) if feeding else {}
    for name, m in own:
        lo, hi = in_ranges.get(m, (0.0, 1.0))
        signed = lo < 0
        if alpha_init is not None:
            lo, hi = -alpha_init, alpha_init
        if signed:
            q = SignedPACT(n_bits, lo, max(hi, 1e-3), weight_decay)
            init[f"{name}.input_quantizer"] = {"alpha_lo": q.alpha_lo.item(), "alpha_hi": q.alpha_hi.item()}
        else:
            q = PACT(n_bits, max(hi, 1e-3), weight_decay)
            init[f"{name}.input_quantizer"] = {"alpha": q.alpha.item()}
        attach_input_quantizer(m, q.to(m.weight.device))
    return init


def _quantizer_key(name: str, mod: nn.Module) -> str:
    # A SignedPACT after an activation sits at "<activation>.1"; report it under the activation's name.
    if isinstance(mod, SignedPACT) and not name.endswith(".input_quantizer"):
        return name.rpartition(".")[0]
    return name


def quantized_input_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], batches) -> list[str]:
    """Names of the layers whose input is the output of a PACT/SignedPACT quantizer (measured by one forward)."""
    quantizers = {m: n for n, m in model.named_modules() if isinstance(m, (PACT, SignedPACT))}
    if not quantizers:
        return []
    sources = layer_input_sources(model, layers, quantizers, _probe(batches))
    return [n for n, _ in layers if sources[n] is not None]


def pact_qat(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, ctx) -> dict:
    """PACT QAT in place: insert activation quantizers, train ``cfg.epochs`` with fake-quantized weights."""
    folded = fold_for_compression(model, cfg.fold_bn, ctx.calib_batches)
    init = {}
    if cfg.a_bits < FULL_PRECISION_BITS:
        if cfg.act_quant == "distiller":
            names = distiller_relus(model, ctx.calib_batches, cfg.skip_first_last)
            init = insert_pact(model, cfg.a_bits, ctx.calib_batches, cfg.alpha_init, cfg.alpha_weight_decay,
                               names=set(names)) if names else {}
        elif cfg.act_quant == "layer_inputs":
            init = quantize_layer_inputs(model, layers, cfg.a_bits, ctx.calib_batches, cfg.alpha_init,
                                         cfg.alpha_weight_decay)
        else:
            init = insert_pact(model, cfg.a_bits, ctx.calib_batches, cfg.alpha_init, cfg.alpha_weight_decay)
        if not init:
            log.warning("QAT: no activation quantizer inserted, activations stay in float")
    train_with_quantized_weights(model, layers, cfg.w_bits, cfg.weight_quant, cfg.epochs, ctx.fine_tune)
    final = {_quantizer_key(n, m): ({"alpha": m.alpha.item()} if isinstance(m, PACT) else
                                    {"alpha_lo": m.alpha_lo.item(), "alpha_hi": m.alpha_hi.item()})
             for n, m in model.named_modules() if isinstance(m, (PACT, SignedPACT))}
    own = [k for k in init if k.endswith(".input_quantizer")]
    n_act = len(init) - len(own)
    n_signed_act = sum("alpha_lo" in v for k, v in init.items() if k not in own)
    n_signed_own = sum("alpha_lo" in init[k] for k in own)
    covered = quantized_input_layers(model, layers, ctx.calib_batches) if init else []
    float_inputs = [n for n, _ in layers if n not in set(covered)]
    n_wq = len(layers) if cfg.w_bits < FULL_PRECISION_BITS else 0
    log.info("PACT QAT W%dA%d (%s weights, %s): %d/%d layer inputs quantized (%d activations, %d signed; %d "
             "layer input quantizers, %d signed), %d epochs", cfg.w_bits, cfg.a_bits, cfg.weight_quant,
             cfg.act_quant, len(covered), len(layers), n_act, n_signed_act, len(own), n_signed_own, cfg.epochs)
    if float_inputs and cfg.a_bits < FULL_PRECISION_BITS:
        log.info("QAT: layers whose input stays in float: %s", ", ".join(float_inputs))
    return {"method": "pact", "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "epochs": cfg.epochs,
            "weight_quant": cfg.weight_quant, "act_quant": cfg.act_quant,
            "act_quantizers": n_act, "signed_act_quantizers": n_signed_act,
            "input_quantizers": len(own), "signed_input_quantizers": n_signed_own,
            "quantized_layers": len(layers), "quantized_inputs": len(covered), "quantized_weights": n_wq,
            "float_inputs": float_inputs, "alpha_init": init, "alpha": final, **folded}


# --------------------------------------------------------------------------------------------- the compressor


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

    ``act_quant``: ``distiller`` (default, reference) quantizes the output of every nn.ReLU but the
    first and last one called (with ``skip_first_last``), everything else stays float — so RPReLU
    (arch=snt) and GELU (Mixer) outputs are not quantized, as in distiller; ``layer_inputs`` (option)
    quantizes the input of every target layer — the activation that feeds it where there is one, else
    a quantizer on the layer itself (signed when its calibration inputs go below zero: LayerNorm
    outputs, residual sums), so every architecture gets the same coverage; ``activations`` (option)
    quantizes every activation module and nothing else.

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
    act_quant: str = "distiller"
    alpha_init: Optional[float] = 8.0
    alpha_weight_decay: float = 0.0
    # PACT keeps the first and last layers (weights and inputs) in full precision.
    skip_first_last: bool = True
    # Fold each BatchNorm into the Conv2d before it before QAT (BN removed: the trained grid is the one
    # that deploys); false: BN trained as in the papers (craft_runner.compress.fold).
    fold_bn: bool = False

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)
        _check(not (self.fold_bn and self.bn_recalib), "compress.bn_recalib", self.bn_recalib,
               "0 with compress.fold_bn=true (folding leaves no BatchNorm to re-calibrate)")
        _check_choice("compress.method", self.method, ("pact",))
        _check(self.epochs >= 0, "compress.epochs", self.epochs, "an integer >= 0")
        _check_choice("compress.weight_quant", self.weight_quant, ("dorefa", "symmetric"))
        _check_choice("compress.act_quant", self.act_quant, ("distiller", "layer_inputs", "activations"))
        _check(self.alpha_init is None or self.alpha_init > 0, "compress.alpha_init", self.alpha_init,
               "null (calibrated) or a positive number")
        _check(self.alpha_weight_decay >= 0, "compress.alpha_weight_decay", self.alpha_weight_decay, "a number >= 0")


ACT_QUANT_LABELS = {"layer_inputs": "layer inputs", "activations": "all activations"}


def qat_label(c: dict) -> str:
    # distiller's coverage (the default) unmarked; the options say which they are.
    extra = ACT_QUANT_LABELS.get(c.get("act_quant", "distiller"))
    fold = " +foldBN" if c.get("fold_bn") else ""
    return f"QAT W{c['w_bits']}A{c['a_bits']}{fold}" + (f" ({extra})" if extra else "")


register_compressor("qat", QATConfig, label=qat_label, caps=Capabilities(quantizes=True, injects_scales=True))(pact_qat)
