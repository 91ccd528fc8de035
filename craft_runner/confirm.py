"""``make claims``: the confirmatory run of the papers' claims (:mod:`craft_runner.report.claims`).

Only each claim's primary comparison is run — the cells of its ``_small`` experiment that the primary needs —
on seeds the 5-seed tables did not use (from ``CONFIRM_SEED0``), with the seeds per arm that the power analysis
of those tables asks for (``docs/small/*-cells.csv``; at least ``MIN_SEEDS``, at most ``MAX_SEEDS``), within a
time budget (``--hours``, 3 by default). Jobs of ``CHUNK`` seeds run in two rounds: round 1, the first
``MIN_SEEDS`` seeds of every sweep, always runs, costliest sweeps first; round 2 adds the further seeds one chunk
of every sweep in turn, and a chunk starts only where its sweep's measured seconds per seed say it ends within the
budget (the others are listed as skipped). Two workers, each ``craft-run`` on one thread, take the next job whose
trainings the other worker is not making (same network family and seeds share cached trainings: side by side,
one would wait on the other's training lock). A rerun resumes: finished cells are skipped, trainings come from
the cache. Ends with ``craft-report --claims`` over what finished: claims.md, claims-summary.md and claims.csv
in OUT, the cells they were computed from in OUT/cells (one ``<experiment>-cells.csv`` each, over all its sweeps), with
``plan.json`` (per sweep its experiment, overrides, claims and seeds per arm) and ``timings.json`` (minutes per
job, the chunks skipped; per folder the seconds of training, diagnostics and compression with evaluation).

    python -m craft_runner.confirm [--out outputs/claims] [--cells docs/small] [--jobs 2] [--hours 3] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from craft_runner import results
from craft_runner.report import claims as claims_mod

# Cheapest first (round 2 adds seeds in this order; round 1 runs it backwards, the costliest first).
ORDER = ("craft_table4", "craft_fig1", "craft_fig2", "craft_table5", "craft_table1", "craft_table2",
         "craft_table3", "craft_fig4",
         "snt_table4", "snt_table3_ptq", "snt_fig6", "snt_fig7", "snt_fig5", "snt_table3_qat")
# Seeds per job: small enough for two workers to pack the sweeps and to stop at the budget.
CHUNK = 5
BUDGET_HOURS = 3.0
# The network each experiment's confirmatory sweeps train (or fine-tune): sweeps of one family share trainings.
FAMILY = {"craft_table3": "tiny EfficientNet", "snt_fig5": "Mixer-S", "snt_table3_qat": "MobileNet-V1"}


def family(experiment: str) -> str:
    return FAMILY.get(experiment, "ResNet-20" if experiment.startswith("snt_") else "tiny ViT")


def plan(cells_dir: Path) -> dict:
    """{sweep name: {"experiment", "overrides", "claims", "seeds"}} from the 5-seed tables' cells CSVs: the
    sweep name is the experiment's, with "-2", "-3" for an experiment's further sweeps; seeds per arm are the
    most any claim of the sweep asks for."""
    paths = sorted(Path(cells_dir).glob("*-cells.csv"))
    if not paths:
        raise SystemExit(f"craft-claims: error: no *-cells.csv under {cells_dir} (the 5-seed tables: make tables)")
    need = claims_mod.seeds_per_claim(claims_mod.tables_from_cells(paths))
    sweeps = claims_mod.confirm_sweeps()
    order = [e for e in ORDER if e in sweeps] + sorted(e for e in sweeps if e not in ORDER)
    out = {}
    for e in order:
        for i, g in enumerate(sweeps[e]):
            seeds = max(need.get(c, claims_mod.MIN_SEEDS) for c in g["claims"])
            out[e if i == 0 else f"{e}-{i + 1}"] = {"experiment": e, "overrides": g["overrides"],
                                                    "claims": g["claims"], "seeds": seeds}
    return out


@dataclass(frozen=True)
class Job:
    """One ``craft-run -m`` of a sweep on a few seeds."""

    name: str  # the sweep (plan key)
    family: str
    round: int  # 1: the first MIN_SEEDS seeds (always run); 2: the further seeds the power analysis asks for
    seeds: tuple


def jobs(p: dict, chunk: int = CHUNK) -> list[Job]:
    """Round 1: the first MIN_SEEDS seeds of every sweep, the costliest sweeps first (two workers then finish
    together); round 2: the further seeds, one chunk of every sweep in turn, cheapest first."""
    first, s0 = claims_mod.MIN_SEEDS, claims_mod.CONFIRM_SEED0
    out = [Job(name, family(v["experiment"]), 1, tuple(range(s0 + i, s0 + min(i + chunk, first, v["seeds"]))))
           for name, v in reversed(p.items()) for i in range(0, min(first, v["seeds"]), chunk)]
    for i in range(first, max(v["seeds"] for v in p.values()), chunk):
        out += [Job(name, family(v["experiment"]), 2, tuple(range(s0 + i, s0 + min(i + chunk, v["seeds"]))))
                for name, v in p.items() if v["seeds"] > i]
    return out


def sweep_dir(sweeps: Path, name: str, experiment: str, seeds: list) -> Path:
    """One folder per invocation: craft-report reads the jobs of a folder's last sweep only, so a second round
    (or a second sweep of the experiment) into the first one's folder would set its cells aside."""
    tag = name[len(experiment):]  # "" or "-2"
    return sweeps / f"{experiment}_small" / f"seeds{min(seeds)}-{max(seeds)}{tag}"


def command(bin_dir: str, name: str, entry: dict, seeds: list, sweeps: Path) -> list[str]:
    exp = entry["experiment"]
    return [f"{bin_dir}/craft-run", "-m", f"experiment={exp}_small",
            f"hydra.sweep.dir={sweep_dir(sweeps, name, exp, seeds)}", "train.progress=false", *entry["overrides"],
            "seed=" + ",".join(map(str, seeds))]


def where_time_goes(folder: Path) -> dict:
    """The seconds of work behind one sweep folder's finished cells, by stage: the trainings its cells made
    (a cell that read its training from the cache made none) with their diagnostics (λmax, ranges), and per cell
    the compression with its evaluation passes."""
    train: dict = {}
    diagnostics: dict = {}
    cells, compress_eval = 0, 0.0
    for path in sorted(Path(folder).glob("*/results.json")):
        r = results.read_results(path)
        if r is None or r.get("status") != "ok":
            continue
        m = r.get("metrics") or {}
        cells += 1
        compress_eval += m.get("eval_seconds") or 0.0
        if m.get("trained"):
            key = r.get("cache_key")
            train[key] = m.get("train_seconds") or 0.0
            diagnostics[key] = sum(v.get("seconds") or 0.0 for when in (r.get("sharpness") or {}).values()
                                   if isinstance(when, dict) for v in when.values() if isinstance(v, dict))
    return {"cells": cells, "trainings": len(train), "train_s": round(sum(train.values()), 1),
            "diagnostics_s": round(sum(diagnostics.values()), 1), "compress_eval_s": round(compress_eval, 1)}


class Queue:
    """The jobs in order, under a time budget. ``take`` gives a worker the first job whose trainings no other
    worker is making (same network family, same seeds), else the first (it then waits on a training lock at
    worst). Round-2 jobs start only where the sweep's measured seconds per seed say they end within the budget;
    the others are set aside in ``skipped``. Round 1 always runs: it is every claim's minimum."""

    def __init__(self, jobs: list, budget_s: float = math.inf, clock=time.monotonic):
        self.jobs, self.busy, self.skipped = list(jobs), {}, []
        self.cost: dict = {}  # sweep name -> [seconds, seeds] of its finished jobs
        self.budget, self.clock, self.t0 = budget_s, clock, clock()
        self.cond = threading.Condition()

    def estimate(self, job: Job) -> Optional[float]:
        seconds, seeds = self.cost.get(job.name, (0.0, 0))
        return seconds / seeds * len(job.seeds) if seeds else None

    def take(self, worker: int) -> Optional[Job]:
        with self.cond:
            while True:
                elapsed = self.clock() - self.t0
                for j in [j for j in self.jobs if j.round > 1 and self.estimate(j) is not None]:
                    if elapsed + self.estimate(j) > self.budget:
                        self.jobs.remove(j)
                        self.skipped.append({"sweep": j.name, "seeds": len(j.seeds),
                                             "estimate_minutes": round(self.estimate(j) / 60, 1)})
                if not self.jobs:
                    return None
                # a round-2 job waits for its sweep's first measured job
                ready = [j for j in self.jobs if j.round == 1 or self.estimate(j) is not None]
                if ready:
                    others = [b for w, b in self.busy.items() if w != worker]
                    job = next((j for j in ready if not any(
                        b.family == j.family and set(b.seeds) & set(j.seeds) for b in others)), ready[0])
                    self.jobs.remove(job)
                    self.busy[worker] = job
                    return job
                self.cond.wait()

    def done(self, worker: int, seconds: float) -> None:
        with self.cond:
            job = self.busy.pop(worker)
            c = self.cost.setdefault(job.name, [0.0, 0])
            c[0] += seconds
            c[1] += len(job.seeds)
            self.cond.notify_all()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="craft-claims", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/claims")
    ap.add_argument("--cells", default="docs/small", help="the 5-seed tables' *-cells.csv (the power analysis)")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2))
    ap.add_argument("--bin", default=str(Path(sys.executable).parent))
    ap.add_argument("--hours", type=float, default=BUDGET_HOURS,
                    help="time budget: no further-seed job starts that would end after it (round 1 always runs)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    args = ap.parse_args(argv)
    if not args.hours > 0:
        ap.error(f"--hours must be positive, got {args.hours}")
    out = Path(args.out)
    sweeps = out / "sweeps"
    p = plan(Path(args.cells))
    todo = jobs(p)
    if args.dry_run:
        for j in todo:
            print(f"round {j.round}: " + " ".join(command(args.bin, j.name, p[j.name], list(j.seeds), sweeps)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(p, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if args.jobs == 2 else dict(os.environ)
    timings: dict = {"jobs": args.jobs, "cpus": os.cpu_count(), "budget_hours": args.hours, "runs": []}
    lock = threading.Lock()
    t_start = time.time()
    queue = Queue(todo, budget_s=args.hours * 3600)

    def work(worker: int) -> None:
        while (job := queue.take(worker)) is not None:
            t0 = time.time()
            with open(out / f"{job.name}_small.log", "a") as log:
                rc = subprocess.call(command(args.bin, job.name, p[job.name], list(job.seeds), sweeps),
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
            seconds = time.time() - t0
            queue.done(worker, seconds)
            with lock:
                timings["runs"].append({"sweep": job.name, "round": job.round, "seeds": len(job.seeds),
                                        "first_seed": job.seeds[0], "worker": worker,
                                        "minutes": round(seconds / 60, 2), "rc": rc})
                (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
            print(f"{job.name} seeds {job.seeds[0]}-{job.seeds[-1]}: {seconds / 60:.1f} min, rc {rc}", flush=True)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timings["total_minutes"] = round((time.time() - t_start) / 60, 2)
    timings["skipped"] = queue.skipped  # further seeds that would have ended after the budget
    roots = [str(d) for d in sorted(sweeps.glob("*/seeds*")) if d.is_dir()]
    timings["work"] = {str(Path(r).relative_to(sweeps)): where_time_goes(Path(r)) for r in roots}
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    if not roots:
        print("craft-claims: error: no sweep finished", file=sys.stderr)
        return 2
    rc = subprocess.call([f"{args.bin}/craft-report", *roots, "--claims", "--out", str(out), "--thesis-cells",
                          str(args.cells), "--cells-out", str(out / "cells")])
    return rc


if __name__ == "__main__":
    sys.exit(main())
