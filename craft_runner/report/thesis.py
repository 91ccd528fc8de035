"""The papers' thesis tested directly: does λmax predict how much a network loses when compressed?

Both papers conclude that λmax (the top Hessian eigenvalue after training) is a proxy for compressibility.
Over every training of the given sweeps (all optimizers, architectures and seeds) this module takes, per
compression setting, one point per training: (λmax after training, drop = compressed top-1 − FP32 top-1),
and reports Spearman's ρ between log λmax and the drop

- pooled over all trainings ("all"), with a percentile bootstrap 95 % interval that resamples trainings
  (``n_resamples`` draws with replacement, a fixed ``seed``, so the interval is reproducible);
- within each optimizer (ADAM, SAM, ARCH, ...: the rows' approach label; where a setting spans several
  backbones or data sets, within each backbone, data set and optimizer), each with its own interval: does a
  lower λmax predict a smaller drop among one method's seeds, or only between methods?
- within optimizers pooled ("within"): the n-weighted mean of the per-optimizer ρ, its interval from a
  bootstrap stratified by optimizer (trainings resampled inside their own optimizer): the within-method
  question with every training's weight, free of the differences between methods.

Records are grouped by the training they share (the inputs of the weights' cache key, seed included:
:attr:`Record.train_fields`), so a training that several sweeps or several compression cells reuse is one
point per setting; a setting is the compression's table label, split (``[field=value]``) by any compress field
that varies among records of one label (e.g. QAT's ``act_quant``). Spearman's ρ is invariant under the
monotone log, so ranks of λmax are used; the log matters only for the figure's axis.

Verdict per setting, on the pooled interval: the papers say higher λmax → larger loss, i.e. ρ(log λmax, drop) < 0
since drops are negative: "λmax predicts the drop" when the interval lies below 0, "contrary" when it lies
above, "not separated" otherwise; fewer than :data:`MIN_N` trainings: "too few trainings". The intervals are
per setting, not corrected for the number of settings.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.stats import rankdata

from craft_runner.atomic import atomic_write_text
from craft_runner.report import figures
from craft_runner.report.papers import approach, backbone, compression, task
from craft_runner.report.records import Record

N_RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
MIN_N = 5  # trainings needed for an interval (the ρ of fewer is shown, without one)
HOLDS, CONTRARY, NOT_SEPARATED, TOO_FEW = ("λmax predicts the drop", "contrary", "not separated",
                                           "too few trainings")
CSV_COLUMNS = ("setting", "group", "n", "rho", "ci_low", "ci_high", "verdict")


@dataclass(frozen=True)
class Point:
    training: tuple  # the training's cache-key fields
    optimizer: str  # the group "within" compares inside: the approach (ADAM, SAM, ARCH, ...)
    lam: float  # λmax after training
    drop: float  # compressed − FP32 top-1, percentage points
    context: str = ""  # backbone and data set: with several in one setting, a group is one of them and a method


# --------------------------------------------------------------------------------------------- statistics


def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank."""
    return rankdata(a, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair; NaN where a row is constant."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's r of the ranks (ties: average ranks); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    return float(_pearson_rows(_rank_rows(x), _rank_rows(y)))


def _draws(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_resamples, n))


def bootstrap_ci(x: Sequence[float], y: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of Spearman's ρ, resampling (x, y) pairs with replacement.

    Draws where a side is constant (ρ undefined) are left out; (None, None) when fewer than half remain.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    idx = _draws(np.random.default_rng(seed), len(x), n_resamples)
    rho = _pearson_rows(_rank_rows(x[idx]), _rank_rows(y[idx]))
    return _percentiles(rho, n_resamples, level)


def _percentiles(rho: np.ndarray, n_resamples: int, level: float) -> tuple[Optional[float], Optional[float]]:
    rho = rho[~np.isnan(rho)]
    if len(rho) < n_resamples / 2:
        return None, None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(rho, [alpha, 1 - alpha])
    return float(lo), float(hi)


def within_pooled(groups: Sequence[tuple[Sequence[float], Sequence[float]]], n_resamples: int = N_RESAMPLES,
                  seed: int = SEED, level: float = LEVEL) -> tuple[int, float, Optional[float], Optional[float]]:
    """(n, ρ, ci_low, ci_high) of the n-weighted mean of each group's ρ (groups with a defined ρ only), the
    interval by a bootstrap stratified by group (pairs resampled inside their group)."""
    groups = [(np.asarray(x, float), np.asarray(y, float)) for x, y in groups if len(x) >= 3]
    groups = [(x, y) for x, y in groups if not math.isnan(spearman(x, y))]
    if not groups:
        return 0, float("nan"), None, None
    n = sum(len(x) for x, _ in groups)
    point = sum(len(x) * spearman(x, y) for x, y in groups) / n
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    weight = np.zeros(n_resamples)
    for x, y in groups:
        idx = _draws(rng, len(x), n_resamples)
        rho = _pearson_rows(_rank_rows(x[idx]), _rank_rows(y[idx]))
        ok = ~np.isnan(rho)
        total[ok] += len(x) * rho[ok]
        weight[ok] += len(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)
    lo, hi = _percentiles(pooled, n_resamples, level) if n >= MIN_N else (None, None)
    return n, point, lo, hi


def correlate(points: Sequence[Point], n_resamples: int = N_RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> tuple[int, float, Optional[float], Optional[float]]:
    """(n, ρ(log λmax, drop), ci_low, ci_high) over ``points``; no interval under :data:`MIN_N` points."""
    n = len(points)
    if n < 3:
        return n, float("nan"), None, None
    lam = [p.lam for p in points]
    drop = [p.drop for p in points]
    rho = spearman(lam, drop)
    lo, hi = bootstrap_ci(lam, drop, n_resamples, seed, level) if n >= MIN_N else (None, None)
    return n, rho, lo, hi


def verdict(n: int, lo: Optional[float], hi: Optional[float]) -> str:
    if n < MIN_N or lo is None or hi is None:
        return TOO_FEW
    if hi < 0:
        return HOLDS
    if lo > 0:
        return CONTRARY
    return NOT_SEPARATED


# --------------------------------------------------------------------------------------------- records


def training_key(r: Record) -> tuple:
    """The training a record's weights come from: its cache-key fields (seed included), as a sorted tuple."""
    return tuple(sorted((k, r.fields.get(k)) for k in r.train_fields))


def optimizer_label(r: Record) -> str:
    return approach(r.get("optimizer.name"), r.get("arch.preact"), r.get("arch.rprelu"))


def _setting_labels(records: Sequence[Record]) -> dict:
    """{id(record): setting}: the compression's label, split by compress fields varying under one label."""
    by_label = defaultdict(list)
    for r in records:
        lab = compression(r)
        if lab is not None:
            by_label[lab].append(r)
    out = {}
    for lab, recs in by_label.items():
        comp = sorted({p for r in recs for p in r.fields if p.startswith("compress.")})
        varying = [p for p in comp if len({r.fields.get(p) for r in recs}) > 1
                   and not all(r.fields.get(p) == r.seed for r in recs if p in r.fields)]
        for r in recs:
            out[id(r)] = lab + (" [" + ",".join(f"{p.split('.', 1)[1]}={r.fields.get(p)}" for p in varying) + "]"
                                if varying else "")
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Collected:
    points: dict  # setting -> [Point], one per training
    notes: list


def collect_points(records: Sequence[Record]) -> Collected:
    """One point per (setting, training): the training's λmax and the setting's drop (a rerun: the newest)."""
    done = [r for r in records if r.ok and _finite(r.metrics.get("drop"))]
    lam_of: dict = defaultdict(list)
    for r in records:
        if r.ok and _finite(r.metrics.get("lambda_max_after")):
            lam_of[training_key(r)].append(float(r.metrics["lambda_max_after"]))
    labels = _setting_labels(done)
    newest: dict = {}
    for r in sorted(done, key=lambda r: r.mtime):
        if id(r) in labels:
            newest[(labels[id(r)], training_key(r))] = r
    points: dict = defaultdict(list)
    no_lam = set()
    for (setting, key), r in sorted(newest.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        lams = lam_of.get(key)
        if not lams:
            no_lam.add(key)
            continue
        context = f"{backbone(r.get('model.name'))}, {task(r.get('dataset.name'), r.get('dataset.classes'))}"
        points[setting].append(Point(key, optimizer_label(r), statistics.median(lams), float(r.metrics["drop"]),
                                     context))
    notes = []
    disagree = sum(1 for v in lam_of.values() if max(v) - min(v) > 1e-6 * max(abs(x) for x in v))
    if disagree:
        notes.append(f"{disagree} trainings have records that disagree on λmax (measured with other diagnostics "
                     f"settings): their median is used")
    if no_lam:
        notes.append(f"{len(no_lam)} trainings with a compression drop but no λmax after training are left out")
    return Collected(dict(sorted(points.items())), notes)


def points_from_cells(path: Path) -> Collected:
    """The points of one ``<experiment>-cells.csv`` (craft-report's per-cell numbers, e.g. ``docs/small``): per
    seed, the row's λmax (the column named "λmax...") and FP32 ("FP32", else "Accuracy") with each compressed
    column's value, drop = value − FP32 of the same seed. A training is (experiment, seed, λmax, FP32): rows that
    share one differ only in a compression field (BasePTQ / PTQ4ViT rows), whose values then join the setting's
    label; the rest of the row is the group compared "within". Settings are named "<experiment>: <column>";
    experiments are not pooled (a cells CSV does not say which trainings two experiments share)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stem = Path(path).name[: -len("-cells.csv")]
    if not rows or "column" not in rows[0]:
        return Collected({}, [f"{path}: not a cells CSV"])
    headers = list(rows[0])[: list(rows[0]).index("column")]
    values: dict = defaultdict(dict)  # row key -> column -> {seed: value}
    compressed: dict = defaultdict(set)
    for r in rows:
        key = tuple(r[h] for h in headers)
        if r["values"] and r["seeds"]:
            values[key][r["column"]] = dict(zip(r["seeds"].split(), (float(v) for v in r["values"].split())))
        if r["drop_mean"]:
            compressed[key].add(r["column"])
    trainings: dict = defaultdict(list)  # training -> [row key]
    found = []
    for key, cols in values.items():
        lam = next((c for c in cols if c.startswith("λmax")), None)
        fp = "FP32" if "FP32" in cols else "Accuracy" if "Accuracy" in cols else None
        if lam is None or fp is None:
            continue
        for seed, lv in cols[lam].items():
            if seed in cols[fp]:
                t = (stem, seed, lv, cols[fp][seed])
                trainings[t].append(key)
                found += [(t, key, c, cols[c][seed] - cols[fp][seed]) for c in sorted(compressed[key])
                          if seed in cols[c]]
    # row fields that differ among the rows of one training are compression fields: they name the setting
    setting_fields = sorted({i for keys in trainings.values() for i in range(len(headers))
                             if len({k[i] for k in keys}) > 1})
    points: dict = defaultdict(list)
    for t, key, col, drop in found:
        extra = ",".join(f"{headers[i]}={key[i]}" for i in setting_fields)
        label = f"{stem}: {col}" + (f" [{extra}]" if extra else "")
        group = " / ".join(key[i] for i in range(len(headers)) if i not in setting_fields and key[i])
        points[label].append(Point(t, group, t[2], drop))
    return Collected(dict(sorted(points.items())), [])


# --------------------------------------------------------------------------------------------- verdicts


def _verdict_of(setting: str, pts: Sequence[Point], n_resamples: int, seed: int) -> dict:
    n, rho, lo, hi = correlate(pts, n_resamples, seed)
    by_opt = defaultdict(list)
    several = len({p.context for p in pts}) > 1  # "among one method's seeds": of one backbone and data set
    for p in pts:
        by_opt[f"{p.context} / {p.optimizer}" if several else p.optimizer].append(p)
    within = {opt: correlate(by_opt[opt], n_resamples, seed) for opt in sorted(by_opt)}
    pooled = within_pooled([([p.lam for p in g], [p.drop for p in g]) for g in by_opt.values()], n_resamples,
                           seed) if len(by_opt) > 1 else (0, float("nan"), None, None)
    return {"setting": setting, "n": n, "rho": rho, "ci_low": lo, "ci_high": hi, "verdict": verdict(n, lo, hi),
            "within": within, "within_pooled": pooled, "within_verdict": verdict(pooled[0], *pooled[2:])}


def thesis_verdicts(records: Sequence[Record], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                    cells: Sequence[Path] = ()) -> list[dict]:
    """One dict per compression setting: setting, n (trainings), rho (Spearman's ρ of log λmax and the drop,
    pooled), ci_low, ci_high (bootstrap 95 % over trainings), verdict, within ({optimizer: (n, rho, ci_low,
    ci_high)}), within_pooled ((n, rho, ci_low, ci_high) of the n-weighted within-optimizer ρ) and
    within_verdict (the same rule on it). ``cells``: cells CSVs read as well (:func:`points_from_cells`)."""
    coll = _collect(records, cells)
    return [_verdict_of(s, pts, n_resamples, seed) for s, pts in coll.points.items()]


def _collect(records: Sequence[Record], cells: Sequence[Path]) -> Collected:
    coll = collect_points(records)
    for path in cells:
        extra = points_from_cells(Path(path))
        coll.points.update({k: v for k, v in extra.points.items() if k not in coll.points})
        coll.notes.extend(extra.notes)
    return coll


# --------------------------------------------------------------------------------------------- output


def _f(v, digits: int = 2) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(lo, hi) -> str:
    return "—" if lo is None else f"[{_f(lo)}, {_f(hi)}]"


def _groups(v: dict):
    """(group, n, rho, ci_low, ci_high, verdict) of a setting: all, each optimizer, then within (pooled)."""
    yield "all", v["n"], v["rho"], v["ci_low"], v["ci_high"], v["verdict"]
    for opt, (n, rho, lo, hi) in v["within"].items():
        yield opt, n, rho, lo, hi, verdict(n, lo, hi)
    n, rho, lo, hi = v["within_pooled"]
    if n:
        yield "within", n, rho, lo, hi, v["within_verdict"]


def csv_rows(verdicts: Sequence[dict]) -> list[list]:
    return [[v["setting"], g, n, _f(rho, 4), _f(lo, 4), _f(hi, 4), ver]
            for v in verdicts for g, n, rho, lo, hi, ver in _groups(v)]


def to_csv(verdicts: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(csv_rows(verdicts))
    return buf.getvalue()


def to_markdown(verdicts: Sequence[dict], notes: Sequence[str] = (), n_resamples: int = N_RESAMPLES,
                seed: int = SEED) -> str:
    lines = ["### λmax as a proxy for compressibility: Spearman's ρ(log λmax, drop) over trainings", "",
             "| Setting | Group | n | ρ | 95 % CI | Verdict |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        for g, n, rho, lo, hi, ver in _groups(v):
            lines.append(f"| {v['setting']} | {g} | {n} | {_f(rho) or '—'} | {_ci(lo, hi)} | {ver} |")
    lines.append("")
    for v in verdicts:
        lines.append(f"- {v['setting']}: {v['verdict']} (ρ = {_f(v['rho'])}, 95 % CI {_ci(v['ci_low'], v['ci_high'])}"
                     f", n = {v['n']} trainings); within optimizers: {v['within_verdict']} (ρ = "
                     f"{_f(v['within_pooled'][1])}, {_ci(*v['within_pooled'][2:])})")
    lines += ["", f"- drop = compressed top-1 − FP32 top-1 (negative: a loss); the papers' thesis is ρ < 0 (higher "
                  f"λmax, larger loss). One point per training (cache key, seed included); intervals: percentile "
                  f"bootstrap over trainings, {n_resamples} resamples, seed {seed}; \"within\": n-weighted mean of "
                  f"the per-optimizer ρ, bootstrap stratified by optimizer; no interval under {MIN_N} trainings; "
                  f"not corrected for the number of settings."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def report(records: Sequence[Record], out_dir: Optional[Path] = None, stream=None, figure: bool = True,
           n_resamples: int = N_RESAMPLES, seed: int = SEED, cells: Sequence[Path] = ()) -> int:
    """Print the thesis table; with ``out_dir`` also write thesis.md, thesis.csv and the scatter figure.
    ``cells``: cells CSVs read as well (:func:`points_from_cells`). Returns 2 when no training has both a λmax
    and a compression drop, else 0."""
    stream = stream or sys.stdout
    coll = _collect(records, cells)
    if not coll.points:
        print("craft-report: error: --thesis: no training with both a λmax after training and a compression drop",
              file=sys.stderr)
        return 2
    verdicts = [_verdict_of(s, pts, n_resamples, seed) for s, pts in coll.points.items()]
    text = to_markdown(verdicts, coll.notes, n_resamples, seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(text, out_dir / "thesis.md")
        atomic_write_text(to_csv(verdicts), out_dir / "thesis.csv")
        if figure:
            for p in figures.thesis_scatter(coll.points, verdicts, out_dir):
                print(f"figure: {p}", file=sys.stderr)
    print(text, file=stream, end="")
    return 0
