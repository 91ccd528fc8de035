"""``make claims``: the confirmatory run of the papers' claims (:mod:`craft_runner.report.claims`).

Only each claim's primary comparison is run — the cells of its ``_small`` experiment that the primary needs —
on seeds the 5-seed tables did not use (from ``CONFIRM_SEED0``), with the seeds per arm that the power analysis
of those tables asks for (``docs/small/*-cells.csv``; at least ``MIN_SEEDS``, at most ``MAX_SEEDS``). Seeds run
in rounds over all experiments (the first ``MIN_SEEDS`` everywhere, then the rest), two lanes side by side, each
``craft-run`` on one thread, so a run cut short leaves every claim with as many seeds as the time allowed; a
rerun resumes (finished cells are skipped, trainings come from the cache). Ends with ``craft-report --claims``
over what finished: claims.md, claims-summary.md and claims.csv in OUT, with ``plan.json`` (per experiment the
seeds asked for and the overrides) and ``timings.json``.

    python -m craft_runner.confirm [--out outputs/claims] [--cells docs/small] [--jobs 2] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from craft_runner.report import claims as claims_mod

# The from-scratch (SNT) experiments share trainings among themselves; so do the CrAFT ones. One lane each,
# cheapest first within a lane so that the cheap claims are measured early.
LANE_ORDER = ("craft_table4", "craft_fig1", "craft_fig2", "craft_table5", "craft_table1", "craft_table2",
              "craft_table3", "craft_fig4",
              "snt_table4", "snt_table3_ptq", "snt_fig6", "snt_fig7", "snt_fig5", "snt_table3_qat")


def plan(cells_dir: Path) -> dict:
    """{experiment: {"seeds": n per arm, "overrides": [...]}} from the 5-seed tables' cells CSVs."""
    paths = sorted(Path(cells_dir).glob("*-cells.csv"))
    if not paths:
        raise SystemExit(f"craft-claims: error: no *-cells.csv under {cells_dir} (the 5-seed tables: make tables)")
    seeds = claims_mod.seeds_per_arm(claims_mod.tables_from_cells(paths))
    sweeps = claims_mod.confirm_sweeps()
    order = [e for e in LANE_ORDER if e in sweeps] + sorted(e for e in sweeps if e not in LANE_ORDER)
    return {e: {"seeds": seeds.get(e, claims_mod.MIN_SEEDS), "overrides": sweeps[e]} for e in order}


def rounds(p: dict) -> list[list[tuple[str, list[int]]]]:
    """The seeds in rounds: first MIN_SEEDS for every experiment, then the rest where more are asked for."""
    first = claims_mod.MIN_SEEDS
    s0 = claims_mod.CONFIRM_SEED0
    out = [[(e, list(range(s0, s0 + min(first, v["seeds"])))) for e, v in p.items()]]
    more = [(e, list(range(s0 + first, s0 + v["seeds"]))) for e, v in p.items() if v["seeds"] > first]
    return out + ([more] if more else [])


def lanes(batch: list) -> list[list]:
    snt = [x for x in batch if x[0].startswith("snt_")]
    rest = [x for x in batch if not x[0].startswith("snt_")]
    return [lane for lane in (rest, snt) if lane]


def sweep_dir(sweeps: Path, experiment: str, seeds: list) -> Path:
    """One folder per invocation: craft-report reads the jobs of a folder's last sweep only, so a second round
    into the first round's folder would set the first round's cells aside."""
    return sweeps / f"{experiment}_small" / f"seeds{min(seeds)}-{max(seeds)}"


def command(bin_dir: str, experiment: str, overrides: list, seeds: list, sweeps: Path) -> list[str]:
    return [f"{bin_dir}/craft-run", "-m", f"experiment={experiment}_small",
            f"hydra.sweep.dir={sweep_dir(sweeps, experiment, seeds)}", "train.progress=false", *overrides,
            "seed=" + ",".join(map(str, seeds))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="craft-claims", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/claims")
    ap.add_argument("--cells", default="docs/small", help="the 5-seed tables' *-cells.csv (the power analysis)")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2))
    ap.add_argument("--bin", default=str(Path(sys.executable).parent))
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    sweeps = out / "sweeps"
    p = plan(Path(args.cells))
    batches = rounds(p)
    if args.dry_run:
        for i, batch in enumerate(batches):
            for exp, seeds in batch:
                print(f"round {i + 1}: " + " ".join(command(args.bin, exp, p[exp]["overrides"], seeds, sweeps)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(p, indent=2) + "\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if args.jobs == 2 else dict(os.environ)
    timings: dict = {"jobs": args.jobs, "cpus": os.cpu_count(), "runs": []}
    lock = threading.Lock()
    t_start = time.time()

    def run_lane(lane: list, rnd: int) -> None:
        for exp, seeds in lane:
            t0 = time.time()
            with open(out / f"{exp}_small.log", "a") as log:
                rc = subprocess.call(command(args.bin, exp, p[exp]["overrides"], seeds, sweeps), stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
            minutes = (time.time() - t0) / 60
            with lock:
                timings["runs"].append({"experiment": exp, "round": rnd, "seeds": len(seeds),
                                        "minutes": round(minutes, 2), "rc": rc})
                (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
            print(f"{exp}_small round {rnd}: {len(seeds)} seeds, {minutes:.1f} min, rc {rc}", flush=True)

    for rnd, batch in enumerate(batches, 1):
        groups = lanes(batch) if args.jobs == 2 else [batch]
        threads = [threading.Thread(target=run_lane, args=(lane, rnd)) for lane in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    timings["total_minutes"] = round((time.time() - t_start) / 60, 2)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    roots = [str(d) for d in sorted(sweeps.glob("*/seeds*")) if d.is_dir()]
    if not roots:
        print("craft-claims: error: no sweep finished", file=sys.stderr)
        return 2
    rc = subprocess.call([f"{args.bin}/craft-report", *roots, "--claims", "--out", str(out), "--thesis-cells",
                          str(args.cells)])
    return rc


if __name__ == "__main__":
    sys.exit(main())
