"""craft-report on synthetic sweeps: results.json files written here, the report read back.

The expected cells are computed here with ``statistics`` from the numbers written, not by the report's code.
"""

import csv
import dataclasses
import io
import json
import statistics
from pathlib import Path

import pytest

from craft_runner.compress import PruneConfig, PTQConfig
from craft_runner.compress.registry import CompressConfig
from craft_runner.optim import OptimizerConfig
from craft_runner.report.cli import main
from craft_runner.report.labels import compression_label
from craft_runner.schema import DatasetConfig, RunConfig, TrainConfig


def config(experiment=None, optimizer="adam", seed=0, compress=None, lr=1e-3, epochs=4, classes=None, **top):
    rc = RunConfig(optimizer=OptimizerConfig(name=optimizer, lr=lr), train=TrainConfig(epochs=epochs),
                   dataset=DatasetConfig(classes=classes), compress=compress or CompressConfig(), seed=seed,
                   experiment=experiment, **top)
    return dataclasses.asdict(rc)


def write(path: Path, cfg: dict, fp=None, acc=None, status="ok", error=None, **metrics):
    path.mkdir(parents=True)
    m = {"fp_acc": fp, **metrics}
    if acc is not None:
        m.update(compressed_acc=acc, drop=acc - fp)
    (path / "results.json").write_text(json.dumps({"config": cfg, "metrics": m, "status": status, "error": error,
                                                   "compression": {}, "sharpness": {}}))


def cell(values, drops=None, fmt="{:.2f}"):
    """mean ± std (drop mean ± std), computed here."""
    s = fmt.format(statistics.mean(values))
    if len(values) > 1:
        s += " ± " + fmt.format(statistics.stdev(values))
    if drops:
        s += f" ({statistics.mean(drops):+.2f}"
        s += f" ± {statistics.stdev(drops):.2f})" if len(drops) > 1 else ")"
    return s


def table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``text`` (header first), cells stripped."""
    lines = []
    for ln in text.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [rows[0]] + rows[2:]


# --------------------------------------------------------------------------------------------- paper layout


FP = {("adam", 0): 95.0, ("adam", 1): 96.0, ("adam", 2): 94.5, ("sam", 0): 96.0, ("sam", 1): 96.5, ("sam", 2): 97.0}
LOSS = {"W8A8": 0.5, "W4A16": 20.0}


def acc_of(opt, method, bits, seed):
    return FP[(opt, seed)] - LOSS[bits] * (0.5 if opt == "sam" else 1.0) - (2.0 if method == "ptq4vit" else 0) - seed


@pytest.fixture
def table2_sweep(tmp_path):
    for opt in ("adam", "sam"):
        for method in ("base", "ptq4vit"):
            for bits in ("W8A8", "W4A16"):
                for seed in range(3):
                    cfg = config("craft_table2_small", opt, seed, PTQConfig(method=method, bits=bits),
                                 classes=[5, 6, 7, 8, 9])
                    d = tmp_path / f"{opt}-{method}-{bits}-{seed}"
                    if (opt, method, bits, seed) == ("sam", "ptq4vit", "W4A16", 2):
                        write(d, cfg, status="failed", error="RuntimeError: boom")
                    elif (opt, method, bits) == ("adam", "ptq4vit", "W8A8"):
                        write(d, cfg, status="failed", error="ValueError: bad scale")
                    else:
                        write(d, cfg, FP[(opt, seed)], acc_of(opt, method, bits, seed))
    return tmp_path


def test_paper_layout_mean_std_n_and_failed_cells(table2_sweep, capsys):
    assert main([str(table2_sweep), "--format", "md", "--no-figures"]) == 1
    out = capsys.readouterr().out
    rows = table(out)
    assert rows[0] == ["Downstream Task", "Method", "Fine-tuning", "n", "FP32", "W8A8", "W4A16"]
    body = {tuple(r[:3]): r for r in rows[1:]}
    assert list(body) == [("Digits 5-9", "BasePTQ", "ADAM"), ("Digits 5-9", "BasePTQ", "CrAFT"),
                          ("Digits 5-9", "PTQ4ViT", "ADAM"), ("Digits 5-9", "PTQ4ViT", "CrAFT")]
    r = body[("Digits 5-9", "BasePTQ", "ADAM")]
    accs = [acc_of("adam", "base", "W4A16", s) for s in range(3)]
    assert r[3] == "3"
    assert r[4] == cell([FP[("adam", s)] for s in range(3)])
    assert r[6] == cell(accs, [a - FP[("adam", s)] for s, a in enumerate(accs)])
    # Two seeds finished, the third failed: its mean over n=2 and a note that says why.
    r = body[("Digits 5-9", "PTQ4ViT", "CrAFT")]
    accs = [acc_of("sam", "ptq4vit", "W4A16", s) for s in range(2)]
    assert r[6].startswith(cell(accs, [a - FP[("sam", s)] for s, a in enumerate(accs)]) + " n=2 [")
    # No seed finished: "—" and the reason under the table.
    r = body[("Digits 5-9", "PTQ4ViT", "ADAM")]
    assert r[5].startswith("— [")
    assert "boom" in out and "bad scale" in out and "failed" in out


def test_csv_and_latex_and_written_files(table2_sweep, capsys):
    assert main([str(table2_sweep), "--format", "csv", "--no-figures"]) == 1
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out.strip())))
    assert rows[0][:5] == ["Downstream Task", "Method", "Fine-tuning", "n", "FP32"] and len(rows) == 5
    tex = (table2_sweep / "craft_table2_small.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "Digits 5-9" in tex
    cells = list(csv.DictReader(io.StringIO((table2_sweep / "craft_table2_small-cells.csv").read_text())))
    one = [c for c in cells if c["Method"] == "BasePTQ" and c["Fine-tuning"] == "ADAM" and c["column"] == "W8A8"][0]
    accs = [acc_of("adam", "base", "W8A8", s) for s in range(3)]
    assert one["n"] == "3" and float(one["mean"]) == pytest.approx(statistics.mean(accs))
    assert float(one["std"]) == pytest.approx(statistics.stdev(accs), rel=1e-5)


def test_md_is_markdown(table2_sweep, capsys):
    main([str(table2_sweep), "--no-figures"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("### CrAFT Table 2")
    assert lines[2].startswith("| Downstream Task") and set(lines[3].replace("|", "").strip()) <= {"-", ":", " "}
    assert all(ln.startswith("|") and ln.endswith("|") for ln in lines[2:8])


def test_two_trainings_differing_in_epochs_or_lr_get_two_rows(tmp_path, capsys):
    w8 = PTQConfig(bits="W8A8")
    write(tmp_path / "a", config(epochs=8, compress=w8), 90.0, 89.0)
    write(tmp_path / "b", config(epochs=10, compress=PTQConfig(bits="W4A16")), 95.0, 80.0)
    write(tmp_path / "c", config(lr=0.01, compress=w8), 70.0, 60.0)
    assert main([str(tmp_path), "--no-figures"]) == 1  # the 10-epoch model was never quantized at W8A8
    rows = table(capsys.readouterr().out)
    h = rows[0]
    assert "optimizer.lr" in h and "train.epochs" in h
    got = {(r[h.index("optimizer.lr")], r[h.index("train.epochs")]): r for r in rows[1:]}
    assert set(got) == {("0.001", "8"), ("0.001", "10"), ("0.01", "4")}
    e8, e10 = got[("0.001", "8")], got[("0.001", "10")]
    assert e8[h.index("FP32")] == "90.00" and e8[h.index("W8A8")] == "89.00 (-1.00)"
    assert e10[h.index("FP32")] == "95.00" and e10[h.index("W4A16")] == "80.00 (-15.00)"
    assert got[("0.001", "10")][h.index("W8A8")].startswith("— [")
    assert got[("0.01", "4")][h.index("W8A8")] == "60.00 (-10.00)"


def test_a_compression_field_outside_the_label_splits_the_column(tmp_path, capsys):
    for calib in (32, 128):
        cfg = config(compress=PTQConfig(bits="W6A6", calib_size=calib))
        write(tmp_path / f"c{calib}", cfg, 90.0, 80.0 + calib / 32)
    assert main([str(tmp_path), "--no-figures"]) == 0
    h = table(capsys.readouterr().out)[0]
    assert "W6A6 [calib_size=32]" in h and "W6A6 [calib_size=128]" in h


# --------------------------------------------------------------------------------------------- sweeps


def test_missing_and_unfinished_jobs_and_stale_dirs(tmp_path, capsys):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      optimizer: adam,sam\n      seed: 0,1\n"
        "  overrides:\n    task: [experiment=cheap_sam_small]\n  runtime:\n    choices:\n"
        "      experiment: cheap_sam_small\n")
    jobs = [(o, s) for o in ("adam", "sam") for s in (0, 1)]
    for o, s in jobs[:2]:
        d = tmp_path / f"{o}{s}"
        write(d, config("cheap_sam_small", o, s, PruneConfig(sparsity=0.3)), 90.0 + s, 85.0 + s)
        (d / "overrides.yaml").write_text(f"- experiment=cheap_sam_small\n- optimizer={o}\n- seed={s}\n")
    # killed: Hydra's config and overrides, no results.json
    d = tmp_path / "sam0"
    d.mkdir()
    cfg = config("cheap_sam_small", "sam", 0, PruneConfig(sparsity=0.3))
    import yaml
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "overrides.yaml").write_text("- experiment=cheap_sam_small\n- optimizer=sam\n- seed=0\n")
    # an earlier sweep's leftover
    stale = tmp_path / "old"
    write(stale, config("cheap_sam_small", "adam", 0, PruneConfig(sparsity=0.3), lr=0.5), 10.0, 5.0)
    (stale / "overrides.yaml").write_text("- experiment=cheap_sam_small\n- optimizer.lr=0.5\n")
    assert main([str(tmp_path), "--no-figures"]) == 1
    out = capsys.readouterr().out
    rows = table(out)
    body = {r[0]: r for r in rows[1:]}
    assert set(body) == {"ADAM", "SAM"}  # the stale lr=0.5 run makes no row
    assert body["SAM"][rows[0].index("magnitude 30%")].startswith("— [")
    missing = [ln for ln in out.splitlines() if "missing job:" in ln]
    assert "unfinished" in out and len(missing) == 1 and "optimizer=sam seed=1" in missing[0]
    assert "set aside: 1 run directories" in out


def test_empty_dir_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- relative columns


def test_overhead_and_accuracy_boost_pair_seeds(tmp_path, capsys):
    secs = {("adam", 0): 60.0, ("adam", 1): 50.0, ("sam", 0): 126.0, ("sam", 1): 100.0}
    for (o, s), t in secs.items():
        write(tmp_path / f"{o}{s}", config("craft_table4_small", o, s, classes=[5, 6, 7, 8, 9]), 90.0,
              train_seconds=t)
    assert main([str(tmp_path), "--no-figures"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[0] == ["Downstream Task", "Method", "n", "E2E Time (Min)", "Overhead"]
    ratios = [126 / 60, 100 / 50]
    sam = [r for r in rows[1:] if r[1] == "CrAFT"][0]
    assert sam[4] == f"{statistics.mean(ratios):.2f}x ± {statistics.stdev(ratios):.2f}"
    assert sam[3] == cell([126 / 60, 100 / 60], fmt="{:.3g}")


def test_snt_ablation_boost_and_paper_columns(tmp_path, capsys):
    archs = {"Baseline": dict(name="base"), "+Preact": dict(name="snt", preact=True),
             "+PReLU/LBias": dict(name="snt", preact=True, rprelu=True)}
    acc = {"Baseline": [60.0, 61.0], "+Preact": [61.0, 61.5], "+PReLU/LBias": [62.0, 63.5]}
    from craft_runner.schema import ArchConfig

    for label, a in archs.items():
        for s in (0, 1):
            write(tmp_path / f"{a['name']}{len(a)}{s}", config("snt_table4", seed=s, arch=ArchConfig(**a),
                                                              compress=PTQConfig(bits="W4A16", finetune_epochs=1)),
                  70.0, acc[label][s], lambda_max_after=100.0 / len(a))
    assert main([str(tmp_path), "--no-figures", "--paper"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert rows[0][:5] == ["", "n", "λmax (↓)", "λmax (↓) (paper)", "Top-1 (%)"]
    body = {r[0]: r for r in rows[1:]}
    assert list(body) == ["Baseline", "+Preact", "+PReLU/LBias"]
    h = rows[0]
    boost = [b - a for a, b in zip(acc["Baseline"], acc["+PReLU/LBias"])]
    expected = f"{statistics.mean(boost):+.2f} ± {statistics.stdev(boost):.2f}"
    assert body["+PReLU/LBias"][h.index("Acc. Boost (%)")] == expected
    assert body["+PReLU/LBias"][h.index("Acc. Boost (%) (paper)")] == "1.02"
    assert body["Baseline"][h.index("λmax (↓) (paper)")] == "105.62"


def test_small_rows_print_the_published_table_below(table2_sweep, capsys):
    main([str(table2_sweep), "--no-figures", "--paper"])
    out = capsys.readouterr().out
    assert "published: CrAFT Table 2" in out and "| Flowers-102" in out and "23.5 (-74.79)" in out
    assert "(paper)" not in out.split("published:")[0]  # digits rows are not the paper's rows


# --------------------------------------------------------------------------------------------- figures


def test_figures_are_written(tmp_path):
    shapes = [("unstructured", s, 2, 4) for s in (0.1, 0.3, 0.5)] + [("nm", 0.5, 2, 4), ("nm", 0.5, 16, 32)]
    for o in ("adam", "sam"):
        for crit in ("magnitude", "wanda"):
            for pat, sp, n, m in shapes:
                for s in (0, 1):
                    c = PruneConfig(criterion=crit, pattern=pat, sparsity=sp, n=n, m=m)
                    write(tmp_path / f"{o}{crit}{pat}{sp}{n}{s}", config("craft_fig4_small", o, s, c), 90.0,
                          90.0 - 60 * sp * (0.5 if o == "sam" else 1) - s, lambda_max_after=10.0)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    for name in ("craft_fig4_smalla.png", "craft_fig4_smallb.png"):
        p = tmp_path / "out" / name
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table((tmp_path / "out" / "craft_fig4_small.md").read_text())
    assert rows[0][4:] == ["10%", "30%", "50%", "16:32", "2:4"]


def test_finetune_curves_are_written(tmp_path):
    """SNT Figure 6: one run per k epochs of fine-tuning after W4 PTQ; the loss curve is the longest run's."""
    for o in ("adam", "sam"):
        for k in range(4):
            for s in (0, 1):
                path = tmp_path / f"{o}{k}{s}"
                write(path, config("snt_fig6_small", o, s, PTQConfig(bits="W4A16", finetune_epochs=k)), 90.0,
                      60.0 + 10 * k - s)
                res = json.loads((path / "results.json").read_text())
                res["compression"] = {"finetune_history": [{"epoch": e, "loss": 1.0 / e} for e in range(1, k + 1)]}
                (path / "results.json").write_text(json.dumps(res))
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    p = tmp_path / "out" / "snt_fig6_small.png"
    assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table((tmp_path / "out" / "snt_fig6_small.md").read_text())
    assert [c for c in rows[0] if c.startswith("ft ")] == ["ft 0 ep", "ft 1 ep", "ft 2 ep", "ft 3 ep"]
    assert rows[1][rows[0].index("ft 3 ep")] == cell([90.0, 89.0], [0.0, -1.0])


def test_labels():
    assert compression_label({"name": "ptq", "method": "base", "w_bits": 6, "a_bits": 16}) == "W6A16"
    assert compression_label({"name": "prune", "criterion": "wanda", "pattern": "nm", "n": 2, "m": 4,
                              "sparsity": 0.5}) == "wanda 2:4"
    assert compression_label({"name": "zip_test"}) == "zip_test"  # a compressor this install lacks
    assert compression_label({"name": "token_prune", "keep_rate": 0.7}) == "token prune 0.7"


# --------------------------------------------------------------------------------------------- end to end

ROOT = Path(__file__).resolve().parent.parent


def _python(*args, cwd, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


FAST = ["train.epochs=1", "train.progress=false", "sharpness.max_iter=5"]


@pytest.mark.slow
def test_snt_small_end_to_end(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    p = _python("-m", "craft_runner.run", "-m", "experiment=snt_table4_small", *FAST, "seed=0,1,2",
                f"hydra.sweep.dir={sweep}",
                f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main([str(sweep), "--paper"]) == 0
    rows = table(capsys.readouterr().out)
    h = rows[0]
    assert h[:2] == ["", "n"] and {"λmax (↓)", "Top-1 (%)", "Acc. Boost (%)"} <= set(h)
    assert [r[0] for r in rows[1:]] == ["Baseline", "+Preact", "+PReLU/LBias"] and all(r[1] == "3" for r in rows[1:])
    assert rows[1][h.index("Acc. Boost (%)")] == "+0.00 ± 0.00"
    for r in rows[1:]:
        top1 = r[h.index("Top-1 (%)")]
        assert " ± " in top1 and "(" in top1 and float(r[h.index("λmax (↓)")].split(" ± ")[0]) > 0
    png = sweep / "snt_table4_small-lambda.png"
    assert png.exists() and png.stat().st_size > 1000
    res = json.loads(next(sweep.rglob("results.json")).read_text())
    assert res["config"]["experiment"] == "snt_table4_small"
    assert [h["epoch"] for h in res["compression"]["finetune_history"]] == [1]


@pytest.mark.slow
def test_craft_small_end_to_end_as_a_transfer(tmp_path, capsys):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    p = _python("-m", "craft_runner.run", "experiment=craft_pretrain_small", "+shared/tiny=test_vit", "train.epochs=2",
                "train.progress=false", f"hydra.run.dir={tmp_path / 'pre'}", cache, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _python(str(ROOT / "scripts" / "export_checkpoint.py"), str(tmp_path / "pre"),
                str(tmp_path / "pretrained" / "test_vit.pt"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    sweep = tmp_path / "sweep"
    p = _python("-m", "craft_runner.run", "-m", "experiment=craft_table5_small", *FAST, "seed=0,1,2",
                f"hydra.sweep.dir={sweep}",
                cache, cwd=tmp_path, env={"CRAFT_PRETRAINED_DIR": str(tmp_path / "pretrained")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Loaded pretrained test_vit" in p.stdout + p.stderr
    assert main([str(sweep)]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[0] == ["Downstream Task", "n", "Before FT", "ADAM", "CrAFT"]
    assert rows[1][:2] == ["Digits 5-9", "3"] and all(" ± " in c for c in rows[1][2:])
    assert (sweep / "craft_table5_small-lambda.png").stat().st_size > 1000


def test_paper_flag_without_a_published_table_says_so(tmp_path, capsys):
    for s in range(2):
        write(tmp_path / f"adam-{s}", config("cheap_sam_small", "adam", s, PTQConfig(bits="W4A16")), 98.0, 90.0 + s)
    assert main([str(tmp_path), "--paper", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "--paper: no published table for cheap_sam_small" in out
    main([str(tmp_path), "--no-figures"])
    assert "no published table" not in capsys.readouterr().out
