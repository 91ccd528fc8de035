"""Hydra's side of the schemas: ConfigStore registration and DictConfig → typed :class:`RunConfig`.

The dataclasses and their checks live in :mod:`craft_runner.schema` (no Hydra there); Hydra checks key
names and types when it composes, :func:`to_run_config` runs the range checks before any work starts.
"""

from __future__ import annotations

import dataclasses

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from craft_runner.optim.registry import OptimizerConfig
from craft_runner.schema import (  # noqa: F401  (re-exported: the schemas' historical home)
    ArchConfig,
    ConfigError,
    DatasetConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    RunConfig,
    SharpnessConfig,
    TrainConfig,
)


def register_configs() -> None:
    """The run schema, one ``<name>_schema`` per registered compressor in the ``compress`` group, and the
    ``export`` group's ``export_schema``."""
    from craft_runner.compress.registry import compressors
    from craft_runner.export.config import ExportConfig

    cs = ConfigStore.instance()
    # Each family owns its schema; the run schema gets the optimizer block here, above the families.
    cs.store(name="run_schema", node=RunConfig(optimizer=OptimizerConfig()))
    for info in compressors().values():
        cs.store(group="compress", name=f"{info.name}_schema", node=info.schema)
    cs.store(group="export", name="export_schema", node=ExportConfig)


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse keys no schema declares: Hydra lets ``+key=value`` add them to a typed node, where they would be
    ignored. Keys inside a field typed as a plain dict (``model.kwargs``) are free."""
    schema = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if fields is not None and key not in fields:
            raise ConfigError(f"{name} is not allowed: no key {key!r} in {schema.__name__} (a typo? keys added "
                              f"with + must be declared by a schema)")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{name}.")


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """Resolve interpolations and build the typed config; raises ConfigError on a bad value or a key no
    schema declares."""
    if isinstance(cfg, RunConfig):
        return cfg
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    check_known_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(e).splitlines()[0]) from None
    return obj
