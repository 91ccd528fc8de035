"""The optimizer registry: one :class:`OptimInfo` per name (in the spirit of timm's ``OptimInfo``).

An entry says which class builds the optimizer, which fields of the flat ``optimizer`` config block feed
which constructor argument (so the cache key hashes only those), and whether it is sharpness-aware: such an
optimizer wraps the base optimizer ``optimizer.base`` and may take a second forward-backward per step
(asked per step by the training loop, see :mod:`craft_runner.optim`). Every module of this package is
imported on the first lookup: a new optimizer is one module calling :func:`register_optimizer` plus one
``conf/optimizer/<name>.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from craft_runner.discovery import import_siblings
from craft_runner.schema import ConfigError, _check, _check_choice


def _finite_positive(key: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key, value,
           "a finite positive number")


@dataclass
class OptimizerConfig:
    """One flat block for every optimizer; each registered :class:`OptimInfo` says which fields it uses."""

    name: str = "adam"
    # Sharpness-aware optimizers wrap this base optimizer.
    base: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    nesterov: bool = False
    rho: float = 0.05
    # ASAM's perturbation (e = rho T^2 g / ||T g||) for any SAM variant; asam sets it.
    adaptive: bool = False
    # ASAM's T: kwon = |w| + eta on weights, 1 on biases (SamsungLabs/ASAM); davda54 = |w| everywhere.
    asam_variant: str = "kwon"
    eta: float = 0.01
    # looksam: a full SAM step every k steps; alpha weighs the reused orthogonal direction g_v.
    k: int = 5
    alpha: float = 0.7
    # randsam: probability that a step is a SAM step; the draw for step t depends on (seed, t) only.
    sam_prob: float = 0.25
    seed: int = 0
    # saf / mesa: weight, temperature and epoch window (start < epoch < end, 0-based; null: to the end) of the KL
    # term; saf: the outputs of saf_epochs_ago epochs ago; mesa: an EMA model with this decay per step.
    traj_coef: float = 0.16
    traj_temperature: float = 5.0
    traj_start_epoch: int = 5
    traj_end_epoch: Optional[int] = None
    saf_epochs_ago: int = 3
    ema_decay: float = 0.9998
    # swa: averaging starts at this fraction of the epochs.
    swa_start: float = 0.75
    # rwp: filter-wise noise scale and the weight of the gradient at perturbed weights.
    rwp_gamma: float = 0.01
    rwp_alpha: float = 0.5

    def __post_init__(self):
        _check_choice("optimizer.name", self.name, optimizer_names())
        _check_choice("optimizer.base", self.base, base_optimizer_names())
        _finite_positive("optimizer.lr", self.lr)
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
               self.weight_decay, "a finite number >= 0")
        _finite_positive("optimizer.rho", self.rho)
        _check_choice("optimizer.asam_variant", self.asam_variant, ("kwon", "davda54"))
        _check(self.eta >= 0, "optimizer.eta", self.eta, "a number >= 0")
        _check(self.k >= 1, "optimizer.k", self.k, "an integer >= 1")
        _check(self.alpha >= 0, "optimizer.alpha", self.alpha, "a number >= 0")
        _check(0 <= self.sam_prob <= 1, "optimizer.sam_prob", self.sam_prob, "a value in [0, 1]")
        _check(self.traj_coef >= 0, "optimizer.traj_coef", self.traj_coef, "a number >= 0")
        _finite_positive("optimizer.traj_temperature", self.traj_temperature)
        _check(self.saf_epochs_ago >= 1, "optimizer.saf_epochs_ago", self.saf_epochs_ago, "an integer >= 1")
        _check(0 < self.ema_decay < 1, "optimizer.ema_decay", self.ema_decay, "a value in (0, 1)")
        _check(0 <= self.swa_start < 1, "optimizer.swa_start", self.swa_start, "a fraction in [0, 1)")
        _finite_positive("optimizer.rwp_gamma", self.rwp_gamma)
        _check(0 <= self.rwp_alpha <= 1, "optimizer.rwp_alpha", self.rwp_alpha, "a value in [0, 1]")


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type
    # constructor argument -> OptimizerConfig field (lr, weight_decay and the parameter groups are always given)
    params: dict = field(default_factory=dict)
    # constant constructor arguments (e.g. ASAM's adaptive=True)
    fixed: dict = field(default_factory=dict)
    # wraps ``optimizer.base``; a step may take the gradient at perturbed weights (the SAM family)
    sharpness_aware: bool = False
    description: str = ""

    def kwargs(self, cfg: OptimizerConfig) -> dict:
        return {**{arg: _plain(getattr(cfg, f)) for arg, f in self.params.items()}, **self.fixed}

    def key(self, cfg: OptimizerConfig) -> dict:
        """The config values this optimizer's updates depend on."""
        return {"name": self.name, **{f: _plain(getattr(cfg, f)) for f in self.params.values()}}


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


_REGISTRY: dict[str, OptimInfo] = {}
_discovered = False


def register_optimizer(info: OptimInfo) -> OptimInfo:
    if info.name in _REGISTRY and _REGISTRY[info.name] != info:
        raise ValueError(f"optimizer {info.name!r} is registered twice")
    _REGISTRY[info.name] = info
    return info


def optimizers() -> dict[str, OptimInfo]:
    global _discovered
    if not _discovered:
        _discovered = True
        import_siblings(__file__, __package__)
    return dict(_REGISTRY)


def optimizer_names() -> tuple[str, ...]:
    """Every registered name: base optimizers first, in registration order (the tables' row order)."""
    infos = optimizers().values()
    return tuple(i.name for i in infos if not i.sharpness_aware) + tuple(i.name for i in infos if i.sharpness_aware)


def base_optimizer_names() -> tuple[str, ...]:
    return tuple(i.name for i in optimizers().values() if not i.sharpness_aware)


def get_optimizer(name: str) -> OptimInfo:
    """The registered optimizer, or a one-line ConfigError listing the known names."""
    known = optimizers()
    if name not in known:
        raise ConfigError(f"optimizer.name={name!r} is not allowed: expected one of {', '.join(optimizer_names())}")
    return known[name]


def optimizer_key(cfg: OptimizerConfig) -> dict:
    """What determines the updates of ``cfg``: the chosen optimizer's fields (and its base's), weight decay."""
    info = get_optimizer(cfg.name)
    key = {**info.key(cfg), "weight_decay": cfg.weight_decay}
    if info.sharpness_aware:
        key["base"] = get_optimizer(cfg.base).key(cfg)
    return key


register_optimizer(OptimInfo("adam", torch.optim.Adam, {"lr": "lr", "betas": "betas"}, description="Adam"))
register_optimizer(OptimInfo("adamw", torch.optim.AdamW, {"lr": "lr", "betas": "betas"},
                             description="AdamW (decoupled weight decay)"))
register_optimizer(OptimInfo("sgd", torch.optim.SGD, {"lr": "lr", "momentum": "momentum", "nesterov": "nesterov"},
                             description="SGD with momentum"))
