"""cheap_sam's frontier: the share of SAM's gain kept against a hand computation, the headline's test, the figure."""

import math
import statistics

import numpy as np
import pytest
from test_report import config, write

from craft_runner.compress import PruneConfig, PTQConfig
from craft_runner.report import pareto
from craft_runner.report.cli import main


def test_kept_share_is_the_ratio_of_the_mean_gains_and_its_interval_holds_it():
    adam, sam, row = [1000.0, 1200.0, 1100.0], [100.0, 120.0, 110.0], [550.0, 700.0, 600.0]
    # (mean(row) − mean(adam)) / (mean(sam) − mean(adam)) = (616.67 − 1100) / (110 − 1100)
    hand = (statistics.mean(row) - 1100.0) / (110.0 - 1100.0)
    point, lo, hi = pareto.kept_share(row, adam, sam, np.random.default_rng(0))
    assert point == pytest.approx(hand) and lo < point < hi and 0.3 < lo and hi < 0.65
    # a row equal to Adam keeps nothing, one equal to SAM everything
    assert pareto.kept_share(adam, adam, sam, np.random.default_rng(0))[0] == pytest.approx(0.0)
    assert pareto.kept_share(sam, adam, sam, np.random.default_rng(0))[0] == pytest.approx(1.0)
    # one seed: the share, no interval
    one = pareto.kept_share([600.0], adam, sam, np.random.default_rng(0))
    assert one[0] == pytest.approx((600.0 - 1100.0) / (110.0 - 1100.0)) and math.isnan(one[1])


# rows: (optimizer, arch preact/rprelu); per seed train seconds, λmax, W4A16 drop, magnitude 50 % drop
SEEDS = range(5)
ROWS = {
    "adam": dict(t=10.0, lam=[1000, 1100, 900, 1050, 950], w4=[-20, -22, -18, -21, -19], m50=[-60, -62, -58, -61, -59]),
    "sam": dict(t=20.0, lam=[100, 110, 90, 105, 95], w4=[-5, -6, -4, -5, -5], m50=[-20, -22, -18, -21, -19]),
    # cheap and keeps ~90 % of everything: meets the headline
    "msam": dict(t=10.5, lam=[190, 200, 180, 195, 185], w4=[-6.5, -7.5, -5.5, -6.5, -6.5],
                 m50=[-24, -26, -22, -25, -23]),
    # as cheap, keeps little of the λmax cut: fails it
    "swa": dict(t=10.2, lam=[900, 1000, 800, 950, 850], w4=[-6, -7, -5, -6, -6], m50=[-22, -24, -20, -23, -21]),
    # keeps everything but costs 1.5x: fails it
    "looksam": dict(t=15.0, lam=[100, 110, 90, 105, 95], w4=[-5, -6, -4, -5, -5], m50=[-20, -22, -18, -21, -19]),
}


@pytest.fixture
def cheap_sweep(tmp_path):
    root = tmp_path / "cheap"
    for opt, r in ROWS.items():
        for s in SEEDS:
            fp = 98.0
            for comp, drops in (("W4A16", r["w4"]), ("mag50", r["m50"])):
                for bn in (0, 8):  # BN re-calibration halves every drop: the same shares kept
                    c = (PruneConfig(sparsity=0.5, bn_recalib=bn) if comp == "mag50"
                         else PTQConfig(bits=comp, bn_recalib=bn))
                    write(root / f"{opt}-{comp}-{bn}-{s}", config("cheap_sam_small", opt, s, c), fp,
                          fp + drops[s] / (2 if bn else 1), lambda_max_after=float(r["lam"][s]),
                          train_seconds=r["t"] * (1 + 0.01 * s))
    return root


def test_frontier_table_and_headline_from_a_sweep(cheap_sweep, tmp_path):
    out = tmp_path / "out"
    assert main([str(cheap_sweep), "--out", str(out)]) == 0
    md = (out / "cheap_sam_small-pareto.md").read_text()
    assert (out / "cheap_sam_small-pareto.png").read_bytes()[:4] == b"\x89PNG"
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert head[-2:] == ["headline met [bn_recalib=0]", "headline met [bn_recalib=8]"]
    assert "W4A16 [bn_recalib=8]: kept of SAM's gain" in head and "λmax: kept of SAM's gain" == head[2]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| Row")}
    assert rows["MSAM *"][-2] == "yes"
    assert rows["MSAM *"][-1] == "yes"  # cheap, and on the frontier
    assert rows["SWA *"][-1] == "no" and rows["LOOKSAM *"][-1] == "no"
    # LOOKSAM keeps all of SAM's cut at less cost: SAM is not on the frontier
    # MSAM's λmax share, computed here: (mean 190 − 1000) / (100 − 1000) = 0.9
    assert rows["MSAM *"][2].startswith("0.90 [") and rows["MSAM *"][2].endswith("†")
    assert rows["MSAM *"][1].startswith("1.05x")  # train seconds per seed / Adam's: 10.5 / 10
    assert rows["ADAM *"][2].startswith("0.00") and rows["SAM"][2].startswith("1.00")


def test_meets_needs_every_target_separated():
    class V:
        def __init__(self, d, sep):
            self.diff_mean, self.separated = d, sep

    def entry(cost, lam_sep=True):
        t = {pareto.LAM: {"kept": (0.9, 0.8, 1.0), "verdict": V(-800, lam_sep)},
             "W4A16": {"kept": (0.85, 0.7, 1.0), "verdict": V(12, True)},
             "magnitude 50%": {"kept": (0.95, 0.8, 1.1), "verdict": V(30, True)}}
        return {"row": "X", "cost": (cost, 0.01, 5), "targets": t}

    assert pareto.meets(entry(1.05)) is True
    assert pareto.meets(entry(1.12)) is False
    assert pareto.meets(entry(1.05, lam_sep=False)) is False
    missing = entry(1.05)
    del missing["targets"]["W4A16"]
    assert pareto.meets(missing) is None


def test_step_costs_from_make_bench_replace_the_sweeps_times(cheap_sweep, tmp_path):
    import json

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": {}, "step_costs": {"adam": 1.0, "sam": 2.02, "msam": 1.31, "swa": 1.01}}))
    out = tmp_path / "out"
    assert main([str(cheap_sweep), "--out", str(out), "--step-costs", str(bench)]) == 0
    md = (out / "cheap_sam_small-pareto.md").read_text()
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("| Row")}
    # MSAM at 1.31x Adam's step misses the cost target now; LOOKSAM, not benched, has no cost
    assert rows["MSAM *"][1] == "1.31x" and rows["MSAM *"][-1] == "no"
    assert rows["LOOKSAM"][1] == "—" and "make bench` measured side by side" in md
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main([str(cheap_sweep), "--step-costs", str(bad)]) == 2
