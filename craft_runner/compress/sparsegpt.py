"""SparseGPT (Frantar & Alistarh, ICML 2023) as its reference code (IST-DASLab/sparsegpt ``sparsegpt.py``) prunes
a layer, on the shared OBS core (:mod:`craft_runner.compress.obs`).

Which weights go is chosen per block of ``block_size`` columns by the OBS saliency w²/[H⁻¹]_qq² (U_qq² with U the
Cholesky factor, as the reference computes it): unstructured, the weights of the block at or below the
int(numel·sparsity)-th smallest saliency of the block (all rows together; ties at the threshold are pruned too,
as the reference's ``<=``); N:M, in every m consecutive columns (from the block's working copy, as the sweep
reaches them) the n of each row with the smallest saliency — n pruned of m, the runner's ``nm`` reading and
the reference's prunen / prunem. Layers: the same as ``prune`` (stem and classifier dense; with N:M a layer whose
input size is not a multiple of m raises or, with ``nm_indivisible=skip``, stays dense).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from craft_runner.compress.obs import compress_in_blocks, inverse_hessian, obs_sweep, set_weight, weight_matrix
from craft_runner.compress.prune import _nm_prunable, _report, wanda_groups
from craft_runner.compress.registry import Capabilities, CompressConfig, register_compressor, target_layers
from craft_runner.compress.search import SearchProgress
from craft_runner.schema import _check, _check_choice

log = logging.getLogger(__name__)


def sparsegpt_matrix(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                     damp: float = 0.01, block_size: int = 128) -> dict:
    """SparseGPT of W (G, R, C) with Hessians H (G, C, C): unstructured to ``sparsity`` (n = 0) or n pruned of
    every m columns. Returns {"Q": pruned and updated weights, "loss": (G, R)}."""
    if n and block_size % m:
        raise ValueError(f"block size {block_size} is not a multiple of m={m}")
    W = W.clone()
    U, dead = inverse_hessian(H, damp)
    W.masked_fill_(dead.unsqueeze(1), 0)

    def block(W1, U1, i1):
        if n:
            return torch.zeros_like(W1, dtype=torch.bool)
        sal = W1.pow(2) / U1.diagonal(dim1=-2, dim2=-1).unsqueeze(1).pow(2)
        flat = sal.flatten(1)
        thresh = flat.sort(dim=1).values[:, int(flat.shape[1] * sparsity)]
        return sal <= thresh[:, None, None]

    def column(i, j, w, W1, U1, Wfull, mask):
        if n and j % m == 0:
            sal = W1[..., j:j + m].pow(2) / U1.diagonal(dim1=-2, dim2=-1)[:, j:j + m].unsqueeze(1).pow(2)
            mask.scatter_(2, j + torch.topk(sal, n, dim=2, largest=False).indices, True)
        return w.masked_fill(mask[..., j], 0)

    Q, loss = obs_sweep(W, U, block_size, column, block)
    return {"Q": Q, "loss": loss}


@dataclass
class SparseGPTConfig(CompressConfig):
    """SparseGPT: unstructured (``pattern=unstructured``, ``sparsity``) or N:M (``pattern=nm``: ``n`` pruned of
    every ``m`` consecutive input weights, read as the runner's ``nm``), each layer's Hessian from its inputs on
    the model pruned so far, block by block (``sequential`` as GPTQ's). The reference's defaults: 128 calibration
    images, damp 0.01, blocks of 128 columns; the stem and the classifier stay dense as with ``prune``."""

    name: str = "sparsegpt"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    nm_indivisible: str = "error"
    calib_size: int = 128
    damp: float = 0.01
    block_size: int = 128
    sequential: str = "block"
    skip_first_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_choice("compress.pattern", self.pattern, ("unstructured", "nm"))
        _check(0.0 <= self.sparsity < 1.0, "compress.sparsity", self.sparsity, "a value in [0, 1)")
        _check_choice("compress.nm_indivisible", self.nm_indivisible, ("error", "skip"))
        _check(self.damp > 0, "compress.damp", self.damp, "a positive number (a share of mean diag H)")
        _check(self.block_size >= 1, "compress.block_size", self.block_size, "an integer >= 1")
        _check_choice("compress.sequential", self.sequential, ("block", "layer"))
        if self.pattern == "nm":
            _check(self.m >= 2, "compress.m", self.m, "an integer >= 2")
            _check(1 <= self.n < self.m, "compress.n", self.n, f"an integer in 1..m-1 = 1..{self.m - 1}")
            _check(self.block_size % self.m == 0, "compress.block_size", self.block_size,
                   f"a multiple of compress.m={self.m} (N:M groups may not straddle two blocks)")
            self.sparsity = self.n / self.m


def sparsegpt_label(c: dict) -> str:
    shape = f"{c['n']}:{c['m']}" if c.get("pattern") == "nm" else f"{100 * c['sparsity']:.0f}%"
    return f"SparseGPT {shape}"


def check_sparsegpt(model: nn.Module, cfg: SparseGPTConfig) -> None:
    if cfg.pattern == "nm":
        _nm_prunable(target_layers(model, cfg.skip_first_last), cfg)


@register_compressor("sparsegpt", SparseGPTConfig, label=sparsegpt_label, check=check_sparsegpt,
                     caps=Capabilities(sparse=True, tag="SparseGPT"))
def sparsegpt(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: SparseGPTConfig, ctx) -> dict:
    skipped: list[str] = []
    if cfg.pattern == "nm":
        layers, skipped = _nm_prunable(layers, cfg)
    n, m = (cfg.n, cfg.m) if cfg.pattern == "nm" else (0, 0)
    bar = SearchProgress(len(layers), "SparseGPT", ctx.progress)
    losses, seconds = {}, {}

    def prune(name, mod, H):
        t0 = time.perf_counter()
        out = sparsegpt_matrix(weight_matrix(mod), H, cfg.sparsity, n, m, cfg.damp, cfg.block_size)
        set_weight(mod, out["Q"])
        losses[name] = float(out["loss"].sum())
        seconds[name] = time.perf_counter() - t0
        bar.step(name)

    groups = wanda_groups(model, layers, "block" if cfg.sequential == "block" else "layer")
    try:
        compress_in_blocks(model, groups, ctx.calib_batches, prune)
    finally:
        bar.close()
    info = {**_report(layers), "method": "sparsegpt", "pattern": cfg.pattern, "target_sparsity": cfg.sparsity,
            "pruned_layers": len(layers), "damp": cfg.damp, "block_size": cfg.block_size,
            "sequential": cfg.sequential, "obs_loss": losses,
            "seconds_per_layer": sum(seconds.values()) / max(len(seconds), 1),
            "calib_images": sum(len(x) for x, _ in ctx.calib_batches)}
    if cfg.pattern == "nm":
        info.update(n=cfg.n, m=cfg.m, skipped_layers=skipped)
    log.info("SparseGPT %s: sparsity %.4f on %d layers", f"{cfg.n}:{cfg.m}" if n else f"{cfg.sparsity:.0%}",
             info["sparsity"], len(layers))
    return info
