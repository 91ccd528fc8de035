"""Each optimizer owns its hyper-parameter schema and checks (issue 30 item 4); the keys users type and the cache
keys are what they were before the split (pinned here from main before it: 060aacf)."""

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import compose_run

from craft_runner import schema
from craft_runner.cache import cache_key, weights_key
from craft_runner.compress import registry as compress_registry
from craft_runner.config import ConfigError, to_run_config
from craft_runner.discovery import Registry
from craft_runner.export import registry as export_registry
from craft_runner.optim import registry
from craft_runner.optim.registry import CommonParams, HParams, OptimInfo, OptimizerConfig, optimizers

# `craft-run` with no overrides: its weights' cache key before the schemas were split
DEFAULT_KEY = "212bb006bcfd23a2"
# the optimizer part of each optimizer's cache key inputs (its YAML's values) before the split, as the digest
# of its JSON (sorted keys), the form of the cache key itself
OPTIMIZER_KEYS = [
    (('optimizer=sam',), '284c92d554e82959'),
    (('optimizer=looksam', 'optimizer.base=sgd'), 'b3f3df976f712c63'),
    (('optimizer=saf', 'train.epochs=10'), '16c89f6d67b44cce'),
    (('optimizer=randsam',), '20f833c281d65363'),
    (('optimizer=msam',), '9a87cbc8c29bd980'),
    (('optimizer=asam',), '4ffa3adfcaa84408'),
    (('optimizer=mesa',), '53803f9110f56d10'),
    (('optimizer=swa',), 'a38dd770de06a074'),
    (('optimizer=rwp',), '44d09a191525de81'),
    (('optimizer=sgd',), '715739ef2fefc2dc'),
    (('optimizer=adamw',), '5d0fbe72b5d9c6e4'),
]


def test_the_default_runs_cache_key_is_unchanged():
    assert cache_key(to_run_config(compose_run())) == DEFAULT_KEY


@pytest.mark.parametrize("overrides,want", OPTIMIZER_KEYS)
def test_each_optimizers_key_is_unchanged(overrides, want):
    rc = to_run_config(compose_run(*overrides))
    got = json.dumps(weights_key(rc)["optimizer"], sort_keys=True)
    assert hashlib.sha256(got.encode()).hexdigest()[:16] == want, got


def test_every_optimizer_declares_its_schema_and_the_flat_block_is_their_union():
    infos = optimizers()
    assert len(infos) == 12
    union = {f.name for f in dataclasses.fields(CommonParams)}
    for info in infos.values():
        assert issubclass(info.hparams, HParams) and info.hparams is not HParams, info.name
        own = {f.name for f in dataclasses.fields(info.hparams)}
        assert set(info.params.values()) <= own | {"lr"}, info.name  # what feeds the optimizer is its own
        union |= own
    assert {f.name for f in dataclasses.fields(OptimizerConfig)} == union
    assert type(OptimizerConfig(name="looksam", k=3).hparams).__name__ == "LookSAMParams"
    assert OptimizerConfig(name="looksam", k=3).hparams.k == 3


def test_the_keys_users_type_still_compose():
    rc = to_run_config(compose_run("optimizer=sam", "optimizer.rho=0.07"))
    assert (rc.optimizer.name, rc.optimizer.rho, rc.optimizer.hparams.rho) == ("sam", 0.07, 0.07)
    # a sweep over every optimizer may set SAF's keys (cheap_sam_small): they are ignored by Adam, not refused
    rc = to_run_config(compose_run("optimizer=adam", "optimizer.traj_start_epoch=0"))
    assert rc.optimizer.name == "adam" and not hasattr(rc.optimizer.hparams, "traj_start_epoch")
    with pytest.raises(ConfigError, match="optimizer.k=0 is not allowed"):  # checked whichever one is chosen
        to_run_config(compose_run("optimizer=adam", "optimizer.k=0"))


def test_the_run_checks_are_the_optimizers_not_the_run_configs():
    assert not any(f'"{name}"' in inspect.getsource(schema.RunConfig) for name in optimizers())  # no names
    with pytest.raises(ConfigError, match="optimizer.traj_start_epoch=3 is not allowed"):
        schema.RunConfig(optimizer=OptimizerConfig(name="mesa", traj_start_epoch=3),
                         train=schema.TrainConfig(epochs=4))


@dataclass
class _HalfParams(HParams):
    half_lr_steps: int = 7

    def check(self) -> None:
        if self.half_lr_steps < 1:
            raise ConfigError(f"optimizer.half_lr_steps={self.half_lr_steps} is not allowed: expected >= 1")


def test_a_new_optimizer_is_one_registration_with_its_own_schema():
    info = registry.register_optimizer(OptimInfo("half_sgd_test", torch.optim.SGD, {"lr": "lr"},
                                                 hparams=_HalfParams))
    try:
        flat = registry._flat_config()  # what the import builds once every module has registered
        cfg = flat(name="half_sgd_test", half_lr_steps=3)
        assert cfg.hparams == _HalfParams(3) and registry.optimizer_key(cfg) == {
            "name": "half_sgd_test", "lr": 1e-3, "weight_decay": 0.0}
        with pytest.raises(ConfigError, match="optimizer.half_lr_steps=0"):
            flat(name="adam", half_lr_steps=0)
        assert info is registry.get_optimizer("half_sgd_test")
    finally:
        registry._REGISTRY.pop("half_sgd_test")

    @dataclass
    class Clash(HParams):
        rho: float = 1.0  # SAM's key with another default

    registry.register_optimizer(OptimInfo("clash_test", torch.optim.SGD, hparams=Clash))
    try:
        with pytest.raises(TypeError, match="'rho' differs"):
            registry._flat_config()
    finally:
        registry._REGISTRY.pop("clash_test")


def test_one_registry_class_serves_every_family():
    for module in (registry, compress_registry, export_registry):
        assert isinstance(module._REGISTRY, Registry), module.__name__
    package = Path(registry.__file__).resolve().parents[1]
    callers = [p.name for p in package.rglob("*.py") if "import_siblings(" in p.read_text()]
    assert callers == ["discovery.py"]
    with pytest.raises(ValueError, match="optimizer 'sam' is registered twice"):
        registry.register_optimizer(OptimInfo("sam", torch.optim.SGD))
