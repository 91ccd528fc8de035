"""A cell against its baseline: the difference of the means over seeds with a 95 % interval and a p-value.

``welch`` (the default): the two cells' seeds as independent samples, Welch's t interval with the
Welch–Satterthwaite degrees of freedom. ``paired``: the t interval of the per-seed differences over the seeds
both cells have (the same seed trains both sides' data order and initialisation). Where a t interval cannot be
trusted — a side without spread, or fewer than :data:`MIN_T` seeds on a side — ``welch`` falls back to an exact
permutation test of the difference of means (every split of the pooled seeds, or :data:`PERM_DRAWS` random ones
when there are more), its interval the shifts the test does not reject: never an interval of zero width.
Fewer than two values on a side gives no interval, only the reason ``"n<2"``.

A scale (``raw`` or ``log``) is applied before the test: ``log`` compares the logarithms (the difference is the
log of the ratio of geometric means), for positive heavy-tailed quantities such as λmax and times.

Also here: Holm's step-down correction and the power of a two-sided Welch-type test (statsmodels), used by the
claims list (:mod:`.claims`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from typing import Optional

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

TESTS = ("welch", "paired")
SCALES = ("raw", "log")
LEVEL = 0.95
MIN_T = 3  # fewer seeds on a side than this (2): the permutation test instead of Welch's t
PERM_DRAWS = 20000  # random splits when the exact enumeration would exceed MAX_SPLITS
MAX_SPLITS = 200_000


@dataclasses.dataclass(frozen=True)
class Verdict:
    diff_mean: float  # mean(cell) − mean(baseline), on the scale compared
    low: float
    high: float
    n: int
    n_base: int
    test: str  # "welch", "paired" or "permutation"
    metric: str = "value"  # what was compared: "drop" (compressed − FP32) or "value"
    reason: str = ""  # why there is no interval
    p: float = math.nan  # two-sided p-value of "no difference"
    scale: str = "raw"

    @property
    def separated(self) -> Optional[bool]:
        """The interval excludes 0 (None: no interval)."""
        if self.reason or math.isnan(self.low):
            return None
        return not (self.low <= 0.0 <= self.high)


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def _spread(v: Sequence[float]) -> float:
    m = _mean(v)
    return max(abs(x - m) for x in v)


def scale_of(label: str) -> str:
    """The scale a column is compared on: ``log`` for λmax, times and activation ranges (positive, heavy-tailed),
    ``raw`` for accuracies, drops and shares."""
    return "log" if re.search(r"λmax|time|\(s\)|\(Min\)|max \|x\|", label, re.I) else "raw"


def on_scale(values: Sequence[float], scale: str) -> list[float]:
    """``values`` on ``scale``; ``log`` refuses a value ≤ 0 in one line."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is not known: expected one of {', '.join(SCALES)}")
    v = [float(x) for x in values]
    if scale == "log":
        bad = [x for x in v if not x > 0]
        if bad:
            raise ValueError(f"the log scale needs positive values, got {bad[0]!r}")
        return [math.log(x) for x in v]
    return v


def permutation(a: Sequence[float], b: Sequence[float], level: float = LEVEL, seed: int = 0) -> Verdict:
    """Exact two-sided permutation test of mean(a) − mean(b), with the interval obtained by inverting it: the
    shifts δ for which ``a − δ`` against ``b`` is not rejected at ``1 − level``."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    na, nb = len(a), len(b)
    d = _mean(a) - _mean(b)
    if na < 2 or nb < 2:
        return Verdict(d, math.nan, math.nan, na, nb, "permutation", reason="n<2")
    z = np.array(a + b)
    n = na + nb
    if math.comb(n, na) <= MAX_SPLITS:
        idx = np.array(list(itertools.combinations(range(n), na)))
    else:
        rng = np.random.default_rng(seed)
        idx = np.sort(np.argsort(rng.random((PERM_DRAWS, n)), axis=1)[:, :na], axis=1)
        idx = np.vstack([np.arange(na)[None, :], idx])  # the observed split is one of them
    in_s = np.zeros((len(idx), n), dtype=bool)
    np.put_along_axis(in_s, idx, True, axis=1)
    total = z.sum()
    s_sum = (z[None, :] * in_s).sum(axis=1)
    stat0 = s_sum / na - (total - s_sum) / nb
    k = in_s[:, :na].sum(axis=1)  # how many of a's seeds the split puts on a's side
    c = k / na - (na - k) / nb  # d(stat)/d(-δ) for a shift of a's values by δ
    alpha = 1.0 - level
    tol = 1e-9 * (1.0 + float(np.abs(z).max()))

    def pvalue(delta: float) -> float:
        return float(np.mean(np.abs(stat0 - delta * c) >= abs(d - delta) - tol))

    p = pvalue(0.0)
    width = float(z.max() - z.min()) + abs(d)
    grid = np.linspace(d - 2 * width, d + 2 * width, 801) if width > 0 else np.array([d])
    kept = [g for g in grid if pvalue(float(g)) > alpha]
    if not kept:  # too few splits to reject anything but the observed difference itself
        kept = [d]
    step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.0
    low, high = float(min(kept)) - step / 2, float(max(kept)) + step / 2
    if len(grid) > 1 and min(kept) <= grid[0]:  # not rejected out to the grid's edge: no bound on that side
        low = -math.inf
    if len(grid) > 1 and max(kept) >= grid[-1]:
        high = math.inf
    if low <= 0.0 <= high and p <= alpha:  # the grid's resolution must not contradict the test itself
        low, high = (low, -tol) if d < 0 else (tol, high)
    return Verdict(d, low, high, na, nb, "permutation", p=p)


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Verdict:
    """Welch's t interval of mean(a) − mean(b); the permutation test where a side has no spread or fewer than
    :data:`MIN_T` values."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    d = _mean(a) - _mean(b)
    if len(a) < 2 or len(b) < 2:
        return Verdict(d, math.nan, math.nan, len(a), len(b), "welch", reason="n<2")
    if _spread(a) == 0.0 or _spread(b) == 0.0 or min(len(a), len(b)) < MIN_T:
        return permutation(a, b, level)
    res = sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(level)
    return Verdict(d, float(ci.low), float(ci.high), len(a), len(b), "welch", p=float(res.pvalue))


def paired(a: dict, b: dict, level: float = LEVEL) -> Verdict:
    """The t interval of the mean per-seed difference a[s] − b[s] over the seeds both have ({seed: value})."""
    common = [s for s in a if s in b]
    diffs = [float(a[s]) - float(b[s]) for s in common]
    d = _mean(diffs)
    if len(common) < 2:
        return Verdict(d, math.nan, math.nan, len(common), len(common), "paired", reason="n<2")
    if _spread(diffs) == 0.0:  # every seed moved by the same amount: a sign-flip test of the differences
        p = min(1.0, 2.0 * 0.5 ** len(diffs)) if d != 0 else 1.0
        sep = p <= 1.0 - level
        return Verdict(d, d if sep else min(d, 0.0), d if sep else max(d, 0.0), len(common), len(common),
                       "paired", p=p)
    res = sps.ttest_1samp(diffs, 0.0)
    ci = res.confidence_interval(level)
    return Verdict(d, float(ci.low), float(ci.high), len(common), len(common), "paired", p=float(res.pvalue))


def compare(mine: dict, base: dict, test: str = "welch", metric: str = "value", scale: str = "raw") -> Verdict:
    """Two cells' per-seed values ({seed: value}) by ``test`` on ``scale``; ``metric`` only labels the result."""
    if test not in TESTS:
        raise ValueError(f"test {test!r} is not known: expected one of {', '.join(TESTS)}")
    m = dict(zip(mine, on_scale(mine.values(), scale)))
    b = dict(zip(base, on_scale(base.values(), scale)))
    v = welch(list(m.values()), list(b.values())) if test == "welch" else paired(m, b)
    return dataclasses.replace(v, metric=metric, scale=scale)


def holm(pvalues: Sequence[float], alpha: float = 1.0 - LEVEL) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction: which hypotheses are rejected at familywise ``alpha``, and the adjusted
    p-values. NaN p-values (no test) are left out of the family and never rejected."""
    keep = [i for i, p in enumerate(pvalues) if p == p]
    reject, adj = [False] * len(pvalues), [math.nan] * len(pvalues)
    if keep:
        r, pa, _, _ = multipletests([pvalues[i] for i in keep], alpha=alpha, method="holm")
        for i, ri, pi in zip(keep, r, pa):
            reject[i], adj[i] = bool(ri), float(pi)
    return reject, adj


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt((s_a² + s_b²) / 2): the standard deviation that standardises a difference for the power analysis."""
    va = float(np.var(a, ddof=1)) if len(a) > 1 else 0.0
    vb = float(np.var(b, ddof=1)) if len(b) > 1 else 0.0
    return math.sqrt((va + vb) / 2.0)


def power(effect: float, sd: float, n: int, alpha: float = 1.0 - LEVEL) -> float:
    """The power of a two-sided two-sample t test with ``n`` seeds per arm to detect ``effect`` (same scale as
    ``sd``)."""
    if not (effect == effect) or n < 2:
        return math.nan
    if sd == 0.0:
        return 1.0 if effect != 0 else alpha
    es = abs(effect) / sd
    pw = float(TTestIndPower().power(effect_size=es, nobs1=n, alpha=alpha, ratio=1.0, alternative="two-sided"))
    if pw != pw:  # statsmodels' noncentral t gives NaN far in the tail: the same formula through scipy
        df, nc = 2 * n - 2, es * math.sqrt(n / 2.0)
        crit = float(sps.t.ppf(1 - alpha / 2, df))
        pw = float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))
        if pw != pw:
            pw = 1.0 if nc > crit else math.nan
    return min(1.0, pw)


def seeds_needed(effect: float, sd: float, target: float = 0.8, alpha: float = 1.0 - LEVEL,
                 cap: int = 10_000) -> float:
    """Seeds per arm for ``target`` power to detect ``effect`` with spread ``sd`` (ceil; inf above ``cap``)."""
    if not (effect == effect) or effect == 0.0:
        return math.inf
    if sd == 0.0:
        return 2
    if power(effect, sd, cap, alpha) < target:
        return math.inf
    lo, hi = 2, cap  # the smallest n with enough power: power rises with n
    while lo < hi:
        mid = (lo + hi) // 2
        if power(effect, sd, mid, alpha) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo
