"""Hydra callbacks of craft-run (registered in conf/run.yaml under hydra.callbacks).

:class:`SweepCallback` around a multirun: with ``dry_run=true`` it lists the cells, the unique trainings among
them (cache keys) and what is cached or done, and stops before anything is launched; after a sweep it lists the
cells that failed or did not finish (their results.json) and ends craft-run with exit status 1 if there are any.
It works with every launcher (the basic one runs jobs in this process, SLURM's elsewhere): it reads the cells'
results.json files, found by expanding the sweep as Hydra's basic sweeper does.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from craft_runner import plan, results
from craft_runner.distributed import launched_rank
from craft_runner.hydra_glue import fill_from_hydra
from craft_runner.schema import ConfigError
from craft_runner.validate import check_checkpoint, check_device, check_writable

log = logging.getLogger("craft_runner")


def sweep_cells(config: DictConfig) -> Optional[list[DictConfig]]:
    """Each job's config of the multirun ``config`` (as the basic sweeper and its launchers build them), with
    ``paths.run_dir`` set to the job's directory; None for another sweeper (its cells are not known ahead)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        return None
    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(args)
    jobs = []
    cells = [list(o) for batch in BasicSweeper.split_arguments(overrides, None) for o in batch]
    # What tells the cells apart: the overrides whose value differs between them.
    values: dict[str, set] = {}
    for cell in cells:
        for o in cell:
            values.setdefault(o.split("=", 1)[0], set()).add(o)
    swept = {k for k, v in values.items() if len(v) > 1}
    for idx, cell in enumerate(cells):
        job = loader.load_sweep_config(config, list(cell))
        with open_dict(job):
            job.hydra.job.id = job.hydra.job.num = idx
        run_dir = Path(str(job.hydra.sweep.dir)) / str(OmegaConf.select(job, "hydra.sweep.subdir"))
        fill_from_hydra(job, job.hydra, run_dir)
        job.hydra.job.name = " ".join(o for o in cell if o.split("=", 1)[0] in swept) or run_dir.name
        jobs.append(job)
    return jobs


def _check_places(config: DictConfig, run_key: str) -> None:
    """Refusals made before Hydra creates a directory (each cell's own checks follow in the pipeline's
    prepare; the device there too, as a launcher may run the cells on other machines)."""
    try:
        if run_key == "hydra.run.dir":
            check_device(str(config.get("device", "auto")))
        check_writable(str(OmegaConf.select(config, run_key)), run_key)
        check_writable(str(config.paths.cache_dir), "paths.cache_dir")
    except ConfigError as e:  # Hydra turns a callback's exception into a warning and goes on: exit here
        print(f"craft-run: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_checkpoints(config: DictConfig) -> None:
    """A sweep whose cells load a checkpoint that is not there (the _small CrAFT experiments before `make
    pretrained`) is refused before its first cell, in one line, rather than failing every cell."""
    if not OmegaConf.select(config, "model.checkpoint_path", default=None):
        return
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    swept = [str(k) for k in params] + [o.split("=", 1)[0] for o in config.hydra.overrides.task if "," in o]
    # Expanding a sweep composes every cell (seconds per hundred): only when the cells differ in the model.
    jobs = (sweep_cells(config) if any(k.lstrip("+~").startswith("model") for k in swept) else None) or [config]
    errors: dict = {}
    for job in jobs:
        model = SimpleNamespace(name=OmegaConf.select(job, "model.name"),
                                checkpoint_path=OmegaConf.select(job, "model.checkpoint_path"))
        try:
            check_checkpoint(model)
        except ConfigError as e:
            errors[str(e)] = errors.get(str(e), 0) + 1
    if errors:
        first = next(iter(errors))
        more = (f" ({sum(errors.values())} of {len(jobs)} cells" + (f", {len(errors)} files" if len(errors) > 1
                                                                   else "") + ")") if len(jobs) > 1 else ""
        print(f"craft-run: error: {first}{more}", file=sys.stderr)
        raise SystemExit(2)


class SweepCallback(Callback):
    def __init__(self) -> None:
        self._start = time.time()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before Hydra makes the run directory: it and the cache can be written, the device exists."""
        if not config.get("dry_run"):
            _check_places(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.time()
        if not config.get("dry_run"):
            _check_places(config, "hydra.sweep.dir")
            _check_checkpoints(config)
            return
        jobs = sweep_cells(config)
        if jobs is None:
            print("craft-run: dry_run=true lists the cells of the basic sweeper only", file=sys.stderr)
            raise SystemExit(2)
        cells = [{**plan.plan_cell(job), "label": job.hydra.job.name} for job in jobs]
        print(plan.describe_plan(cells))
        # before the sweeper: nothing is launched, no directory made; 2 when no cell could run
        raise SystemExit(0 if plan.runnable(cells) else 2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("dry_run") or launched_rank() != 0:  # rank 0 of a distributed sweep reports
            return
        jobs = sweep_cells(config)
        if jobs is not None:
            cells = [(Path(j.paths.run_dir), str(j.hydra.job.name)) for j in jobs]
        else:  # another sweeper: the results.json files this multirun wrote
            cells = [(p.parent, p.parent.name) for p in Path(str(config.hydra.sweep.dir)).rglob("results.json")
                     if p.stat().st_mtime >= self._start - 1]
        outcomes = [(label, *results.status(d)) for d, label in cells]
        bad = [(d, s, why) for d, s, why in outcomes if s != "ok"]
        log.info("sweep %s: %d cells, %d ok, %d failed or unfinished", config.hydra.sweep.dir, len(outcomes),
                 len(outcomes) - len(bad), len(bad))
        if not bad:
            return
        lines = [f"craft-run: {len(bad)} of {len(outcomes)} cells of the sweep failed or did not finish "
                 f"(rerun the same command: the ok cells are skipped):"]
        lines += [f"  {label}: {s}: {why}" for label, s, why in bad]
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(1)
