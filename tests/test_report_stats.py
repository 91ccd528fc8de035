"""craft-report's verdicts: the 95 % intervals against hand computations, the CSV columns, the mark, the claims.

Expected intervals are computed here from the written formulas (Welch–Satterthwaite df; scipy only for the t
quantile), on numbers chosen so the means and variances are easy to check by hand.
"""

import csv
import io
import math
import statistics

import pytest
from scipy.stats import t as student_t
from test_report import _python, config, table, write

from craft_runner.compress import PruneConfig, PTQConfig
from craft_runner.report import stats
from craft_runner.report.cli import main

# ------------------------------------------------------------------------------------------------ intervals


def welch_by_hand(a, b):
    ma, mb = statistics.mean(a), statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    h = student_t.ppf(0.975, df) * math.sqrt(va + vb)
    return ma - mb, ma - mb - h, ma - mb + h


def test_welch_interval_by_hand():
    # a: mean 4, variance 4; b: mean 2, variance 1 → se² = 4/3 + 1/3 = 5/3, df = (5/3)² / ((4/3)²/2 + (1/3)²/2) = 50/17
    v = stats.welch([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    h = student_t.ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert (v.diff_mean, v.low, v.high) == pytest.approx((2.0, 2.0 - h, 2.0 + h))
    assert v.separated is False and (v.n, v.n_base) == (3, 3)
    a, b = [-3.1, -2.5, -2.9, -3.4], [-9.0, -12.5, -7.75]
    assert (lambda w: (w.diff_mean, w.low, w.high))(stats.welch(a, b)) == pytest.approx(welch_by_hand(a, b))
    assert stats.welch(a, b).separated is True


def test_paired_interval_by_hand():
    mine, base = {0: 5.0, 1: 7.0, 2: 6.0, 9: 100.0}, {0: 4.0, 1: 5.0, 2: 6.0}
    d = [1.0, 2.0, 0.0]  # seed 9 has no partner
    h = student_t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    v = stats.paired(mine, base)
    assert (v.diff_mean, v.low, v.high, v.n) == pytest.approx((1.0, 1.0 - h, 1.0 + h, 3))


def test_too_few_seeds_and_no_spread():
    v = stats.welch([1.0], [1.0, 2.0])
    assert v.reason == "n<2" and v.separated is None and v.diff_mean == pytest.approx(-0.5)
    assert stats.paired({0: 1.0, 1: 2.0}, {1: 0.0, 2: 0.0}).reason == "n<2"
    same = stats.welch([3.0, 3.0], [1.0, 1.0, 1.0])  # no spread: the permutation test, never a [Δ, Δ] interval
    assert same.test == "permutation" and same.separated is False and same.low < 2.0 < same.high
    with pytest.raises(ValueError, match="test 'bootstrap' is not known"):
        stats.compare({}, {}, "bootstrap")


# ------------------------------------------------------------------------------------------------ sweeps

SEEDS = (0, 1, 2)
# Per (optimizer, compression): the per-seed compressed − fp drops; fp is 90 + seed.
DROPS = {
    ("adam", "W8A8"): [-1.0, -2.0, -1.5], ("sam", "W8A8"): [-1.2, -1.6, -2.1],          # overlapping
    ("adam", "W4A16"): [-10.0, -12.0, -11.0], ("sam", "W4A16"): [-20.0, -21.5, -22.0],  # SAM worse
    ("adam", "mag50"): [-30.0, -28.0, -33.0], ("sam", "mag50"): [-5.0, -6.0, None],     # SAM better, n=2
}
LAM = {"adam": [900.0, 1200.0, 1000.0], "sam": [50.0, 80.0, 65.0]}


def _comp(name):
    return PruneConfig(sparsity=0.5) if name == "mag50" else PTQConfig(bits=name)


@pytest.fixture
def default_sweep(tmp_path):
    """A digits_default sweep; the SAM pruning cell lost its third seed to a failure."""
    root = tmp_path / "default"
    for (opt, comp), drops in DROPS.items():
        for s, d in zip(SEEDS, drops):
            path = root / f"{opt}-{comp}-{s}"
            cfg = config("digits_default", opt, s, _comp(comp))
            if d is None:
                write(path, cfg, status="failed", error="RuntimeError: boom")
            else:
                write(path, cfg, 90.0 + s, 90.0 + s + d, lambda_max_after=LAM[opt][s],
                      train_seconds=(10.0 + s) * (2 if opt == "sam" else 1))
    return root


def test_csv_verdict_columns(default_sweep, capsys):
    assert main([str(default_sweep), "--format", "csv", "--no-figures"]) == 1  # the failed seed
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out.strip())))
    sam = next(r for r in rows if r["Optimizer"] == "SAM")
    adam = next(r for r in rows if r["Optimizer"] == "ADAM")
    for col in ("W4A16", "W8A8", "magnitude 50%", "λmax"):
        assert adam[f"{col} separated"] == "" and adam[f"{col} diff_mean"] == ""  # the baseline itself
    want = welch_by_hand(DROPS[("sam", "W4A16")], DROPS[("adam", "W4A16")])
    got = [float(sam[f"W4A16 {k}"]) for k in ("diff_mean", "diff_ci_low", "diff_ci_high")]
    assert got == pytest.approx(want, rel=1e-5) and sam["W4A16 separated"] == "true"
    assert want[2] < 0  # SAM's drop is larger: separated on the contrary side
    assert sam["W8A8 separated"] == "false"
    # two seeds on SAM's side: the exact permutation test, whose 10 splits allow no p below 0.2 → not separated
    mag = [d for d in DROPS[("sam", "mag50")] if d is not None]
    assert len(mag) == 2 and sam["magnitude 50% separated"] == "false"
    assert float(sam["magnitude 50% diff_mean"]) == pytest.approx(statistics.mean(mag)
                                                                  - statistics.mean(DROPS[("adam", "mag50")]),
                                                                  rel=1e-5)
    want = welch_by_hand([math.log(x) for x in LAM["sam"]], [math.log(x) for x in LAM["adam"]])  # the log scale
    assert float(sam["λmax diff_ci_high"]) == pytest.approx(want[2], rel=1e-5) and sam["λmax separated"] == "true"
    assert "FP32 separated" not in sam and "overhead separated" not in sam  # no verdict on these columns
    assert "†" not in sam["W4A16"]
    cells = list(csv.DictReader(io.StringIO((default_sweep / "digits_default-cells.csv").read_text())))
    one = next(c for c in cells if c["Optimizer"] == "SAM" and c["column"] == "W4A16")
    assert (one["baseline"], one["compared"], one["test"], one["n_baseline"]) == ("ADAM / W4A16", "drop", "welch", "3")
    assert float(one["diff_mean"]) == pytest.approx(statistics.mean(DROPS[("sam", "W4A16")])
                                                    - statistics.mean(DROPS[("adam", "W4A16")]), rel=1e-5)  # 6 digits


def test_paired_test_in_csv(default_sweep, capsys):
    main([str(default_sweep), "--format", "csv", "--no-figures", "--test", "paired"])
    sam = next(r for r in csv.DictReader(io.StringIO(capsys.readouterr().out.strip())) if r["Optimizer"] == "SAM")
    d = [a - b for a, b in zip(DROPS[("sam", "W8A8")], DROPS[("adam", "W8A8")])]
    h = student_t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    assert float(sam["W8A8 diff_ci_low"]) == pytest.approx(statistics.mean(d) - h, rel=1e-5)


def test_markdown_mark_and_legend(default_sweep, capsys):
    main([str(default_sweep), "--no-figures"])
    out = capsys.readouterr().out
    rows = table(out)
    h = rows[0]
    body = {r[0]: r for r in rows[1:]}
    assert body["SAM"][h.index("W4A16")].endswith("†") and not body["SAM"][h.index("W8A8")].endswith("†")
    # two seeds against three: no permutation p below 0.2, so no mark however far apart
    assert body["SAM"][h.index("magnitude 50%")].endswith("]") and "†" not in body["SAM"][h.index("magnitude 50%")]
    assert body["SAM"][h.index("λmax")].endswith("†")
    assert not any(c.endswith("†") for c in body["ADAM"])
    assert "†: the 95 % Welch's t interval" in out and "excludes 0" in out


# ------------------------------------------------------------------------------------------------ claims


# The claims list's own tests are in test_claims.py.


# ------------------------------------------------------------------------------------------------ a real sweep


@pytest.mark.slow
def test_real_tiny_sweep_verdicts(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    p = _python("-m", "craft_runner.run", "-m", "experiment=digits_default", "train.epochs=1", "train.progress=false",
                "sharpness.max_iter=5", "+shared/comp=w4a16", "seed=0,1", f"hydra.sweep.dir={sweep}",
                f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main([str(sweep), "--format", "csv", "--no-figures"]) == 0
    sam = next(r for r in csv.DictReader(io.StringIO(capsys.readouterr().out.strip())) if r["Optimizer"] == "SAM")
    cells = list(csv.DictReader(io.StringIO((sweep / "digits_default-cells.csv").read_text())))

    def drop_mean(opt):
        return float(next(c for c in cells if c["Optimizer"] == opt and c["column"] == "W4A16")["drop_mean"])

    assert float(sam["W4A16 diff_mean"]) == pytest.approx(drop_mean("SAM") - drop_mean("ADAM"), abs=1e-4)
    low, high = float(sam["W4A16 diff_ci_low"]), float(sam["W4A16 diff_ci_high"])
    assert low <= float(sam["W4A16 diff_mean"]) <= high
    assert sam["W4A16 separated"] == str(not low <= 0 <= high).lower()
