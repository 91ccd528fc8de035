"""`craft-run`: compose the config with Hydra and run the pipeline."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from craft_runner.config import register_configs

log = logging.getLogger("craft_runner")
CONF_DIR = os.environ.get("CRAFT_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))

register_configs()


def job_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's directory name from its overrides: readable, one path component, never too long."""
    name = overrides.replace("/", "_") or "default"
    if len(name) <= limit:
        return name
    return f"{name[:limit - 17]}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"


OmegaConf.register_new_resolver("craft.dirname", job_dirname, replace=True)


def task_wrapper(task):
    """What every job needs around the pipeline: its Hydra config and log saved in the run directory once
    the input is known to be good, bad input reported in one line (exit 2) with no run directory left."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            # Recorded in results.json: the report lays the run out as its experiment's table.
            cfg.experiment = HydraConfig.get().runtime.choices.get("experiment")
        handler = None

        def on_start(rc) -> None:
            nonlocal handler
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml")
            OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), run_dir / "overrides.yaml")
            handler = logging.FileHandler(run_dir / "run.log")
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            logging.getLogger().addHandler(handler)

        try:
            return task(cfg, on_start)
        except (ValueError, TypeError) as e:  # ConfigError and the library's input errors: one line
            log.debug("error", exc_info=True)
            _remove_if_empty(run_dir)
            print(f"craft-run: error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()

    return wrapped


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


@task_wrapper
def _task(cfg: DictConfig, on_start) -> float | None:
    from craft_runner import pipeline

    metrics = pipeline.run(cfg, on_start=on_start)
    return pipeline.optimized_value(cfg.get("optimized_metric"), metrics)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float | None:
    return _task(cfg)


if __name__ == "__main__":
    main()
