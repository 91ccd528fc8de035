"""Optimizer factory: plain optimizers and the sharpness-aware family that wraps them.

The training loop never branches on a name: it asks :func:`needs_second_pass`.
"""

from __future__ import annotations

import logging

import torch

from craft_runner.config import SHARPNESS_AWARE, OptimizerConfig

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, normalisation and per-channel activation parameters (all ndim <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name in SHARPNESS_AWARE:
        from pytorch_optimizer import SAM

        base_cls, kwargs = _base_class_and_kwargs(cfg.base, cfg)
        adaptive = cfg.adaptive or cfg.name == "asam"
        return SAM(groups, base_cls, rho=cfg.rho, adaptive=adaptive, **kwargs)
    cls, kwargs = _base_class_and_kwargs(cfg.name, cfg)
    return cls(groups, **kwargs)


def needs_second_pass(opt: torch.optim.Optimizer) -> bool:
    """Sharpness-aware optimizers take a gradient at the perturbed weights before stepping."""
    return hasattr(opt, "first_step") and hasattr(opt, "second_step")
