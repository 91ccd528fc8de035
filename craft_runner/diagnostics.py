"""Every diagnostic of a run behind one call, :func:`run_diagnostics`, plus the two weight/activation ones.

- λmax (power iteration or Lanczos) and the Hutchinson trace of the Hessian: :mod:`craft_runner.sharpness`.
- Weight spectrum (CrAFT Figure 1), :func:`weight_spectrum`. Each ``nn.Linear`` / ``nn.Conv*`` weight is
  the matrix W of shape (out, in·kh·kw): one row (sample) per output unit, one column (feature) per input
  weight, as PCA of the weight matrix in the paper. The columns are centred (W − mean over rows), the
  singular values s₁ ≥ s₂ ≥ … of the centred matrix taken, and the share of variance of the top k
  components is Σ_{i≤k} s_i² / Σ_i s_i² (sklearn's ``PCA(...).explained_variance_ratio_`` summed).
  k ≥ 1 is a count (CrAFT: 200 of 768), 0 < k < 1 a fraction of each matrix's min(out, in·kh·kw)
  components (rounded up). Layers are grouped by kind — ``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
  ``mlp.fc2`` (``mlp_tokens.fc1``, … in a Mixer), ``conv3x3``, ``conv1x1``, ``conv.dw`` (depthwise),
  ``patch_embed``, ``head``, ``linear`` — and the shares averaged per kind.
- Activation ranges (CrAFT Figure 2), :func:`activation_ranges`: the per-channel min and max of each
  block's input over the calibration batches, model in eval mode. Blocks: ``blocks.i`` of a ViT / Mixer /
  MobileNet, every residual block ``layerN.j`` of a ResNet, ``stages.i.blocks.j`` of timm's staged nets
  (else the model's top-level children). Channel: the last dim of a (B, N, C) token tensor, dim 1 of a
  (B, C, H, W) feature map or a (B, C) vector. Summaries per block: ``absmax`` (largest |value|),
  ``median_absmax`` (median over channels of each channel's max |value|) and ``outlier_ratio`` (their
  quotient: ≫ 1 when a few channels carry outliers, the paper's "activation outlier problem").

The result of :func:`run_diagnostics` is JSON-serialisable; its ``"scalars"`` entry is a flat
``{name: number}`` dict for W&B, the rest the detail for ``results.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.calibration import forward_with_hooks
from craft_runner.device import full_fp32
from craft_runner.runtime import release_freed_memory
from craft_runner.schema import SharpnessConfig
from craft_runner.sharpness import Batch, hutchinson_trace, lanczos, power_iteration

log = logging.getLogger(__name__)

__all__ = ["run_diagnostics", "weight_spectrum", "activation_ranges", "block_modules", "layer_kind",
           "explained_variance", "plot_spectrum", "plot_activation_ranges"]


# --------------------------------------------------------------------------------------------- spectrum


def _classifier(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_classifier", None)
    try:
        return get() if callable(get) else None
    except Exception:  # a model whose get_classifier needs arguments or fails
        return None


def layer_kind(name: str, module: nn.Module, classifier: Optional[nn.Module] = None) -> str:
    """The kind of a Linear/Conv layer, from its type and the last parts of its name."""
    parts = name.split(".")
    leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if classifier is not None and module is classifier:
        return "head"
    if isinstance(module, nn.Linear):
        if leaf == "qkv" or (leaf in ("q", "k", "v", "proj") and "attn" in parent):
            return f"attn.{leaf}"
        if leaf in ("fc1", "fc2") and parent:
            return f"{parent}.{leaf}"
        if leaf in ("head", "fc", "classifier") and len(parts) <= 2:
            return "head"
        return "linear"
    if "patch_embed" in name or (parent == "stem" and leaf == "proj"):
        return "patch_embed"
    if module.groups > 1 and module.groups == module.in_channels:
        return "conv.dw"
    return "conv" + "x".join(str(k) for k in module.kernel_size)


def explained_variance(weight: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance share of the principal components of ``weight`` as (out, rest).

    Entry i is the share of the first i+1 components; length min(out, rest). All ones for a zero matrix.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    w = w - w.mean(dim=0, keepdim=True)
    var = torch.linalg.svdvals(w) ** 2
    total = var.sum()
    # no host branch on the total: the result stays on w's device without a sync
    return torch.where(total > 0, torch.cumsum(var, 0) / total, torch.ones_like(var))


def _components(k: float, n: int) -> int:
    return max(1, min(n, int(k) if k >= 1 else math.ceil(k * n)))


def weight_spectrum(model: nn.Module, k: float = 0.25) -> dict:
    """Top-k explained-variance share of every Linear/Conv weight, per layer and averaged per kind."""
    classifier = _classifier(model)
    layers, curves = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or m.weight.dim() < 2:
            continue
        if min(m.weight.shape[0], m.weight[0].numel()) < 2:
            continue  # a single row or column has no spectrum to speak of
        cum = explained_variance(m.weight)
        kk = _components(k, len(cum))
        kind = layer_kind(name, m, classifier)
        layers[name] = {"kind": kind, "shape": [m.weight.shape[0], m.weight[0].numel()],
                        "n_components": len(cum), "k": kk, "share": float(cum[kk - 1])}
        curves.setdefault(kind, []).append(cum)
    by_kind = {}
    for kind in sorted(curves):
        shares = [v["share"] for v in layers.values() if v["kind"] == kind]
        by_kind[kind] = {"share": sum(shares) / len(shares), "layers": len(shares),
                         "n_components": max(len(c) for c in curves[kind])}
    return {"k": k, "by_kind": by_kind, "layers": layers,
            "curves": {kind: _mean_curve(cs).tolist() for kind, cs in curves.items()}}


def _mean_curve(curves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cumulative share per number of components; a layer with n components counts as 1 beyond n."""
    n = max(len(c) for c in curves)
    padded = [torch.cat([c, torch.ones(n - len(c), dtype=c.dtype, device=c.device)]) for c in curves]
    return torch.stack(padded).mean(0)


# --------------------------------------------------------------------------------------------- ranges


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks whose inputs :func:`activation_ranges` records (see the module docstring)."""
    def children(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{prefix}.{n}", m) for n, m in seq.named_children()]

    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return children("blocks", blocks)
    layers = [(n, m) for n, m in model.named_children()
              if n.startswith("layer") and n[5:].isdigit() and isinstance(m, nn.Sequential)]
    if layers:
        return [b for n, m in sorted(layers, key=lambda t: int(t[0][5:])) for b in children(n, m)]
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)):
        out = []
        for sn, stage in stages.named_children():
            inner = getattr(stage, "blocks", None)
            if isinstance(inner, (nn.Sequential, nn.ModuleList)):
                out += children(f"stages.{sn}.blocks", inner)
            else:
                out.append((f"stages.{sn}", stage))
        return out
    return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]


def _channel_dim(x: torch.Tensor) -> int:
    return x.dim() - 1 if x.dim() == 3 else 1


@torch.no_grad()
def activation_ranges(model: nn.Module, batches: Sequence[Batch],
                      blocks: Optional[Sequence[tuple[str, nn.Module]]] = None) -> dict:
    """Per-channel min/max of each block's input over ``batches`` (eval mode; the mode is restored)."""
    blocks = list(blocks) if blocks is not None else block_modules(model)
    stats: dict[str, list] = {}

    def hook(name):
        def fn(_module, args):
            if not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach()
            cd = _channel_dim(x)
            flat = x.float().movedim(cd, -1).reshape(-1, x.shape[cd])
            lo, hi = torch.aminmax(flat, dim=0)
            if name in stats:
                stats[name][1] = torch.minimum(stats[name][1], lo)
                stats[name][2] = torch.maximum(stats[name][2], hi)
            else:
                stats[name] = [cd, lo, hi]
        return fn

    forward_with_hooks(model, batches, pre_hooks=[(m, hook(n)) for n, m in blocks])
    out = {}
    for name, _ in blocks:
        if name not in stats:
            continue
        cd, lo, hi = stats[name]
        absmax = torch.maximum(lo.abs(), hi.abs())
        med = float(absmax.median())
        out[name] = {"channel_dim": cd, "channels": len(lo), "min": lo.cpu().tolist(), "max": hi.cpu().tolist(),
                     "absmax": float(absmax.max()), "median_absmax": med,
                     "outlier_ratio": float(absmax.max()) / med if med > 0 else None,
                     "top_channels": absmax.topk(min(5, len(absmax))).indices.cpu().tolist()}
    return {"blocks": out}


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(spectrum: dict, path: Path, title: str = "") -> Path:
    """Mean cumulative explained variance vs number of components, one line per kind (CrAFT Fig. 1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, curve in sorted(spectrum["curves"].items()):
        ax.plot(range(1, len(curve) + 1), curve, label=f"{kind} ({spectrum['by_kind'][kind]['share']:.2f})")
    k = spectrum["k"]
    if k >= 1:
        ax.axvline(k, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("principal components")
    ax.set_ylabel("explained variance (cumulative share)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"weight spectrum (top-k share, k={k:g})")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_activation_ranges(ranges: dict, path: Path, title: str = "", max_blocks: int = 12) -> Path:
    """Per-channel [min, max] of each block's input, one panel per block (CrAFT Fig. 2)."""
    plt = _pyplot()
    names = list(ranges["blocks"])
    if len(names) > max_blocks:  # evenly spaced blocks, first and last included
        idx = sorted({round(i * (len(names) - 1) / (max_blocks - 1)) for i in range(max_blocks)})
        names = [names[i] for i in idx]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = ranges["blocks"][name]
        ch = range(r["channels"])
        ax.vlines(ch, r["min"], r["max"], lw=0.8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{name} (x{r['outlier_ratio']:.1f})" if r["outlier_ratio"] else name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title or "block input ranges per channel", fontsize=9)
    fig.supxlabel("channel", fontsize=8)
    return _save(plt, fig, path)


# --------------------------------------------------------------------------------------------- entry


@full_fp32()
def run_diagnostics(model: nn.Module, batches: Sequence[Batch], cfg: SharpnessConfig,
                    out_dir: Optional[Path] = None, *, tag: str = "", loss_fn: Optional[Callable] = None) -> dict:
    """Every diagnostic switched on in ``cfg``; returns a JSON-serialisable dict.

    Keys (present when switched on): ``lambda_max`` (value = the largest eigenvalue, iterations, converged,
    method, rel_residual, rel_change, seconds, and lambda_min with lambda_min_converged and
    lambda_min_residual: λmin is null unless its own residual met the tolerance; see
    :class:`craft_runner.sharpness.EigResult`),
    ``trace`` (value, stderr, probes, seconds),
    ``spectrum`` (see :func:`weight_spectrum`), ``act_ranges`` (see :func:`activation_ranges`), ``plots``
    (PNG paths, when ``cfg.plots`` and ``out_dir``; the file names end in ``-{tag}``), and always
    ``scalars``: a flat dict of numbers for a tracker. ``loss_fn`` defaults to mean cross-entropy.
    Everything is measured in full float32 (TF32 off, :func:`craft_runner.device.full_fp32`).
    """
    loss_fn = loss_fn or F.cross_entropy
    out: dict = {}
    scalars: dict[str, float] = {}
    if cfg.lambda_max:
        t0 = time.perf_counter()
        fn = power_iteration if cfg.method == "power" else lanczos
        res = fn(model, loss_fn, batches, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed,
                 reuse_graph=cfg.reuse_graph)
        d = {**res.to_dict(), "seconds": time.perf_counter() - t0}
        release_freed_memory()  # the Hessian's graphs are gone: their pages back to the kernel
        out["lambda_max"] = d
        scalars.update(lambda_max=d["value"], lambda_max_iterations=d["iterations"],
                       lambda_max_rel_change=d["rel_change"])
        if d["lambda_min"] is not None:  # certified by its own residual only
            scalars["lambda_min"] = d["lambda_min"]
        elif d["lambda_min_residual"] is not None:
            log.info("λmin (%s) not recorded: its residual %.2g is above tol=%g", cfg.method,
                     d["lambda_min_residual"], cfg.tol)
        if not res.converged:
            log.warning("λmax (%s) did not reach tol=%g in %d Hessian-vector products (residual %.2g)",
                        cfg.method, cfg.tol, res.iterations, res.rel_residual)
    if cfg.trace:
        t0 = time.perf_counter()
        tr = hutchinson_trace(model, loss_fn, batches, probes=cfg.trace_probes, seed=cfg.seed,
                              reuse_graph=cfg.reuse_graph)
        out["trace"] = {**tr.to_dict(), "seconds": time.perf_counter() - t0}
        scalars.update(hessian_trace=tr.value, hessian_trace_stderr=tr.stderr)
    if cfg.spectrum:
        t0 = time.perf_counter()
        sp = weight_spectrum(model, cfg.spectrum_k)
        out["spectrum"] = {**sp, "seconds": time.perf_counter() - t0}
        scalars.update({f"spectrum_share/{kind}": v["share"] for kind, v in sp["by_kind"].items()})
    if cfg.act_ranges:
        t0 = time.perf_counter()
        ar = activation_ranges(model, batches)
        out["act_ranges"] = {**ar, "seconds": time.perf_counter() - t0}
        for name, r in ar["blocks"].items():
            scalars[f"act_absmax/{name}"] = r["absmax"]
            if r["outlier_ratio"] is not None:
                scalars[f"act_outlier_ratio/{name}"] = r["outlier_ratio"]
    if cfg.plots and out_dir is not None:
        suffix = f"-{tag}" if tag else ""
        plots = {}
        if "spectrum" in out:
            plots["spectrum"] = str(plot_spectrum(out["spectrum"], Path(out_dir) / f"spectrum{suffix}.png",
                                                  title=f"weight spectrum {tag}".strip()))
        if "act_ranges" in out and out["act_ranges"]["blocks"]:
            plots["act_ranges"] = str(plot_activation_ranges(
                out["act_ranges"], Path(out_dir) / f"act_ranges{suffix}.png",
                title=f"block input ranges per channel {tag}".strip()))
        if plots:
            out["plots"] = plots
    out["scalars"] = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
    return _finite(out)


def _finite(obj):
    """NaN and ±inf (e.g. the relative change after a single iteration) become None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
