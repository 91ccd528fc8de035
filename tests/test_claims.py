"""The claims' verdicts (craft_runner/report/claims.py) and their statistics (report/stats.py) against hand
computations: the exact permutation test enumerated here, Holm's step-down done by hand, the power of the
two-sample t test from the noncentral t written out with scipy, a log-scale comparison done on logarithms here.
"""

import csv
import io
import itertools
import math
import re
import statistics
import threading

import pytest
from scipy import stats as sps
from test_report import config, write

from craft_runner import confirm
from craft_runner.compress import PTQConfig
from craft_runner.report import claims, stats
from craft_runner.report.cli import main

# ------------------------------------------------------------------------------------------------ statistics


def perm_p_by_hand(a, b):
    z = a + b
    d = statistics.mean(a) - statistics.mean(b)
    hits = total = 0
    for s in itertools.combinations(range(len(z)), len(a)):
        mine = [z[i] for i in s]
        rest = [z[i] for i in range(len(z)) if i not in s]
        total += 1
        hits += abs(statistics.mean(mine) - statistics.mean(rest)) >= abs(d) - 1e-12
    return hits / total


def test_permutation_test_by_hand():
    # [1, 2] vs [3, 4]: of the 6 splits, {1, 2} and {3, 4} reach |−2| → p = 1/3, never separated with 2 seeds
    v = stats.welch([1.0, 2.0], [3.0, 4.0])
    assert v.test == "permutation" and v.p == pytest.approx(1 / 3) and v.separated is False
    # a side without spread: no [Δ, Δ] interval any more; of C(10, 5) = 252 splits only the observed one and its
    # mirror are as extreme → p = 2 / 252
    a, b = [5.0] * 5, [1.0, 1.5, 1.0, 1.2, 1.0]
    v = stats.welch(a, b)
    assert v.test == "permutation" and v.p == pytest.approx(2 / 252) == pytest.approx(perm_p_by_hand(a, b))
    assert v.separated is True and v.low < v.diff_mean < v.high and v.low > 0
    # the interval inverts the test: at its bounds the shifted sample is (just) not rejected, outside it is
    inside = [x - (v.low + 0.02) for x in a]
    outside = [x - (v.low - 0.1) for x in a]
    assert perm_p_by_hand(inside, b) > 0.05 and perm_p_by_hand(outside, b) <= 0.05
    # three seeds against three: 20 splits, the smallest p is 2/20 = 0.1 → the interval is unbounded
    w = stats.welch([3.0, 3.0, 3.0], [1.0, 1.0, 1.0])
    assert w.p == pytest.approx(0.1) and w.separated is False and math.isinf(w.low) and math.isinf(w.high)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1: 0.04 rejects, 0.09 stops; adjusted p monotone
    reject, adj = stats.holm([0.01, 0.04, 0.03, 0.2, math.nan])
    assert reject == [True, False, False, False, False]
    assert adj[:4] == pytest.approx([0.04, 0.09, 0.09, 0.2]) and math.isnan(adj[4])


def test_power_against_the_noncentral_t():
    def by_hand(d, n, alpha=0.05):
        df, nc = 2 * n - 2, d * math.sqrt(n / 2)
        crit = sps.t.ppf(1 - alpha / 2, df)
        return sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)

    for effect, sd, n in ((1.0, 1.0, 17), (0.5, 1.0, 64), (2.0, 4.0, 10), (-3.0, 0.4, 3)):
        assert stats.power(effect, sd, n) == pytest.approx(by_hand(abs(effect) / sd, n), abs=1e-6)
    # the textbook sample sizes for 80 % power at α = 0.05: d = 1 → 17, d = 0.5 → 64 per arm
    assert stats.seeds_needed(1.0, 1.0) == 17 and stats.seeds_needed(0.5, 1.0) == 64
    assert by_hand(1.0, 16) < 0.8 <= by_hand(1.0, 17)
    assert stats.seeds_needed(0.0, 1.0) == math.inf


def test_log_scale_is_welch_on_logarithms():
    a, b = {0: 20.0, 1: 25.0, 2: 30.0, 3: 18.0}, {0: 700.0, 1: 300.0, 2: 4000.0, 3: 500.0}
    v = stats.compare(a, b, "welch", "value", "log")
    la, lb = [math.log(x) for x in a.values()], [math.log(x) for x in b.values()]
    ci = sps.ttest_ind(la, lb, equal_var=False).confidence_interval(0.95)
    assert (v.diff_mean, v.low, v.high) == pytest.approx((statistics.mean(la) - statistics.mean(lb), ci.low, ci.high))
    assert v.scale == "log" and v.separated is True
    with pytest.raises(ValueError, match="log scale needs positive values"):
        stats.compare({0: 1.0, 1: 0.0}, b, "welch", "value", "log")


def test_decide():
    def v(d, lo, hi):
        return stats.Verdict(d, lo, hi, 10, 10, "welch", p=0.5)

    assert claims.decide(v(2.0, 1.0, 3.0), +1, 5.0) == "holds"
    assert claims.decide(v(2.0, 1.0, 3.0), -1, -5.0) == "contrary"
    assert claims.decide(v(0.1, -1.0, 1.2), +1, 5.0) == "no effect of the paper's size"
    assert claims.decide(v(0.1, -1.0, 6.0), +1, 5.0) == "undecided"
    assert claims.decide(v(0.1, -1.0, 1.2), +1, None) == "undecided"
    assert claims.decide(stats.Verdict(0.0, math.nan, math.nan, 1, 3, "welch", reason="n<2"), +1, 1.0) == \
        "not measured"
    assert claims.decide(None, +1, 1.0) == "not measured"


# ------------------------------------------------------------------------------------------------ claims


def test_the_claims_are_declared():
    from craft_runner.report.papers import LAYOUTS

    for c in claims.CLAIMS:
        p = c.primary
        assert c.paper in ("CrAFT", "SNT") and c.direction in (-1, 1), c
        assert p.experiment in LAYOUTS and p.estimand in ("drop", "value") and p.scale in stats.SCALES, c
        if re.search(r"λmax|Time", p.column):
            assert p.scale == "log", c  # heavy-tailed positive quantities compare on the log scale
        if c.effect is not None:
            assert (c.effect > 0) == (c.direction > 0), c  # the paper's effect points the claimed way
        assert all(exp in LAYOUTS for exp, *_ in c.supporting + c.related), c
    # no two claims stand on the same primary
    keys = [(c.primary.experiment, c.primary.row, c.primary.base, c.primary.column, c.primary.base_column)
            for c in claims.CLAIMS]
    assert len(keys) == len(set(keys))


def _table2(tmp_path, drops):
    """craft_table2_small: BasePTQ W4A4 and W8A8 for ADAM and SAM (CrAFT), seeds 0-4; FP32 90 + seed."""
    for opt, (d44, d88) in drops.items():
        for s in range(5):
            for bits, d in (("W4A4", d44[s]), ("W8A8", d88[s])):
                cfg = config("craft_table2_small", opt, s, PTQConfig(method="base", bits=bits), classes=[5, 6, 7, 8, 9])
                write(tmp_path / f"{opt}-{bits}-{s}", cfg, 90.0 + s, 90.0 + s + d)


def _line(out, where, text):
    return next(ln for ln in out.splitlines() if ln.startswith(f"- **{where}**: {text}"))


def test_claims_report_on_a_sweep(tmp_path, capsys):
    adam44, sam44 = [-10.0, -12.0, -9.0, -11.0, -13.0], [-2.0, -3.0, -1.0, -2.5, -1.5]
    _table2(tmp_path / "t2", {"adam": (adam44, [-1, -1, -1, -1, -1.5]), "sam": (sam44, [-1, -1, -1.5, -1, -1])})
    out_dir = tmp_path / "out"
    assert main([str(tmp_path / "t2"), "--claims", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    line = _line(out, "Table 2", "CrAFT boosts PTQ")
    assert "— **holds**" in line
    # the primary's figures: the drops' difference by Welch's formula, computed here
    d = statistics.mean(sam44) - statistics.mean(adam44)
    ci = sps.ttest_ind(sam44, adam44, equal_var=False).confidence_interval(0.95)
    assert f"Δ {d:+.3g} [{ci.low:+.3g}, {ci.high:+.3g}]" in out
    assert "primary: craft_table2_small · BasePTQ / CrAFT vs ADAM · W4A4 · drop on the raw scale" in out
    # W8A8 is supporting evidence, Holm-adjusted within the claim: 1 comparison, not separated
    assert "supporting: 0 of 1 after Holm" in out
    assert "**not measured**: no craft_table1 results" in _line(out, "Table 1", "SAM lowers λmax")
    rows = list(csv.DictReader(io.StringIO((out_dir / "claims.csv").read_text())))
    assert len(rows) == len(claims.CLAIMS) + 1  # and the papers' thesis, not measured on this sweep
    assert rows[-1]["where"] == "Conclusions" and rows[-1]["verdict"] == "not measured"
    t2 = next(r for r in rows if r["where"] == "Table 2")
    assert (t2["verdict"], t2["estimand"], t2["scale"], t2["n"], t2["n_baseline"]) == ("holds", "drop", "raw", "5", "5")
    assert float(t2["diff"]) == pytest.approx(d) and float(t2["ci_low"]) == pytest.approx(ci.low, rel=1e-5)
    assert t2["supporting"] == "0 of 1 after Holm"
    sd = math.sqrt((statistics.variance(sam44) + statistics.variance(adam44)) / 2)
    assert float(t2["power_at_paper_effect"]) == pytest.approx(stats.power(6.73, sd, 5), rel=1e-5)
    assert int(t2["seeds_for_paper_effect"]) == stats.seeds_needed(6.73, sd)
    summary = (out_dir / "claims-summary.md").read_text()
    assert summary.rstrip().splitlines()[-1].startswith(f"Verdicts over the {len(claims.CLAIMS) + 1} claims: 1 holds")
    assert main([str(tmp_path / "t2"), "--claims", "--format", "csv"]) == 0
    assert capsys.readouterr().out == (out_dir / "claims.csv").read_text()
    # the cells the list was computed from, one file per experiment, give the same list
    assert main([str(tmp_path / "t2"), "--claims", "--format", "csv", "--cells-out", str(tmp_path / "cells")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["craft_table2_small-cells.csv"]
    assert main([str(tmp_path / "cells"), "--claims", "--format", "csv"]) == 0
    assert capsys.readouterr().out == (out_dir / "claims.csv").read_text()


def test_a_data_pair_counts_once(tmp_path):
    _table2(tmp_path, {"adam": ([-10.0, -12, -9, -11, -13], [-1, -1, -1, -1, -1.5]),
                       "sam": ([-2.0, -3, -1, -2.5, -1.5], [-1, -1, -1.5, -1, -1])})
    from craft_runner.report.cli import build, collect, layout_for

    recs = collect(tmp_path).records
    tables = {"craft_table2_small": build(layout_for("craft_table2_small"), recs)}
    first = claims.CLAIMS[5]  # Table 2: primary W4A4, supporting every bit-width
    second = claims.Claim("CrAFT", "Table 9", "a claim that reuses Table 2's cells",
                          claims.dataclasses.replace(first.primary, column="W8A8"), None, "—",
                          supporting=(("craft_table2", "W4A4|W8A8"),))
    a1, a2 = claims.assess([first, second], tables)
    # a primary is its claim's own: the first claim lists the second's W8A8 primary without counting it, and the
    # second lists the first's W4A4 primary
    assert a1.supporting == [] and [(c.col, owner.split(":")[0]) for c, owner in a1.repeated] == [
        ("W8A8", "CrAFT Table 9")]
    assert a2.supporting == [] and [c.col for c, _ in a2.repeated] == ["W4A4"]
    assert a1.verdict == "holds" and a2.verdict in ("undecided", "no effect of the paper's size", "contrary",
                                                    "holds")


def test_claims_from_cells_csv(tmp_path):
    """docs/small's cells CSVs are enough to recompute every verdict; a drop per seed is value − the seed's FP32."""
    text = ("Fine-tuning,column,n,mean,std,drop_mean,drop_std,seeds,values,text,notes,baseline,compared,test,"
            "n_baseline,diff_mean,diff_ci_low,diff_ci_high,separated\n"
            "ADAM,FP32,3,91,1,,,0 1 2,90 91 92,,,,,,,,,,\n"
            "ADAM,W4A4,3,81,1,-10,0,0 1 2,80 81 82,,,,,,,,,,\n"
            "CrAFT,FP32,3,91,1,,,0 1 2,90 92 91,,,,,,,,,,\n"
            "CrAFT,W4A4,3,89,1,-2,1,0 1 2,88 89 90,,,ADAM / W4A4,drop,welch,3,8,0,0,true\n")
    (tmp_path / "craft_table2_small-cells.csv").write_text(text)
    t = claims.tables_from_cells([tmp_path / "craft_table2_small-cells.csv"])["craft_table2_small"]
    crafted = t.rows[("CrAFT",)]["W4A4"].stat.per_seed("drop")
    assert crafted == {0: -2.0, 1: -3.0, 2: -1.0}
    assert t.rows[("CrAFT",)]["W4A4"].baseline == (("ADAM",), "W4A4")


# ------------------------------------------------------------------------------------------------ make claims


def test_confirmatory_plan(tmp_path):
    from pathlib import Path

    import yaml

    sweeps = claims.confirm_sweeps()
    assert set(sweeps) == {c.primary.experiment for c in claims.CLAIMS}
    conf = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    fixed = {o for c in claims.CLAIMS for o in c.primary.fixed}
    for exp, groups in sweeps.items():
        params = yaml.safe_load((conf / f"{exp}_small.yaml").read_text())["hydra"]["sweeper"]["params"]
        for ov in (o for g in groups for o in g["overrides"] if o not in fixed):
            # every restriction narrows a key the experiment sweeps, to values it sweeps
            key, vals = ov.split("=", 1)
            assert key in params, (exp, key)
            assert set(vals.split(",")) <= {str(v) for v in str(params[key]).split(",")} | {
                str(float(v)) for v in str(params[key]).split(",") if v.replace(".", "").isdigit()}, (exp, ov)
    # every claim is in exactly one sweep
    texts = [t for groups in sweeps.values() for g in groups for t in g["claims"]]
    assert sorted(texts) == sorted(c.text for c in claims.CLAIMS)
    # SNT Figure 5: IMP at 90 % and one-shot at 70 % are two sweeps, not the four cells of their product
    fig5 = [dict(o.split("=", 1) for o in g["overrides"]) for g in sweeps["snt_fig5"]]
    assert sorted((g["compress"], g["compress.sparsity"]) for g in fig5) == [("imp", "0.9"), ("prune", "0.7")]
    assert all(g["sharpness.enabled"] == "false" for g in fig5)  # none of its claims reads λmax
    # the power analysis of the 5-seed tables sets the seeds per arm, within [10, 20], seeds from 100 on
    cells = Path(__file__).resolve().parent.parent / "docs" / "small"
    p = confirm.plan(cells)
    assert {v["experiment"] for v in p.values()} == set(sweeps)
    assert all(claims.MIN_SEEDS <= v["seeds"] <= claims.MAX_SEEDS for v in p.values())
    todo = confirm.jobs(p)
    seen: dict = {}
    for j in todo:
        assert len(j.seeds) <= confirm.CHUNK and not set(j.seeds) & set(seen.get(j.name, ()))
        seen[j.name] = seen.get(j.name, ()) + j.seeds
    assert all(sorted(seen[e]) == list(range(100, 100 + p[e]["seeds"])) for e in p)
    # round 1 (every sweep's first MIN_SEEDS seeds) comes before any further seed
    rnd = [j.round for j in todo]
    assert rnd == sorted(rnd) and {j.name for j in todo if j.round == 1} == set(p)
    assert all(max(j.seeds) < 100 + claims.MIN_SEEDS for j in todo if j.round == 1)
    assert all(min(s) >= 5 for s in seen.values())  # none of the 5-seed tables' seeds 0-4


def test_sweeps_merge_only_without_extra_cells():
    """Two primaries share a sweep where their joint product adds no cell; otherwise they are two sweeps."""
    def claim(text, **sweep):
        return claims.Claim("X", "T", text, claims._p("e", {"R": "a"}, {"R": "b"}, "c", sweep=sweep), None, "")

    one = claims.confirm_sweeps([claim("a", k=["1"], j=["x"]), claim("b", k=["2"], j=["x"])])
    assert [g["overrides"] for g in one["e"]] == [["k=1,2", "j=x"]]
    two = claims.confirm_sweeps([claim("a", k=["1"], j=["x"]), claim("b", k=["2"], j=["y"])])
    assert [g["overrides"] for g in two["e"]] == [["k=1", "j=x"], ["k=2", "j=y"]]
    full = claims.confirm_sweeps([claim("a", k=["1"]), claim("b")])  # the whole sweep covers the restricted one
    assert [(g["overrides"], g["claims"]) for g in full["e"]] == [([], ["b", "a"])]


def test_workers_take_jobs_whose_trainings_the_other_is_not_making():
    J = confirm.Job
    q = confirm.Queue([J("a", "vit", 1, (1, 2)), J("b", "vit", 1, (1, 2)), J("a", "vit", 1, (3,)),
                       J("c", "resnet", 1, (1,))])
    assert q.take(0).name == "a"
    assert q.take(1).seeds == (3,)  # b would wait on a's trainings of seeds 1-2; seed 3 is another training
    q.done(1, 10.0)
    assert q.take(1).name == "c"
    q.done(1, 10.0)
    assert q.take(1).name == "b"  # nothing else left: the same trainings after all
    q.done(0, 10.0)
    q.done(1, 10.0)
    assert q.take(0) is None


def test_further_seeds_start_only_where_they_end_within_the_budget():
    """Round 1 always runs; a round-2 chunk waits for its sweep's measured seconds per seed and is set aside
    where now + (seconds per seed x its seeds) passes the budget."""
    now = [0.0]
    J = confirm.Job
    q = confirm.Queue([J("a", "f", 1, (1, 2)), J("b", "g", 1, (1,)), J("a", "f", 2, (3, 4)), J("b", "g", 2, (2,))],
                      budget_s=100.0, clock=lambda: now[0])
    a1, b1 = q.take(0), q.take(1)
    assert (a1.name, b1.name) == ("a", "b")
    got = []
    t = threading.Thread(target=lambda: got.append(q.take(2)))
    t.start()  # only round-2 jobs are left, none measured yet: the worker waits
    t.join(0.2)
    assert t.is_alive()
    now[0] = 40.0
    q.done(1, 40.0)  # b: 40 s a seed; at 40 s, 40 + 40 = 80 <= 100: b's chunk starts
    t.join(5)
    assert got[0].name == "b" and got[0].round == 2
    now[0] = 70.0
    q.done(0, 70.0)  # a: 35 s a seed, its 2-seed chunk would end at 70 + 70 = 140 > 100
    assert q.take(0) is None
    assert q.skipped == [{"sweep": "a", "seeds": 2, "estimate_minutes": round(70 / 60, 1)}]
    # round 1 runs whatever the clock says
    late = confirm.Queue([J("a", "f", 1, (1,))], budget_s=1.0, clock=lambda: 1e6)
    assert late.take(0).name == "a"


def test_the_thesis_as_a_claim():
    setting = claims.THESIS[3]
    base = {"setting": setting, "n": 55, "rho": -0.4, "ci_low": -0.6, "ci_high": -0.2,
            "verdict": "λmax predicts the drop", "within_pooled": (55, 0.05, -0.2, 0.3),
            "within_verdict": "not separated"}
    other = {**base, "setting": "x: W6A6", "rho": 0.1, "ci_low": -0.2, "ci_high": 0.4, "verdict": "not separated"}
    block, line, row = claims.thesis_block([other, base])
    assert "— **holds**" in block and "shown not counted: x: W6A6" in block and "**holds**" in line
    assert (row["verdict"], row["n"], row["diff"]) == ("holds", 55, "-0.4")
    undecided = claims.thesis_block([{**base, "ci_high": 0.1, "verdict": "not separated"}])
    assert "— **undecided**" in undecided[0]
    assert claims.thesis_block([other])[2]["verdict"] == "not measured"


def test_each_round_sweeps_into_its_own_folder(tmp_path):
    """craft-report reads a folder's last sweep: two rounds (or two sweeps of one experiment) into one folder
    would hide the first one's cells."""
    entry = {"experiment": "craft_table2", "overrides": ["compress.bits=W4A4"]}
    first = confirm.command("bin", "craft_table2", entry, list(range(100, 110)), tmp_path)
    second = confirm.command("bin", "craft_table2", entry, list(range(110, 120)), tmp_path)
    other = confirm.command("bin", "craft_table2-2", entry, list(range(100, 110)), tmp_path)
    dirs = [next(a for a in c if a.startswith("hydra.sweep.dir=")) for c in (first, second, other)]
    assert len(set(dirs)) == 3 and all("craft_table2_small/seeds" in d for d in dirs)
    assert first[-1] == "seed=" + ",".join(map(str, range(100, 110))) and "compress.bits=W4A4" in first


def test_where_the_time_goes(tmp_path):
    """Trainings count once, in the folder whose cell made them; compression and evaluation count per cell."""
    import json

    def cell(name, key, trained, train_s, eval_s, lam_s, status="ok"):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "status": status, "cache_key": key, "sharpness": {"after": {"lambda_max": {"seconds": lam_s}}},
            "metrics": {"trained": trained, "train_seconds": train_s, "eval_seconds": eval_s}}))

    cell("a", "k1", True, 100.0, 3.0, 8.0)
    cell("b", "k1", False, 100.0, 4.0, 8.0)  # the same training, read from the cache
    cell("c", "k2", True, 50.0, 2.5, 6.0)
    cell("d", "k3", True, 70.0, 9.0, 1.0, status="failed")
    assert confirm.where_time_goes(tmp_path) == {"cells": 3, "trainings": 2, "train_s": 150.0,
                                                 "diagnostics_s": 14.0, "compress_eval_s": 9.5}
