"""The papers' claims as hypotheses declared before the data, and the verdict a set of sweeps gives each
(``craft-report --claims``; the confirmatory run ``make claims``).

Each :class:`Claim` names in advance its **primary comparison** (:class:`Primary`: experiment, treatment row,
baseline row, column), its **estimand** (the drop, compressed − FP32, or the absolute value where the paper
words the claim so), its **scale** (``log`` for λmax, times and other positive heavy-tailed quantities: the
difference is then the log of the ratio of geometric means; ``raw`` otherwise), its direction and the paper's
effect size on that scale. The claim's verdict is its primary comparison's alone (Welch's t interval on the
declared scale, the exact permutation test where a side has no spread or few seeds, :mod:`.stats`):

- **holds**: the 95 % interval excludes 0 on the claimed side;
- **contrary**: it excludes 0 on the other side;
- **no effect of the paper's size**: it holds 0 and excludes the paper's effect (an equivalence statement);
- **undecided**: it holds 0 and the paper's effect too — more seeds would decide (the power says how many);
- **not measured**: the primary cell is missing (the reason is given).

The claim's other comparisons are supporting evidence, Holm-adjusted within the claim (familywise 0.05) and
shown as "k of m after Holm"; a data pair an earlier claim already uses is listed, not counted again, and a
comparison from an experiment that does not reproduce the claim's setting (another recipe, a step the paper does
not take) is shown as related evidence, never counted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from craft_runner.report import stats
from craft_runner.report.engine import Cell, Stat, Table
from craft_runner.report.papers import ACT_QUANT

# Treatment rows of supporting comparisons: any of these {row header: labels} (all headers of one entry present
# and matching).
SAM_ROWS = ({"Optimizer": ("SAM",)}, {"Fine-tuning": ("SAM", "CrAFT")}, {"Method": ("CrAFT",)},
            {"Model": ("SAM",)}, {"Approach": ("SAM",)})
ARCH_ROWS = ({"Approach": ("ARCH",)},)
BITS = r"W\d+A\d+|A8W8"
LOWER, HIGHER = -1, +1
VERDICTS = ("holds", "contrary", "no effect of the paper's size", "undecided", "not measured")
POWER_TARGET = 0.8
# The confirmatory run's seeds: none of them used by the 5-seed tables (seeds 0-4).
CONFIRM_SEED0 = 100
MIN_SEEDS, MAX_SEEDS = 10, 20


@dataclasses.dataclass(frozen=True)
class Primary:
    """The one comparison a claim stands or falls on, declared before the confirmatory data."""

    experiment: str  # "craft_table1": its ``_small`` variant is what this machine measures
    row: tuple  # the treatment row: ((header, label), ...)
    base: tuple  # the baseline row: ((header, label), ...); headers not named keep the treatment's label
    column: str  # the column label (the part before any " [...]" suffix)
    estimand: str = "drop"  # "drop" (compressed − FP32) or "value"
    scale: str = "raw"  # "raw" or "log"
    base_column: Optional[str] = None  # compare with another column of the baseline row (CrAFT Table 5)
    # The restriction of the experiment's sweep that produces both arms (``make claims``): {sweep key: values}.
    sweep: tuple = ()
    # Overrides the confirmatory run adds to that sweep (e.g. no λmax where no claim of the sweep reads it).
    fixed: tuple = ()


@dataclasses.dataclass(frozen=True)
class Claim:
    paper: str
    where: str  # "Table 2", "Figure 4"
    text: str
    primary: Primary
    effect: Optional[float]  # the paper's effect (treatment − baseline) on the primary's estimand and scale
    effect_from: str  # how the paper's effect was read off the paper
    direction: int = HIGHER  # +1: the treatment's value is higher than the baseline's; -1: lower
    supporting: tuple = ()  # (experiment, column regex) pairs whose cells are counted after Holm
    rows: tuple = SAM_ROWS  # the treatment rows of the supporting comparisons
    related: tuple = ()  # (experiment, column regex, why it is not counted)
    extension: bool = False  # this runner's question, not the papers'


def _rows(**kw) -> tuple:
    return tuple((k.replace("_", " ") if k != "blank" else "", v) for k, v in kw.items())


def _p(experiment, row, base, column, estimand="drop", scale="raw", base_column=None, sweep=None, fixed=()):
    return Primary(experiment, tuple(row.items()), tuple(base.items()), column, estimand, scale, base_column,
                   tuple((k, tuple(v)) for k, v in (sweep or {}).items()), tuple(fixed))


# The confirmatory run skips the diagnostics (λmax, ranges) of a sweep none of whose claims reads them.
_NO_DIAGNOSTICS = ("sharpness.enabled=false",)
_CALIBRATED_CLIP = ("compress.alpha_init=null",)


_LN = math.log


def _ptq(approach: str, column: str, scale: str = "raw") -> Primary:
    """SNT Table 3 (PTQ), ResNet-20 (the row the paper's text discusses): ``approach`` against ADAM."""
    return _p("snt_table3_ptq", {"Backbone": "ResNet-20", "Approach": approach}, {"Approach": "ADAM"}, column,
              "value", scale, sweep={"+shared/snt_row": ["resnet20_w4ft"]})


def _qat(approach: str, column: str, scale: str = "raw") -> Primary:
    """SNT Table 3 (QAT), MobileNet-V1: ``approach`` against ADAM. distiller's activation coverage (its ReLUs)
    where both arms have ReLUs; ARCH's RPReLUs get none from it (its W4A4 cells would be weight-only), so its
    accuracy is compared where every layer input of both arms is quantized (``act_quant=layer_inputs``), each
    clipping level started from calibration: from distiller's fixed 8, a SignedPACT after ARCH's RPReLU would
    start at [-8, 8] and spend half its levels below zero against PACT's [0, 8] after ADAM's ReLU."""
    act = "layer_inputs" if approach == "ARCH" and column.startswith("Top-1") else "distiller"
    arms = ["mobilenetv1_adam", f"mobilenetv1_{approach.lower()}"] if act == "layer_inputs" else [
        "mobilenetv1_adam", "mobilenetv1_sam", "mobilenetv1_arch"]
    return _p("snt_table3_qat", {"Backbone": "MobileNet-V1", "Act. quant": ACT_QUANT.fmt(act), "Approach": approach},
              {"Approach": "ADAM"}, column, "value", scale,
              sweep={"+shared/snt_qat": arms, "compress.act_quant": [act]},
              fixed=_NO_DIAGNOSTICS + _CALIBRATED_CLIP if act == "layer_inputs" else ())


_T1 = dict(Model="tiny ViT")
_NOT_CRAFT = "trained from scratch with BN re-calibration (cheap_sam) or make run's recipe, not CrAFT's fine-tuning"

CLAIMS: list[Claim] = [
    # ---------------------------------------------------------------- CrAFT: SAM fine-tuning (CrAFT) against Adam.
    Claim("CrAFT", "Table 1", "SAM lowers λmax (ViT-B: 739 → 21)",
          _p("craft_table1", {**_T1, "Fine-tuning": "SAM"}, {"Fine-tuning": "ADAM"}, "λmax", "value", "log"),
          _LN(21 / 739), "ln(21 / 739)", LOWER,
          related=(("cheap_sam", "λmax", _NOT_CRAFT), ("digits_default", "λmax", _NOT_CRAFT))),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under one-shot weight pruning at 50 % (−4.78 vs −1.11)",
          _p("craft_table1", {**_T1, "Fine-tuning": "SAM"}, {"Fine-tuning": "ADAM"}, "Weight Pruning (50%)"),
          -1.11 + 4.78, "−1.11 − (−4.78)",
          related=(("cheap_sam", "magnitude 50%", _NOT_CRAFT), ("digits_default", "magnitude 50%", _NOT_CRAFT))),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under token pruning (−4.30 vs −1.04)",
          _p("craft_table1", {**_T1, "Fine-tuning": "SAM"}, {"Fine-tuning": "ADAM"}, "Token Pruning"),
          -1.04 + 4.30, "−1.04 − (−4.30)"),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under token merging (−4.11 vs −0.95)",
          _p("craft_table1", {**_T1, "Fine-tuning": "SAM"}, {"Fine-tuning": "ADAM"}, "Token Merging"),
          -0.95 + 4.11, "−0.95 − (−4.11)"),
    Claim("CrAFT", "Table 1", "SAM keeps more accuracy under A8W8 quantization (−72.05 vs −0.15)",
          _p("craft_table1", {**_T1, "Fine-tuning": "SAM"}, {"Fine-tuning": "ADAM"}, "A8W8"),
          -0.15 + 72.05, "−0.15 − (−72.05)",
          related=(("digits_default", "W8A8", _NOT_CRAFT),)),
    Claim("CrAFT", "Table 2", "CrAFT boosts PTQ after task adaptation (BasePTQ and PTQ4ViT): smaller drops than Adam",
          _p("craft_table2", {"Method": "BasePTQ", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"}, "W4A4",
             sweep={"+shared/quantizer": ["base"], "compress.bits": ["W4A4"]}),
          6.73, "median over the 7 tasks of BasePTQ's W6A6 gain (the paper's hardest W+A column)",
          supporting=(("craft_table2", BITS),),
          related=(("cheap_sam", BITS, _NOT_CRAFT), ("digits_default", BITS, _NOT_CRAFT))),
    Claim("CrAFT", "Table 3", "CrAFT's smaller BasePTQ drops generalize across backbones",
          _p("craft_table3", {"Backbone": "tiny EfficientNet", "Method": "CrAFT"}, {"Method": "ADAM"}, "W4A4",
             sweep={"+shared/tiny": ["test_efficientnet"], "compress.bits": ["W4A4"]}, fixed=_NO_DIAGNOSTICS),
          (84.75 - 77.32) - (85.51 - 81.43), "EfficientNet-B0's W8A8 gain: 7.43 − 4.08",
          supporting=(("craft_table3", BITS),)),
    Claim("CrAFT", "Table 4", "CrAFT's fine-tuning takes longer than Adam's (about 2×)",
          _p("craft_table4", {"Method": "CrAFT"}, {"Method": "ADAM"}, "E2E Time (Min)", "value", "log"),
          _LN(2.0), "ln 2 (overheads 1.9-2.3×)",
          related=(("digits_default", r"train \(s\)", "make run's from-scratch recipe"),)),
    Claim("CrAFT", "Table 5", "fine-tuning flattens the pretrained minimum: λmax after Adam below λmax before",
          _p("craft_table5", {}, {}, "ADAM", "value", "log", base_column="Before FT"),
          (_LN(103.97 / 125.63) + _LN(135.6 / 284.22) + _LN(142.93 / 172.72)) / 3,
          "mean over the 3 tasks of ln(ADAM / Before FT)", LOWER, rows=()),
    Claim("CrAFT", "Table 5", "CrAFT reaches a flatter minimum than Adam fine-tuning (lower λmax)",
          _p("craft_table5", {}, {}, "CrAFT", "value", "log", base_column="ADAM"),
          (_LN(84.22 / 103.97) + _LN(61.05 / 135.6) + _LN(109.35 / 142.93)) / 3,
          "mean over the 3 tasks of ln(CrAFT / ADAM)", LOWER, rows=()),
    Claim("CrAFT", "Figure 1", "SAM's weights have a lower rank: the top-k principal components hold more variance",
          _p("craft_fig1", {**_T1, "Optimizer": "SAM"}, {"Optimizer": "ADAM"}, "FFN share", "value"),
          0.80 - 0.40, "FFN: 80 % against 40 % of the variance in 200 of 768 components",
          supporting=(("craft_fig1", "FFN share|QKV share"),)),
    Claim("CrAFT", "Figure 2", "SAM smooths the activations: smaller channel ranges and fewer outliers",
          _p("craft_fig2", {**_T1, "Optimizer": "SAM"}, {"Optimizer": "ADAM"}, "max |x|", "value", "log"),
          None, "the paper gives no figure for SAM's range", LOWER,
          supporting=(("craft_fig2", r"max \|x\||max outlier ratio|median outlier ratio"),)),
    Claim("CrAFT", "Figure 4a", "CrAFT lifts unstructured one-shot pruning (magnitude and Wanda), most above 40 %",
          _p("craft_fig4", {"Criterion": "Magnitude", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"}, "80%",
             sweep={"+shared/pruner": ["magnitude"], "+shared/prune_shape": ["u80"]}),
          30.0, "\"around 30 %\" for magnitude above 40 % sparsity",
          supporting=(("craft_fig4", r"\d+%"),)),
    Claim("CrAFT", "Figure 4b", "CrAFT lifts N:M block pruning at 50 % (up to 12 points on 16:32)",
          _p("craft_fig4", {"Criterion": "Magnitude", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"}, "16:32",
             sweep={"+shared/pruner": ["magnitude"], "+shared/prune_shape": ["nm16_32"]}),
          12.0, "\"up to 12 %\" on 16:32",
          supporting=(("craft_fig4", r"\d+:\d+"),)),
    # ---------------------------- this runner's extension (issue 31): does CrAFT's gain survive the stronger
    # compressors? The compressor swapped on the papers' hard cells (W2A16 for weight-only GPTQ, W4A4, 80 %); no
    # paper effect.
    Claim("CrAFT", "Table 2 (GPTQ)", "CrAFT's smaller PTQ drop survives GPTQ (error-compensating quantization)",
          _p("craft_table2", {"Method": "GPTQ", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"}, "W2A16",
             sweep={"+shared/quantizer": ["gptq"], "compress.bits": ["W2A16"]}),
          None, "an extension: the paper tests round-to-nearest PTQ only; GPTQ quantizes weights, so its hardest "
          "weight-only column (at A4 the activations' BasePTQ quantizer would decide)",
          supporting=(("craft_table2", BITS),), rows=({"Method": ("GPTQ",), "Fine-tuning": ("CrAFT",)},),
          extension=True),
    Claim("CrAFT", "Figure 4a (SparseGPT)", "CrAFT's pruning gain survives SparseGPT (error-compensating pruning)",
          _p("craft_fig4", {"Criterion": "SparseGPT", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"}, "80%",
             sweep={"+shared/pruner": ["sparsegpt"], "+shared/prune_shape": ["u80"]}),
          None, "an extension: the paper tests magnitude and Wanda only",
          supporting=(("craft_fig4", r"\d+%|\d+:\d+"),),
          rows=({"Criterion": ("SparseGPT",), "Fine-tuning": ("CrAFT",)},),
          extension=True),
    Claim("CrAFT", "Table 2 (SmoothQuant)", "CrAFT's W+A gain survives SmoothQuant (outliers migrated into the weights "
          "first: if it vanishes, Figure 2's smoothing is the reason)",
          _p("craft_table2", {"Method": "BasePTQ +SmoothQuant", "Fine-tuning": "CrAFT"}, {"Fine-tuning": "ADAM"},
             "W4A4", sweep={"+shared/quantizer": ["base_sq"], "compress.bits": ["W4A4"]}),
          None, "an extension: the paper names equalization but does not test it",
          supporting=(("craft_table2", r"W\d+A(4|6|8)"),),
          rows=({"Method": ("BasePTQ +SmoothQuant",), "Fine-tuning": ("CrAFT",)},), extension=True),
    # ---------------------------------------------- SNT: SAM and ARCH (Adam on the transformed network) vs ADAM.
    Claim("SNT", "Table 3 (PTQ)", "SAM lowers λmax below ADAM's",
          _ptq("SAM", "λmax (↓)", "log"),
          _LN(15.19 / 105.62), "ResNet-20: ln(15.19 / 105.62)", LOWER,
          supporting=(("snt_table3_ptq", r"λmax.*"), ("cheap_sam", "λmax"))),
    Claim("SNT", "Table 3 (PTQ)", "ARCH lowers λmax below ADAM's",
          _ptq("ARCH", "λmax (↓)", "log"),
          _LN(39.43 / 105.62), "ResNet-20: ln(39.43 / 105.62)", LOWER,
          supporting=(("snt_table3_ptq", r"λmax.*"), ("cheap_sam", "λmax")), rows=ARCH_ROWS),
    Claim("SNT", "Table 3 (PTQ)", "SAM keeps more accuracy than ADAM after PTQ (ResNet-20 W4: +2.2)",
          _ptq("SAM", "Top-1 (%)"),
          68.33 - 66.12, "ResNet-20 W4 Top-1: 68.33 − 66.12",
          supporting=(("snt_table3_ptq", r"Top-1.*"),)),
    Claim("SNT", "Table 3 (PTQ)", "ARCH keeps more accuracy than ADAM after PTQ (ResNet-20 W4: +1.0)",
          _ptq("ARCH", "Top-1 (%)"),
          67.14 - 66.12, "ResNet-20 W4 Top-1: 67.14 − 66.12",
          supporting=(("snt_table3_ptq", r"Top-1.*"),), rows=ARCH_ROWS),
    Claim("SNT", "Table 3 (QAT)", "SAM lowers λmax below ADAM's",
          _qat("SAM", "λmax (↓)", "log"),
          _LN(943.16 / 1234.5), "MobileNet-V1: ln(943.16 / 1234.5)", LOWER,
          supporting=(("snt_table3_qat", r"λmax.*"),)),
    Claim("SNT", "Table 3 (QAT)", "ARCH lowers λmax below ADAM's (below SAM's on MobileNet-V1)",
          _qat("ARCH", "λmax (↓)", "log"),
          _LN(809.96 / 1234.5), "MobileNet-V1: ln(809.96 / 1234.5)", LOWER,
          supporting=(("snt_table3_qat", r"λmax.*"),), rows=ARCH_ROWS),
    Claim("SNT", "Table 3 (QAT)", "SAM keeps more accuracy than ADAM after W4A4 QAT",
          _qat("SAM", "Top-1 (%)"),
          82.8 - 78.2, "MobileNet-V1 W4A4 Top-1: 82.8 − 78.2",
          supporting=(("snt_table3_qat", r"Top-1.*"),)),
    Claim("SNT", "Table 3 (QAT)", "ARCH keeps more accuracy than ADAM after W4A4 QAT (MobileNet-V1: +5.4)",
          _qat("ARCH", "Top-1 (%)"),
          83.67 - 78.2, "MobileNet-V1 W4A4 Top-1: 83.67 − 78.2",
          supporting=(("snt_table3_qat", r"Top-1.*"),), rows=ARCH_ROWS),
    Claim("SNT", "Table 4",
          "the transformation lowers λmax below the baseline's, cumulatively (+Preact, then +PReLU/LBias)",
          _p("snt_table4", {"": "+Preact"}, {"": "Baseline"}, "λmax (↓)", "value", "log",
             sweep={"arch": ["base", "snt_preact"]}),
          _LN(70.41 / 105.62), "+Preact: ln(70.41 / 105.62) (+PReLU/LBias is Table 3's ARCH row, counted there)",
          LOWER,
          supporting=(("snt_table4", r"λmax.*"),), rows=({"": ("+Preact", "+PReLU/LBias")},)),
    Claim("SNT", "Table 4", "the transformation boosts static W4 accuracy (+0.28, +1.02)",
          _p("snt_table4", {"": "+Preact"}, {"": "Baseline"}, "Top-1 (%)", "value",
             sweep={"arch": ["base", "snt_preact"]}),
          0.28, "+Preact: 66.4 − 66.12 (+PReLU/LBias is Table 3's ARCH row, counted there)",
          supporting=(("snt_table4", r"Top-1.*"),), rows=({"": ("+Preact", "+PReLU/LBias")},)),
    Claim("SNT", "Figure 5", "IMP: ARCH keeps more accuracy than ADAM (Mixer-S: about +2)",
          _p("snt_fig5", {"Backbone": "Mixer-S", "Pruning": "IMP", "Approach": "ARCH"}, {"Approach": "ADAM"}, "90%",
             "value", sweep={"model": ["mixer_s"], "compress": ["imp"], "compress.sparsity": ["0.9"],
                             "+shared/approach": ["adam", "arch"]}, fixed=_NO_DIAGNOSTICS),
          2.0, "\"ARCH consistently outperforms base ... by 2 %\"",
          supporting=(("snt_fig5", r"\d+%"),), rows=({"Pruning": ("IMP",), "Approach": ("ARCH",)},)),
    Claim("SNT", "Figure 5", "one-shot pruning: SAM keeps more accuracy than ADAM (\"a clear winner\")",
          _p("snt_fig5", {"Backbone": "Mixer-S", "Pruning": "one-shot", "Approach": "SAM"}, {"Approach": "ADAM"},
             "70%", "value", sweep={"model": ["mixer_s"], "compress": ["prune"], "compress.sparsity": ["0.7"],
                                     "+shared/approach": ["adam", "sam"]}, fixed=_NO_DIAGNOSTICS),
          None, "\"a clear winner\": no figure",
          supporting=(("snt_fig5", r"\d+%"),), rows=({"Pruning": ("one-shot",), "Approach": ("SAM",)},)),
    Claim("SNT", "Figure 5", "one-shot pruning above 50 %: ARCH keeps slightly more accuracy than ADAM",
          _p("snt_fig5", {"Backbone": "Mixer-S", "Pruning": "one-shot", "Approach": "ARCH"}, {"Approach": "ADAM"},
             "70%", "value", sweep={"model": ["mixer_s"], "compress": ["prune"], "compress.sparsity": ["0.7"],
                                     "+shared/approach": ["adam", "arch"]}, fixed=_NO_DIAGNOSTICS),
          None, "\"slightly more\": no figure",
          supporting=(("snt_fig5", r"[6-9]\d%"),), rows=({"Pruning": ("one-shot",), "Approach": ("ARCH",)},)),
    Claim("SNT", "Figure 6", "after W4 PTQ and k epochs of fine-tuning SAM recovers more accuracy than ADAM",
          _p("snt_fig6", {"Approach": "SAM"}, {"Approach": "ADAM"}, "ft 3 ep", "value",
             sweep={"+shared/approach": ["adam", "sam"], "compress.finetune_epochs": ["3"]}),
          None, "Figure 6's curves, no figure in the text; the curve's end (1 epoch is Table 3's PTQ cell)",
          supporting=(("snt_fig6", r"ft \d+ ep"),)),
    Claim("SNT", "Figure 7", "ARCH keeps its pruning robustness with and without augmentation (50 %: about +4)",
          _p("snt_fig7", {"Augmentation": "without", "Approach": "ARCH"}, {"Approach": "ADAM"}, "50%",
             sweep={"dataset.augment": ["false"], "compress.sparsity": ["0.5"]}),
          4.0, "\"it can retain 4 % accuracy at 0.5 sparsity\"",
          supporting=(("snt_fig7", r"\d+%"),), rows=ARCH_ROWS),
]


# ------------------------------------------------------------------------------------------------ comparisons


@dataclasses.dataclass
class Comparison:
    experiment: str
    row: tuple
    col: str
    base_row: tuple
    base_col: str
    verdict: stats.Verdict
    mine: dict  # {seed: compared value, on the raw scale}
    base: dict

    @property
    def pair(self) -> tuple:
        """What identifies the data compared, whatever table shows it."""
        return (self.verdict.metric, tuple(sorted(self.mine.items())), tuple(sorted(self.base.items())))


def _base_name(experiment: str) -> str:
    return experiment[: -len("_small")] if experiment.endswith("_small") else experiment


def _tables_of(experiment: str, tables: dict) -> list:
    return [n for n in sorted(tables) if _base_name(n) == experiment]


def _label(col: str) -> str:
    return col.split(" [", 1)[0]


def _row_matches(headers: list, key: tuple, rows: tuple) -> bool:
    if not rows:
        return True
    labels = dict(zip(headers, key))
    return any(all(h in labels and labels[h] in allowed for h, allowed in alt.items()) for alt in rows)


def _find_row(table: Table, want: dict) -> list:
    """The rows matching ``want``; a header the table does not show cannot tell its rows apart and is ignored
    (e.g. SNT Table 3 QAT's "Act. quant" in tables from before that row existed)."""
    want = {h: v for h, v in want.items() if h in table.row_headers}
    return [k for k in table.rows if all(dict(zip(table.row_headers, k)).get(h) == v for h, v in want.items())]


def primary_comparison(claim: Claim, tables: dict) -> tuple[Optional[Comparison], str]:
    """The claim's primary comparison in ``tables`` ({experiment: Table}), or None and why not."""
    p = claim.primary
    names = _tables_of(p.experiment, tables)
    if not names:
        return None, f"no {p.experiment} results"
    why = []
    for name in names:
        table: Table = tables[name]
        rows = _find_row(table, dict(p.row))
        if len(rows) != 1:
            why.append(f"{name}: {'no' if not rows else len(rows)} row{'s' if len(rows) > 1 else ''} "
                       f"{' / '.join(v for _, v in p.row) or '(the only row)'}")
            continue
        key = rows[0]
        base_want = {**dict(zip(table.row_headers, key)), **dict(p.base)}
        bases = _find_row(table, base_want)
        if len(bases) != 1:
            why.append(f"{name}: no baseline row {' / '.join(v for _, v in p.base)}")
            continue
        cols = [c for c in table.col_labels if _label(c) == p.column]
        base_cols = [c for c in table.col_labels if _label(c) == (p.base_column or p.column)]
        if len(cols) != 1 or len(base_cols) != 1:
            why.append(f"{name}: {'no' if not cols else 'several'} column {p.column}")
            continue
        cell, base = table.rows[key][cols[0]], table.rows[bases[0]][base_cols[0]]
        if cell.stat is None or base.stat is None:
            why.append(f"{name}: no seed finished on {'the treatment' if cell.stat is None else 'the baseline'}")
            continue
        mine, theirs = cell.stat.per_seed(p.estimand), base.stat.per_seed(p.estimand)
        v = stats.compare(mine, theirs, "welch", p.estimand, p.scale)
        return Comparison(name, key, cols[0], bases[0], base_cols[0], v, mine, theirs), ""
    return None, "; ".join(why)


def _comparisons(tests: Sequence, rows: tuple, tables: dict) -> list[Comparison]:
    found = []
    for exp, pattern, *_ in tests:
        for name in _tables_of(exp, tables):
            table: Table = tables[name]
            cols = [c for c in table.col_labels if re.fullmatch(pattern, _label(c))]
            for key in (k for k in table.rows if _row_matches(table.row_headers, k, rows)):
                for col in cols:
                    cell = table.rows[key][col]
                    if cell.baseline is None or cell.stat is None:
                        continue
                    base_key, base_col = cell.baseline
                    base = table.rows[base_key][base_col]
                    metric = cell.verdict.metric if cell.verdict is not None else "value"
                    mine, theirs = cell.stat.per_seed(metric), base.stat.per_seed(metric)
                    scale = stats.scale_of(col)
                    try:
                        v = stats.compare(mine, theirs, "welch", metric, scale)
                    except ValueError:  # a non-positive value on a log column: compare it raw
                        v = stats.compare(mine, theirs, "welch", metric, "raw")
                    found.append(Comparison(name, key, col, base_key, base_col, v, mine, theirs))
    return found


@dataclasses.dataclass
class Assessment:
    claim: Claim
    primary: Optional[Comparison]
    why: str  # why there is no primary
    verdict: str
    power_paper: float  # power at the paper's effect with the seeds measured here
    seeds_paper: float  # seeds per arm for 80 % power at the paper's effect
    seeds_observed: float  # ... at the observed effect
    supporting: list  # [(Comparison, outcome, adjusted p)] counted after Holm
    repeated: list  # [(Comparison, the claim that counts it)] listed, not counted
    related: list  # [(Comparison, why it is not counted)]

    @property
    def support(self) -> str:
        k = sum(1 for _, o, _ in self.supporting if o == "holds")
        against = sum(1 for _, o, _ in self.supporting if o == "contrary")
        s = f"{k} of {len(self.supporting)} after Holm"
        return s + (f" ({against} contrary)" if against else "")


def _outcome(v: stats.Verdict, direction: int) -> str:
    if v.separated is None:
        return v.reason or "n<2"
    if not v.separated:
        return "not separated"
    return "holds" if (v.diff_mean > 0) == (direction > 0) else "contrary"


def decide(v: Optional[stats.Verdict], direction: int, effect: Optional[float]) -> str:
    """The claim's verdict from its primary comparison (module docstring)."""
    if v is None or v.separated is None:
        return "not measured"
    if v.separated:
        return "holds" if (v.diff_mean > 0) == (direction > 0) else "contrary"
    if effect is not None and not (v.low <= effect <= v.high):
        return "no effect of the paper's size"
    return "undecided"


def assess(claims: Sequence[Claim], tables: dict) -> list[Assessment]:
    """Every claim's verdict, power and evidence, in order; a data pair counts once, in the first claim."""
    used: dict = {}
    out = []
    prims = [primary_comparison(c, tables) for c in claims]
    for claim, (prim, _) in zip(claims, prims):
        if prim is not None:
            used.setdefault(prim.pair, f"{claim.paper} {claim.where}: {claim.text}")
    for claim, (prim, why) in zip(claims, prims):
        v = prim.verdict if prim else None
        verdict = decide(v, claim.direction, claim.effect)
        pw = sp = so = math.nan
        if prim is not None and v.separated is not None:
            p = claim.primary
            a = stats.on_scale(prim.mine.values(), p.scale)
            b = stats.on_scale(prim.base.values(), p.scale)
            sd = stats.pooled_sd(a, b)
            n = min(len(a), len(b))
            if claim.effect is not None:
                pw, sp = stats.power(claim.effect, sd, n), stats.seeds_needed(claim.effect, sd)
            so = stats.seeds_needed(v.diff_mean, sd)
        me = f"{claim.paper} {claim.where}: {claim.text}"
        counted, repeated = [], []
        for c in _comparisons(claim.supporting, claim.rows, tables):
            if prim is not None and c.pair == prim.pair:
                continue
            owner = used.get(c.pair)
            if owner is not None and owner != me:
                repeated.append((c, owner))
                continue
            used.setdefault(c.pair, me)
            counted.append(c)
        reject, adj = stats.holm([c.verdict.p for c in counted])
        supporting = []
        for c, r, pa in zip(counted, reject, adj):
            o = ("holds" if (c.verdict.diff_mean > 0) == (claim.direction > 0) else "contrary") if r else (
                "not separated" if pa == pa else (c.verdict.reason or "n<2"))
            supporting.append((c, o, pa))
        related = [(c, why_not) for exp, pat, why_not in claim.related
                   for c in _comparisons(((exp, pat),), SAM_ROWS if claim.rows == () else claim.rows, tables)]
        out.append(Assessment(claim, prim, why, verdict, pw, sp, so, supporting, repeated, related))
    return out


# ------------------------------------------------------------------------------------------------ rendering


def _f(x: float) -> str:
    if x != x:
        return "nan"
    if math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    return f"{x:+.3g}" if abs(x) < 1000 else f"{x:+.0f}"


def _n(x: float) -> str:
    return "—" if x != x else ("> 10,000" if math.isinf(x) else str(int(x)))


def _side(values: dict, scale: str) -> str:
    v = list(values.values())
    if not v:
        return "—"
    if scale == "log" and all(x > 0 for x in v):
        g = math.exp(sum(math.log(x) for x in v) / len(v))
        return f"geo. mean {g:.3g} (n={len(v)})"
    m = sum(v) / len(v)
    if len(v) < 2:
        return f"{m:.3g} (n=1)"
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{m:.3g} ± {sd:.2g} (n={len(v)})"


def _delta(v: stats.Verdict) -> str:
    if v.separated is None:
        return f"Δ {_f(v.diff_mean)} ({v.reason})"
    s = f"Δ {_f(v.diff_mean)} [{_f(v.low)}, {_f(v.high)}]"
    if v.scale == "log":
        s += f" (ratio ×{math.exp(v.diff_mean):.3g} [{_ratio(v.low)}, {_ratio(v.high)}])"
    return s + f", {v.test}, p = {v.p:.2g}"


def _ratio(x: float) -> str:
    return "0" if x == -math.inf else ("∞" if x == math.inf else f"{math.exp(x):.3g}")


def figures(c: Comparison) -> str:
    v = c.verdict
    what = "drop" if v.metric == "drop" else "value"
    base = " / ".join(c.base_row) + ("" if c.base_col == c.col else f" / {c.base_col}")
    return (f"{c.experiment} · {' / '.join(c.row) or '—'} / {c.col}: {what} {_side(c.mine, v.scale)} vs {base} "
            f"{_side(c.base, v.scale)}; {_delta(v)}")


def _declared(claim: Claim) -> str:
    p = claim.primary
    row = " / ".join(v for _, v in p.row) or "the row"
    base = " / ".join(v for _, v in p.base) or "the row"
    col = p.column + (f" against {p.base_column}" if p.base_column else "")
    eff = ("paper's effect " + _f(claim.effect) + f" ({claim.effect_from})" if claim.effect is not None
           else f"paper's effect: none ({claim.effect_from})")
    side = "higher" if claim.direction > 0 else "lower"
    return (f"primary: {p.experiment}_small · {row} vs {base} · {col} · {p.estimand} on the {p.scale} scale, "
            f"treatment {side}; {eff}")


def _power_text(a: Assessment) -> str:
    if a.primary is None or a.primary.verdict.separated is None:
        return ""
    n = min(a.primary.verdict.n, a.primary.verdict.n_base)
    s = f"power at the paper's effect with n={n}: " + ("—" if a.power_paper != a.power_paper
                                                      else f"{a.power_paper:.0%}")
    return s + f"; seeds per arm for 80 %: {_n(a.seeds_paper)} (paper's effect), {_n(a.seeds_observed)} (observed)"


def render(tables: dict, test: str = "welch", claims: Sequence[Claim] = CLAIMS, extra: str = "") -> str:
    """The claims list as Markdown: per paper, each claim with its declared primary, its verdict, power and the
    supporting evidence. ``test`` is accepted for the command line's sake; the primary is always Welch's (with
    the permutation fallback)."""
    del test
    assessed = assess(claims, tables)
    lines = ["## Claims of the papers, measured",
             "",
             "Each claim stands on one primary comparison declared in advance (experiment, treatment row, "
             "baseline, column, estimand, scale): 95 % Welch interval of treatment − baseline on the declared "
             "scale (log: the log of the ratio of geometric means), the exact permutation test where a side has "
             "no spread or only 2 seeds. Verdicts: holds / contrary (the interval excludes 0), no effect of "
             "the paper's size (it holds 0 and excludes the paper's effect), undecided (it holds both). Other "
             "comparisons support it after Holm's correction within the claim; a data pair counts in one claim "
             "only; related evidence from other recipes is shown, never counted.",
             ""]
    counts: dict = {}
    for paper in dict.fromkeys(a.claim.paper for a in assessed):
        lines += [f"### {paper}", ""]
        for a in (x for x in assessed if x.claim.paper == paper):
            counts[a.verdict] = counts.get(a.verdict, 0) + 1
            ext = " *(this runner's extension, not the paper's claim)*" if a.claim.extension else ""
            head = f"- **{a.claim.where}**: {a.claim.text}{ext} — **{a.verdict}**"
            if a.primary is None:
                head += f": {a.why}"
            lines.append(head)
            lines.append(f"  - {_declared(a.claim)}")
            if a.primary is not None:
                lines.append(f"  - measured: {figures(a.primary)}")
                if _power_text(a):
                    lines.append(f"  - {_power_text(a)}")
            if a.supporting:
                lines.append(f"  - supporting: {a.support}")
                for c, o, pa in a.supporting:
                    lines.append(f"    - {o} (Holm p = {'—' if pa != pa else f'{pa:.2g}'}): {figures(c)}")
            for c, owner in a.repeated:
                lines.append(f"  - counted in «{owner}», not again: {figures(c)}")
            for c, why in a.related:
                lines.append(f"  - related, not counted ({why}): {figures(c)}")
        lines.append("")
    if extra:
        lines += [extra.rstrip(), ""]
        verdict = re.search(r"— \*\*(.+?)\*\*", extra)
        if verdict:
            counts[verdict.group(1)] = counts.get(verdict.group(1), 0) + 1
    lines.append("Verdicts: " + ", ".join(f"{counts[k]} {k}" for k in VERDICTS if k in counts))
    return "\n".join(lines) + "\n"


def summary(tables: dict, test: str = "welch", claims: Sequence[Claim] = CLAIMS, extra: str = "") -> str:
    """The claims list in brief (the paragraph of docs/results.md): a line per claim with its primary's figures."""
    del test
    lines, counts = [], {}
    for a in assess(claims, tables):
        counts[a.verdict] = counts.get(a.verdict, 0) + 1
        line = f"- {a.claim.paper} {a.claim.where}, {a.claim.text}: **{a.verdict}**"
        if a.primary is not None:
            v = a.primary.verdict
            line += f" ({a.primary.experiment} {a.primary.col}, {v.metric}, {v.scale}: {_delta(v)}"
            if a.supporting:
                line += f"; supporting {a.support}"
            if a.seeds_paper == a.seeds_paper:
                line += f"; {_n(a.seeds_paper)} seeds per arm for the paper's effect"
            line += ")"
        else:
            line += f" ({a.why})"
        lines.append(line + ".")
    n = len(claims)
    if extra:
        lines.append(extra)
        verdict = re.search(r"\*\*(.+?)\*\*", extra)
        if verdict:
            counts[verdict.group(1)] = counts.get(verdict.group(1), 0) + 1
            n += 1
    lines.append("")
    lines.append(f"Verdicts over the {n} claims: "
                 + ", ".join(f"{counts[k]} {k}" for k in VERDICTS if k in counts) + ".")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("paper", "where", "claim", "verdict", "extension", "experiment", "row", "baseline", "column",
              "estimand", "scale", "direction", "test", "n", "n_baseline", "diff", "ci_low", "ci_high", "p",
              "paper_effect", "supporting", "power_at_paper_effect", "seeds_for_paper_effect",
              "seeds_for_observed_effect", "reason")


def to_csv(tables: dict, claims: Sequence[Claim] = CLAIMS, extra_rows: Sequence[dict] = ()) -> str:
    """One row per claim (``craft-report --claims --format csv``); differences on the declared scale."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for a in assess(claims, tables):
        p, c = a.claim.primary, a.primary
        v = c.verdict if c else None
        w.writerow({
            "paper": a.claim.paper, "where": a.claim.where, "claim": a.claim.text, "verdict": a.verdict,
            "extension": str(a.claim.extension).lower(), "experiment": c.experiment if c else p.experiment,
            "row": " / ".join(v_ for _, v_ in p.row), "baseline": " / ".join(v_ for _, v_ in p.base),
            "column": p.column + (f" vs {p.base_column}" if p.base_column else ""), "estimand": p.estimand,
            "scale": p.scale, "direction": "higher" if a.claim.direction > 0 else "lower",
            "test": v.test if v else "", "n": v.n if v else "", "n_baseline": v.n_base if v else "",
            "diff": _g(v.diff_mean) if v else "", "ci_low": _g(v.low) if v else "", "ci_high": _g(v.high) if v else "",
            "p": _g(v.p) if v else "", "paper_effect": _g(a.claim.effect) if a.claim.effect is not None else "",
            "supporting": a.support if a.supporting else "",
            "power_at_paper_effect": _g(a.power_paper), "seeds_for_paper_effect": _g(a.seeds_paper),
            "seeds_for_observed_effect": _g(a.seeds_observed), "reason": a.why or (v.reason if v else ""),
        })
    for row in extra_rows:
        w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    return buf.getvalue()


def _g(x) -> str:
    if x is None or x != x:
        return ""
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else f"{x:.6g}")


# ------------------------------------------------------------------------------------------------ the thesis

# Both papers conclude that λmax is a proxy for compressibility. Declared primary: Spearman's ρ between log λmax
# and the drop over cheap_sam_small's 55 trainings (11 methods × 5 seeds) at W4A16 without BN re-calibration
# (one-shot PTQ as the papers apply it, the weight-only setting that bites on ResNet-20); the claim holds when the
# bootstrap 95 % interval lies below 0 (a higher λmax, a larger drop). Its within-method ρ says whether λmax
# predicts the drop among one method's seeds or only between methods; the other settings are shown, not counted.
THESIS = ("Both", "Conclusions", "λmax is a proxy for compressibility: a higher λmax, a larger drop",
          "cheap_sam_small: W4A16 [bn_recalib=0]")


def thesis_block(verdicts: Sequence[dict]) -> tuple[str, str, dict]:
    """The thesis as a claim: (Markdown block, summary line, csv row) from ``thesis.thesis_verdicts``."""
    paper, where, text, setting = THESIS
    prim = next((v for v in verdicts if v["setting"] == setting), None)
    if prim is None or prim.get("ci_low") is None:
        verdict = "not measured"
    else:
        verdict = {"λmax predicts the drop": "holds", "contrary": "contrary"}.get(prim["verdict"], "undecided")
    head = f"- **{where}**: {text} — **{verdict}**"
    lines = [f"### {paper} papers", "", head,
             f"  - primary: Spearman's ρ(log λmax, drop) over the trainings of {setting}, bootstrap 95 % interval "
             f"over trainings; holds when the interval lies below 0; paper's effect: none stated"]
    row = {"paper": paper, "where": where, "claim": text, "verdict": verdict, "extension": "false",
           "experiment": setting.split(":")[0], "row": "every training", "baseline": "",
           "column": setting.split(": ", 1)[-1], "estimand": "Spearman rho(log lambda_max, drop)", "scale": "rank",
           "direction": "lower", "test": "bootstrap"}
    if prim is None:
        lines.append(f"  - not measured: no {setting} cells")
        line = f"- {paper} papers' {where}, {text}: **{verdict}** (no {setting} cells)."
        return "\n".join(lines), line, {**row, "reason": f"no {setting} cells"}
    wn, wr, wl, wh = prim.get("within_pooled") or (0, math.nan, None, None)
    fig = (f"ρ {prim['rho']:+.2f} [{_f2(prim['ci_low'])}, {_f2(prim['ci_high'])}] over n = {prim['n']} trainings; "
           f"within each method (n-weighted): ρ {wr:+.2f} [{_f2(wl)}, {_f2(wh)}] ({prim.get('within_verdict')})")
    lines.append(f"  - measured: {fig}")
    for v in verdicts:
        if v is not prim:
            lines.append(f"  - other setting, shown not counted: {v['setting']}: ρ {v['rho']:+.2f} "
                         f"[{_f2(v['ci_low'])}, {_f2(v['ci_high'])}], n = {v['n']} ({v['verdict']})")
    line = f"- {paper} papers' {where}, {text}: **{verdict}** ({setting}: {fig})."
    row.update({"n": prim["n"], "diff": _g(prim["rho"]), "ci_low": _g(prim["ci_low"]),
                "ci_high": _g(prim["ci_high"])})
    return "\n".join(lines), line, row


def _f2(x) -> str:
    return "—" if x is None or x != x else f"{x:+.2f}"


# ------------------------------------------------------------------------------------------------ cells CSVs


def tables_from_cells(paths: Sequence[Path]) -> dict:
    """Tables rebuilt from ``<experiment>-cells.csv`` files (``docs/small``): enough for :func:`assess`. A row's
    drop per seed is its value minus the same seed's FP32 (``FP32`` or ``Accuracy`` column of the row)."""
    tables = {}
    for path in paths:
        path = Path(path)
        name = path.name[: -len("-cells.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            headers = fields[: fields.index("column")]
            raw = list(reader)
        rows: OrderedDict = OrderedDict()
        labels: list = []
        per: dict = {}
        for r in raw:
            key = tuple(r[h] for h in headers)
            col = r["column"]
            labels.append(col) if col not in labels else None
            seeds = [int(s) for s in r["seeds"].split()] if r["seeds"] else []
            values = [float(x) for x in r["values"].split()] if r["values"] else []
            per.setdefault(key, {})[col] = (r, dict(zip(seeds, values)))
        for key, cols in per.items():
            ref = cols.get("FP32") or cols.get("Accuracy")
            rows[key] = OrderedDict()
            for col in labels:
                if col not in cols:
                    rows[key][col] = Cell(None, [])
                    continue
                r, vals = cols[col]
                if not vals:
                    rows[key][col] = Cell(None, [])
                    continue
                seeds = sorted(vals)
                drop_seeds = [s for s in seeds if r["drop_mean"] and ref is not None and s in ref[1]]
                drops = [vals[s] - ref[1][s] for s in drop_seeds]
                stat = Stat([vals[s] for s in seeds], seeds, drops, drop_seeds=drop_seeds)
                rows[key][col] = Cell(stat, [])
        for key, cols in per.items():
            for col, (r, _) in cols.items():
                if not r.get("baseline") or rows[key][col].stat is None:
                    continue
                base_key, base_col = _parse_baseline(r["baseline"], headers, rows, col)
                if base_key is None:
                    continue
                cell = rows[key][col]
                cell.baseline = (base_key, base_col)
                metric = r.get("compared") or "value"
                cell.verdict = stats.Verdict(math.nan, math.nan, math.nan, 0, 0, "welch", metric=metric,
                                             reason="from csv")
        tables[name] = Table(layout=None, row_headers=headers, col_labels=labels, col_specs=[], rows=rows,
                             row_records={}, notes=[], n={}, incomplete=False, experiment=name)
    return tables


def _parse_baseline(text: str, headers: list, rows: dict, col: str) -> tuple:
    """``"tiny ViT / ADAM / λmax"``-style baseline names back to (row key, column)."""
    parts = [p.strip() for p in text.split(" / ")]
    for key in rows:
        k = list(key)
        for n_col in (1, 0):
            head = parts[: len(parts) - n_col] if n_col else parts
            if [x.strip() for x in k] == head or (not any(k) and not head):
                base_col = parts[-1] if n_col else col
                if base_col in rows[key]:
                    return key, base_col
    return None, None


# ------------------------------------------------------------------------------------------------ make claims


def seeds_per_claim(tables: dict, claims: Sequence[Claim] = CLAIMS) -> dict:
    """{claim text: seeds per arm} for the confirmatory run: the seeds the 5-seed tables' power analysis asks for
    (the paper's effect where the paper gives one, else the observed), within [MIN_SEEDS, MAX_SEEDS]."""
    need: dict = {}
    for a in assess(claims, tables):
        want = a.seeds_paper if a.seeds_paper == a.seeds_paper else a.seeds_observed
        need[a.claim.text] = (MAX_SEEDS if not want == want or math.isinf(want)
                              else int(min(MAX_SEEDS, max(MIN_SEEDS, want))))
    return need


def _cells(sweep: dict) -> set:
    """The cells of a sweep {key: values}: its Cartesian product, each cell a set of (key, value)."""
    cells = [frozenset()]
    for k, vals in sweep.items():
        cells = [c | {(k, v)} for c in cells for v in vals]
    return set(cells)


def confirm_sweeps(claims: Sequence[Claim] = CLAIMS) -> dict:
    """{experiment: [{"overrides": [Hydra override, ...], "claims": [claim text, ...]}, ...]}: the sweeps that
    produce the claims' primaries, each a restriction of the experiment's ``_small`` sweep (none: the whole
    sweep) plus the primaries' fixed overrides. Two primaries share a sweep only where the joint sweep has no
    cell neither needs: SNT Figure 5's IMP at 90 % and one-shot at 70 % are two sweeps, not the four cells of
    their product. The seeds are the caller's."""
    out: dict = {}
    for claim in claims:
        p = claim.primary
        sweep = {k: list(v) for k, v in p.sweep}
        groups = out.setdefault(p.experiment, [])
        for g in groups:
            if g["fixed"] != p.fixed or set(g["sweep"]) != set(sweep):
                continue
            joint = {k: g["sweep"][k] + [v for v in sweep[k] if v not in g["sweep"][k]] for k in sweep}
            if _cells(joint) == _cells(g["sweep"]) | _cells(sweep):
                g["sweep"], g["claims"] = joint, g["claims"] + [claim.text]
                break
        else:
            groups.append({"sweep": sweep, "fixed": p.fixed, "claims": [claim.text]})
    for groups in out.values():  # a whole-sweep group covers the experiment's others with its fixed overrides
        for full in [g for g in groups if not g["sweep"]]:
            for g in [g for g in groups if g is not full and g["fixed"] == full["fixed"]]:
                full["claims"] += g["claims"]
                groups.remove(g)
    return {exp: [{"overrides": [f"{k}={','.join(v)}" for k, v in g["sweep"].items()] + list(g["fixed"]),
                   "claims": g["claims"]} for g in groups] for exp, groups in out.items()}
