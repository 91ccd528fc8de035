"""`make tables`: run every `_small` experiment, report each, then list the papers' claims over all of them.

Experiments that share trainings (through the cache) run one after another in one lane, so the later ones reuse
what the first trained. With ``--jobs 2`` the two lanes run side by side, each craft-run on one thread: the small
models use one core badly, so two lanes finish sooner than one lane on two threads. Results are deterministic
per thread count, so a table made with ``--jobs 2`` can differ from one made with ``--jobs 1`` in the last digits.

Writes into OUT: each experiment's log, tables and figures, ``claims.md`` and ``timings.json`` (minutes per
experiment, the load, and the total), which the README's table of minutes quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# Trained from scratch on digits: these share ResNet-20 / Mixer-S / MobileNet-V1 trainings among themselves.
SCRATCH_LANE = ("snt_fig5", "snt_fig6", "snt_table4", "snt_fig7", "cheap_sam")


def lanes(experiments: list[str], jobs: int) -> list[list[str]]:
    """The experiments split into ``jobs`` lanes (1 or 2), each keeping the given order."""
    if jobs == 1:
        return [list(experiments)]
    scratch = [e for e in experiments if e in SCRATCH_LANE]
    rest = [e for e in experiments if e not in SCRATCH_LANE]
    return [lane for lane in (scratch, rest) if lane]


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_experiment(name: str, args, env: dict, timings: dict, lock: threading.Lock) -> bool:
    sweep = Path(args.sweeps) / f"{name}_small"
    shutil.rmtree(sweep, ignore_errors=True)
    t0 = time.time()
    ok = True
    with open(Path(args.out) / f"{name}_small.log", "w") as log:
        rc = subprocess.call([args.bin + "/craft-run", "-m", f"experiment={name}_small", "train.progress=false"],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        ok = False
        print(f"{name}_small: craft-run failed, see {args.out}/{name}_small.log", flush=True)
    if subprocess.call([args.bin + "/craft-report", str(sweep), "--out", args.out, "--paper"], env=env) != 0:
        ok = False
    minutes = (time.time() - t0) / 60
    with lock:
        timings["experiments"][name] = {"minutes": round(minutes, 2), "load": load(), "ok": ok}
    print(f"{name}_small: {minutes:.1f} min (load {load()})", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+", help="experiment names without _small, in the order to run")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="lanes side by side (default 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per craft-run (default: 1 with --jobs 2, torch's default with --jobs 1)")
    ap.add_argument("--out", default="outputs/tables")
    ap.add_argument("--sweeps", default="outputs/sweeps")
    ap.add_argument("--bin", default=str(Path(sys.executable).parent))
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    threads = args.threads if args.threads is not None else (1 if args.jobs == 2 else None)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    timings = {"jobs": args.jobs, "threads": threads, "cpus": os.cpu_count(), "experiments": {}}
    lock = threading.Lock()
    results: list[bool] = []
    start = time.time()

    def run_lane(lane):
        for name in lane:
            results.append(run_experiment(name, args, env, timings, lock))

    workers = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes(args.experiments, args.jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    sweeps = [str(Path(args.sweeps) / f"{e}_small") for e in args.experiments
              if (Path(args.sweeps) / f"{e}_small").is_dir()]
    with open(Path(args.out) / "claims.txt", "w") as out:
        claims_rc = subprocess.call([args.bin + "/craft-report", *sweeps, "--claims", "--out", args.out],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
    timings["total_minutes"] = round((time.time() - start) / 60, 2)
    tmp = Path(args.out) / "timings.json.tmp"
    tmp.write_text(json.dumps(timings, indent=2) + "\n")
    tmp.replace(Path(args.out) / "timings.json")
    print(f"make tables: {timings['total_minutes']:.1f} min for the experiments ({args.jobs} lane(s))", flush=True)
    return 0 if all(results) and claims_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
