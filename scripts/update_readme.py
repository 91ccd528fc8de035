"""Regenerate the README's two paragraphs that `make tables` measures: the minutes per experiment (from
``timings.json``) and what the small tables show (``claims-summary.md``, from ``craft-report --claims``).

    python scripts/update_readme.py outputs/tables [--readme README.md] [--date 2026-12-06]

Each paragraph sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (NAME: small-minutes,
small-claims); the text outside the markers is left as it is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"the README needs exactly one {begin} ... {end} pair")
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
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args(argv)
    tables, readme = Path(args.tables), Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    timings = json.loads((tables / "timings.json").read_text())
    text = replace_block(text, "small-minutes", minutes_paragraph(timings, args.date))
    text = replace_block(text, "small-claims", (tables / "claims-summary.md").read_text(encoding="utf-8"))
    tmp = readme.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
