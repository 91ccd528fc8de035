"""The papers' claims that their tables test, and the verdict a set of sweeps gives each (``craft-report --claims``).

A :class:`Claim` names the experiments that test it, the columns (a regular expression on the column label)
and the treatment rows (row header → label); every such cell that has a baseline (:mod:`.engine`: ADAM on the
base architecture, or the column ``Col.versus`` names) gives a comparison: *holds* when its 95 % interval
excludes 0 on the claimed side, *contrary* when it excludes 0 on the other, *not separated* when it holds 0,
and no verdict with fewer than two seeds on a side. A claim holds when some cells hold and none is contrary,
is contrary when some are contrary and none holds, *mixed* when both, *not separated* when no cell separates,
and *not measured* (with the reason) when no cell could be compared.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

from craft_runner.report import stats
from craft_runner.report.engine import Table

# Treatment rows: any of these {row header: labels} (all headers of one entry present and matching).
SAM_ROWS = ({"Optimizer": ("SAM",)}, {"Fine-tuning": ("SAM", "CrAFT")}, {"Method": ("CrAFT",)},
            {"Model": ("SAM",)}, {"Approach": ("SAM",)})
ARCH_ROWS = ({"Approach": ("ARCH",)},)
BITS = r"W\d+A\d+|A8W8"


@dataclasses.dataclass(frozen=True)
class Claim:
    paper: str
    where: str  # "Table 2", "Figure 4"
    text: str
    tests: tuple  # (experiment, column regex) pairs: where the claim is measured (``_small`` counts too)
    rows: tuple = SAM_ROWS
    direction: int = +1  # +1: the treatment's value is higher than the baseline's; -1: lower
    metric: Optional[str] = None  # "drop" / "value"; None: the column's own (the drop for compressed cells)


LOWER, HIGHER = -1, +1

CLAIMS: list[Claim] = [
    # CrAFT (Jeon et al.): SAM during fine-tuning (CrAFT) against Adam fine-tuning.
    Claim("CrAFT", "Table 1", "SAM lowers λmax (ViT-B: 739 → 21)",
          (("craft_table1", "λmax"), ("digits_default", "λmax"), ("cheap_sam", "λmax")), direction=LOWER),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under one-shot weight pruning at 50 % (−4.78 vs −1.11)",
          (("craft_table1", r"Weight Pruning \(50%\)"), ("digits_default", "magnitude 50%"),
           ("cheap_sam", "magnitude 50%"))),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under token pruning (−4.30 vs −1.04)",
          (("craft_table1", "Token Pruning"),)),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under token merging (−4.11 vs −0.95)",
          (("craft_table1", "Token Merging"),)),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under A8W8 quantization (−72.05 vs −0.15)",
          (("craft_table1", "A8W8"), ("digits_default", "W8A8"))),
    Claim("CrAFT", "Table 2", "CrAFT boosts PTQ after task adaptation (BasePTQ and PTQ4ViT): smaller drops than Adam",
          (("craft_table2", BITS), ("digits_default", BITS), ("cheap_sam", BITS))),
    Claim("CrAFT", "Table 3", "CrAFT's smaller BasePTQ drops generalize across backbones",
          (("craft_table3", BITS),)),
    Claim("CrAFT", "Table 4", "CrAFT's fine-tuning takes longer than Adam's (about 2×)",
          (("craft_table4", r"E2E Time \(Min\)"), ("digits_default", r"train \(s\)"))),
    Claim("CrAFT", "Table 5", "fine-tuning flattens the pretrained minimum: λmax after Adam below λmax before",
          (("craft_table5", "ADAM"),), rows=(), direction=LOWER),
    Claim("CrAFT", "Table 5", "CrAFT reaches a flatter minimum than Adam fine-tuning (lower λmax)",
          (("craft_table5", "CrAFT"),), rows=(), direction=LOWER),
    Claim("CrAFT", "Figure 1", "SAM's weights have a lower rank: the top-k principal components hold more variance",
          (("craft_fig1", "FFN share|QKV share"),)),
    Claim("CrAFT", "Figure 2", "SAM smooths the activations: smaller channel ranges and fewer outliers",
          (("craft_fig2", r"max \|x\||max outlier ratio|median outlier ratio"),), direction=LOWER),
    Claim("CrAFT", "Figure 4a", "CrAFT lifts unstructured one-shot pruning (magnitude and Wanda), most above 40 %",
          (("craft_fig4", r"\d+%"),)),
    Claim("CrAFT", "Figure 4b", "CrAFT lifts N:M block pruning at 50 % (up to 12 points on 16:32)",
          (("craft_fig4", r"\d+:\d+"),)),
    # SNT (Jeon et al.): SAM and ARCH (Adam on the transformed network) against ADAM.
    Claim("SNT", "Table 3 (PTQ)", "SAM lowers λmax below ADAM's", (("snt_table3_ptq", r"λmax.*"),),
          direction=LOWER),
    Claim("SNT", "Table 3 (PTQ)", "ARCH lowers λmax below ADAM's", (("snt_table3_ptq", r"λmax.*"),), rows=ARCH_ROWS,
          direction=LOWER),
    Claim("SNT", "Table 3 (PTQ)", "SAM keeps more accuracy than ADAM after PTQ (ResNet-20 W4: +2.2)",
          (("snt_table3_ptq", r"Top-1.*"),)),
    Claim("SNT", "Table 3 (PTQ)", "ARCH keeps more accuracy than ADAM after PTQ (ResNet-20 W4: +1.0)",
          (("snt_table3_ptq", r"Top-1.*"),), rows=ARCH_ROWS),
    Claim("SNT", "Table 3 (QAT)", "SAM lowers λmax below ADAM's", (("snt_table3_qat", r"λmax.*"),),
          direction=LOWER),
    Claim("SNT", "Table 3 (QAT)", "ARCH lowers λmax below ADAM's (below SAM's on MobileNet-V1)",
          (("snt_table3_qat", r"λmax.*"),), rows=ARCH_ROWS, direction=LOWER),
    Claim("SNT", "Table 3 (QAT)", "SAM keeps more accuracy than ADAM after W4A4 QAT",
          (("snt_table3_qat", r"Top-1.*"),)),
    Claim("SNT", "Table 3 (QAT)", "ARCH keeps more accuracy than ADAM after W4A4 QAT (MobileNet-V1: +5.4)",
          (("snt_table3_qat", r"Top-1.*"),), rows=ARCH_ROWS),
    Claim("SNT", "Table 4",
          "the transformation lowers λmax below the baseline's, cumulatively (+Preact, then +PReLU/LBias)",
          (("snt_table4", r"λmax.*"),), rows=({"": ("+Preact", "+PReLU/LBias")},), direction=LOWER),
    Claim("SNT", "Table 4", "the transformation boosts static W4 accuracy (+0.28, +1.02)",
          (("snt_table4", r"Top-1.*"),), rows=({"": ("+Preact", "+PReLU/LBias")},)),
    Claim("SNT", "Figure 5", "IMP: ARCH keeps more accuracy than ADAM (Mixer-S: about +2)",
          (("snt_fig5", r"\d+%"),), rows=({"Pruning": ("IMP",), "Approach": ("ARCH",)},)),
    Claim("SNT", "Figure 5", "one-shot pruning: SAM keeps more accuracy than ADAM (\"a clear winner\")",
          (("snt_fig5", r"\d+%"),), rows=({"Pruning": ("one-shot",), "Approach": ("SAM",)},)),
    Claim("SNT", "Figure 5", "one-shot pruning above 50 %: ARCH keeps slightly more accuracy than ADAM",
          (("snt_fig5", r"[6-9]\d%"),), rows=({"Pruning": ("one-shot",), "Approach": ("ARCH",)},)),
    Claim("SNT", "Figure 6", "after W4 PTQ and k epochs of fine-tuning SAM recovers more accuracy than ADAM",
          (("snt_fig6", r"ft \d+ ep"),)),
    Claim("SNT", "Figure 7", "ARCH keeps its pruning robustness with and without augmentation (50 %: about +4)",
          (("snt_fig7", r"\d+%"),), rows=ARCH_ROWS),
]


@dataclasses.dataclass
class Comparison:
    experiment: str
    row: tuple
    col: str
    base_row: tuple
    base_col: str
    verdict: stats.Verdict
    mine: dict  # {seed: compared value}
    base: dict


def outcome(v: stats.Verdict, direction: int) -> str:
    """holds / contrary / not separated / n<2 of one comparison."""
    if v.separated is None:
        return v.reason or "n<2"
    if not v.separated:
        return "not separated"
    return "holds" if (v.diff_mean > 0) == (direction > 0) else "contrary"


def overall(outcomes: Sequence[str]) -> str:
    holds, contrary = outcomes.count("holds"), outcomes.count("contrary")
    if holds and contrary:
        return "mixed"
    if holds:
        return "holds"
    if contrary:
        return "contrary"
    if "not separated" in outcomes:
        return "not separated"
    return "not measured"


def _base_name(experiment: str) -> str:
    return experiment[: -len("_small")] if experiment.endswith("_small") else experiment


def _row_matches(headers: list, key: tuple, rows: tuple) -> bool:
    if not rows:
        return True
    labels = dict(zip(headers, key))
    return any(all(h in labels and labels[h] in allowed for h, allowed in alt.items()) for alt in rows)


def evaluate(claim: Claim, tables: dict) -> tuple[list, str]:
    """The claim's comparisons in ``tables`` ({experiment: Table}) and, when there are none, why."""
    found, why = [], []
    for exp, pattern in claim.tests:
        names = [n for n in tables if _base_name(n) == exp]
        if not names:
            why.append(f"no {exp} results")
            continue
        for name in sorted(names):
            table: Table = tables[name]
            cols = [c for c in table.col_labels if re.fullmatch(pattern, c.split(" [", 1)[0])]
            keys = [k for k in table.rows if _row_matches(table.row_headers, k, claim.rows)]
            if not cols or not keys:
                why.append(f"{name}: no {'column ' + pattern if not cols else 'treatment row'}")
                continue
            before = len(found)
            for key in keys:
                for col in cols:
                    cell = table.rows[key][col]
                    if cell.baseline is None:
                        if cell.stat is None:
                            why.append(f"{name} {' / '.join(key)} / {col}: no seed finished")
                        continue
                    base_key, base_col = cell.baseline
                    base = table.rows[base_key][base_col]
                    metric = claim.metric or cell.verdict.metric
                    mine, theirs = cell.stat.per_seed(metric), base.stat.per_seed(metric)
                    v = cell.verdict if metric == cell.verdict.metric else stats.compare(mine, theirs, table.test,
                                                                                         metric)
                    found.append(Comparison(name, key, col, base_key, base_col, v, mine, theirs))
            if len(found) == before:
                why.append(f"{name}: no cell with a baseline (the reference row missing or unfinished)")
    return found, "; ".join(dict.fromkeys(why))


def _f(x: float) -> str:
    return f"{x:+.3g}" if abs(x) < 1000 else f"{x:+.0f}"


def _side(values: dict) -> str:
    v = list(values.values())
    if not v:
        return "—"
    m = sum(v) / len(v)
    if len(v) < 2:
        return f"{m:.3g} (n=1)"
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{m:.3g} ± {sd:.2g} (n={len(v)})"


def figures(c: Comparison) -> str:
    v = c.verdict
    what = "drop" if v.metric == "drop" else "value"
    base = " / ".join(c.base_row) + ("" if c.base_col == c.col else f" / {c.base_col}")
    ci = f"[{_f(v.low)}, {_f(v.high)}]" if v.separated is not None else f"({v.reason})"
    return (f"{c.experiment} · {' / '.join(c.row)} / {c.col}: {what} {_side(c.mine)} vs {base} {_side(c.base)}; "
            f"Δ {_f(v.diff_mean) if v.diff_mean == v.diff_mean else 'nan'} {ci}")


def render(tables: dict, test: str = "welch", claims: Sequence[Claim] = CLAIMS) -> str:
    """The claims list as Markdown: per paper, each claim with its verdict and the figures behind it."""
    how = ("Welch's t interval (Welch–Satterthwaite df) over seeds" if test == "welch"
           else "paired t interval over the common seeds")
    lines = ["## Claims of the papers, measured",
             "",
             f"Each comparison: the treatment cell minus its baseline (ADAM's row; the base architecture for SNT's "
             f"rows; Table 5: the column named), 95 % {how}; compared is the drop (compressed − FP32) in "
             f"compressed columns, the value in λmax / time / share columns. A claim holds when some comparisons "
             f"separate on its side and none on the other (mixed: both), is not separated when none separates.",
             ""]
    counts: dict = {}
    for paper in dict.fromkeys(c.paper for c in claims):
        lines += [f"### {paper}", ""]
        for claim in (c for c in claims if c.paper == paper):
            found, why = evaluate(claim, tables)
            outs = [outcome(c.verdict, claim.direction) for c in found]
            verdict = overall(outs)
            counts[verdict] = counts.get(verdict, 0) + 1
            tally = ", ".join(f"{outs.count(o)} {o}" for o in ("holds", "contrary", "not separated", "n<2")
                              if outs.count(o))
            head = f"- **{claim.where}**: {claim.text} — **{verdict}**"
            if found:
                head += f" ({tally} of {len(found)})"
            elif why:
                head += f": {why}"
            lines.append(head)
            for c, o in zip(found, outs):
                lines.append(f"  - {o}: {figures(c)}")
        lines.append("")
    lines.append("Verdicts: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines) + "\n"


def _short(c: Comparison) -> str:
    v = c.verdict
    return f"{c.experiment} {' / '.join(c.row)} / {c.col} {_f(v.diff_mean)} [{_f(v.low)}, {_f(v.high)}]"


def summary(tables: dict, test: str = "welch", claims: Sequence[Claim] = CLAIMS, shown: int = 3) -> str:
    """The claims list in brief (the README's paragraph on what the small tables show): per claim its verdict,
    the tally, and up to ``shown`` separated comparisons as difference [95 % interval]."""
    lines, counts = [], {}
    for claim in claims:
        found, why = evaluate(claim, tables)
        outs = [outcome(c.verdict, claim.direction) for c in found]
        verdict = overall(outs)
        counts[verdict] = counts.get(verdict, 0) + 1
        sep = [c for c, o in zip(found, outs) if o in ("holds", "contrary")]
        line = f"- {claim.paper} {claim.where}, {claim.text}: **{verdict}**"
        if found:
            line += f" ({len(sep)} of {len(found)} comparisons separated"
            line += (": " + "; ".join(_short(c) for c in sep[:shown]) + (f"; {len(sep) - shown} more"
                                                                        if len(sep) > shown else "")
                     if sep else "") + ")"
        elif why:
            line += f" ({why})"
        lines.append(line + ".")
    lines.append("")
    lines.append("Verdicts over the " + str(len(claims)) + " claims: "
                 + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".")
    return "\n".join(lines) + "\n"
