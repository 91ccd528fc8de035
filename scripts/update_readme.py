"""Regenerate the two paragraphs of docs/results.md that `make tables` measures: the minutes per experiment
(from ``timings.json``) and what the small tables show (``claims-summary.md``, from ``craft-report --claims``).

    python scripts/update_readme.py outputs/tables [--doc docs/results.md] [--date 2026-12-06]

Each paragraph sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (NAME: small-minutes,
small-claims); the text outside the markers is left as it is. (The name is historical: the paragraphs lived in
the README until it was shortened.)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", help="make tables' output folder (timings.json, claims-summary.md)")
    # --readme: the option's name before the paragraphs moved to docs/results.md
    ap.add_argument("--doc", "--readme", dest="doc", default=str(DOC),
                    help="the Markdown file holding both marker pairs (default: docs/results.md)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    tables, doc = Path(args.tables), Path(args.doc)
    text = doc.read_text(encoding="utf-8")
    timings = json.loads((tables / "timings.json").read_text())
    text = replace_block(text, "small-minutes", minutes_paragraph(timings, args.date))
    text = replace_block(text, "small-claims", (tables / "claims-summary.md").read_text(encoding="utf-8"))
    atomic_write_text(text, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
