"""Weight pruning through ``torch.nn.utils.prune``: magnitude or Wanda scores, unstructured (per
layer or per output row) or N:M, one-shot or iterative (IMP with a cubic or exponential schedule).

Masks are applied with ``prune.custom_from_mask`` and stay applied (the ``weight_orig`` ×
``weight_mask`` reparametrisation) through any fine-tuning; ``prune.remove`` makes them permanent
before evaluation. Every score is computed on the weight matrix viewed as (out, in): a Conv2d
weight (out, in/groups, kh, kw) is flattened over (in/groups, kh, kw) in PyTorch's row-major order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from craft_runner.calibration import forward_with_hooks
from craft_runner.compress.registry import Capabilities, CompressConfig, register_compressor, target_layers
from craft_runner.schema import ConfigError, _check, _check_choice

log = logging.getLogger(__name__)


def layer_sparsity(module: nn.Module) -> float:
    w = module.weight
    return float((w == 0).sum()) / w.numel()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, also while a pruning reparametrisation is attached
    (``module.weight`` is only refreshed by the next forward)."""
    if hasattr(module, "weight_orig"):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


# --------------------------------------------------------------------------- scores


@torch.no_grad()
def input_feature_norms(model: nn.Module, modules: list[nn.Module], batches) -> dict[nn.Module, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of each module over the calibration batches (forward hooks).

    Linear: j indexes the last input dim; the norm runs over all other dims (batch, tokens).
    Conv2d: j indexes the unfolded patch element (c, kh, kw) of the module's own kernel, stride,
    padding and dilation, so it matches column j of the flattened weight; the norm runs over the
    batch and every unfold position (zero padding counts as zeros). Returns, per module, a tensor
    (groups, in/groups · kh · kw) for Conv2d and (1, in) for Linear.
    """
    sq: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, args, _out):
        x = args[0].detach().float()
        if isinstance(mod, nn.Conv2d):
            cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
            s = cols.pow(2).sum(dim=(0, 2)).view(mod.groups, -1)
        else:
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0).view(1, -1)
        sq[mod] = sq[mod] + s if mod in sq else s

    for m in modules:
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ValueError(f"Wanda norms assume zero padding; got padding_mode={m.padding_mode!r}")
    forward_with_hooks(model, batches, forward_hooks=[(m, hook) for m in modules])
    return {m: s.sqrt() for m, s in sq.items()}


def wanda_scores(weight: torch.Tensor, feat_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, shaped like ``weight``; ``feat_norm`` is (groups, columns) as returned by
    :func:`input_feature_norms` (output row i belongs to group i // (out/groups))."""
    w2 = weight.detach().abs().flatten(1)
    groups = feat_norm.shape[0]
    norms = feat_norm.to(w2).repeat_interleave(w2.shape[0] // groups, dim=0)
    return (w2 * norms).view_as(weight)


# --------------------------------------------------------------------------- masks


def prune_count(sparsity: float, size: int, count: str = "truncate") -> int:
    """How many of ``size`` weights to zero: ``truncate`` is int(sparsity · size) on the float product, as
    locuslab/wanda (``int(W.shape[1]*sparsity)``) and distiller (``int(desired_sparsity * numel)``) count;
    ``round`` rounds it to the nearest integer."""
    if count == "truncate":
        return int(sparsity * size)
    if count == "round":
        return round(sparsity * size)
    raise ValueError(f"unknown count {count!r}: expected truncate or round")


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "layer",
                      count: str = "truncate") -> torch.Tensor:
    """Keep-mask (1 keep, 0 prune) zeroing the lowest scores: :func:`prune_count` of them per layer
    (``scope="layer"``) or per output row (``scope="row"``)."""
    s2 = scores.flatten(1)
    mask = torch.ones_like(s2)
    if scope == "layer":
        k = prune_count(sparsity, s2.numel(), count)
        if k:
            mask.view(-1)[torch.topk(s2.reshape(-1), k, largest=False).indices] = 0
    elif scope == "row":
        k = prune_count(sparsity, s2.shape[1], count)
        if k:
            mask.scatter_(1, torch.topk(s2, k, dim=1, largest=False).indices, 0)
    else:
        raise ValueError(f"unknown scope {scope!r}")
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int, layout: str = "pytorch") -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive weights along the input dimension, the ``n``
    with the lowest scores are zeroed — n pruned of m, sparsity n/m, so every group keeps exactly m − n
    non-zeros (given non-zero weights).

    ``layout`` says what "consecutive along the input dimension" means for a Conv2d weight
    (out, c, kh, kw): ``pytorch`` flattens it to (out, c·kh·kw) in PyTorch's row-major order (kw
    fastest), so a group can mix kernel positions and channels; ``nvidia`` groups input channels
    at a fixed output channel and kernel position, as NVIDIA's ASP (apex ``create_mask`` permutes
    the weight to (kh, kw, out, c) and groups along c). Both are the same for Linear and 1x1 convs.
    The size of that dimension (c·kh·kw, or c for ``nvidia``) must be a multiple of m."""
    if layout not in ("pytorch", "nvidia"):
        raise ValueError(f"unknown N:M layout {layout!r}: expected pytorch or nvidia")
    if layout == "nvidia" and scores.dim() == 4:
        if scores.shape[1] % m:
            raise ValueError(f"input channels {scores.shape[1]} are not a multiple of m={m}")
        # (out, c, kh, kw) -> (out, kh, kw, c): groups of m consecutive channels at one kernel position
        return nm_mask(scores.permute(0, 2, 3, 1), n, m).permute(0, 3, 1, 2).contiguous()
    s2 = scores.flatten(1)
    if s2.shape[1] % m:
        raise ValueError(f"input size {s2.shape[1]} is not a multiple of m={m}")
    g = s2.reshape(s2.shape[0], -1, m)
    mask = torch.ones_like(g).scatter_(2, torch.topk(g, n, dim=2, largest=False).indices, 0)
    return mask.reshape(scores.shape)


def nm_group_size(module: nn.Module, layout: str = "pytorch") -> int:
    """Length of the dimension N:M groups run along: in·kh·kw (``pytorch``) or in (``nvidia``) per group."""
    w = module.weight
    return w.shape[1] if layout == "nvidia" else w[0].numel()


def schedule_sparsity(t: int, steps: int, final: float, initial: float = 0.0, kind: str = "cubic") -> float:
    """Target sparsity after pruning step t of ``steps`` (t = steps gives ``final``).

    cubic (AGP, Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)(1 − t/T)³.
    exponential: the same share of the remaining weights each step,
    1 − s_t = (1 − s_i)·((1 − s_f)/(1 − s_i))^(t/T).
    """
    r = t / steps
    if kind == "cubic":
        return final + (initial - final) * (1 - r) ** 3
    if kind == "exponential":
        return 1 - (1 - initial) * ((1 - final) / (1 - initial)) ** r
    raise ValueError(f"unknown schedule kind {kind!r}")


# --------------------------------------------------------------------------- pruning


def magnitude_prune(layers: list[tuple[str, nn.Module]], sparsity: float, count: str = "truncate") -> dict:
    """Unstructured: in each layer, zero the ``sparsity`` share of weights with the smallest |w|."""
    for _, m in layers:
        tprune.custom_from_mask(m, "weight", unstructured_mask(m.weight.detach().abs(), sparsity, "layer", count))
        tprune.remove(m, "weight")
    log.info("magnitude pruning to %.0f%% on %d layers", 100 * sparsity, len(layers))
    return _report(layers)


def _report(layers) -> dict:
    per_layer = {name: layer_sparsity(m) for name, m in layers}
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return {"layer_sparsity": per_layer, "sparsity": zeros / max(total, 1)}


def _nm_prunable(layers, cfg) -> tuple[list, list]:
    keep, skipped = [], []
    layout = getattr(cfg, "nm_layout", "pytorch")
    for name, m in layers:
        cols = nm_group_size(m, layout)
        if cols % cfg.m == 0:
            keep.append((name, m))
        elif cfg.nm_indivisible == "skip":
            skipped.append(name)
        else:
            raise ConfigError(f"compress.m={cfg.m} is not allowed: expected a divisor of the input size {cols} of "
                              f"layer {name} (compress.nm_layout={layout}; or compress.nm_indivisible=skip)")
    if skipped:
        log.warning("N:M leaves %d layers dense (input size not a multiple of %d): %s", len(skipped), cfg.m,
                    ", ".join(skipped))
    return keep, skipped


def _repeated_child(parent: nn.Module, child: nn.Module) -> bool:
    """``child`` is one of a run of same-class modules in a Sequential/ModuleList (blocks, stages)."""
    if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
        return False
    return sum(type(c) is type(child) for c in parent.children()) >= 2


def block_of(model: nn.Module, name: str) -> str:
    """The block a layer belongs to, for Wanda's block-by-block order: the child, on the layer's path,
    of its deepest Sequential/ModuleList ancestor that holds two or more modules of that child's class
    (timm ViT/Mixer ``blocks.i``, ResNet ``layerK.i``, EfficientNet ``blocks.i.j``); a layer with no
    such ancestor (stem, classifier) is a block by itself."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:i]))
        child_name = ".".join(parts[:i + 1])
        if _repeated_child(parent, model.get_submodule(child_name)):
            return child_name
    return name


def wanda_groups(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: str) -> list[list]:
    """Layers grouped in the order Wanda measures and prunes them: all of a group's input norms are
    measured in one pass over the calibration batches, on the model as pruned so far, then the group
    is pruned. ``block``: one group per block (:func:`block_of`), in module order — Wanda's
    ``prune_wanda``; ``layer``: one group per layer; ``dense``: one group, every norm from the dense
    model."""
    if inputs == "dense":
        return [list(layers)]
    if inputs == "layer":
        return [[lm] for lm in layers]
    if inputs != "block":
        raise ValueError(f"unknown Wanda input order {inputs!r}: expected block, layer or dense")
    groups: dict[str, list] = {}
    for name, m in layers:
        groups.setdefault(block_of(model, name), []).append((name, m))
    return list(groups.values())


def _prune_step(model, layers, cfg, sparsity: float, batches) -> None:
    """One pruning step to ``sparsity`` on every layer; masks stay attached (so a later group's inputs
    are measured on the model as pruned so far)."""
    groups = wanda_groups(model, layers, cfg.wanda_inputs) if cfg.criterion == "wanda" else [layers]
    for group in groups:
        norms = input_feature_norms(model, [m for _, m in group], batches) if cfg.criterion == "wanda" else {}
        for _, m in group:
            w = effective_weight(m)
            scores = wanda_scores(w, norms[m]) if cfg.criterion == "wanda" else w.abs()
            if hasattr(m, "weight_mask"):
                # Pruned weights rank below every live one, so masks only grow and the target is exact.
                scores = scores.masked_fill(m.weight_mask == 0, -1.0)
            if cfg.pattern == "nm":
                mask = nm_mask(scores, cfg.n, cfg.m, cfg.nm_layout)
            else:
                mask = unstructured_mask(scores, sparsity, cfg.resolved_scope, cfg.count)
            tprune.custom_from_mask(m, "weight", mask)


def prune_model(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, ctx) -> dict:
    """Prune ``layers`` of ``model`` in place as ``cfg`` (a PruneConfig) says; returns the record."""
    skipped: list[str] = []
    if cfg.pattern == "nm":
        layers, skipped = _nm_prunable(layers, cfg)
    if cfg.criterion == "wanda" and not ctx.calib_batches:
        raise ValueError("Wanda needs calibration batches")
    steps = cfg.steps if cfg.schedule == "iterative" else 1
    if cfg.finetune_epochs and ctx.fine_tune is None:
        raise ValueError("fine-tuning between pruning steps needs CompressContext.fine_tune")
    history = []
    try:
        for t in range(1, steps + 1):
            target = (schedule_sparsity(t, steps, cfg.sparsity, cfg.initial_sparsity, cfg.schedule_kind)
                      if cfg.schedule == "iterative" else cfg.sparsity)
            _prune_step(model, layers, cfg, target, ctx.calib_batches)
            achieved = _achieved(layers)
            log.info("pruning step %d/%d: target %.4f, achieved %.4f", t, steps, target, achieved)
            if cfg.finetune_epochs:
                ctx.fine_tune(model, cfg.finetune_epochs)
            history.append({"step": t, "target": target, "achieved": achieved})
    finally:
        for _, m in layers:
            if tprune.is_pruned(m):
                tprune.remove(m, "weight")
    info = _report(layers)
    if cfg.criterion == "wanda":
        info.update(wanda_inputs=cfg.wanda_inputs)
    info.update(criterion=cfg.criterion, pattern=cfg.pattern, target_sparsity=cfg.sparsity, schedule=cfg.schedule,
                pruned_layers=len(layers), finetune_epochs=cfg.finetune_epochs)
    if cfg.pattern == "nm":
        info.update(n=cfg.n, m=cfg.m, nm_layout=cfg.nm_layout, skipped_layers=skipped)
    else:
        info.update(scope=cfg.resolved_scope, count=cfg.count)
    if cfg.schedule == "iterative":
        info.update(schedule_kind=cfg.schedule_kind, steps=steps, history=history)
    log.info("%s pruning (%s): sparsity %.4f on %d layers", cfg.criterion,
             f"{cfg.n}:{cfg.m}" if cfg.pattern == "nm" else f"unstructured per {cfg.resolved_scope}", info["sparsity"],
             len(layers))
    return info


def _achieved(layers) -> float:
    zeros = sum(int((effective_weight(m) == 0).sum()) for _, m in layers)
    return zeros / max(sum(m.weight_orig.numel() if hasattr(m, "weight_orig") else m.weight.numel()
                           for _, m in layers), 1)


__all__ = ["layer_sparsity", "effective_weight", "input_feature_norms", "wanda_scores", "prune_count",
           "unstructured_mask", "nm_mask",
           "nm_group_size", "block_of", "wanda_groups",
           "schedule_sparsity", "magnitude_prune", "prune_model", "PruneConfig"]


# --------------------------------------------------------------------------------------------- the compressor


@dataclass
class PruneConfig(CompressConfig):
    """Weight pruning of Conv2d and Linear layers through ``torch.nn.utils.prune``.

    criterion: ``magnitude`` scores |W_ij|; ``wanda`` scores |W_ij| · ‖X_j‖₂, the L2 norm of input
    feature j over every calibration token (Linear) or every unfold position (Conv2d, where the
    feature of weight column (c, kh, kw) is that element of the input patch). ``wanda_inputs``
    says on which model the norms are measured: ``dense`` (default) all from the dense model — Wanda's
    image-classifier code (``prune_vit``: each block's hooks fire while the block is still dense and its
    dense output feeds the next block), the reference for CrAFT's ViTs; ``block`` block by block, each
    block's inputs on the model with every earlier block pruned and the block itself dense (locuslab/wanda
    ``prune_wanda``, its LLM code); ``layer`` layer by layer, every earlier layer pruned.

    scope (unstructured only): which weights compete. ``layer``: all weights of a layer;
    ``row``: the weights of one output row (output channel), each row pruned to ``sparsity``;
    ``auto`` (default): ``row`` for wanda (Wanda's own choice), ``layer`` for magnitude.

    pattern: ``unstructured`` prunes int(sparsity · group size) weights per group (layer or row) —
    ``count=truncate`` (default), as Wanda's and distiller's code; ``count=round`` rounds instead.
    ``nm`` (N:M): in every group of M consecutive weights along the input dimension, the N with the
    lowest scores are zeroed (N pruned of M, sparsity N/M, as Wanda's code reads "2:4"; NVIDIA
    counts N kept of M instead — the two agree at 50 %, which covers the papers' 2:4, 16:32 and
    32:64). The input dimension of a Conv2d is its weight flattened over
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
    # Wanda: where each layer's input norms are measured. dense = every norm from the dense model in one
    # pass (Wanda's image_classifiers code, the reference); block = block by block on the model as
    # pruned so far (locuslab/wanda prune_wanda, its LLM code); layer = layer by layer likewise.
    wanda_inputs: str = "dense"
    # Unstructured: weights pruned per group, int(s·size) (truncate, the reference codes') or round(s·size).
    count: str = "truncate"
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
        _check_choice("compress.wanda_inputs", self.wanda_inputs, ("dense", "block", "layer"))
        _check_choice("compress.count", self.count, ("truncate", "round"))
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


def prune_label(c: dict) -> str:
    shape = f"{c['n']}:{c['m']}" if c.get("pattern") == "nm" else f"{100 * c['sparsity']:.0f}%"
    kind = "iterative " if c.get("schedule") == "iterative" else ""
    return f"{kind}{c.get('criterion', 'magnitude')} {shape}"


def check_prune(model: nn.Module, cfg: PruneConfig) -> None:
    """N:M groups must fit every layer (checked before training)."""
    if cfg.pattern == "nm":
        _nm_prunable(target_layers(model, cfg.skip_first_last), cfg)


register_compressor("prune", PruneConfig, label=prune_label, check=check_prune, caps=Capabilities(sparse=True))(
    prune_model)
