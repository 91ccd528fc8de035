"""One cell, one configuration: the report refuses to merge records of one seed that differ in a field the layout
does not show, and SNT Table 3 (QAT) shows its activation coverage as a row.

Expected cells are computed here with ``statistics`` from the numbers written.
"""

import dataclasses
import json
import os
import statistics
from pathlib import Path

import pytest

from craft_runner.compress.qat import QATConfig
from craft_runner.optim import OptimizerConfig
from craft_runner.report.cli import main
from craft_runner.report.engine import MergeError, build
from craft_runner.report.papers import layout_for
from craft_runner.report.records import collect
from craft_runner.schema import RunConfig


def write(path: Path, experiment, optimizer, seed, act_quant, fp, acc, mtime=None):
    rc = RunConfig(optimizer=OptimizerConfig(name=optimizer), compress=QATConfig(act_quant=act_quant), seed=seed,
                   experiment=experiment)
    path.mkdir(parents=True)
    f = path / "results.json"
    f.write_text(json.dumps({"config": dataclasses.asdict(rc), "status": "ok", "compression": {}, "sharpness": {},
                             "metrics": {"fp_acc": fp, "compressed_acc": acc, "drop": acc - fp,
                                         "lambda_max_after": 10.0}}))
    if mtime is not None:
        os.utime(f, (mtime, mtime))


ACC = {("adam", "distiller"): 60.0, ("adam", "layer_inputs"): 40.0, ("sam", "distiller"): 70.0,
       ("sam", "layer_inputs"): 50.0}


def _qat_sweep(root: Path, experiment="snt_table3_qat_small"):
    for (opt, aq), base in ACC.items():
        for seed in range(3):
            write(root / f"{opt}-{aq}-{seed}", experiment, opt, seed, aq, 90.0 + seed, base + 2 * seed)


def test_qat_table_has_a_row_per_activation_coverage(tmp_path):
    _qat_sweep(tmp_path)
    table = build(layout_for("snt_table3_qat_small"), collect(tmp_path).records)
    assert "Act. quant" in table.row_headers
    i = table.row_headers.index("Act. quant")
    j = table.row_headers.index("Approach")
    got = {(key[i], key[j]): table.cell(key, "Top-1 (%)").stat for key in table.rows}
    assert set(got) == {("distiller", "ADAM"), ("layer inputs", "ADAM"), ("distiller", "SAM"),
                        ("layer inputs", "SAM")}
    for (opt, aq), base in ACC.items():
        st = got[("layer inputs" if aq == "layer_inputs" else "distiller", opt.upper())]
        assert st.n == 3
        assert st.mean == pytest.approx(statistics.mean(base + 2 * s for s in range(3)))
        assert st.drop_mean == pytest.approx(statistics.mean(base + 2 * s - 90.0 - s for s in range(3)))
    # each coverage's SAM row is compared with the ADAM row of the same coverage
    key = next(k for k in table.rows if k[i] == "layer inputs" and k[j] == "SAM")
    base_key, _ = table.cell(key, "Top-1 (%)").baseline
    assert base_key[i] == "layer inputs" and base_key[j] == "ADAM"


def test_two_configurations_in_one_cell_are_refused(tmp_path, capsys):
    # snt_table3_ptq's layout has no activation-coverage row: QAT records of both coverages would share cells
    _qat_sweep(tmp_path / "sweep", experiment="snt_table3_ptq_small")
    with pytest.raises(MergeError, match=r"compress\.act_quant \(distiller, layer_inputs\)"):
        build(layout_for("snt_table3_ptq_small"), collect(tmp_path / "sweep").records)
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "compress.act_quant" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_a_rerun_of_the_same_configuration_is_not_a_conflict(tmp_path):
    write(tmp_path / "old", "snt_table3_qat_small", "adam", 0, "distiller", 90.0, 50.0, mtime=1_000_000)
    write(tmp_path / "new", "snt_table3_qat_small", "adam", 0, "distiller", 90.0, 60.0, mtime=2_000_000)
    table = build(layout_for("snt_table3_qat_small"), collect(tmp_path).records)
    (key,) = table.rows
    assert table.cell(key, "Top-1 (%)").stat.values == [60.0]  # the newest


def test_lambda_max_measured_two_ways_in_one_cell_is_refused(tmp_path):
    """λmax belongs to the training, but two records of one training that measured it with other settings
    (sharpness.n_samples) would leave one of the two values in the cell."""
    for n in (128, 256):
        write(tmp_path / f"adam-{n}", "snt_table3_qat_small", "adam", 0, "distiller", 90.0, 60.0)
        f = tmp_path / f"adam-{n}" / "results.json"
        res = json.loads(f.read_text())
        res["config"]["sharpness"]["n_samples"] = n
        f.write_text(json.dumps(res))
    with pytest.raises(MergeError, match=r"sharpness\.n_samples \(128, 256\)"):
        build(layout_for("snt_table3_qat_small"), collect(tmp_path).records)
