"""Where a run's results go: results.json always, W&B when asked for.

results.json is written atomically and never depends on W&B: a W&B failure is logged and
ignored, and ``finish`` always runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Protocol

from craft_runner.atomic import atomic_write_json  # noqa: F401  (re-exported)
from craft_runner.schema import LoggerConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict) -> None: ...

    def finish(self, status: str) -> None: ...


class NullTracker:
    run_id: Optional[str] = None

    def log(self, metrics: dict) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def _wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return "online" if has_key else "offline"


class WandbTracker:
    """A W&B run; offline without an API key, so it never blocks on the network."""

    def __init__(self, cfg: LoggerConfig, config: dict, run_dir: Path, name: str, run_id: Optional[str] = None):
        import wandb

        self._wandb = wandb
        mode = _wandb_mode(cfg)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None, name=name,
            config=config, dir=str(run_dir), mode=mode, id=run_id, resume="allow" if run_id else None,
            reinit="finish_previous", settings=wandb.Settings(init_timeout=30, silent=True),
        )
        self.run_id = self.run.id
        log.info("W&B run %s (%s mode)", self.run_id, mode)

    def log(self, metrics: dict) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self.run.summary.update(flat)
        self.run.log(flat)

    def finish(self, status: str) -> None:
        self._wandb.finish(exit_code=0 if status == "ok" else 1)


def make_tracker(cfg: LoggerConfig, config: dict, run_dir: Path, name: str) -> Tracker:
    if cfg.name == "wandb":
        try:
            return WandbTracker(cfg, config, run_dir, name)
        except Exception as e:  # results.json must not depend on W&B
            log.warning("W&B unavailable, results.json only: %s", e)
    return NullTracker()
