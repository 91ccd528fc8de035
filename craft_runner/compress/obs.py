"""The Optimal-Brain-Surgeon core that GPTQ and SparseGPT share (Frantar & Alistarh; IST-DASLab/gptq ``gptq.py``,
IST-DASLab/sparsegpt ``sparsegpt.py``).

Per layer, with X the layer's inputs (a Linear's tokens, a Conv2d's unfolded patches) on the calibration data:

- H = 2·XXᵀ/n, accumulated batch by batch (n: the rows of X seen so far);
- columns whose diagonal entry is 0 (an input that is always zero: "dead") get H_jj = 1 and weight 0;
  then H += damp·mean(diag H)·I, and the upper Cholesky factor U of H⁻¹ is taken (H⁻¹ = UᵀU): row q of U
  is H⁻¹[q, q:] / sqrt(H⁻¹[q, q]) of the inverse Hessian with the columns before q removed, which is what the
  OBS update needs;
- columns are processed in order, each one rounded or pruned to q, its error e = (w − q)/U_qq pushed onto the
  columns after it in the block (W[:, q:] −= e·U[q, q:]), and onto the later blocks once per block of
  ``block_size`` columns (the "lazy batch" update).

A Conv2d with ``groups`` > 1 has one Hessian per group (its input channels); everything here is batched over a
leading group dimension G: weights (G, rows, columns), Hessians (G, columns, columns).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.calibration import forward_with_hooks

log = logging.getLogger(__name__)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (groups, out/groups, in/groups·kh·kw), float32 (a copy)."""
    w = module.weight.detach()
    g = module.groups if isinstance(module, nn.Conv2d) else 1
    return w.reshape(g, w.shape[0] // g, -1).float().clone()


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))


class HessianAccumulator:
    """H = 2·XXᵀ/n of one layer's inputs, updated batch by batch (a running mean, as the references keep it)."""

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(f"the OBS Hessian unfolds with zero padding; got padding_mode={module.padding_mode!r}")
        self.module = module
        g = module.groups if isinstance(module, nn.Conv2d) else 1
        cols = module.weight[0].numel()
        self.H = torch.zeros(g, cols, cols, device=module.weight.device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        m = self.module
        x = x.detach().float()
        if isinstance(m, nn.Conv2d):
            u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            g = m.groups
            # (B, G·cols, L) → (G, cols, B·L): one column per output position
            X = u.reshape(u.shape[0], g, -1, u.shape[-1]).permute(1, 2, 0, 3).flatten(2)
        else:
            X = x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
        new = X.shape[-1]
        self.H *= self.n / (self.n + new)
        self.n += new
        X = math.sqrt(2 / self.n) * X
        self.H += X @ X.transpose(1, 2)


def inverse_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ with dead columns' H_jj set to 1;
    dead (G, columns) marks the columns whose input was always zero."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1
    diag += damp * diag.mean(-1, keepdim=True)
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses it
        raise ValueError(f"the layer's Hessian is not positive definite after damping ({e}); raise compress.damp"
                         ) from None


def gather_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t[g][..., perm[g]] for (G, R, C) t and (G, C) perm."""
    return t.gather(-1, perm[:, None, :].expand_as(t))


def permute_hessian(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    rows = H.gather(1, perm[:, :, None].expand_as(H))
    return rows.gather(2, perm[:, None, :].expand_as(H))


# column(i, j, w, W1, U1, W, state) → the processed column q (G, R): i the column's index, j its index in the block
Column = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def obs_sweep(W: torch.Tensor, U: torch.Tensor, block_size: int, column: Column,
              block: Optional[Callable[[torch.Tensor, torch.Tensor, int], object]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Process the columns of ``W`` (G, R, C; updated in place) in order with the OBS update; ``column`` gives
    each column's rounded / pruned value, ``block(W1, U1, i1)`` (optional) a state at the start of each block
    (SparseGPT's mask). Returns (Q, loss) with loss (G, R) = Σ_q (w_q − q)² / (2·U_qq²), the OBS error estimate."""
    G, R, C = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros(G, R, dtype=W.dtype, device=W.device)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[..., i1:i2].clone()
        U1 = U[:, i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        state = block(W1, U1, i1) if block is not None else None
        for j in range(i2 - i1):
            w = W1[..., j]
            d = U1[:, j, j].unsqueeze(1)
            q = column(i1 + j, j, w, W1, U1, W, state)
            Q[..., i1 + j] = q
            e = (w - q) / d
            loss += e.pow(2) / 2
            W1[..., j:] -= e.unsqueeze(2) * U1[:, j, j:].unsqueeze(1)
            err1[..., j] = e
        W[..., i2:] -= err1 @ U[:, i1:i2, i2:]
    return Q, loss


# --------------------------------------------------------------------------- calibration, block by block


def compress_in_blocks(model: nn.Module, groups: list[list[tuple[str, nn.Module]]], batches,
                       fn: Callable[[str, nn.Module, torch.Tensor], None]) -> None:
    """For each group of layers in order: one pass over ``batches`` on the model compressed so far, every
    layer's Hessian accumulated from its inputs, then ``fn(name, module, H)`` per layer (which changes it)."""
    if not batches:
        raise ValueError("the OBS compressors need calibration batches")
    for group in groups:
        acc = {m: HessianAccumulator(m) for _, m in group}

        def hook(mod, args, _out, acc=acc):
            acc[mod].add(args[0])

        forward_with_hooks(model, batches, forward_hooks=[(m, hook) for _, m in group])
        for name, m in group:
            if acc[m].n == 0:
                log.warning("%s is not used in the forward pass: no Hessian, left as it is", name)
                continue
            fn(name, m, acc.pop(m).H)
