"""The optimizer registry: one :class:`OptimInfo` per name (in the spirit of timm's ``OptimInfo``).

An entry says which class builds the optimizer, which fields of the flat ``optimizer`` config block feed
which constructor argument (so the cache key hashes only those), and whether it is sharpness-aware: such an
optimizer wraps the base optimizer ``optimizer.base`` and may take a second forward-backward per step
(asked per step by the training loop, see :mod:`craft_runner.optim`). Every module of this package is
imported on the first lookup: a new optimizer is one module calling :func:`register_optimizer` plus one
``conf/optimizer/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch

from craft_runner.schema import ConfigError, OptimizerConfig


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
        import craft_runner.optim as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
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
