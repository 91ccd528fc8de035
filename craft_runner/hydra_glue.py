"""What craft-run takes from Hydra, in one place that both the job (:mod:`craft_runner.run`) and the sweep's
callback (:mod:`craft_runner.callbacks`) import: the ``craft.dirname`` resolver that names a sweep job's
directory, and what only Hydra knows about a job (its run directory, its experiment, the W&B group)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's directory name from its overrides: readable, one path component, never too long."""
    name = overrides.replace("/", "_") or "default"
    if len(name) <= limit:
        return name
    return f"{name[:limit - 17]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"


OmegaConf.register_new_resolver("craft.dirname", job_dirname, replace=True)


def fill_from_hydra(cfg: DictConfig, hc: DictConfig, run_dir: Path) -> None:
    """What only Hydra knows (``hc``: the job's hydra node): the run directory, and the W&B group (the
    experiment, else the sweep directory of a multirun)."""
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        # Recorded in results.json: the report lays the run out as its experiment's table.
        cfg.experiment = hc.runtime.choices.get("experiment")
        if cfg.get("logger") is not None and cfg.logger.get("group") is None:
            experiment = hc.runtime.choices.get("experiment")
            if experiment:
                cfg.logger.group = str(experiment)
            elif hc.mode == RunMode.MULTIRUN:
                cfg.logger.group = str(hc.sweep.dir)
