"""`craft-run`: compose the config with Hydra and run the pipeline."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from craft_runner import distributed, pipeline, plan, results
from craft_runner.atomic import atomic_write_text, disk_full
from craft_runner.config import register_configs, to_run_config
from craft_runner.hydra_glue import fill_from_hydra, job_dirname  # noqa: F401  (job_dirname: re-exported)
from craft_runner.results import record_failure
from craft_runner.train import RunError

log = logging.getLogger("craft_runner")
CONF_DIR = os.environ.get("CRAFT_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))

register_configs()


class RunLog(logging.FileHandler):
    """The run directory's run.log. A write that fails (a full disk) stops it with one line on stderr instead
    of logging's traceback per message; the run goes on (its results.json says how it ends)."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        self.broken = True
        e = sys.exc_info()[1]
        print(f"craft-run: warning: {self.baseFilename}: {disk_full(e, self.baseFilename) or e}; the run goes on "
              f"without its log file", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # flushing the last lines on a full disk: never raised out of the job
            self.handleError(logging.LogRecord("craft_runner", logging.ERROR, "", 0, str(e), None, None))


def _save_config_and_log(cfg: DictConfig, hc: DictConfig, run_dir: Path) -> RunLog:
    """The job's composed config and overrides in its run directory (atomically: a full disk leaves no empty
    config.yaml that the report would read as the job's config), and its log file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg), run_dir / "config.yaml")
    atomic_write_text(OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))), run_dir / "overrides.yaml")
    handler = RunLog(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _Job:
    """prepare → save the config and the log → execute, in sequence; remembers how far it got for the error
    handling (:func:`job`)."""

    def __init__(self, cfg: DictConfig, hc: DictConfig, run_dir: Path, main: bool):
        self.cfg, self.hc, self.run_dir, self.main = cfg, hc, run_dir, main
        self.started = False  # the input was good and the run directory is being written
        self.handler: Optional[RunLog] = None

    def __call__(self) -> Optional[float]:
        cfg = self.cfg
        if cfg.get("dry_run"):
            _remove_if_empty(Path(cfg.paths.run_dir))
            cells = [plan.plan_cell(cfg)]
            print(plan.describe_plan(cells))
            if not plan.runnable(cells):  # nothing would run: the same status as the run's refusal
                sys.exit(2)
            return None
        rc = to_run_config(cfg)  # converted once
        metrics = results.done(rc)
        if metrics is None:
            p = pipeline.prepare(rc)
            self.started = True
            if self.main:
                self.handler = _save_config_and_log(cfg, self.hc, self.run_dir)
            metrics = pipeline.execute(p)
        if metrics is None:  # a rank other than 0 of a distributed run: rank 0 records
            return None
        return pipeline.optimized_value(cfg.get("optimized_metric"), metrics)


def job(cfg: DictConfig) -> Optional[float]:
    """One job of craft-run, with its errors reported in one line.

    A single run exits with 2 on bad input found before it started (no run directory left) and 1 on a failed
    run (results.json says why). A job of a multirun never ends the sweep: its failure is recorded in its
    results.json (status failed, the reason) and the job returns, so the other cells run; the sweep's callback
    (:class:`craft_runner.callbacks.SweepCallback`) lists the failed cells at the end and exits non-zero.
    """
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    distributed.setup(str(cfg.get("device", "auto")))
    run_dir = distributed.agree_on_run_dir(Path(hc.runtime.output_dir))
    main = distributed.is_main()  # rank 0 of a distributed run writes and reports
    fill_from_hydra(cfg, hc, run_dir)
    this = _Job(cfg, hc, run_dir, main)
    try:
        return this()
    except (ValueError, TypeError, RunError) as e:  # bad input, a non-finite or unreadable run: one line
        log.debug("error", exc_info=True)
        # 2: refused before the run started (no run directory); found later (a corrupt image mid-epoch), the
        # run directory stays with results.json saying failed: 1, as any failed run
        failure, code = _one_line(e), (1 if isinstance(e, RunError) or this.started else 2)
    except OSError as e:
        full = disk_full(e)
        if full is None:
            if not multirun:
                e.craft_run_crash = True
                raise
            log.exception("%s failed", run_dir)
            failure, code = f"{type(e).__name__}: {_one_line(e)}", 1
        else:  # a full disk: one line naming the file and the free space; the run directory stays
            log.debug("error", exc_info=True)
            failure, code = str(full), 1
    except Exception as e:
        if not multirun:
            e.craft_run_crash = True  # main(): a crash of the run, never reported as bad input
            raise
        log.exception("%s failed", run_dir)
        failure, code = f"{type(e).__name__}: {_one_line(e)}", 1
    finally:
        if this.handler is not None:
            logging.getLogger().removeHandler(this.handler)
            this.handler.close()  # never raises (RunLog)
        distributed.shutdown()
    prefix = f"craft-run: error: {run_dir.name}: " if multirun else "craft-run: error: "
    if main:
        print(prefix + failure, file=sys.stderr)
    if not multirun:
        _remove_if_empty(run_dir)
        sys.exit(code)
    if main:
        record_failure(run_dir, failure, list(hc.overrides.task))  # stderr says so if it cannot
    return None


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def _main(cfg: DictConfig) -> float | None:
    return job(cfg)


def hydra_refusal(e: BaseException) -> str | None:
    """The one line of a refusal raised before the run (a bad override, an unknown key or option, an
    unwritable directory), or None for anything else."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from craft_runner.schema import ConfigError

    if getattr(e, "craft_run_crash", False) or not isinstance(e, (HydraException, OmegaConfBaseException,
                                                                  ConfigError)):
        return None
    # Hydra's advice to append a key with + does not hold for the typed groups, where craft-run refuses it.
    first = [ln.strip() for ln in str(e).strip().splitlines()
             if ln.strip() and not ln.startswith(("To append", "See https://hydra"))][:1]
    text = str(e)
    if first and "Available options in" in text:  # an unknown option of a group: name the known ones
        opts = []
        for ln in text.split("Available options in", 1)[1].splitlines()[1:]:
            if not ln[:1].isspace() or not ln.strip():  # the options are the indented lines
                break
            if not ln.strip().endswith("_schema"):  # the structured schemas the YAML files extend
                opts.append(ln.strip())
        if opts:
            first[0] = f"{first[0].rstrip('.')}; expected one of {', '.join(opts)}"
    reason = _chained_reason(e)
    if reason is not None and not any(reason.split(" (", 1)[0] in ln for ln in first):
        first.append(reason)
    hint = _quote_hint(e, sys.argv[1:])
    return ": ".join(ln.rstrip(".").rstrip(":") for ln in first) + hint or type(e).__name__


def _chained_reason(e: BaseException) -> str | None:
    """The first line of the OmegaConf error under ``e`` (Hydra chains a YAML file's bad value as
    ``__context__``, an override's as ``__cause__``), with the key it names."""
    from omegaconf.errors import OmegaConfBaseException

    seen = set()
    c = e.__cause__ or e.__context__
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        if isinstance(c, OmegaConfBaseException) and str(c).strip():
            line = str(c).strip().splitlines()[0].rstrip(".")
            key = getattr(c, "full_key", None)
            return line + (f" ({key})" if key and str(key) not in line else "")
        c = c.__cause__ or c.__context__
    return None


def _quote_hint(e: BaseException, argv: list) -> str:
    """An override Hydra cannot parse: most often a value with a space the shell split, or with characters
    Hydra's grammar reserves; say how to quote it."""
    from hydra.errors import OverrideParseException

    if not isinstance(e, OverrideParseException):
        return ""
    bad = str(getattr(e, "override", "") or "")
    if bad and "=" not in bad and bad in argv:
        i = argv.index(bad)
        prev = next((a for a in reversed(argv[:i]) if "=" in a), None)
        if prev is not None:
            return (f" (a value with a space must be quoted in the shell, e.g. "
                    f"\"{prev} {' '.join(argv[i:i + 1])}\")")
    key, _, value = bad.partition("=")
    example = f"{key}='{value}'" if value else "key='value'"
    return (f" (quote a value with spaces or any of ()[]{{}},:=' for Hydra: \"{example}\")")


def main() -> float | None:
    from craft_runner.runtime import keep_freed_memory

    keep_freed_memory()  # before the first tensor: CPU steps without page faults (CRAFT_MALLOC=default: off)
    # Hydra prints its own refusals and exits 1; raised instead, they are reported here like the project's own
    # (one line, exit status 2). HYDRA_FULL_ERROR=1 set by the user keeps Hydra's full report.
    full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return _main()
    except Exception as e:
        line = None if full == "1" else hydra_refusal(e)
        if line is None:
            raise
        print(f"craft-run: error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full


if __name__ == "__main__":
    main()
