"""Optimizer factory: plain optimizers and the sharpness-aware family that wraps them.

The training loop never branches on a name. It asks two capability questions:

- :func:`is_two_pass`: does the optimizer follow the first_step / second_step protocol (the SAM family,
  also pytorch-optimizer's SAM-like classes)?
- :func:`needs_second_pass`: does *this* step need the gradient at perturbed weights? Always for SAM
  and ASAM, every k-th step for LookSAM, with probability p for randomised SAM. Optimizers that answer
  per step expose ``needs_second_pass_now()``; a two-pass optimizer without it always gets the pass.
"""

from __future__ import annotations

import torch

from craft_runner.optim.registry import OptimInfo, OptimizerConfig, get_optimizer, optimizers, register_optimizer
from craft_runner.optim.sam import SAM, LookSAM, RandomSAM, SharpnessAware, expected_cost

__all__ = ["build_optimizer", "param_groups", "needs_second_pass", "is_two_pass", "SharpnessAware", "SAM",
           "LookSAM", "RandomSAM", "expected_cost", "OptimInfo", "OptimizerConfig", "get_optimizer", "optimizers",
           "register_optimizer"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, normalisation and per-channel activation parameters (all ndim <= 1).

    Each group keeps its parameters' names (``param_names``, as torch.optim does): ASAM's T depends on them.
    """
    decay = {"params": [], "param_names": [], "weight_decay": weight_decay}
    no_decay = {"params": [], "param_names": [], "weight_decay": 0.0}
    for n, p in model.named_parameters():
        if p.requires_grad:
            group = no_decay if p.ndim <= 1 else decay
            group["params"].append(p)
            group["param_names"].append(n)
    groups = [decay, no_decay]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The registered optimizer ``cfg.name``; a sharpness-aware one wraps ``cfg.base``."""
    groups = param_groups(model, cfg.weight_decay)
    info = get_optimizer(cfg.name)
    if not info.sharpness_aware:
        return info.cls(groups, **info.kwargs(cfg))
    base = get_optimizer(cfg.base)
    return info.cls(groups, base.cls, **info.kwargs(cfg), **base.kwargs(cfg))


def is_two_pass(opt: torch.optim.Optimizer) -> bool:
    """The first_step / second_step protocol of the SAM family."""
    return hasattr(opt, "first_step") and hasattr(opt, "second_step")


def needs_second_pass(opt: torch.optim.Optimizer) -> bool:
    """Whether the coming step takes a gradient at perturbed weights before stepping."""
    if not is_two_pass(opt):
        return False
    now = getattr(opt, "needs_second_pass_now", None)
    return bool(now()) if callable(now) else True
