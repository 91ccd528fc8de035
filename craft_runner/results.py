"""A run directory's ``results.json``: its one reader and writer.

The record says ``running`` while the run works, then ``ok`` or ``failed`` with the reason. When even the
``failed`` record cannot be written (a full disk), the ``running`` one is set aside as
``results.json.incomplete`` (a rename needs no space), so that neither a rerun nor the sweep's summary takes
it for a run still going; the reason goes to stderr and, for a job of this process, to the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from craft_runner.atomic import atomic_write_json, disk_full
from craft_runner.identity import same_cell
from craft_runner.schema import RunConfig

log = logging.getLogger("craft_runner.pipeline")  # what a run logs reads as one logger's, as before

NAME = "results.json"
INCOMPLETE = "results.json.incomplete"

# Run directory → why its failure could not be recorded (jobs of this process; the sweep's summary reads it).
_unrecorded: dict[str, str] = {}


def path_of(run_dir: Path) -> Path:
    return Path(run_dir) / NAME


def read_results(path: Path) -> Optional[dict]:
    """A results.json as a dict; None when it is absent, unreadable, not JSON or not a JSON object."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) else None


def read(run_dir: Path) -> Optional[dict]:
    return read_results(path_of(run_dir))


def previous_status(run_dir: Path) -> Optional[str]:
    r = read(run_dir)
    return r.get("status") if r is not None else None


def previous_result(rc: RunConfig) -> Optional[dict]:
    """The run directory's results.json when it is ok and was made by the same cell (craft_runner.identity:
    equal in every field but those of role ``nothing``, e.g. rerun, dry_run, paths, logger), else None."""
    if not rc.paths.run_dir:
        return None
    r = read(Path(rc.paths.run_dir))
    if r is None:
        return None
    if r.get("status") == "ok" and isinstance(r.get("config"), dict) and \
            same_cell(r["config"], dataclasses.asdict(rc)):
        return r
    return None


def done(rc: RunConfig) -> Optional[dict]:
    """The metrics of a run done already (results.json ok, same config) unless ``rerun``; None: run it. A
    record that cannot be read is said to be replaced."""
    if rc.paths.run_dir and path_of(rc.paths.run_dir).exists() and read(rc.paths.run_dir) is None:
        log.warning("%s is not a results record (unreadable, not JSON, or JSON other than an object): the run "
                    "is done again and replaces it", path_of(rc.paths.run_dir))
    previous = previous_result(rc)
    if previous is None or rc.rerun:
        return None
    log.info("%s: already done (results.json ok, same config): skipped; rerun=true runs it again", rc.paths.run_dir)
    return previous["metrics"]


def write(results: dict, run_dir: Path) -> None:
    """``results`` as the run directory's results.json, atomically."""
    atomic_write_json(results, path_of(run_dir))
    with contextlib.suppress(OSError):  # an earlier attempt's set-aside record is superseded
        (Path(run_dir) / INCOMPLETE).unlink(missing_ok=True)


def write_failed(results: dict, run_dir: Path, error: str) -> bool:
    """``results`` recorded as failed with ``error``; False (and the reason on stderr, the half record set
    aside) when it cannot be written."""
    results.update(status="failed", error=error)
    try:
        write(results, run_dir)
        return True
    except OSError as e:
        unrecordable(run_dir, error, e)
        return False


def record_failure(run_dir: Path, error: str, overrides: list) -> None:
    """A cell that failed before the pipeline could record it (e.g. a bad value): status failed and the
    reason, so the sweep's summary and a rerun see it. A failure the pipeline recorded is kept."""
    if (read(run_dir) or {}).get("status") == "failed" or str(run_dir) in _unrecorded:
        return
    write_failed({"overrides": list(overrides)}, run_dir, error)


def unrecordable(run_dir: Path, error: str, why: BaseException) -> None:
    """The failure ``error`` of ``run_dir`` could not be written (``why``): say so on stderr, set the
    ``running`` record aside, remember the reason for this process's sweep summary."""
    why = disk_full(why) or why
    reason = f"{error} (not recorded in {NAME}: {why})"
    _unrecorded[str(run_dir)] = reason
    print(f"craft-run: error: {run_dir}: {reason}", file=sys.stderr)
    path = path_of(run_dir)
    with contextlib.suppress(OSError):
        if path.exists():
            os.replace(path, Path(run_dir) / INCOMPLETE)
    with contextlib.suppress(OSError):  # the rename failed too: a record that says running must not stay
        path.unlink(missing_ok=True)


def status(run_dir: Path) -> tuple[str, str]:
    """(status, why) of a run directory, for the sweep's summary."""
    run_dir = Path(run_dir)
    if str(run_dir) in _unrecorded:
        return "failed", _unrecorded[str(run_dir)]
    r = read(run_dir)
    if r is None:
        if (run_dir / INCOMPLETE).exists():
            return "failed", (f"its failure could not be recorded ({INCOMPLETE} is the record of the run that "
                              f"started; a full disk?)")
        if path_of(run_dir).exists():
            return "failed", f"{NAME} is unreadable (truncated, not JSON, or not a JSON object)"
        return "missing", "no results.json (the job did not start or was killed before it could write one)"
    state = r.get("status", "missing")
    if state == "running":
        return state, "results.json still says running (the job was killed or is still running)"
    return state, str(r.get("error", ""))
