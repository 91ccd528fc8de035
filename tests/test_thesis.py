"""craft-report --thesis: Spearman's ρ of log λmax and the compression drop over trainings, bootstrap intervals.

Expected values are computed here by hand (ranks written out) or with scipy's own spearmanr, never with the
module's code.
"""

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from craft_runner.compress import PTQConfig
from craft_runner.compress.qat import QATConfig
from craft_runner.optim import OptimizerConfig
from craft_runner.report import thesis
from craft_runner.report.cli import main
from craft_runner.report.records import collect
from craft_runner.schema import ArchConfig, RunConfig


def config(experiment, optimizer, seed, compress, snt=False):
    rc = RunConfig(optimizer=OptimizerConfig(name=optimizer), compress=compress, seed=seed, experiment=experiment,
                   arch=ArchConfig(preact=snt, rprelu=snt))
    return dataclasses.asdict(rc)


def write(path: Path, cfg: dict, lam: float, drop: float, fp: float = 90.0):
    path.mkdir(parents=True)
    m = {"fp_acc": fp, "compressed_acc": fp + drop, "drop": drop, "lambda_max_after": lam}
    (path / "results.json").write_text(json.dumps({"config": cfg, "metrics": m, "status": "ok",
                                                   "compression": {}, "sharpness": {}}))


# --------------------------------------------------------------------------------------------- statistics


def test_spearman_with_ties_by_hand():
    x = [1, 2, 2, 3, 5]
    y = [2, 1, 4, 4, 6]
    # ranks by hand (ties share their average rank): x → 1, 2.5, 2.5, 4, 5; y → 2, 1, 3.5, 3.5, 5
    rx = [1, 2.5, 2.5, 4, 5]
    ry = [2, 1, 3.5, 3.5, 5]
    dx = [a - 3 for a in rx]
    dy = [b - 3 for b in ry]
    hand = sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    assert hand == pytest.approx(7.25 / 9.5)
    assert thesis.spearman(x, y) == pytest.approx(hand, abs=1e-12)
    assert thesis.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    # invariant under the monotone log: ρ(log λ, drop) = ρ(λ, drop)
    assert thesis.spearman(np.log(x), y) == pytest.approx(hand, abs=1e-12)
    assert math.isnan(thesis.spearman([1, 1, 1], [1, 2, 3]))  # a constant side: undefined


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(3)
    lam = np.exp(rng.uniform(0, 6, 25))
    drop = -np.log(lam) + rng.normal(0, 2, 25)
    rho = thesis.spearman(lam, drop)
    lo, hi = thesis.bootstrap_ci(lam, drop, n_resamples=2000, seed=7)
    assert lo < rho < hi
    assert -1 <= lo < hi <= 1
    assert thesis.bootstrap_ci(lam, drop, n_resamples=2000, seed=7) == (lo, hi)  # same seed, same interval
    assert thesis.bootstrap_ci(lam, drop, n_resamples=2000, seed=8) != (lo, hi)  # the seed is used


def test_verdict_rule():
    assert thesis.verdict(20, -0.6, -0.1) == thesis.HOLDS
    assert thesis.verdict(20, -0.6, 0.1) == thesis.NOT_SEPARATED
    assert thesis.verdict(20, 0.1, 0.6) == thesis.CONTRARY
    assert thesis.verdict(3, None, None) == thesis.TOO_FEW


# --------------------------------------------------------------------------------------------- sweeps


def _sweep(root: Path, lam_drop, experiment="cheap_sam_small", comp=None):
    """One results.json per (optimizer, seed) with the given (λmax, drop)."""
    comp = comp or PTQConfig(bits="W4A16")
    for (opt, seed), (lam, drop) in lam_drop.items():
        write(root / f"{opt}-{seed}", config(experiment, opt, seed, comp), lam, drop)


OPTS = ("adam", "sam", "asam")


def _synthetic(shuffle: bool, n_seeds=10, k=3.0, seed=0):
    rng = np.random.default_rng(seed)
    keys = [(o, s) for o in OPTS for s in range(n_seeds)]
    lam = np.exp(rng.uniform(1, 7, len(keys)))
    drop = -k * np.log(lam) + rng.normal(0, 2.0, len(keys))
    if shuffle:
        drop = rng.permutation(drop)
    return {key: (float(a), float(b)) for key, a, b in zip(keys, lam, drop)}


def test_synthetic_sweep_separates_and_a_shuffled_one_does_not(tmp_path):
    data = _synthetic(shuffle=False)
    _sweep(tmp_path / "real", data)
    (v,) = thesis.thesis_verdicts(collect(tmp_path / "real").records)
    lam, drop = zip(*data.values())
    assert v["n"] == 30
    assert v["rho"] == pytest.approx(spearmanr(lam, drop).statistic, abs=1e-12)
    assert v["rho"] < 0 and v["ci_high"] < 0
    assert v["verdict"] == thesis.HOLDS
    assert set(v["within"]) == {"ADAM", "SAM", "ASAM"}
    for opt, (n, rho, lo, hi) in v["within"].items():
        mine = [data[(opt.lower(), s)] for s in range(10)]
        assert n == 10
        assert rho == pytest.approx(spearmanr(*zip(*mine)).statistic, abs=1e-12)
        assert lo <= rho <= hi

    shuffled = _synthetic(shuffle=True)
    _sweep(tmp_path / "shuffled", shuffled)
    (s,) = thesis.thesis_verdicts(collect(tmp_path / "shuffled").records)
    assert s["ci_low"] < 0 < s["ci_high"]
    assert s["verdict"] == thesis.NOT_SEPARATED


def test_between_methods_only_is_told_apart_from_within(tmp_path):
    """Adam: high λmax and large drops, SAM: low λmax and small drops, no relation inside either."""
    rng = np.random.default_rng(1)
    data = {}
    for s in range(12):
        data[("adam", s)] = (float(np.exp(rng.uniform(6, 7))), float(rng.normal(-10, 1)))
        data[("sam", s)] = (float(np.exp(rng.uniform(2, 3))), float(rng.normal(-2, 1)))
    _sweep(tmp_path, data)
    (v,) = thesis.thesis_verdicts(collect(tmp_path).records)
    assert v["verdict"] == thesis.HOLDS  # pooled: the two methods alone make ρ strongly negative
    n, rho, lo, hi = v["within_pooled"]
    by_hand = [spearmanr(*zip(*[data[(o, s)] for s in range(12)])).statistic for o in ("adam", "sam")]
    assert n == 24 and rho == pytest.approx(sum(by_hand) / 2, abs=1e-12)
    assert lo < 0 < hi and v["within_verdict"] == thesis.NOT_SEPARATED


def test_a_training_shared_by_two_sweeps_counts_once(tmp_path):
    """The same 6 trainings compressed in two sweeps (and two settings): n = 6 per setting, not 12."""
    data = {(o, s): (10.0 ** (1 + s + (o == "adam")), -1.0 - s - 2 * (o == "adam")) for o in ("adam", "sam")
            for s in range(3)}
    for sweep in ("a", "b"):
        _sweep(tmp_path / sweep / "w4", data, experiment=f"exp_{sweep}")
        _sweep(tmp_path / sweep / "w8", {k: (lam, d / 10) for k, (lam, d) in data.items()}, experiment=f"exp_{sweep}",
               comp=PTQConfig(bits="W8A8"))
    records = collect(tmp_path).records
    assert len(records) == 24
    got = {v["setting"]: v for v in thesis.thesis_verdicts(records)}
    assert set(got) == {"W4A16", "W8A8"}
    assert got["W4A16"]["n"] == got["W8A8"]["n"] == 6
    lam, drop = zip(*data.values())
    assert got["W4A16"]["rho"] == pytest.approx(spearmanr(lam, drop).statistic, abs=1e-12)


def test_a_compress_field_that_varies_splits_the_setting(tmp_path):
    data = _synthetic(shuffle=False, n_seeds=3)
    for aq in ("distiller", "layer_inputs"):  # QAT's label names the coverage
        _sweep(tmp_path / aq, data, experiment="snt_table3_qat_small", comp=QATConfig(act_quant=aq))
    for calib in (64, 128):  # a field the label does not show: [calib_size=...] appended
        _sweep(tmp_path / f"c{calib}", data, comp=PTQConfig(bits="W4A16", calib_size=calib))
    got = {v["setting"]: v["n"] for v in thesis.thesis_verdicts(collect(tmp_path).records)}
    assert got == {"QAT W4A4": 9, "QAT W4A4 (layer inputs)": 9, "W4A16 [calib_size=64]": 9,
                   "W4A16 [calib_size=128]": 9}


def test_cli_writes_table_csv_and_figure(tmp_path, capsys):
    _sweep(tmp_path / "a", _synthetic(shuffle=False))
    _sweep(tmp_path / "b", {(o, s + 10): v for (o, s), v in _synthetic(shuffle=False, seed=2).items()},
           comp=PTQConfig(bits="W8A8"))
    out = tmp_path / "out"
    assert main(["--thesis", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "W4A16" in text and thesis.HOLDS in text
    rows = list(csv.DictReader((out / "thesis.csv").open()))
    assert list(rows[0])[:6] == ["setting", "group", "n", "rho", "ci_low", "ci_high"]
    assert {(r["setting"], r["group"]) for r in rows} >= {("W4A16", "all"), ("W4A16", "ADAM"), ("W8A8", "all")}
    w4 = next(r for r in rows if r["setting"] == "W4A16" and r["group"] == "all")
    assert int(w4["n"]) == 30 and float(w4["ci_high"]) < 0
    assert (out / "thesis-scatter.png").stat().st_size > 0 and (out / "thesis.md").exists()


def test_cli_refuses_when_nothing_to_correlate(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--thesis", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no training" in capsys.readouterr().err
    assert not (tmp_path / "out" / "thesis.csv").exists()
    assert main(["--thesis", str(tmp_path / "nowhere")]) == 2


def test_cells_csv_points_dedupe_rows_of_one_training(tmp_path, capsys):
    """Two rows differing only in the PTQ method share a training (same λmax and FP32 per seed): each becomes
    its own setting, and n counts trainings, not rows."""
    header = "Method,Fine-tuning,column,n,mean,std,drop_mean,drop_std,seeds,values,text\n"
    lines = []
    for method in ("BasePTQ", "PTQ4ViT"):
        for opt, lam, fp in (("ADAM", "100 200 300", "90 91 92"), ("CrAFT", "10 20 30", "90 90 90")):
            lines.append(f"{method},{opt},λmax,3,,,,,0 1 2,{lam},")
            lines.append(f"{method},{opt},FP32,3,,,,,0 1 2,{fp},")
            acc = "80 79 78" if opt == "ADAM" else "89 88 87"
            lines.append(f"{method},{opt},W4A4,3,,,-5,,0 1 2,{acc},")
    f = tmp_path / "exp_small-cells.csv"
    f.write_text(header + "\n".join(lines) + "\n")
    got = thesis.points_from_cells(f).points
    assert set(got) == {"exp_small: W4A4 [Method=BasePTQ]", "exp_small: W4A4 [Method=PTQ4ViT]"}
    pts = got["exp_small: W4A4 [Method=BasePTQ]"]
    assert len(pts) == 6
    assert sorted((p.optimizer, p.lam, p.drop) for p in pts) == sorted(
        [("ADAM", 100.0, -10.0), ("ADAM", 200.0, -12.0), ("ADAM", 300.0, -14.0),
         ("CrAFT", 10.0, -1.0), ("CrAFT", 20.0, -2.0), ("CrAFT", 30.0, -3.0)])
    (v,) = [v for v in thesis.thesis_verdicts([], cells=[f]) if v["setting"].endswith("[Method=BasePTQ]")]
    assert v["n"] == 6 and v["rho"] == pytest.approx(-1.0)  # λmax and the loss rise together, rank for rank
    assert set(v["within"]) == {"ADAM", "CrAFT"}
    assert main(["--thesis", str(tmp_path), "--no-figures"]) == 0
    assert "exp_small: W4A4 [Method=PTQ4ViT]" in capsys.readouterr().out
