"""A sweep directory as records: one per job, whether it finished, failed, was killed, or never started.

- ``results.json`` (status ``ok`` or ``failed``) gives a :class:`Record` with its config and metrics;
- a run directory with ``config.yaml`` but no ``results.json`` (killed, or still running) gives one with
  status ``unfinished``;
- a ``results.json`` that cannot be read (truncated, not JSON, JSON but not an object) gives one with status
  ``unreadable`` and the reason, placed by the job's ``config.yaml`` (normalised as the runner records a
  config, so that it lands in the cell it belongs to); without one it is listed under the table, unplaced;
- a sweep's ``multirun.yaml`` names every job Hydra's basic sweeper expands it to: a job with no run
  directory is ``missing`` (its input was refused, or the sweep stopped first), a run directory that no job of
  the last sweep names is ``stale`` (left by an earlier sweep into the same directory) and is set aside.

Each record carries ``fields``: the inputs of the trained weights' cache key (the fields of role ``weights``,
craft_runner.identity: e.g. of ``optimizer`` only the fields the chosen optimizer uses), as results.json records
them (``identity``), and the whole ``compress`` block, flattened to ``"group.name"`` keys, so that the report can
key rows by whatever varies. A results.json written before it recorded them has them rebuilt from its config
(:func:`legacy_training_inputs`, the one place the report builds a RunConfig).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

from craft_runner.fingerprint import COMPARED, differences
from craft_runner.identity import KEY_VERSION, WEIGHTS
from craft_runner.results import INCOMPLETE

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Record:
    path: Path
    status: str  # ok | failed | unfinished | unreadable | missing
    config: dict
    metrics: dict = dataclasses.field(default_factory=dict)
    compression: dict = dataclasses.field(default_factory=dict)
    sharpness: dict = dataclasses.field(default_factory=dict)
    export: dict = dataclasses.field(default_factory=dict)  # results.json's real-artifact record, if any
    error: Optional[str] = None
    fields: dict = dataclasses.field(default_factory=dict)
    train_fields: frozenset = frozenset()
    overrides: tuple = ()
    mtime: float = 0.0
    environment: dict = dataclasses.field(default_factory=dict)  # results.json's fingerprint, if recorded

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def experiment(self) -> Optional[str]:
        return self.config.get("experiment")

    def get(self, path: str, default=None):
        """A flattened field (``"optimizer.name"``), else the same path in the recorded config."""
        if path in self.fields:
            return self.fields[path]
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become tuples, dicts below a leaf (model.kwargs) JSON."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("kwargs",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = _hashable(v)
    return out


def _build(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})


def legacy_training_inputs(config: dict) -> dict:
    """The training key's inputs of a recorded config that does not record them (a results.json written before
    ``identity``, or a job's config.yaml): rebuilt through a RunConfig, as the runner computes the key. Local
    imports: only such records need the optimizer registry (and torch)."""
    try:
        from craft_runner.cache import weights_key
        from craft_runner.compress.registry import CompressConfig
        from craft_runner.optim.registry import OptimizerConfig
        from craft_runner.schema import ArchConfig, DatasetConfig, ModelConfig, RunConfig, TrainConfig

        opt = dict(config.get("optimizer") or {})
        if isinstance(opt.get("betas"), list):
            opt["betas"] = tuple(opt["betas"])
        rc = RunConfig(model=_build(ModelConfig, config.get("model")),
                       dataset=_build(DatasetConfig, config.get("dataset")), optimizer=_build(OptimizerConfig, opt),
                       arch=_build(ArchConfig, config.get("arch")), train=_build(TrainConfig, config.get("train")),
                       compress=CompressConfig(), seed=config.get("seed", 0))
        return weights_key(rc)
    except Exception as e:  # a config from another version: every recorded field counts
        log.debug("weights_key failed (%s): using the recorded sections", e)
        return {k: config.get(k) for k in ("model", "dataset", "arch", "train", "optimizer", "seed")}


def training_fields(config: dict, identity: Optional[dict] = None) -> dict:
    """The inputs of the weights' cache key, flattened (seed included; not the key's version): as results.json
    records them (``identity``), else rebuilt from the config."""
    inputs = (identity or {}).get(WEIGHTS)
    if not isinstance(inputs, dict):
        inputs = legacy_training_inputs(config)
    return {k: v for k, v in flatten(inputs).items() if k != KEY_VERSION}


def _record(path: Path, status: str, config: dict, identity: Optional[dict] = None, **kw) -> Record:
    tf = training_fields(config, identity)
    comp = flatten(config.get("compress") or {}, "compress.")
    return Record(path=path, status=status, config=config, fields={**tf, **comp}, train_fields=frozenset(tf), **kw)


def _read_overrides(run_dir: Path) -> tuple:
    f = run_dir / "overrides.yaml"
    if not f.exists():
        return ()
    import yaml

    return tuple(str(x) for x in (yaml.safe_load(f.read_text()) or []))


def _normalised(cfg: dict) -> dict:
    """A config.yaml as results.json records a config: the compression block through its schema, which
    fills the fields its method derives (None in the YAML), so that the record keys the same row and column."""
    comp = cfg.get("compress")
    if not isinstance(comp, dict) or not comp.get("name"):
        return cfg
    from craft_runner.compress.registry import compressors

    info = compressors().get(comp["name"])
    if info is None:
        return cfg
    names = {f.name for f in dataclasses.fields(info.schema)}
    return {**cfg, "compress": json.loads(json.dumps(dataclasses.asdict(
        info.schema(**{k: v for k, v in comp.items() if k in names})), default=str))}


def _config_yaml(run_dir: Path) -> Optional[dict]:
    """The job's config as Hydra saved it (interpolations resolved, normalised), for a run without a
    readable results.json; None when it is absent, empty or unreadable."""
    f = run_dir / "config.yaml"
    if not f.exists():
        return None
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=True)
        if not isinstance(cfg, dict) or not cfg:
            raise ValueError("empty, or not a mapping")
        cfg.pop("hydra", None)
        return _normalised(cfg)
    except Exception as e:
        log.warning("%s: unreadable (%s)", f, e)
        return None


def load_results(path: Path) -> Record:
    """The record of a results.json; ValueError (or OSError) when it cannot be read as one."""
    r = json.loads(Path(path).read_text())
    if not isinstance(r, dict):
        raise ValueError(f"valid JSON but {type(r).__name__}, not an object")
    status = r.get("status", "failed")
    if status == "running":  # written by an older runner before it finished
        status = "unfinished"
    return _record(Path(path).parent, status if status in ("ok", "failed", "unfinished") else "failed",
                   r.get("config") or {}, identity=r.get("identity") if isinstance(r.get("identity"), dict) else None,
                   metrics=r.get("metrics") or {}, compression=r.get("compression") or {},
                   sharpness=r.get("sharpness") or {}, export=r.get("export") or {}, error=r.get("error"),
                   overrides=_read_overrides(Path(path).parent), mtime=Path(path).stat().st_mtime,
                   environment=r.get("environment") if isinstance(r.get("environment"), dict) else {})


def environment_note(records) -> Optional[str]:
    """One line when the finished records of a table were computed in different environments (library
    versions, CPU or GPU model, CUDA, driver, TF32 / deterministic flags, autocast); thread counts, hosts and
    Python patch levels are not compared."""
    diff = differences([r.environment for r in records if r.ok and r.environment])
    if not diff:
        return None
    shown = "; ".join(f"{k}: {' vs '.join(v)}" for k, v in diff.items())
    return (f"warning: the cells of this table were computed in different environments ({shown}); compared: "
            f"{', '.join(COMPARED)} (not the thread count)")


# ---------------------------------------------------------------------------------------------- sweeps


def sweep_jobs(params: dict, task_overrides: list) -> list[tuple[str, ...]]:
    """The jobs Hydra's basic sweeper makes of ``hydra.sweeper.params`` plus the command line, as override lists."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(task_overrides or [])
    overrides = OverridesParser.create().parse_overrides(lines)
    return [tuple(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@dataclasses.dataclass
class Sweep:
    dir: Path
    experiment: Optional[str]
    jobs: list  # override tuples

    @classmethod
    def read(cls, multirun_yaml: Path) -> Optional[Sweep]:
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(multirun_yaml)
            hydra = cfg.hydra
            params = hydra.sweeper.get("params")  # None: a sweep given on the command line only
            params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
            task = list(hydra.overrides.task)
            choices = OmegaConf.to_container(hydra.runtime.choices, resolve=False) if "runtime" in hydra else {}
            return cls(multirun_yaml.parent, (choices or {}).get("experiment"), sweep_jobs(params, task))
        except Exception as e:
            log.warning("%s: cannot expand the sweep (%s): missing jobs are not detected", multirun_yaml, e)
            return None


@dataclasses.dataclass
class Collection:
    records: list  # Record, statuses ok / failed / unfinished / missing
    stale: list  # run directories set aside
    sweeps: list


def _norm(overrides) -> frozenset:
    return frozenset(str(o).replace(" ", "") for o in overrides)


def collect(root: Path) -> Collection:
    """Every record under ``root`` (a sweep directory, or a folder of them)."""
    root = Path(root)
    records: list[Record] = []
    unplaced: list[Record] = []
    for f in sorted(root.rglob("results.json")):
        try:
            records.append(load_results(f))
        except (OSError, ValueError) as e:
            why = f"unreadable results.json: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            log.warning("%s: %s", f, why)
            cfg, overrides = _config_yaml(f.parent), _read_overrides(f.parent)
            if cfg is not None:
                records.append(_record(f.parent, "unreadable", cfg, error=why, overrides=overrides,
                                       mtime=f.stat().st_mtime))
            else:  # nothing says which cell it is: listed under the table, never guessed into one
                unplaced.append(Record(path=f.parent, status="missing", config={}, overrides=overrides, error=why))
    seen = {r.path for r in records} | {r.path for r in unplaced}
    for f in sorted(root.rglob("config.yaml")):
        if f.parent in seen or not (f.parent / "overrides.yaml").exists():
            continue
        cfg = _config_yaml(f.parent)
        if cfg is None:
            continue
        state, why = "unfinished", "no results.json: killed, or still running"
        if (f.parent / INCOMPLETE).exists():  # craft-run set its "running" record aside: the failure was not written
            state, why = "failed", f"its failure could not be recorded ({INCOMPLETE} left; a full disk?)"
        records.append(_record(f.parent, state, cfg, error=why, overrides=_read_overrides(f.parent),
                               mtime=f.stat().st_mtime))
    sweeps = [s for s in (Sweep.read(m) for m in sorted(root.rglob("multirun.yaml"))) if s is not None]
    stale: list[Record] = []
    for sweep in sweeps:
        inside = [r for r in records if sweep.dir in r.path.parents]
        expected = {_norm(j): j for j in sweep.jobs}
        found = set()
        for r in unplaced:
            if sweep.dir in r.path.parents:
                r.config.setdefault("experiment", sweep.experiment)
                found.add(_norm(r.overrides))
        for r in inside:
            key = _norm(r.overrides)
            if r.overrides and key not in expected:
                stale.append(r)
            found.add(key)
        for key, job in expected.items():
            if key not in found:
                cfg = {"experiment": sweep.experiment}
                records.append(Record(path=sweep.dir, status="missing", config=cfg, overrides=job,
                                      error="no run directory: its input was refused, or the sweep stopped before it"))
    stale_paths = {r.path for r in stale}
    if unplaced and not sweeps:  # a lone run directory: the experiment its neighbours recorded, if one
        known = {r.experiment for r in records if r.experiment}
        for r in unplaced:
            r.config.setdefault("experiment", next(iter(known)) if len(known) == 1 else None)
    kept = [r for r in records if r.path not in stale_paths or r.status == "missing"]
    return Collection(kept + unplaced, stale, sweeps)
