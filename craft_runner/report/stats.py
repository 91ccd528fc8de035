"""A cell against its baseline: the difference of the means over seeds with a 95 % t interval.

``welch`` (the default): the two cells' seeds as independent samples, Welch's t interval with the
Welch–Satterthwaite degrees of freedom. ``paired``: the t interval of the per-seed differences over the seeds
both cells have (the same seed trains both sides' data order and initialisation). Fewer than two values on a
side (two common seeds for ``paired``) gives no interval, only the reason ``"n<2"``. With no spread at all
(every seed equal on both sides) the interval is the difference itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

TESTS = ("welch", "paired")
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Verdict:
    diff_mean: float  # mean(cell) − mean(baseline)
    low: float
    high: float
    n: int
    n_base: int
    test: str
    metric: str = "value"  # what was compared: "drop" (compressed − FP32) or "value"
    reason: str = ""  # why there is no interval

    @property
    def separated(self) -> Optional[bool]:
        """The interval excludes 0 (None: no interval)."""
        if self.reason or math.isnan(self.low):
            return None
        return not (self.low <= 0.0 <= self.high)


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Verdict:
    """Welch's t interval of mean(a) − mean(b)."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    d = _mean(a) - _mean(b)
    if len(a) < 2 or len(b) < 2:
        return Verdict(d, math.nan, math.nan, len(a), len(b), "welch", reason="n<2")
    if _spread(a) == 0.0 and _spread(b) == 0.0:
        return Verdict(d, d, d, len(a), len(b), "welch")
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return Verdict(d, float(ci.low), float(ci.high), len(a), len(b), "welch")


def paired(a: dict, b: dict, level: float = LEVEL) -> Verdict:
    """The t interval of the mean per-seed difference a[s] − b[s] over the seeds both have ({seed: value})."""
    from scipy import stats

    common = [s for s in a if s in b]
    diffs = [float(a[s]) - float(b[s]) for s in common]
    d = _mean(diffs)
    if len(common) < 2:
        return Verdict(d, math.nan, math.nan, len(common), len(common), "paired", reason="n<2")
    if _spread(diffs) == 0.0:
        return Verdict(d, d, d, len(common), len(common), "paired")
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(level)
    return Verdict(d, float(ci.low), float(ci.high), len(common), len(common), "paired")


def _spread(v: Sequence[float]) -> float:
    m = _mean(v)
    return max(abs(x - m) for x in v)


def compare(mine: dict, base: dict, test: str = "welch", metric: str = "value") -> Verdict:
    """Two cells' per-seed values ({seed: value}) by ``test``; ``metric`` only labels the result."""
    if test not in TESTS:
        raise ValueError(f"test {test!r} is not known: expected one of {', '.join(TESTS)}")
    v = welch(list(mine.values()), list(base.values())) if test == "welch" else paired(mine, base)
    return dataclasses.replace(v, metric=metric)
