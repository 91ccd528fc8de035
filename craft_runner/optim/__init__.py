"""Optimizer factory: plain optimizers and the sharpness-aware family that wraps them.

The training loop never branches on a name. It asks two capability questions:

- :func:`is_two_pass`: does the optimizer follow the first_step / second_step protocol (the SAM family,
  also pytorch-optimizer's SAM-like classes)?
- :func:`needs_second_pass`: does *this* step need the gradient at perturbed weights? Always for SAM
  and ASAM, every k-th step for LookSAM, with probability p for randomised SAM. Optimizers that answer
  per step expose ``needs_second_pass_now()``; a two-pass optimizer without it always gets the pass.
"""

from __future__ import annotations

import logging

import torch

from craft_runner.config import SHARPNESS_AWARE, OptimizerConfig
from craft_runner.optim.sam import SAM, LookSAM, RandomSAM, SharpnessAware, expected_cost

log = logging.getLogger(__name__)

__all__ = ["build_optimizer", "param_groups", "needs_second_pass", "is_two_pass", "SharpnessAware", "SAM",
           "LookSAM", "RandomSAM", "expected_cost"]


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


def _base_class_and_kwargs(name: str, cfg: OptimizerConfig):
    if name == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    if name == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    if name == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    raise ValueError(f"unknown optimizer {name!r}")


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """adam / adamw / sgd, or sam / asam / looksam / randsam wrapping ``cfg.base``.

    ``asam`` is SAM with the adaptive perturbation; ``adaptive: true`` makes any SAM variant adaptive.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name not in SHARPNESS_AWARE:
        cls, kwargs = _base_class_and_kwargs(cfg.name, cfg)
        return cls(groups, **kwargs)
    base_cls, kwargs = _base_class_and_kwargs(cfg.base, cfg)
    adaptive = cfg.adaptive or cfg.name == "asam"
    kwargs.update(eta=cfg.eta, asam_variant=cfg.asam_variant)
    if cfg.name == "looksam":
        return LookSAM(groups, base_cls, rho=cfg.rho, k=cfg.k, alpha=cfg.alpha, adaptive=adaptive, **kwargs)
    if cfg.name == "randsam":
        return RandomSAM(groups, base_cls, rho=cfg.rho, p=cfg.sam_prob, seed=cfg.seed, adaptive=adaptive,
                         **kwargs)
    return SAM(groups, base_cls, rho=cfg.rho, adaptive=adaptive, **kwargs)


def is_two_pass(opt: torch.optim.Optimizer) -> bool:
    """The first_step / second_step protocol of the SAM family."""
    return hasattr(opt, "first_step") and hasattr(opt, "second_step")


def needs_second_pass(opt: torch.optim.Optimizer) -> bool:
    """Whether the coming step takes a gradient at perturbed weights before stepping."""
    if not is_two_pass(opt):
        return False
    now = getattr(opt, "needs_second_pass_now", None)
    return bool(now()) if callable(now) else True
