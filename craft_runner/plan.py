"""What a run or a sweep would do, without doing it (``dry_run=true``): each cell's training key, whether
its weights are cached, whether it is done already (skipped), or why it cannot run."""

from __future__ import annotations

from pathlib import Path

from craft_runner.cache import cache_key
from craft_runner.config import to_run_config
from craft_runner.data import DataRootError, check_dataset
from craft_runner.results import previous_result
from craft_runner.schema import ConfigError
from craft_runner.validate import MissingFile, check_checkpoint, validate


def plan_cell(cfg) -> dict:
    """What running ``cfg`` would do, without doing it: its training's cache key, whether the weights are
    cached, whether the run is done already (skipped), or why its config is refused."""
    paths = cfg.get("paths") if hasattr(cfg, "get") else getattr(cfg, "paths", None)
    run_dir = paths.get("run_dir") if hasattr(paths, "get") else getattr(paths, "run_dir", None)
    try:
        rc = to_run_config(cfg)
        validate(rc, device=False, places=False, checkpoint=False)  # a launcher may run cells elsewhere
    except (ConfigError, TypeError) as e:
        return {"run_dir": run_dir, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    key = cache_key(rc)
    plan = {"run_dir": rc.paths.run_dir, "cache_key": key,
            "cached": (Path(rc.paths.cache_dir) / key / "model.pt").exists(),
            "done": previous_result(rc) is not None and not rc.rerun}
    if not plan["done"]:
        try:  # the check a run makes first (prepare); a download is not tried here
            check_dataset(rc.dataset, rc.paths.data_dir)
        except DataRootError as e:
            plan["data_missing"] = str(e).splitlines()[0]
        except ConfigError as e:
            return {"run_dir": run_dir, "error": str(e).splitlines()[0]}
        try:
            check_checkpoint(rc.model)
        except MissingFile as e:
            plan["pretrained_missing"] = str(e).splitlines()[0]
    return plan


def runnable(cells: list[dict]) -> int:
    """How many of the planned ``cells`` would run or are done (not invalid, not missing data or weights)."""
    return sum("error" not in c and not c.get("data_missing") and not c.get("pretrained_missing") for c in cells)


def describe_plan(cells: list[dict]) -> str:
    """A listing of :func:`plan_cell` results: one line per cell, then the unique trainings among them. A
    reason shared by several cells is written once, under the list, and referred to by its number."""
    counts: dict = {}
    for c in cells:
        for k in ("error", "data_missing", "pretrained_missing"):
            if c.get(k):
                counts[c[k]] = counts.get(c[k], 0) + 1
    shared: dict = {}

    def why(text: str) -> str:
        if counts[text] < 2:
            return text
        shared.setdefault(text, len(shared) + 1)
        return f"[{shared[text]}]"

    lines = []
    for c in cells:
        name = c.get("label") or (Path(c["run_dir"]).name if c.get("run_dir") else "(run)")
        if "error" in c:
            lines.append(f"  {name}: invalid: {why(c['error'])}")
            continue
        state = ("done (results.json ok): skipped" if c["done"]
                 else f"data missing: {why(c['data_missing'])}" if c.get("data_missing")
                 else f"pretrained weights missing: {why(c['pretrained_missing'])}" if c.get("pretrained_missing")
                 else "runs")
        lines.append(f"  {name}: training {c['cache_key']} ({'cached' if c['cached'] else 'to train'}), {state}")
    valid = [c for c in cells if "error" not in c]
    cached = {c["cache_key"]: c["cached"] for c in valid}
    to_train = {c["cache_key"] for c in valid if not c["done"] and not c["cached"]}
    missing = sum(bool(c.get("data_missing")) for c in valid)
    weights = sum(bool(c.get("pretrained_missing")) for c in valid)
    summary = (f"{len(cells)} cells, {len(cached)} unique trainings ({sum(cached.values())} cached, "
               f"{len(to_train)} to train), {sum(c['done'] for c in valid)} cells done already, "
               f"{len(cells) - len(valid)} invalid" + (f", {missing} without their data" if missing else "")
               + (f", {weights} without their pretrained weights" if weights else ""))
    if not runnable(cells):
        summary += "; no cell can run"
    notes = [f"  [{n}] {text}" for text, n in shared.items()]
    return "\n".join(["craft-run plan:", *lines, *notes, summary])
