"""The papers' figures from a built table (PNG, matplotlib's Agg backend), error bars = std over seeds.

Each function takes ``(table, out_dir, stem)`` and returns the paths it wrote (none when the table holds
nothing to plot): accuracy vs sparsity, N:M bars, λmax bars, drop bars, PCA curves, activation ranges,
fine-tuning curves.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from craft_runner.atomic import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a reader never sees half a PNG
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def _wrap(title: str, width: int = 60) -> str:
    return textwrap.fill(title, width)


def _err(std: float):
    return None if (std is None or math.isnan(std)) else std


def _row_name(table, key) -> str:
    return " / ".join(k for k in key if k)


def _split(table, key):
    """(panel, line) of a row key: the last layout row field draws the lines, the others pick the panel."""
    n = len(table.layout.rows)
    line = key[n - 1:n] + key[n:]
    return tuple(key[: n - 1]), " / ".join(x for x in line if x)


def _grid(plt, n: int, w: float = 4.2, h: float = 3.2):
    cols = 2 if n == 4 else min(n, 3)  # four panels read better as 2 x 2 than 3 + 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


# ------------------------------------------------------------------------------------------------ curves


def _pct(label: str):
    try:
        return float(label.split(" [")[0].rstrip("%")) if label.split(" [")[0].endswith("%") else None
    except ValueError:
        return None


def _sparsity_curves(table, out_dir: Path, name: str, title: str):
    labels = [c for c in table.col_labels if _pct(c) is not None]
    if not labels:
        return []
    panels = defaultdict(dict)
    for key, cells in table.rows.items():
        panel, line = _split(table, key)
        pts = [(_pct(c), cells[c].stat) for c in labels if cells[c].stat is not None]
        if pts:
            panels[panel][line] = pts
    if not panels:
        return []
    plt = _plt()
    fig, axes = _grid(plt, len(panels))
    for ax, (panel, lines) in zip(axes, panels.items()):
        for line, pts in lines.items():
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[_err(p[1].std) or 0 for p in pts],
                        marker="o", ms=3, capsize=3, label=line)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(" / ".join(panel) or title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(_wrap(title, 40 * min(len(panels), 3)), fontsize=10)
    return [_save(plt, fig, out_dir / f"{name}.png")]


def sparsity_curves_snt(table, out_dir: Path, stem: str):
    """SNT Figures 5 and 7: top-1 vs sparsity, one panel per (backbone, pruning) or augmentation setting."""
    return _sparsity_curves(table, out_dir, stem, table.layout.title)


def sparsity_curves_craft(table, out_dir: Path, stem: str):
    """CrAFT Figure 4a: top-1 vs unstructured sparsity, one line per criterion and fine-tuning."""
    labels = [c for c in table.col_labels if _pct(c) is not None]
    if not labels:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, cells in table.rows.items():
        pts = sorted((_pct(c), cells[c].stat) for c in labels if cells[c].stat is not None)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[_err(p[1].std) or 0 for p in pts],
                        marker="o", ms=3, capsize=3, label=_row_name(table, key))
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("(a) unstructured pruning", fontsize=10)
    ax.legend(fontsize=7)
    return [_save(plt, fig, out_dir / f"{stem}a.png")]


def _grouped_bars(ax, groups: list[str], series: dict, value="mean", err="std"):
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, stats) in enumerate(series.items()):
        vals = [getattr(stats[g], value) if stats.get(g) is not None and getattr(stats[g], value) is not None
                else np.nan for g in groups]
        errs = [(_err(getattr(stats[g], err)) or 0) if stats.get(g) is not None else 0 for g in groups]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)


def nm_bars(table, out_dir: Path, stem: str):
    """CrAFT Figure 4b: top-1 after N:M pruning at 50 %, easiest (32:64) to hardest (2:4), with error bars."""
    groups = [c for c in table.col_labels if ":" in c.split(" [")[0]]
    if not groups:
        return []
    series = {_row_name(table, key): {g: cells[g].stat for g in groups} for key, cells in table.rows.items()}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    _grouped_bars(ax, groups, series)
    ax.set_xlabel("N:M pattern (50 % sparsity)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("(b) N:M block pruning", fontsize=10)
    ax.legend(fontsize=7)
    return [_save(plt, fig, out_dir / f"{stem}b.png")]


def drop_bars(table, out_dir: Path, stem: str):
    """CrAFT Tables 2 and 3 as bars: the accuracy drop per bit width, one panel per task or backbone."""
    groups = [c for c in table.col_labels if c.startswith("W")]
    if not groups:
        return []
    panels = defaultdict(dict)
    for key, cells in table.rows.items():
        panel = key[0]
        panels[panel][" / ".join(x for x in key[1:] if x)] = {g: cells[g].stat for g in groups}
    plt = _plt()
    fig, axes = _grid(plt, len(panels), w=5)
    for ax, (panel, series) in zip(axes, panels.items()):
        _grouped_bars(ax, groups, series, value="drop_mean", err="drop_std")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel("accuracy drop (points)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(_wrap(table.layout.title, 45 * min(len(panels), 3)), fontsize=9)
    return [_save(plt, fig, out_dir / f"{stem}.png")]


def lambda_bars(table, out_dir: Path, stem: str):
    """λmax per row (and per λmax column: before / after Adam / after SAM), error bars over seeds."""
    cols = [c for c, spec in zip(table.col_labels, table.col_specs) if spec.kind == "lam"]
    rows = {_row_name(table, key): cells for key, cells in table.rows.items()
            if any(cells[c].stat is not None for c in cols)}
    if not cols or not rows:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) * max(len(cols), 1) + 2), 4))
    series = {c: {r: cells[c].stat for r, cells in rows.items()} for c in cols}
    _grouped_bars(ax, list(rows), series)
    vals = [s.mean for c in cols for s in series[c].values() if s is not None and s.mean > 0]
    if vals and max(vals) / min(vals) > 50:
        ax.set_yscale("log")
    ax.set_ylabel("λmax (top Hessian eigenvalue)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    if len(cols) > 1:
        ax.legend(fontsize=7)
    ax.set_title(_wrap(table.layout.title, 55), fontsize=9)
    return [_save(plt, fig, out_dir / f"{stem}-lambda.png")]


# ------------------------------------------------------------------------------------------------ diagnostics


def _pad_mean(curves):
    n = max(len(c) for c in curves)
    return np.mean([np.concatenate([c, np.ones(n - len(c))]) for c in curves], axis=0)


PANELS = {"FFN": ("mlp.fc1", "mlp.fc2", "mlp_channels.fc1", "mlp_channels.fc2"), "QKV": ("attn.qkv",)}


def pca_curves(table, out_dir: Path, stem: str):
    """CrAFT Figure 1: mean cumulative explained variance vs number of components (FFN, QKV), band = ±std."""
    data = defaultdict(lambda: defaultdict(list))  # panel -> row -> [curve per seed]
    k_marks = set()
    for key, recs in table.row_records.items():
        for r in (r for r in recs if r.ok):
            sp = (r.sharpness.get("after") or {}).get("spectrum")
            if not sp:
                continue
            curves = {kind: np.asarray(c, dtype=float) for kind, c in sp["curves"].items()}
            panels = {p: [curves[k] for k in kinds if k in curves] for p, kinds in PANELS.items()}
            panels = {p: c for p, c in panels.items() if c} or {kind: [c] for kind, c in curves.items()}
            for p, cs in panels.items():
                data[p][_row_name(table, key)].append(_pad_mean(cs))
                if sp.get("k", 0) >= 1:
                    k_marks.add(sp["k"])
                else:
                    k_marks.add(math.ceil(sp["k"] * len(cs[0])))
    if not data:
        return []
    plt = _plt()
    fig, axes = _grid(plt, len(data))
    for ax, (panel, rows) in zip(axes, data.items()):
        for name, curves in rows.items():
            n = min(len(c) for c in curves)
            arr = np.stack([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            mean = arr.mean(0)
            ax.plot(x, mean, label=f"{name} (n={len(curves)})")
            if len(curves) > 1:
                sd = arr.std(0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, alpha=0.25)
        for k in k_marks:
            ax.axvline(k, color="grey", ls="--", lw=0.7)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("principal components")
        ax.set_ylabel("explained variance (share)")
        ax.set_title(panel, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("weight spectrum, averaged over blocks", fontsize=10)
    return [_save(plt, fig, out_dir / f"{stem}.png")]


def activation_ranges(table, out_dir: Path, stem: str):
    """CrAFT Figure 2: per-channel [min, max] of the first, middle and last block's input (first seed of each row)."""
    rows = []
    for key, recs in table.row_records.items():
        ok = sorted((r for r in recs if r.ok and (r.sharpness.get("after") or {}).get("act_ranges")),
                    key=lambda r: (r.seed is None, r.seed))
        if ok:
            rows.append((_row_name(table, key), ok[0]))
    if not rows:
        return []
    names = list(rows[0][1].sharpness["after"]["act_ranges"]["blocks"])
    picks = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(3.6 * len(picks), 2.4 * len(rows)), squeeze=False,
                             sharey="col")
    for i, (name, r) in enumerate(rows):
        blocks = r.sharpness["after"]["act_ranges"]["blocks"]
        for j, b in enumerate(picks):
            ax = axes[i][j]
            if b not in blocks:
                ax.axis("off")
                continue
            d = blocks[b]
            ax.vlines(range(d["channels"]), d["min"], d["max"], lw=0.8)
            ax.axhline(0, color="grey", lw=0.5)
            ratio = d.get("outlier_ratio")
            ax.set_title(f"{name}: {b}" + (f" (x{ratio:.1f})" if ratio else ""), fontsize=8)
            ax.tick_params(labelsize=6)
    fig.supxlabel("channel", fontsize=8)
    fig.suptitle(f"block input range per channel (seed {rows[0][1].seed})", fontsize=9)
    return [_save(plt, fig, out_dir / f"{stem}.png")]


def finetune_curves(table, out_dir: Path, stem: str):
    """SNT Figure 6: top-1 after k epochs of fine-tuning (one run per k) and the loss per epoch of the longest."""
    cols = [c for c in table.col_labels if c.startswith("ft ")]
    if not cols:
        return []
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, cells in table.rows.items():
        pts = [(int(c.split()[1]), cells[c].stat) for c in cols if cells[c].stat is not None]
        if pts:
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[_err(p[1].std) or 0 for p in pts],
                        marker="o", ms=3, capsize=3, label=_row_name(table, key))
        recs = [r for r in table.row_records[key] if r.ok and r.compression.get("finetune_history")]
        if recs:
            longest = max(r.get("compress.finetune_epochs") or 0 for r in recs)
            hist = [[h["loss"] for h in r.compression["finetune_history"]] for r in recs
                    if r.get("compress.finetune_epochs") == longest]
            n = min(len(h) for h in hist)
            arr = np.array([h[:n] for h in hist])
            ax2.errorbar(np.arange(1, n + 1), arr.mean(0), yerr=arr.std(0, ddof=1) if len(arr) > 1 else None,
                         marker="o", ms=3, capsize=3, label=_row_name(table, key))
    ax.set_xlabel("fine-tuning epochs after W4 PTQ (one run per point)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7)
    ax2.set_xlabel("epoch of the longest fine-tuning")
    ax2.set_ylabel("training loss")
    ax2.legend(fontsize=7)
    for a in (ax, ax2):  # epochs are whole numbers
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(_wrap(table.layout.title, 100), fontsize=10)
    return [_save(plt, fig, out_dir / f"{stem}.png")]


# ------------------------------------------------------------------------------------------------ thesis


def thesis_scatter(points: dict, verdicts, out_dir: Path, stem: str = "thesis-scatter"):
    """λmax (log axis) against the drop, one panel per compression setting, one colour per optimizer (group);
    each panel's title gives the pooled Spearman ρ and its interval (:mod:`craft_runner.report.thesis`)."""
    points = {s: [p for p in pts if p.lam > 0] for s, pts in points.items()}  # a log axis: λmax > 0 only
    points = {s: pts for s, pts in points.items() if pts}
    if not points:
        return []
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    by_setting = {v["setting"]: v for v in verdicts}
    opts = sorted({p.optimizer for pts in points.values() for p in pts})
    cmap = plt.get_cmap("tab20" if len(opts) > 10 else "tab10")
    colour = {o: cmap(i % cmap.N) for i, o in enumerate(opts)}
    fig, axes = _grid(plt, len(points), 4.2, 3.4)
    shown = None
    for ax, (setting, pts) in zip(axes, points.items()):
        mine = sorted({p.optimizer for p in pts})
        for o in mine:
            sel = [p for p in pts if p.optimizer == o]
            ax.scatter([p.lam for p in sel], [p.drop for p in sel], s=14, color=colour[o], label=o, alpha=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: the minor ones overlap
        ax.set_xlabel("λmax after training (log)")
        ax.set_ylabel("drop (compressed − FP32, points)")
        v = by_setting.get(setting)
        rho = "" if v is None or v["rho"] != v["rho"] else f"\nρ = {v['rho']:.2f}"
        if rho and v["ci_low"] is not None:
            rho += f" [{v['ci_low']:.2f}, {v['ci_high']:.2f}], n = {v['n']}"
        ax.set_title(_wrap(setting, 45) + rho, fontsize=8)
        ax.grid(alpha=0.3)
        if mine != shown:  # a legend where the groups change (the panels of one experiment share theirs)
            ax.legend(fontsize=6)
            shown = mine
    return [_save(plt, fig, Path(out_dir) / f"{stem}.png")]
