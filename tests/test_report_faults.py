"""craft-report on a corrupt results.json (issue 28, item 3) and on cells from different environments
(item 14): the cell shown as "—" with the reason under the table, the rest of the table untouched."""

import dataclasses
import json

import pytest
from helpers import compose_run
from omegaconf import OmegaConf
from test_report import table

from craft_runner.config import to_run_config
from craft_runner.report.cli import main

CELLS = [(o, b) for o in ("adam", "sam") for b in ("W8A8", "W4A16")]
ACC = {("adam", "W8A8"): 90.0, ("adam", "W4A16"): 70.0, ("sam", "W8A8"): 91.0, ("sam", "W4A16"): 80.0}


def _job(d, opt, bits, results=True, env=None):
    """A run directory as craft-run leaves it: Hydra's config.yaml (compression fields its method derives
    still None), overrides.yaml and results.json (the config as the runner records it)."""
    cfg = compose_run("experiment=craft_table2_small", f"optimizer={opt}", f"compress.bits={bits}",
                      "compress.method=base", "seed=0")
    d.mkdir(parents=True)
    cfg.experiment = "craft_table2_small"  # as craft-run's fill_from_hydra sets it before saving
    OmegaConf.save(cfg, d / "config.yaml")
    (d / "overrides.yaml").write_text(f"- optimizer={opt}\n- compress.bits={bits}\n")
    if results:
        rc = dataclasses.asdict(to_run_config(cfg))
        m = {"fp_acc": 95.0, "compressed_acc": ACC[(opt, bits)], "drop": ACC[(opt, bits)] - 95.0}
        r = {"config": rc, "metrics": m, "status": "ok", "compression": {}, "sharpness": {}}
        if env is not None:
            r["environment"] = env
        (d / "results.json").write_text(json.dumps(r, default=str))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for o, b in CELLS:
        _job(root / f"{o}-{b}", o, b)
    return root


def _report(root, capsys):
    code = main([str(root), "--no-figures"])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("content,reason", [("[]", "valid JSON but list, not an object"),
                                            ('{"status": "ok", "metr', "Unterminated string"),
                                            ("", "Expecting value")])
def test_a_corrupt_results_json_is_its_cell_alone(sweep, tmp_path, capsys, content, reason):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(sweep, root)
    whole_code, whole = _report(root, capsys)
    (root / "sam-W8A8" / "results.json").write_text(content)
    code, out = _report(root, capsys)
    assert whole_code == 0 and code == 1
    before, after = table(whole), table(out)
    assert after[0] == before[0]  # no phantom column
    assert len(after) == len(before)  # no phantom row
    h = after[0]
    for b_row, a_row in zip(before[1:], after[1:]):
        for i, (b_cell, a_cell) in enumerate(zip(b_row, a_row)):
            if a_row[2] == "CrAFT" and h[i] == "W8A8":
                assert a_cell.startswith("— [") and b_cell != a_cell
            elif h[i] not in ("n", "FP32") or a_row[2] != "CrAFT":
                assert a_cell == b_cell  # every other cell as it was
    notes = [ln for ln in out.splitlines() if "unreadable results.json" in ln]
    assert len(notes) == 1 and reason in notes[0] and "no results.json" not in out and "not run" not in out
    assert notes[0].startswith("- [1] Digits 5-9 / BasePTQ / CrAFT, seed 0: unreadable results.json: ")
    assert out.count("### ") == 1  # one table: the cell stays in its experiment


def test_a_corrupt_results_json_without_config_yaml_is_listed_not_dropped(sweep, tmp_path, capsys):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(sweep, root)
    (root / "sam-W8A8" / "results.json").write_text("[]")
    (root / "sam-W8A8" / "config.yaml").unlink()
    code, out = _report(root, capsys)
    assert code == 1
    rows = table(out)
    assert rows[0] == ["Downstream Task", "Method", "Fine-tuning", "n", "FP32", "W8A8", "W4A16"]
    line = [ln for ln in out.splitlines() if "unreadable results.json" in ln]
    assert len(line) == 1 and "optimizer=sam compress.bits=W8A8" in line[0]


def _env(torch="2.6.0", threads=2, gpu=None):
    return {"versions": {"torch": torch, "timm": "1.0", "numpy": "2.0", "onnxruntime": "1.20"},
            "cpu": {"model": "x86", "threads": threads}, "gpu": {"name": gpu, "cuda": None, "driver": None},
            "flags": {"matmul_allow_tf32": False, "cudnn_allow_tf32": True}, "autocast": "off"}


def test_a_table_mixing_environments_warns_in_one_line(tmp_path, capsys):
    envs = {("adam", "W8A8"): _env(threads=2), ("adam", "W4A16"): _env(threads=16),
            ("sam", "W8A8"): _env(), ("sam", "W4A16"): _env()}
    for (o, b), env in envs.items():
        _job(tmp_path / "a" / f"{o}-{b}", o, b, env=env)
    code, out = _report(tmp_path / "a", capsys)
    assert code == 0 and "different environments" not in out  # thread counts are noise, not compared
    envs[("sam", "W4A16")] = _env(torch="2.5.1", gpu="NVIDIA H100")
    for (o, b), env in envs.items():
        _job(tmp_path / "b" / f"{o}-{b}", o, b, env=env)
    code, out = _report(tmp_path / "b", capsys)
    warn = [ln for ln in out.splitlines() if "different environments" in ln]
    assert code == 0 and len(warn) == 1
    assert "versions.torch: 2.5.1 vs 2.6.0" in warn[0] and "gpu.name: NVIDIA H100 vs None" in warn[0]
    assert "threads" not in warn[0].split("compared:")[0]


def test_a_failure_that_could_not_be_recorded_is_reported_as_failed(sweep, tmp_path, capsys):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(sweep, root)
    d = root / "sam-W8A8"
    (d / "results.json").rename(d / "results.json.incomplete")
    code, out = _report(root, capsys)
    line = [ln for ln in out.splitlines() if "could not be recorded" in ln]
    assert code == 1 and len(line) == 1 and "failed" in line[0] and "killed" not in out
