"""Random weight perturbation, RWP (Li et al., "Revisiting random weight perturbation for efficiently improving
generalization", TMLR 2024): the gradient mixes one at w and one at randomly perturbed weights.

g = (1 − α)·∇L(B₁; w) + α·∇L(B₂; w + ε), α = ``rwp_alpha`` (0.5). The noise is filter-wise as in the
reference code: for a weight of two or more dimensions each output filter w_f gets ε_f ~ N(0, (γ‖w_f‖)²)
elementwise, a one-dimensional parameter gets N(0, (γ(‖w‖ + 1e-16))²), γ = ``rwp_gamma`` (0.01). The
reference runs the two gradients in parallel on two GPUs, each on its own half of the global batch (its
losses are scaled by 2 because the all-reduce averages them); on one device the batch is split the same way,
B₁ its first half and B₂ its second (``splits_batch``), so a step costs two forward-backward passes of half a
batch each, about one full pass of compute. The BatchNorm running statistics come from the pass at w only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from craft_runner.optim.registry import HParams, OptimInfo, _finite_positive, register_optimizer
from craft_runner.optim.sam import SharpnessAware
from craft_runner.optim.wrapped import tensor_bytes
from craft_runner.schema import _check


def filter_noise(w: torch.Tensor, gamma: float, generator=None) -> torch.Tensor:
    """ε with ε_f ~ N(0, (γ‖w_f‖)²) per output filter (per tensor for one dimension)."""
    if w.ndim > 1:
        std = gamma * w.detach().flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1)))
    else:
        std = gamma * (w.detach().norm() + 1e-16)
    return torch.randn(w.shape, device=w.device, dtype=w.dtype, generator=generator) * std


class RWP(SharpnessAware):
    splits_batch = True  # the two passes see the two halves of the batch

    def __init__(self, params, base_optimizer, gamma: float = 0.01, alpha: float = 0.5, **base_kwargs):
        if not gamma > 0:
            raise ValueError(f"optimizer.rwp_gamma={gamma!r} is not allowed: expected a number > 0")
        if not 0 <= alpha <= 1:
            raise ValueError(f"optimizer.rwp_alpha={alpha!r} is not allowed: expected a value in [0, 1]")
        super().__init__(params, base_optimizer, rho=0.0, **base_kwargs)
        self.gamma, self.alpha = gamma, alpha
        self._g1: dict = {}

    @torch.no_grad()
    def _perturbation(self):
        return [(p, filter_noise(p, self.gamma)) for p in self._params_with_grad()]

    def _on_first_step(self) -> None:
        self._g1 = {p: p.grad.detach().clone() for p in self._params_with_grad()}

    @torch.no_grad()
    def _compose(self, second_pass: bool) -> None:
        if not second_pass:
            return
        for p, g1 in self._g1.items():
            if p.grad is None:
                p.grad = g1.mul_(1 - self.alpha)
            else:
                p.grad.mul_(self.alpha).add_(g1, alpha=1 - self.alpha)
        self._g1 = {}

    def extra_bytes(self) -> int:
        # while a step runs: the gradient at w and the saved weights (old_p), one copy each of the parameters
        return 2 * tensor_bytes(p for g in self.param_groups for p in g["params"])


@dataclass
class RWPParams(HParams):
    # filter-wise noise scale and the weight of the gradient at perturbed weights
    rwp_gamma: float = 0.01
    rwp_alpha: float = 0.5

    def check(self) -> None:
        _finite_positive("optimizer.rwp_gamma", self.rwp_gamma)
        _check(0 <= self.rwp_alpha <= 1, "optimizer.rwp_alpha", self.rwp_alpha, "a value in [0, 1]")


register_optimizer(OptimInfo("rwp", RWP, {"gamma": "rwp_gamma", "alpha": "rwp_alpha"}, sharpness_aware=True,
                             description="random weight perturbation (Li et al. 2024)", hparams=RWPParams))
