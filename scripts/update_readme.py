"""Regenerate the paragraphs of docs/results.md that `make tables` and `make claims` measure: the minutes per
experiment of `make tables` (its ``timings.json``), and the confirmatory run's minutes, where its time went and
its claims list (`make claims`' ``timings.json`` and ``claims-summary.md``).

    python scripts/update_readme.py outputs/tables [--doc docs/results.md] [--date 2026-12-06]
    python scripts/update_readme.py outputs/claims --claims [--doc docs/results.md] [--date 2026-12-07]

Each paragraph sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (NAME: small-minutes; with
--claims: claims-run, small-claims); the text outside the markers is left as it is. (The name is historical: the
paragraphs lived in the README until it was shortened.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from craft_runner.atomic import atomic_write_text

# Where the paragraphs live: this checkout's docs/results.md.
DOC = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the document needs exactly one {begin} ... {end} pair")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def minutes_paragraph(timings: dict, date: str) -> str:
    exps = timings["experiments"]
    lanes = timings.get("jobs", 1)
    per = ", ".join(f"{name} {v['minutes']:.1f}" + ("" if v.get("ok", True) else " (failed)")
                    for name, v in exps.items())
    threads = timings.get("threads")
    return (f"`make tables` on the {timings.get('cpus', '?')}-core machine, 5 seeds per experiment, {lanes} lane(s) "
            f"side by side ({threads or 'default'} thread(s) per craft-run), an empty cache, {date}: "
            f"**{timings['total_minutes']:.0f} min** for the experiments after pretraining the tiny backbones. "
            f"Per experiment, in the order each lane finished it (minutes; an experiment that shares trainings "
            f"with an earlier one in its lane reuses them from the cache, and the two lanes slow each other, "
            f"so these depend on the order): {per}.")


def claims_paragraph(timings: dict, date: str) -> str:
    """`make claims`' run: its minutes per sweep (all rounds; a sweep that did not finish marked), and where the
    work went (one thread's seconds: trainings made, their diagnostics, compression with evaluation). The seeds
    per arm each claim reached are in the claims list itself."""
    minutes: dict = {}
    cut: set = set()
    for r in timings["runs"]:
        name = r.get("sweep", r.get("experiment"))
        minutes[name] = minutes.get(name, 0.0) + r["minutes"]
        if r.get("rc"):
            cut.add(name)
    per = ", ".join(f"{n} {m:.1f}" + (" (stopped once)" if n in cut else "") for n, m in minutes.items())
    work = timings.get("work", {})
    tot = {k: sum(w.get(k, 0.0) for w in work.values()) for k in ("train_s", "diagnostics_s", "compress_eval_s")}
    hours = sum(tot.values()) / 3600
    share = ", ".join(f"{label} {100 * tot[k] / max(sum(tot.values()), 1e-9):.0f} %" for k, label in
                      (("train_s", "training"), ("diagnostics_s", "λmax and the other diagnostics"),
                       ("compress_eval_s", "compression with its evaluation passes")))
    budget, skipped = timings.get("budget_hours"), timings.get("skipped") or []
    rule = (f" Its budget, {budget:g} h: the first 10 seeds of every sweep always run, further seeds only where "
            f"their sweep's measured minutes per seed end them within it; left out at the budget: "
            + (", ".join(f"{s['sweep']} ({s['seeds']} seeds, about {s['estimate_minutes']:.0f} min)" for s in skipped)
               or "none") + "." if budget else "")
    sessions = timings.get("sessions")
    when = ("; ".join(s["date"] + ", " + s["note"] for s in sessions) if sessions and len(sessions) == 1 else
            f"over {len(sessions)} sessions ({'; '.join(s['date'] + ', ' + s['note'] for s in sessions)})"
            if sessions else date)
    return (f"`make claims` on the {timings.get('cpus', '?')}-core machine, {timings.get('jobs', 1)} worker(s) "
            f"side by side, one thread per craft-run, {when}: **{timings['total_minutes']:.0f} min** of wall "
            f"clock. Minutes per sweep, all rounds (a sweep whose trainings an earlier one made reads them from the "
            f"cache; the seeds per arm each claim reached are in the list below): {per}. The work behind the "
            f"finished cells, {hours:.1f} thread-hours: {share}.{rule}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", help="make tables' output folder (timings.json), or make claims' with --claims")
    ap.add_argument("--claims", action="store_true",
                    help="the folder is make claims' (timings.json, claims-summary.md): its two paragraphs")
    # --readme: the option's name before the paragraphs moved to docs/results.md
    ap.add_argument("--doc", "--readme", dest="doc", default=str(DOC),
                    help="the Markdown file holding both marker pairs (default: docs/results.md)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    tables, doc = Path(args.tables), Path(args.doc)
    text = doc.read_text(encoding="utf-8")
    timings = json.loads((tables / "timings.json").read_text())
    if args.claims:
        text = replace_block(text, "claims-run", claims_paragraph(timings, args.date))
        text = replace_block(text, "small-claims", (tables / "claims-summary.md").read_text(encoding="utf-8"))
    else:  # make tables' own claims list is exploratory: docs/small/exploratory-claims*, not this page
        text = replace_block(text, "small-minutes", minutes_paragraph(timings, args.date))
    atomic_write_text(text, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
