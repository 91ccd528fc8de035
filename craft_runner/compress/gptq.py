"""GPTQ (Frantar et al., ICLR 2023) as its reference code (IST-DASLab/gptq ``gptq.py``, ``quant.py``) quantizes
a layer, on the shared OBS core (:mod:`craft_runner.compress.obs`).

Grid (the reference's ``Quantizer(perchannel=True, sym=False)``): per output row, or per ``group_size`` input
columns of a row, the asymmetric min-max grid over [min(w, 0), max(w, 0)]: scale = (max − min)/(2^b − 1), zero
point round(−min/scale), q = clamp(round(w/scale) + zero, 0, 2^b − 1), ŵ = scale·(q − zero). A group's grid is
taken when the sweep reaches its first column, from the weights as updated up to the current block of 128
columns (the reference reads ``W``, not the block's working copy). ``act_order`` (an option there, off by
default) processes the columns by decreasing H_jj. ``sym`` (an option there too) is the symmetric grid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from craft_runner.compress.obs import (
    compress_in_blocks,
    gather_columns,
    inverse_hessian,
    obs_sweep,
    permute_hessian,
    set_weight,
    weight_matrix,
)
from craft_runner.compress.prune import wanda_groups
from craft_runner.compress.quant import PTQConfig, base_ptq
from craft_runner.compress.quantizers import FULL_PRECISION_BITS
from craft_runner.compress.registry import Capabilities, CompressConfig, parse_bits, register_compressor
from craft_runner.compress.search import SearchProgress
from craft_runner.compress.smooth import check_smooth, check_smooth_alpha, smooth_model
from craft_runner.schema import _check, _check_choice

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the grid


def minmax_grid(x: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) over the last dim of ``x``, shaped like ``x`` without it."""
    maxq = 2 ** bits - 1
    zero_t = torch.zeros((), dtype=x.dtype, device=x.device)
    lo = torch.minimum(x.amin(-1), zero_t)
    hi = torch.maximum(x.amax(-1), zero_t)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


# --------------------------------------------------------------------------- one layer


def gptq_matrix(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = 0, sym: bool = False,
                act_order: bool = False, damp: float = 0.01, block_size: int = 128) -> dict:
    """GPTQ of W (G, R, C) with Hessians H (G, C, C). Returns {"Q": quantized weights (G, R, C), "scale",
    "zero": (G, R, groups) per group of ``group_size`` columns (groups = 1: per row), "loss": (G, R)}.
    With ``act_order`` the groups follow the processing order (not contiguous columns)."""
    W, H = W.clone(), H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1
    W.masked_fill_(dead.unsqueeze(1), 0)
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)
        W, H = gather_columns(W, perm), permute_hessian(H, perm)
    U, _ = inverse_hessian(H, damp)
    C = W.shape[-1]
    n_groups = -(-C // group_size) if group_size else 1
    scales = torch.zeros(*W.shape[:2], n_groups, dtype=W.dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    if not group_size:
        s, z = minmax_grid(W, bits, sym)
        scales[..., 0], zeros[..., 0] = s, z
    cur = {}

    def column(i, j, w, W1, U1, Wfull, state):
        if group_size and i % group_size == 0:
            s, z = minmax_grid(Wfull[..., i:i + group_size], bits, sym)
            scales[..., i // group_size], zeros[..., i // group_size] = s, z
            cur["g"] = i // group_size
        g = cur.get("g", 0)
        return to_grid(w, scales[..., g], zeros[..., g], bits)

    Q, loss = obs_sweep(W, U, block_size, column)
    if perm is not None:
        Q = gather_columns(Q, torch.argsort(perm, dim=-1))
    return {"Q": Q, "scale": scales, "zero": zeros, "loss": loss, "perm": perm}


# --------------------------------------------------------------------------------------------- the compressor


@dataclass
class GPTQConfig(CompressConfig):
    """GPTQ: weights 2-8 bits, one asymmetric min-max grid per output channel (``group_size`` 0) or per group of
    ``group_size`` input columns; each layer's Hessian 2XXᵀ/n from its inputs on the model quantized so far,
    block by block (``sequential=block``: the reference's order, every layer of a transformer block / residual
    block from one pass; ``layer``: one pass per layer, the reference's --true-sequential taken to the end).
    The defaults are the reference's: 128 calibration images (its nsamples), damp 0.01 × mean diag H, blocks of
    128 columns, act_order off, asymmetric. Stem and classifier are quantized and the stem's image input stays
    float, as the runner's BasePTQ does. Weight-only by default; with a_bits < 16 every layer's input (and the
    attention matmuls) then gets BasePTQ's searched quantizer on the GPTQ-quantized model.
    """

    name: str = "gptq"
    bits: Optional[str] = None
    w_bits: int = 4
    a_bits: int = 16
    calib_size: int = 128
    group_size: int = 0
    act_order: bool = False
    sym: bool = False
    damp: float = 0.01
    block_size: int = 128
    sequential: str = "block"
    smooth_alpha: Optional[float] = None
    # With a_bits < 16: the BasePTQ input-scale search's candidates and rounds (null: BasePTQ's 1 round), so a
    # table that coarsens BasePTQ's search coarsens GPTQ's activations alike.
    scale_steps: int = 100
    search_rounds: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)
        _check(2 <= self.w_bits <= 8, "compress.w_bits", self.w_bits, "an integer in 2..8 for GPTQ")
        _check(self.group_size == 0 or self.group_size >= 2, "compress.group_size", self.group_size,
               "0 (one grid per output channel) or an integer >= 2")
        _check(self.damp > 0, "compress.damp", self.damp, "a positive number (a share of mean diag H)")
        _check(self.block_size >= 1, "compress.block_size", self.block_size, "an integer >= 1")
        _check_choice("compress.sequential", self.sequential, ("block", "layer"))
        check_smooth_alpha(self.smooth_alpha)


def gptq_label(c: dict) -> str:
    g = f" g{c['group_size']}" if c.get("group_size") else ""
    order = " act-order" if c.get("act_order") else ""
    sym = " sym" if c.get("sym") else ""
    sq = f" +SQ{c['smooth_alpha']:g}" if c.get("smooth_alpha") is not None else ""
    return f"GPTQ W{c['w_bits']}A{c['a_bits']}{g}{order}{sym}{sq}"


def gptq_no_kernel(cfg) -> Optional[str]:
    if cfg.act_order and cfg.group_size:
        return "GPTQ's act-order groups are not contiguous input columns: no blocked kernel takes them"
    return None


def layer_groups(model: nn.Module, layers: list, sequential: str) -> list:
    return wanda_groups(model, layers, "block" if sequential == "block" else "layer")


@register_compressor("gptq", GPTQConfig, label=gptq_label, check=check_smooth,
                     caps=Capabilities(quantizes=True, injects_scales=True, tag="GPTQ", no_kernel=gptq_no_kernel))
def gptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: GPTQConfig, ctx) -> dict:
    """SmoothQuant (``smooth_alpha``), then GPTQ on every layer, then (a_bits < 16) BasePTQ's input quantizers.
    Each quantized module keeps its grid (``gptq_scale``, ``gptq_zero``: (out, groups) buffers) for the export."""
    smoothed = smooth_model(model, cfg.smooth_alpha, ctx.calib_batches) if cfg.smooth_alpha is not None else {}
    bar = SearchProgress(len(layers), "GPTQ", ctx.progress)
    losses, seconds = {}, {}

    def quantize(name, m, H):
        t0 = time.perf_counter()
        out = gptq_matrix(weight_matrix(m), H, cfg.w_bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.damp,
                          cfg.block_size)
        set_weight(m, out["Q"])
        g = out["scale"].shape[-1]
        m.register_buffer("gptq_scale", out["scale"].reshape(-1, g).to(m.weight.dtype), persistent=False)
        m.register_buffer("gptq_zero", out["zero"].reshape(-1, g).to(m.weight.dtype), persistent=False)
        losses[name] = float(out["loss"].sum())
        seconds[name] = time.perf_counter() - t0
        bar.step(name)

    try:
        compress_in_blocks(model, layer_groups(model, layers, cfg.sequential), ctx.calib_batches, quantize)
    finally:
        bar.close()
    info = {"method": "gptq", "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "group_size": cfg.group_size,
            "act_order": cfg.act_order, "sym": cfg.sym, "damp": cfg.damp, "block_size": cfg.block_size,
            "sequential": cfg.sequential, "quantized_weights": len(losses), "obs_loss": losses,
            "seconds_per_layer": sum(seconds.values()) / max(len(seconds), 1),
            "calib_images": sum(len(x) for x, _ in ctx.calib_batches), **smoothed}
    if cfg.a_bits < FULL_PRECISION_BITS:
        act = PTQConfig(w_bits=FULL_PRECISION_BITS, a_bits=cfg.a_bits, calib_size=cfg.calib_size,
                        scale_steps=cfg.scale_steps, search_rounds=cfg.search_rounds)
        act_info, _ = base_ptq(model, layers, act, ctx.calib_batches, ctx.progress)
        info.update(quantized_inputs=act_info["quantized_inputs"], quantized_matmuls=act_info["quantized_matmuls"],
                    activations="BasePTQ (cosine search)")
    log.info("GPTQ W%dA%d%s: %d layers, %.3f s per layer", cfg.w_bits, cfg.a_bits,
             f" g{cfg.group_size}" if cfg.group_size else "", len(losses), info["seconds_per_layer"])
    return info
