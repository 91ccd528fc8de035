"""The optimizer registry: one :class:`OptimInfo` per name (in the spirit of timm's ``OptimInfo``).

An entry says which class builds the optimizer, its own hyper-parameter schema (``hparams``: a dataclass of its
fields, their defaults and its checks, subclassing :class:`HParams`), which of those fields feed which
constructor argument (so the cache key hashes only those), and whether it is sharpness-aware: such an optimizer
wraps the base optimizer ``optimizer.base`` and may take a second forward-backward per step (asked per step by
the training loop, see :mod:`craft_runner.optim`). Every module of this package is imported on the first lookup:
a new optimizer is one module calling :func:`register_optimizer` plus one ``conf/optimizer/<name>.yaml``.

The ``optimizer`` block users type stays one flat set of keys (``optimizer=sam optimizer.rho=0.05``; an
experiment may set SAF's keys for a sweep over every optimizer): :class:`OptimizerConfig` is built from the
common keys (:class:`CommonParams`) and every registered schema's fields. A key two optimizers share (``rho``)
means the same thing and has one default; each schema's checks run on every config (a bad value is refused
whichever optimizer is chosen), its :meth:`HParams.check_run` only when it is the one chosen.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from craft_runner.discovery import Registry
from craft_runner.schema import _check, _check_choice


def _finite_positive(key: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key, value,
           "a finite positive number")


@dataclass
class HParams:
    """An optimizer's own hyper-parameters (subclass it with fields and defaults); errors name ``optimizer.<key>``."""

    def check(self) -> None:
        """Range checks of the fields, one-line ConfigError."""

    def check_run(self, train: Any) -> None:
        """Checks against the run's training settings (``train``: a TrainConfig), when this optimizer is chosen."""


@dataclass
class NoParams(HParams):
    pass


@dataclass
class AdamParams(HParams):
    betas: tuple = (0.9, 0.999)


@dataclass
class SGDParams(HParams):
    momentum: float = 0.9
    nesterov: bool = False


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type
    # constructor argument -> the field of ``hparams`` that gives it (lr, weight_decay and the groups always given)
    params: dict = field(default_factory=dict)
    # constant constructor arguments (e.g. ASAM's adaptive=True)
    fixed: dict = field(default_factory=dict)
    # wraps ``optimizer.base``; a step may take the gradient at perturbed weights (the SAM family)
    sharpness_aware: bool = False
    description: str = ""
    # this optimizer's hyper-parameter schema: its fields, defaults and checks
    hparams: type = NoParams

    def __post_init__(self):
        own = {f.name for f in dataclasses.fields(self.hparams)}
        if not set(self.params.values()) <= own | {"lr"}:
            raise TypeError(f"optimizer {self.name!r}: params {sorted(set(self.params.values()) - own)} are not "
                            f"fields of its schema {self.hparams.__name__}")

    def values(self, cfg) -> HParams:
        """This optimizer's hyper-parameters, read from the flat ``cfg``."""
        return self.hparams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(self.hparams)})

    def kwargs(self, cfg) -> dict:
        return {**{arg: _plain(getattr(cfg, f)) for arg, f in self.params.items()}, **self.fixed}

    def key(self, cfg) -> dict:
        """The config values this optimizer's updates depend on."""
        return {"name": self.name, **{f: _plain(getattr(cfg, f)) for f in self.params.values()}}


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


def _order(entries: dict) -> list[str]:
    """Base optimizers first, in registration order (the tables' row order), then the sharpness-aware ones."""
    infos = entries.values()
    return [i.name for i in infos if not i.sharpness_aware] + [i.name for i in infos if i.sharpness_aware]


_REGISTRY: Registry[OptimInfo] = Registry("optimizer.name", "optimizer", __file__, __package__, order=_order)


def register_optimizer(info: OptimInfo) -> OptimInfo:
    return _REGISTRY.register(info.name, info)


def optimizers() -> dict[str, OptimInfo]:
    return _REGISTRY.entries()


def optimizer_names() -> tuple[str, ...]:
    """Every registered name: base optimizers first, in registration order (the tables' row order)."""
    return tuple(_REGISTRY.names())


def base_optimizer_names() -> tuple[str, ...]:
    return tuple(i.name for i in optimizers().values() if not i.sharpness_aware)


def get_optimizer(name: str) -> OptimInfo:
    """The registered optimizer, or a one-line ConfigError listing the known names."""
    return _REGISTRY.get(name)


@dataclass
class CommonParams:
    """The keys every optimizer has; :class:`OptimizerConfig` adds every registered schema's fields."""

    name: str = "adam"
    # Sharpness-aware optimizers wrap this base optimizer.
    base: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self):
        _check_choice("optimizer.name", self.name, optimizer_names())
        _check_choice("optimizer.base", self.base, base_optimizer_names())
        _finite_positive("optimizer.lr", self.lr)
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
               self.weight_decay, "a finite number >= 0")
        for info in optimizers().values():
            info.values(self).check()

    @property
    def hparams(self) -> HParams:
        """The chosen optimizer's own hyper-parameters."""
        return get_optimizer(self.name).values(self)

    def check_run(self, train: Any) -> None:
        """The chosen optimizer's (and its base's) checks against the run's training settings."""
        self.hparams.check_run(train)
        if get_optimizer(self.name).sharpness_aware:
            get_optimizer(self.base).values(self).check_run(train)


def optimizer_key(cfg) -> dict:
    """What determines the updates of ``cfg``: the chosen optimizer's fields (and its base's), weight decay."""
    info = get_optimizer(cfg.name)
    key = {**info.key(cfg), "weight_decay": cfg.weight_decay}
    if info.sharpness_aware:
        key["base"] = get_optimizer(cfg.base).key(cfg)
    return key


register_optimizer(OptimInfo("adam", torch.optim.Adam, {"lr": "lr", "betas": "betas"}, description="Adam",
                             hparams=AdamParams))
register_optimizer(OptimInfo("adamw", torch.optim.AdamW, {"lr": "lr", "betas": "betas"},
                             description="AdamW (decoupled weight decay)", hparams=AdamParams))
register_optimizer(OptimInfo("sgd", torch.optim.SGD, {"lr": "lr", "momentum": "momentum", "nesterov": "nesterov"},
                             description="SGD with momentum", hparams=SGDParams))


def _flat_config() -> type:
    """The ``optimizer`` group's schema: the common keys and the union of every registered schema's fields (a key
    two schemas share must agree on type and default)."""
    fields: dict[str, tuple] = {}
    for info in optimizers().values():
        hints = typing.get_type_hints(info.hparams)
        for f in dataclasses.fields(info.hparams):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in fields and fields[f.name][:2] != (hints[f.name], default):
                raise TypeError(f"optimizer {info.name!r}: key {f.name!r} differs from another optimizer's "
                                f"({hints[f.name]}, {default!r} vs {fields[f.name][0]}, {fields[f.name][1]!r})")
            fields[f.name] = (hints[f.name], default)
    cls = dataclasses.make_dataclass(
        "OptimizerConfig", [(n, t, field(default=d)) for n, (t, d) in fields.items()], bases=(CommonParams,),
        namespace={"__doc__": "The flat ``optimizer`` block: :class:`CommonParams` and every optimizer's own keys."})
    cls.__module__ = __name__
    return cls


# Built once every optimizer module has registered (the modules beside this one are imported here).
OptimizerConfig = _flat_config()

__all__ = ["CommonParams", "HParams", "OptimInfo", "OptimizerConfig", "get_optimizer",
           "optimizer_key", "optimizer_names", "optimizers", "register_optimizer"]
