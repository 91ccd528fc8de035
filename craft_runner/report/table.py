"""Collect results.json files into a DataFrame and print them as a paper table.

Rows are training setups (optimizer, arch), columns are compression settings; a cell is
"accuracy (drop)" as in CrAFT's Table 2, with the full-precision accuracy and λmax beside.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def compression_label(c: dict) -> str:
    """The table label of a compress config; a name no compressor is registered under is kept, with a warning."""
    from craft_runner.compress import compression_label as label
    from craft_runner.schema import ConfigError

    try:
        return label(c)
    except ConfigError:
        log.warning("results for an unknown compressor %r: labelled by its name", c.get("name"))
        return str(c.get("name"))


def load_results(root: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(root).rglob("results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            continue
        cfg, m = r["config"], r["metrics"]
        rows.append({
            "model": cfg["model"]["name"], "dataset": cfg["dataset"]["name"], "optimizer": cfg["optimizer"]["name"],
            "arch": cfg["arch"]["name"] + ("" if cfg["arch"]["name"] == "base" else
                                           f"(preact={cfg['arch']['preact']},rprelu={cfg['arch']['rprelu']})"),
            "seed": cfg["seed"], "compression": compression_label(cfg["compress"]),
            "fp_acc": m["fp_acc"], "compressed_acc": m.get("compressed_acc"), "drop": m.get("drop"),
            "lambda_max": m.get("lambda_max_after"), "lambda_max_before": m.get("lambda_max_before"),
            "train_seconds": m.get("train_seconds"), "path": str(path.parent),
        })
    return pd.DataFrame(rows)


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, optimizer, arch, seed); FP32, λmax, then one column per compression."""
    from craft_runner.optim.registry import optimizer_names

    keys = ["model", "dataset", "optimizer", "arch", "seed"]
    dup = df.duplicated(keys + ["compression"], keep=False)
    if dup.any():
        log.warning("%d runs share a table cell (same setup, seed and compression); the first is shown",
                    int(dup.sum()))
    base = df.groupby(keys, sort=False).agg(
        FP32=("fp_acc", "first"), lambda_max=("lambda_max", "first"), train_s=("train_seconds", "first"))
    comp = df[df["compression"] != "none"].copy()
    comp["cell"] = [f"{a:.2f} ({d:+.2f})" for a, d in zip(comp["compressed_acc"], comp["drop"])]
    cells = comp.pivot_table(index=keys, columns="compression", values="cell", aggfunc="first", sort=False)
    out = base.join(cells).reset_index()
    # Training cost relative to Adam on the base architecture, same model, data and seed (CrAFT Table 4).
    ref = out[(out["optimizer"] == "adam") & (out["arch"] == "base")].set_index(["model", "dataset", "seed"])
    overhead = [row.train_s / ref["train_s"].get((row.model, row.dataset, row.seed), float("nan"))
                for row in out.itertuples()]
    out.insert(out.columns.get_loc("train_s") + 1, "overhead",
               ["n/a" if pd.isna(v) else f"{v:.2f}x" for v in overhead])
    out["FP32"] = out["FP32"].map(lambda v: f"{v:.2f}")
    out["lambda_max"] = out["lambda_max"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}")
    out["train_s"] = out["train_s"].map(lambda v: f"{v:.1f}")
    # Baselines first: optimizers in the order the config lists them.
    order = {name: i for i, name in enumerate(optimizer_names())}
    out["_o"] = out["optimizer"].map(lambda o: order.get(o, len(order)))
    return out.sort_values(["model", "dataset", "seed", "arch", "_o"], kind="stable").drop(columns="_o")


def format_table(df: pd.DataFrame, fmt: str = "github") -> str:
    from tabulate import tabulate

    return tabulate(df, headers="keys", tablefmt=fmt, showindex=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="craft-table", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a sweep or run directory holding results.json files")
    ap.add_argument("--format", default="github", help="tabulate format: github, latex, plain, ...")
    ap.add_argument("--csv", help="also write the table as CSV to this path")
    args = ap.parse_args(argv)
    df = load_results(Path(args.root))
    if df.empty:
        print(f"craft-table: error: no finished results.json under {args.root}", file=sys.stderr)
        return 2
    table = paper_table(df)
    print(format_table(table, args.format))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
