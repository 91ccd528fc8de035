"""Loss-curvature diagnostics: Hessian-vector products and the top Hessian eigenvalue (λmax).

Usable without Hydra: every function takes a model, a mean-reduced ``loss_fn`` and a list of
``(inputs, targets)`` batches. The Hessian is that of the mean loss over all the batches, with
respect to every trainable parameter, with the model in eval mode (BatchNorm uses running stats).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@contextlib.contextmanager
def measuring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, and fused attention off (it has no double backward); both restored afterwards."""
    was_training = model.training
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    model.eval()
    for m, _ in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        model.train(was_training)


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class HessianOperator:
    """v ↦ H v for the mean loss over ``batches``.

    With ``reuse_graph`` the first-order gradient graph of every batch is built once and
    differentiated again for each product (fast; memory grows with the number of samples).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch],
                 reuse_graph: bool = True):
        self.model, self.loss_fn, self.batches = model, loss_fn, list(batches)
        self.params = trainable_params(model)
        self.n_total = sum(len(y) for _, y in self.batches)
        self.reuse_graph = reuse_graph
        self._grads: list[tuple[torch.Tensor, ...]] | None = None
        if reuse_graph:
            self._grads = [self._batch_grad(b) for b in self.batches]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def _batch_grad(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        x, y = batch
        weight = len(y) / self.n_total
        loss = self.loss_fn(self.model(x), y) * weight
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for i, batch in enumerate(self.batches):
            grads = self._grads[i] if self._grads is not None else self._batch_grad(batch)
            dot = sum((g * vi).sum() for g, vi in zip(grads, v))
            hv = torch.autograd.grad(dot, self.params, retain_graph=self.reuse_graph, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach())
        return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(v, v)).clamp_min(1e-12)
    return [x / norm for x in v]


@dataclass
class EigResult:
    value: float
    iterations: int
    rel_change: float  # |λ_k − λ_{k−1}| / |λ_k| at the last iteration
    converged: bool


def power_iteration(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], max_iter: int = 100,
                    tol: float = 1e-3, seed: int = 0, reuse_graph: bool = True) -> EigResult:
    """Dominant Hessian eigenvalue by power iteration on Hessian-vector products."""
    with measuring_mode(model):
        op = HessianOperator(model, loss_fn, batches, reuse_graph=reuse_graph)
        g = torch.Generator().manual_seed(seed)
        v = _normalize([torch.randn(p.shape, generator=g).to(p) for p in op.params])
        eig, rel, it = 0.0, float("inf"), 0
        for it in range(1, max_iter + 1):
            hv = op.matvec(v)
            new = float(_dot(v, hv))
            rel = abs(new - eig) / max(abs(new), 1e-12)
            eig = new
            v = _normalize(hv)
            if it > 1 and rel < tol:
                break
    res = EigResult(eig, it, rel, rel < tol)
    log.debug("power iteration: λmax=%.4g after %d iterations (rel. change %.2g)", eig, it, rel)
    return res


def top_eigenvalue(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], max_iter: int = 100,
                   tol: float = 1e-3) -> float:
    """λmax: the top eigenvalue of the Hessian of the mean loss over ``batches``."""
    return power_iteration(model, loss_fn, batches, max_iter=max_iter, tol=tol).value
