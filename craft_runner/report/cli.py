"""craft-report: the tables and figures of a sweep directory, laid out as the papers print them.

Every results.json under SWEEP_DIR is grouped by the experiment it recorded; each experiment is laid out as
its paper table (``<name>_small`` as ``<name>``), with mean ± std over seeds and n, the drop in parentheses,
"—" where no seed finished (the reason listed under the table), and its figures as PNG. The tables (Markdown,
CSV, LaTeX, and every cell as numbers in ``<experiment>-cells.csv``) and the PNGs are written to SWEEP_DIR, or
--out DIR; stdout shows the tables in --format. Each compressed (and λmax, time) cell is compared with its
baseline (ADAM's row; the base architecture for ARCH rows) by a 95 % Welch t interval over seeds (--test
paired: over the common seeds): "†" marks a cell whose interval excludes 0, CSV gives diff_mean, diff_ci_low,
diff_ci_high and separated. Exit status: 0 when every cell finished, 1 when a job failed, was killed or is
missing (or a cell was never run), 2 when there are no results.

--thesis SWEEP_DIR...: instead of the tables, Spearman's ρ between log λmax and each compression drop over
every training of the sweeps (one point per training), pooled and within each optimizer, with bootstrap 95 %
intervals and a verdict per setting (thesis.md, thesis.csv, thesis-scatter.png in --out when given).

--claims SWEEP_DIR...: instead of the tables, each claim of both papers with its pre-declared primary comparison
(estimand, scale), its verdict (holds / contrary / no effect of the paper's size / undecided / not measured), its
power and the supporting evidence after Holm (craft_runner/report/claims.py), as Markdown, or one row per claim
with --format csv (claims.md, claims-summary.md and claims.csv in --out when given). A directory without
results.json but with ``*-cells.csv`` files (docs/small) is read from those. Exit 0 whatever the verdicts, 2 when
there are no results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from craft_runner.report import claims as claims_mod
from craft_runner.report import thesis as thesis_mod
from craft_runner.report.engine import MergeError, build
from craft_runner.report.papers import layout_for
from craft_runner.report.records import collect
from craft_runner.report.render import FORMATS, cells_csv, paper_lookup, read_paper, render, table_rows

log = logging.getLogger(__name__)

_EXT = {"md": "md", "csv": "csv", "latex": "tex"}


def report(root: Path, out_dir: Optional[Path] = None, fmt: str = "md", paper: bool = False, figures: bool = True,
           experiments: Optional[list] = None, stream=None, wandb: Optional[dict] = None,
           test: str = "welch", step_costs: Optional[dict] = None) -> int:
    """Write every experiment's report; print them in ``fmt`` to ``stream``; return the exit status.
    ``wandb``: also log each experiment's table and figures as a W&B run in its runs' group (a dict of
    logger fields, e.g. ``{"mode": "offline"}``; the project defaults to the one the runs recorded)."""
    stream = stream or sys.stdout
    root = Path(root)
    coll = collect(root)
    if not coll.records:
        print(f"craft-report: error: no results.json under {root}", file=sys.stderr)
        return 2
    out_dir = Path(out_dir) if out_dir else (root if root.is_dir() else root.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for r in coll.records:
        groups[r.experiment or "results"].append(r)
    status = 0
    try:  # every table before anything is written: a cell that would merge two configurations stops the report
        tables = {name: build(layout_for(name if name != "results" else None), groups[name], test)
                  for name in sorted(groups) if not experiments or name in experiments}
    except MergeError as e:
        print(f"craft-report: error: {e}", file=sys.stderr)
        return 2
    for name in sorted(groups):
        if experiments and name not in experiments:
            continue
        table = tables[name]
        table.step_costs = step_costs
        title = f"{table.layout.title} ({name})"
        notes = list(table.notes)
        stale = [r for r in coll.stale if (r.experiment or "results") == name]
        if stale:
            notes.append(f"set aside: {len(stale)} run directories that no job of the last sweep names "
                         f"(e.g. {stale[0].path})")
        published = paper_lookup(table) if paper else None
        if paper and published is None:  # --paper asked for numbers that do not exist: say so, not nothing
            notes.append(f"--paper: no published table for {name} (neither paper prints one; the layout names "
                         f"no CSV in craft_runner/report/paper/)")
        headers, rows = table_rows(table, published)
        # Rows the paper has get "(paper)" columns; otherwise (a _small run) the published table goes below.
        below = paper and not any(h.endswith(" (paper)") for h in headers)
        as_csv = table_rows(table, published, verdicts=True)  # no marks; the verdicts as columns

        def text_in(f, as_csv=as_csv, headers=headers, rows=rows, notes=notes, title=title):
            return render(*(as_csv if f == "csv" else (headers, rows)), f, notes, title)

        for f in ("md", "csv", "latex"):
            text = text_in(f)
            if f == "md" and below:
                text += _published(table)
            (out_dir / f"{name}.{_EXT[f]}").write_text(text, encoding="utf-8")
        (out_dir / f"{name}-cells.csv").write_text(cells_csv(table), encoding="utf-8")
        shown = text_in(fmt)
        if fmt == "csv":  # notes go to stderr: stdout stays one CSV table per experiment
            for n in notes:
                print(n, file=sys.stderr)
        print(shown, file=stream)
        if below and fmt != "csv":
            print(_published(table, fmt), file=stream)
        pngs = []
        if figures:
            for fig in table.layout.figures:
                try:
                    for p in fig(table, out_dir, name):
                        pngs.append(p)
                        print(f"figure: {p}", file=sys.stderr)
                except Exception as e:  # a figure must not hide the table
                    log.warning("%s: figure %s failed: %s", name, fig.__name__, e)
                    print(f"craft-report: warning: {name}: figure {fig.__name__} failed: {e}", file=sys.stderr)
        if wandb is not None:
            _log_wandb(name, groups[name], headers, rows, pngs, wandb, out_dir)
        if table.incomplete:
            status = 1
    return status


def claims_report(roots: list, out_dir: Optional[Path] = None, test: str = "welch", stream=None,
                  fmt: str = "md", thesis_from: Optional[Path] = None, cells_out: Optional[Path] = None) -> int:
    """The claims list of the sweeps under ``roots`` (one table per experiment across them), or of the
    ``*-cells.csv`` files a root holds when it has no results.json (``docs/small``); 2: no results. With
    ``cells_out``, each table built from the sweeps also goes there as ``<experiment>-cells.csv``: the cells the
    list was computed from, one file per experiment over all its sweeps (``--claims cells_out`` recomputes it)."""
    stream = stream or sys.stdout
    groups = defaultdict(list)
    cells: list = []
    for root in roots:
        recs = collect(Path(root)).records if Path(root).exists() else []
        for r in recs:
            if r.experiment:
                groups[r.experiment].append(r)
        if not recs and Path(root).is_dir():
            cells += sorted(Path(root).glob("*-cells.csv"))
    if not groups and not cells:
        print(f"craft-report: error: no results.json of a known experiment under {', '.join(map(str, roots))}",
              file=sys.stderr)
        return 2
    tables = {name: build(layout_for(name), recs, test) for name, recs in sorted(groups.items())}
    if cells_out is not None:
        Path(cells_out).mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            (Path(cells_out) / f"{name}-cells.csv").write_text(cells_csv(table), encoding="utf-8")
    if cells:
        tables.update({k: v for k, v in claims_mod.tables_from_cells(cells).items() if k not in tables})
    records = [r for recs in groups.values() for r in recs]
    thesis_cells = sorted(Path(thesis_from).glob("*-cells.csv")) if thesis_from else cells
    block, line, row = claims_mod.thesis_block(thesis_mod.thesis_verdicts(records, cells=thesis_cells))
    text = claims_mod.render(tables, test, extra=block)
    table_csv = claims_mod.to_csv(tables, extra_rows=[row])
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "claims.md").write_text(text, encoding="utf-8")
        (Path(out_dir) / "claims-summary.md").write_text(claims_mod.summary(tables, test, extra=line),
                                                         encoding="utf-8")
        (Path(out_dir) / "claims.csv").write_text(table_csv, encoding="utf-8")
    print(table_csv if fmt == "csv" else text, file=stream, end="")
    return 0


def thesis_report(roots: list, out_dir: Optional[Path] = None, figures: bool = True, stream=None) -> int:
    """The λmax-vs-drop correlations over every training under ``roots`` (:mod:`.thesis`); 2: nothing to correlate."""
    missing = [str(r) for r in roots if not Path(r).exists()]
    if missing:
        print(f"craft-report: error: --thesis: no such directory: {missing[0]}", file=sys.stderr)
        return 2
    records, cells = [], []
    for root in roots:
        recs = collect(Path(root)).records
        records += recs
        if not recs:  # a folder of cells CSVs (docs/small), or one such file
            cells += [Path(root)] if Path(root).is_file() else sorted(Path(root).glob("*-cells.csv"))
    return thesis_mod.report(records, out_dir, stream, figure=figures, cells=cells)


def _log_wandb(name: str, records: list, headers: list, rows: list, pngs: list, options: dict, out_dir: Path) -> None:
    """The table and figures as one W&B run in the group the experiment's runs logged to (their recorded
    logger.group, else the experiment's name); offline files under ``out_dir`` unless a key says online."""
    import pandas as pd

    from craft_runner.tracking import log_report

    logged = [r.config.get("logger") or {} for r in records]
    group = next((c.get("group") for c in logged if c.get("group")), None) or name
    cfg = {"name": "wandb", **{k: v for k, v in (logged[0] if logged else {}).items() if k in ("project", "entity")},
           **options}
    table = pd.DataFrame([[str(c) for c in row] for row in rows], columns=[str(h) for h in headers])
    run_id = log_report(group, {name: table}, pngs, cfg, directory=out_dir)
    print(f"W&B: {name} logged to group {group!r}" + (f" (run {run_id})" if run_id else " failed (see the warning)"),
          file=sys.stderr)


def _published(table, fmt: str = "md") -> str:
    """The published table (when the measured rows are not the paper's, e.g. a _small run), in the same layout."""
    p = read_paper(table.layout.paper_csv)
    if p is None:
        return ""
    headers, rows = p
    title = f"published: {table.layout.title}"
    return "\n" + render(headers, rows, fmt if fmt in FORMATS and fmt != "csv" else "md", (), title)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="craft-report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("root", nargs="+", help="a sweep directory (or a folder of them) holding results.json files; "
                                            "several with --claims")
    ap.add_argument("--format", default="md", choices=FORMATS, help="what stdout shows (default md)")
    ap.add_argument("--out", help="where the tables and figures go (default: the sweep directory)")
    ap.add_argument("--paper", action="store_true", help="show the published numbers beside the measured ones")
    ap.add_argument("--no-figures", action="store_true", help="tables only")
    ap.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    ap.add_argument("--wandb", action="store_true",
                    help="also log each table and its figures to W&B, in the group of the experiment's runs")
    ap.add_argument("--wandb-project", help="W&B project (default: the one the runs recorded, else craft-runner)")
    ap.add_argument("--wandb-mode", default="auto", choices=("auto", "online", "offline"),
                    help="auto (default): online only with a credential for the W&B host, as for the runs")
    ap.add_argument("--test", default="welch", choices=("welch", "paired"),
                    help="the interval of a cell's difference to its baseline: welch (default, independent seeds) "
                         "or paired (per-seed differences over the common seeds)")
    ap.add_argument("--step-costs", metavar="BENCH_JSON",
                    help="cheap_sam's frontier: the cost of each optimizer's step against Adam's as `make bench` "
                         "measured it side by side (craft-bench --json), instead of the sweep's training times")
    ap.add_argument("--claims", action="store_true",
                    help="list each claim of the papers that the sweeps' tables test, with its verdict")
    ap.add_argument("--thesis-cells", metavar="DIR",
                    help="with --claims: the papers' thesis (λmax predicts the drop) from the *-cells.csv in DIR "
                         "(e.g. docs/small, whose cheap_sam_small has 55 trainings) instead of the sweeps given")
    ap.add_argument("--cells-out", metavar="DIR",
                    help="with --claims: write the cells of each experiment's table, over all the sweeps given, as "
                         "DIR/<experiment>-cells.csv (what the list was computed from; --claims DIR recomputes it)")
    ap.add_argument("--thesis", action="store_true",
                    help="Spearman's ρ between log λmax and each compression drop over every training of the "
                         "sweeps, pooled and per optimizer, with bootstrap intervals (thesis.md, thesis.csv and "
                         "thesis-scatter.png in --out)")
    ap.add_argument("--csv", help=argparse.SUPPRESS)  # craft-table's old option: also write the CSV here
    args = ap.parse_args(argv)
    if len(args.root) > 1 and not (args.claims or args.thesis):
        print("craft-report: error: several sweep directories are read only with --claims or --thesis",
              file=sys.stderr)
        return 2
    if args.claims and args.thesis:
        print("craft-report: error: --claims and --thesis are separate reports: ask for one", file=sys.stderr)
        return 2
    if args.thesis:
        return thesis_report(args.root, Path(args.out) if args.out else None, not args.no_figures)
    if args.claims:
        try:
            return claims_report(args.root, Path(args.out) if args.out else None, args.test, fmt=args.format,
                             thesis_from=Path(args.thesis_cells) if args.thesis_cells else None,
                             cells_out=Path(args.cells_out) if args.cells_out else None)
        except MergeError as e:
            print(f"craft-report: error: {e}", file=sys.stderr)
            return 2
    args.root = args.root[0]
    logging.basicConfig(level=logging.WARNING, format="craft-report: %(levelname)s: %(message)s")
    wandb = None
    if args.wandb:
        wandb = {"mode": args.wandb_mode, **({"project": args.wandb_project} if args.wandb_project else {})}
    costs = None
    if args.step_costs:
        try:
            costs = json.loads(Path(args.step_costs).read_text())["step_costs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"craft-report: error: --step-costs {args.step_costs}: not a bench --json file ({e})",
                  file=sys.stderr)
            return 2
    status = report(Path(args.root), Path(args.out) if args.out else None, args.format, args.paper,
                    not args.no_figures, args.experiment, wandb=wandb, test=args.test, step_costs=costs)
    if args.csv and status != 2:
        out = Path(args.out) if args.out else Path(args.root)
        parts = [p.read_text() for p in sorted(out.glob("*.csv")) if not p.name.endswith("-cells.csv")]
        Path(args.csv).write_text("\n".join(parts))
    return status


if __name__ == "__main__":
    sys.exit(main())
