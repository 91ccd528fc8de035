"""`make tables`: run every `_small` experiment, report each, then list the papers' claims over all of them.

The experiments are found, not listed: every ``conf/experiment/*_small.yaml`` with a sweep (``hydra.sweeper``).
Each may say, in a header line ``# make tables: lane <lane>, after <experiment> ...``, which lane it runs in
(default ``main``) and which experiments must run before it: those whose trainings it reuses through the cache,
so that it finds them cached. In a lane, an experiment runs after the ones it names, otherwise in name order.
With ``--jobs 2`` the two lanes run side by side, each craft-run on one thread: the small models use one core
badly, so two lanes finish sooner than one lane on two threads (``--jobs 1``: one lane, the same order rule
over all). Results are deterministic per thread count, so a table made with ``--jobs 2`` can differ from one
made with ``--jobs 1`` in the last digits.

Writes into OUT: each experiment's log, tables and figures, ``claims.md`` and ``timings.json`` (minutes per
experiment, the load, and the total), which docs/results.md's paragraph of minutes quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parent.parent / "conf"
_HEADER = re.compile(r"^# make tables: (.*)$", re.M)


@dataclass(frozen=True)
class Experiment:
    name: str  # without _small
    lane: str = "main"
    after: tuple = field(default=())  # names without _small


def discover(conf: Path = CONF) -> list[Experiment]:
    """Every ``_small`` experiment with a sweep, in run order: after the ones it names, otherwise by name."""
    found = {}
    for path in sorted((conf / "experiment").glob("*_small.yaml")):
        text = path.read_text()
        if not (yaml.safe_load(text).get("hydra") or {}).get("sweeper"):
            continue  # a single run (craft_pretrain_small: make pretrained runs it)
        lane, after = "main", ()
        for spec in _HEADER.findall(text):
            for part in (p.strip() for p in spec.split(",")):
                key, _, value = part.partition(" ")
                if key == "lane":
                    lane = value.strip()
                elif key == "after":
                    after += tuple(v.removesuffix("_small") for v in value.split())
                else:
                    raise ValueError(f"{path}: '# make tables: {spec}': expected 'lane <name>' or 'after <names>'")
        name = path.stem.removesuffix("_small")
        found[name] = Experiment(name, lane, after)
    order: list[str] = []
    while len(order) < len(found):  # Kahn's topological sort, the smallest ready name first
        ready = [n for n, e in sorted(found.items()) if n not in order and all(a in order for a in e.after)]
        if not ready:
            missing = {n: e.after for n, e in found.items() if n not in order}
            raise ValueError(f"make tables: 'after' names an unknown experiment or a cycle among {missing}")
        order.append(ready[0])
    for e in found.values():  # lanes run side by side: an order across lanes would not hold
        if any(found[a].lane != e.lane for a in e.after):
            raise ValueError(f"make tables: {e.name} (lane {e.lane}) runs after an experiment of another lane")
    return [found[n] for n in order]


def lanes(experiments: list[Experiment], jobs: int) -> list[list[str]]:
    """The experiments' names split into ``jobs`` lanes (1: one lane; 2: one per declared lane, which must then be
    at most two), each keeping the given order."""
    if jobs == 1:
        return [[e.name for e in experiments]]
    names = list(dict.fromkeys(e.lane for e in experiments))
    if len(names) > jobs:
        raise ValueError(f"make tables: {len(names)} lanes ({', '.join(names)}) for --jobs {jobs}")
    return [[e.name for e in experiments if e.lane == lane] for lane in names]


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
    ap.add_argument("experiments", nargs="*",
                    help="experiment names without _small (default: every one found, see above)")
    ap.add_argument("--list", action="store_true", help="print the experiments in run order with their lanes; run none")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="lanes side by side (default 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per craft-run (default: 1 with --jobs 2, torch's default with --jobs 1)")
    ap.add_argument("--out", default="outputs/tables")
    ap.add_argument("--sweeps", default="outputs/sweeps")
    ap.add_argument("--bin", default=str(Path(sys.executable).parent))
    args = ap.parse_args(argv)
    found = discover()
    unknown = sorted(set(args.experiments) - {e.name for e in found})
    if unknown:
        ap.error(f"no conf/experiment/<name>_small.yaml with a sweep for: {', '.join(unknown)}")
    chosen = [e for e in found if not args.experiments or e.name in args.experiments]
    if args.list:
        for e in chosen:
            print(f"{e.name}  lane {e.lane}" + (f", after {' '.join(e.after)}" if e.after else ""))
        return 0
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

    workers = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes(chosen, args.jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    sweeps = [str(Path(args.sweeps) / f"{e.name}_small") for e in chosen
              if (Path(args.sweeps) / f"{e.name}_small").is_dir()]
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
