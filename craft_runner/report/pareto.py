"""cheap_sam's frontier: what each option costs against Adam, and how much of SAM's flatness and compressibility
it keeps.

For each row (an optimizer, or SNT's ARCH) and each target — λmax after training, and the drop (compressed −
FP32) of each compression column — the share of SAM's gain over Adam the row keeps:
``kept = (x_row − x_adam) / (x_sam − x_adam)`` on the means over seeds (1: all of SAM's gain, 0: none, < 0:
worse than Adam), with a 95 % percentile bootstrap interval that resamples each of the three rows' seeds
independently (:data:`BOOT` draws, a fixed generator: the report is reproducible). Beside it the row's own
comparison with Adam (:mod:`.stats`, as in the table): whether its gain is separated from 0.

The headline (the project's goal for a cheap option) is met by a row whose cost is at most
:data:`COST_TARGET` × Adam's and that keeps at least :data:`KEEP_TARGET` of SAM's λmax cut and of its W4A16 and
50 % pruning robustness, each gain over Adam separated from 0 over the seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

COST = "cost vs Adam"
LAM = "λmax"
# The targets of the headline: λmax and these compression columns (exact labels: no BN re-calibration).
HEADLINE = (LAM, "W4A16", "magnitude 50%")
COST_TARGET = 1.10
KEEP_TARGET = 0.80
BOOT = 4000
LEVEL = 0.95


def _rows(table) -> dict:
    """{row label: row key}; the row label is the key without empty parts."""
    return {" / ".join(k for k in key if k): key for key in table.rows}


def kept_share(row: list, adam: list, sam: list, rng: np.random.Generator, boot: int = BOOT,
               level: float = LEVEL) -> tuple[float, float, float]:
    """The share of SAM's gain over Adam that ``row`` keeps, on means, and its percentile bootstrap interval."""
    row, adam, sam = (np.asarray(v, dtype=float) for v in (row, adam, sam))
    if min(len(row), len(adam), len(sam)) == 0:
        return math.nan, math.nan, math.nan
    gain = sam.mean() - adam.mean()
    point = (row.mean() - adam.mean()) / gain if gain != 0 else math.nan
    if min(len(row), len(adam), len(sam)) < 2:
        return point, math.nan, math.nan

    def means(v):
        return v[rng.integers(0, len(v), size=(boot, len(v)))].mean(1)

    r, a, s = means(row), means(adam), means(sam)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (r - a) / (s - a)
    shares = shares[np.isfinite(shares)]
    if len(shares) < boot // 2:  # SAM's gain is often 0 in the resamples: no usable interval
        return point, math.nan, math.nan
    lo, hi = np.quantile(shares, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def _per_seed(cell, metric: str) -> dict:
    return {} if cell is None or cell.stat is None or cell.stat.text is not None else cell.stat.per_seed(metric)


def frontier(table, targets: tuple = HEADLINE) -> list[dict]:
    """One dict per row: cost (mean, std, n) and, per target, kept (share, low, high) and the row's verdict."""
    names = _rows(table)
    adam, sam = names.get("ADAM"), names.get("SAM")
    cols = [c for c in table.col_labels if _base(c) in targets]
    rng = np.random.default_rng(0)
    out = []
    for name, key in names.items():
        cells = table.rows[key]
        cost = cells.get(COST)
        entry = {"row": name, "cost": None, "targets": {}}
        if table.step_costs is not None:  # make bench's side-by-side step ratio: no spread, one measurement
            c = table.step_costs.get(name.lower())
            entry["cost"] = None if c is None else (float(c), math.nan, 1)
        elif cost is not None and cost.stat is not None and cost.stat.values:
            entry["cost"] = (cost.stat.mean, cost.stat.std, cost.stat.n)
        for col in cols:
            metric = "value" if col == LAM else "drop"
            mine = _per_seed(cells.get(col), metric)
            a = _per_seed(table.rows[adam].get(col), metric) if adam else {}
            s = _per_seed(table.rows[sam].get(col), metric) if sam else {}
            share = kept_share(list(mine.values()), list(a.values()), list(s.values()), rng)
            cell = cells.get(col)  # the table already compared it with ADAM's row: reuse that verdict
            verdict = cell.verdict if cell is not None and cell.baseline == (adam, col) else None
            entry["targets"][col] = {"kept": share, "verdict": verdict,
                                     "mean": float(np.mean(list(mine.values()))) if mine else math.nan}
        out.append(entry)
    return out


def _base(col: str) -> str:
    """A column's label without the ``[field=value]`` that tells variants apart (e.g. ``[bn_recalib=8]``)."""
    return col.split(" [", 1)[0]


def variants(entries: list, targets: tuple = HEADLINE) -> list:
    """The suffixes (``""``, ``"[bn_recalib=0]"``, ...) the headline's compression columns come in."""
    cols = dict.fromkeys(c for e in entries for c in e["targets"] if _base(c) in targets and c != LAM)
    return list(dict.fromkeys(c[len(_base(c)):].strip() for c in cols)) or [""]


def meets(entry: dict, targets: tuple = HEADLINE, variant: str = "") -> Optional[bool]:
    """Whether a row meets the headline with the compression columns of ``variant`` (None: a figure it needs is
    missing)."""
    if entry["cost"] is None:
        return None
    ok = entry["cost"][0] <= COST_TARGET
    for t in targets:
        t = t if t == LAM or not variant else f"{t} {variant}"
        got = entry["targets"].get(t)
        if got is None or got["verdict"] is None or math.isnan(got["kept"][0]):
            return None
        better = got["verdict"].separated and (got["verdict"].diff_mean < 0 if t == LAM
                                               else got["verdict"].diff_mean > 0)
        ok = ok and got["kept"][0] >= KEEP_TARGET and bool(better)
    return ok


def on_front(entries: list, target: str = LAM) -> set:
    """Rows no other row beats in both cost (lower) and the share of SAM's ``target`` gain kept (higher)."""
    pts = {e["row"]: (e["cost"][0], e["targets"][target]["kept"][0]) for e in entries
           if e["cost"] is not None and target in e["targets"] and not math.isnan(e["targets"][target]["kept"][0])}
    return {r for r, (c, k) in pts.items()
            if not any((c2 <= c and k2 >= k) and (c2, k2) != (c, k) for r2, (c2, k2) in pts.items() if r2 != r)}


def _fmt_share(k: tuple) -> str:
    p, lo, hi = k
    if math.isnan(p):
        return "—"
    def f(x):
        return f"{x:.2f}".replace("-0.00", "0.00")

    return f(p) + ("" if math.isnan(lo) else f" [{f(lo)}, {f(hi)}]")


def markdown(entries: list, targets: tuple = HEADLINE, bench: bool = False) -> str:
    """The table beside the figure: cost, per target the share kept and the verdict against Adam, headline."""
    front = on_front(entries)
    cols = list(dict.fromkeys(c for e in entries for c in e["targets"]))
    cols = [LAM] * (LAM in cols) + [c for c in cols if c != LAM]
    vs = variants(entries, targets)
    head = (["Row", "cost vs Adam"] + [f"{t}: kept of SAM's gain" for t in cols]
            + [f"headline met {v}".strip() for v in vs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cost = "—" if e["cost"] is None else f"{e['cost'][0]:.2f}x" + (
            "" if math.isnan(e["cost"][1]) else f" ± {e['cost'][1]:.2f}")
        cells = []
        for t in cols:
            got = e["targets"].get(t)
            if got is None:
                cells.append("—")
                continue
            v = got["verdict"]
            mark = "" if v is None or not v.separated else " †"
            cells.append(_fmt_share(got["kept"]) + mark)
        met = [meets(e, targets, v) for v in vs]
        name = e["row"] + (" *" if e["row"] in front else "")
        lines.append("| " + " | ".join([name, cost] + cells + ["—" if m is None else "yes" if m else "no" for m in met])
                     + " |")
    lines += ["",
              f"kept: the share of SAM's gain over Adam (λmax cut; smaller drop) the row keeps, on the means over "
              f"seeds, [95 % percentile bootstrap over seeds]; †: the row's own difference to Adam is separated (95 % "
              f"t interval excludes 0, either side); *: on the cost / λmax-kept frontier. Headline: cost ≤ "
              f"{COST_TARGET:.2f}x Adam's and ≥ {KEEP_TARGET:.0%} of SAM's gain kept in each of {', '.join(targets)}, "
              f"each gain separated from Adam's. "
              + ("The cost is the step / Adam step that `make bench` measured side by side (craft-report "
                 "--step-costs); a row it does not measure has none." if bench else
                 "The cost is the sweep's measured training time (its machine's load included); `make bench "
                 "--json` measures the step ratios side by side (craft-report --step-costs).")]
    return "\n".join(lines) + "\n"


def figure(table, out_dir: Path, stem: str) -> list:
    """Cost against Adam (x) vs the share of SAM's λmax cut kept and vs each headline compression's accuracy (y),
    error bars over seeds, one marker per row; the table beside it as ``<stem>-pareto.md``."""
    from craft_runner.report.figures import _grid, _plt, _save, _wrap

    every = frontier(table)
    entries = [e for e in every if e["cost"] is not None]
    if not entries or not any(e["targets"] for e in entries):
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}-pareto.md"
    md.write_text(markdown(every, bench=table.step_costs is not None))
    comp = [c for c in dict.fromkeys(c for e in entries for c in e["targets"]) if c != LAM]
    plt = _plt()
    fig, axes = _grid(plt, 1 + len(comp), w=4.6, h=3.6)
    names = _rows(table)
    for ax, target in zip(axes, (LAM, *comp)):
        for i, e in enumerate(entries):
            x, xs = e["cost"][0], e["cost"][1]
            if target == LAM:
                k = e["targets"].get(LAM, {}).get("kept", (math.nan,) * 3)
                y = k[0]
                yerr = None if math.isnan(k[1]) else [[max(y - k[1], 0)], [max(k[2] - y, 0)]]
            else:
                cell = table.rows[names[e["row"]]].get(target)
                if cell is None or cell.stat is None or cell.stat.text is not None:
                    continue
                y, yerr = cell.stat.mean, None if math.isnan(cell.stat.std) else cell.stat.std
            if math.isnan(y):
                continue
            ax.errorbar([x], [y], xerr=None if math.isnan(xs) else xs, yerr=yerr, fmt="os^vD<>ph*X"[i % 11],
                        capsize=3, label=e["row"])
            ax.annotate(e["row"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(COST_TARGET, color="grey", lw=0.8, ls="--")
        if target == LAM:
            ax.axhline(KEEP_TARGET, color="grey", lw=0.8, ls=":")
            ax.set_ylabel("share of SAM's λmax cut kept")
        else:
            ax.set_ylabel(f"{target} accuracy (%)")
        ax.set_xlabel("step cost vs Adam's (make bench)" if table.step_costs is not None
                      else "training time vs Adam's (x)")
        ax.set_title(_wrap(f"{'λmax' if target == LAM else target}: cost against what is kept", 45), fontsize=8)
    axes[0].legend(fontsize=6, loc="best")
    return [_save(plt, fig, out_dir / f"{stem}-pareto.png"), md]
