"""export=... from craft-run (issue 19): the real artifact of a cell, its record, its refusals, its columns.

The artifact's accuracy and bytes are checked here with ONNX Runtime and the file system, not with the
export library; the report's cells are computed here with ``statistics`` from the numbers written.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import CONF, TINY, compose_run
from hydra.errors import MissingConfigException
from test_report import cell, config, table
from test_robust import cli, error_lines

import craft_runner.train as train_mod
from craft_runner import pipeline
from craft_runner.cache import cache_key
from craft_runner.compress import PTQConfig
from craft_runner.config import ConfigError, to_run_config
from craft_runner.export import ExportConfig
from craft_runner.plan import plan_cell
from craft_runner.report.cli import main as report_main
from craft_runner.results import previous_result

# digits / ResNet-20, one epoch, BasePTQ; latency measured briefly (its value is not what is tested here).
DIGITS = ("dataset=digits", "model=resnet20", "train.epochs=1", "train.progress=false", "sharpness.enabled=false",
          "compress=ptq", "compress.search=none", "export.latency_warmup=1", "export.latency_rounds=3")


def _ort_accuracy(path: str, p: pipeline.Prepared) -> float:
    """Top-1 (%) of an ONNX file on the cell's test split, run here by ONNX Runtime."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in p.data.eval_loader(256, p.device, p.rc.dataset):
        logits = sess.run(None, {"input": x.float().contiguous().numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * correct / total


def test_w8a8_cell_exports_int8_and_w6a6_is_simulated_only_without_training_again(tmp_path, monkeypatch):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    cfg = compose_run(*DIGITS, "compress.bits=W8A8", "export=onnx_int8", cache, f"paths.run_dir={tmp_path / 'w8'}")
    metrics = pipeline.run(cfg)
    res = json.loads((tmp_path / "w8" / "results.json").read_text())
    e = res["export"]
    assert res["status"] == "ok" and e["format"] == "onnx_int8" and e["status"] == "ok"
    for key in ("artifact", "fp32_artifact"):
        assert Path(e[key]).is_file() and (tmp_path / "w8") in Path(e[key]).resolve().parents
    assert os.path.getsize(e["artifact"]) == e["bytes"]
    assert e["bytes"] <= 0.35 * os.path.getsize(e["fp32_artifact"])
    # the artifact's accuracy, measured here; within a point of the simulated W8A8 model's
    real = _ort_accuracy(e["artifact"], pipeline.prepare(cfg))
    assert real == pytest.approx(e["accuracy"], abs=1e-9)
    assert abs(real - metrics["compressed_acc"]) <= 1.0
    assert e["threads"] == 1 and all(e[k] > 0 for k in ("latency_ratio_b1", "latency_ratio_b64"))

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_mod, "fit", no_training)
    w6 = pipeline.run(compose_run(*DIGITS, "compress.bits=W6A6", "export=onnx_int8", cache,
                                  f"paths.run_dir={tmp_path / 'w6'}"))
    res6 = json.loads((tmp_path / "w6" / "results.json").read_text())
    assert w6["trained"] is False and res6["status"] == "ok"
    assert res6["export"]["status"] == "simulated only" and "6-bit activations" in res6["export"]["reason"]
    assert not (tmp_path / "w6" / "export").exists()


def test_export_is_not_part_of_the_training_key_and_none_keeps_old_cells_done(tmp_path):
    base = to_run_config(compose_run(*TINY, "compress=ptq", tmp_path=tmp_path))
    other = to_run_config(compose_run(*TINY, "compress=ptq", "export=onnx_int8", tmp_path=tmp_path))
    assert cache_key(base) == cache_key(other)
    # a results.json written before the export group (no "export" key) is the same cell as export=none
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = {k: v for k, v in dataclasses.asdict(base).items() if k != "export"}
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "config": old, "metrics": {"fp_acc": 1.0}}))
    assert previous_result(base)["metrics"] == {"fp_acc": 1.0}
    assert previous_result(other) is None


def test_export_scalars_go_to_the_tracker_with_the_metrics(tmp_path):
    logged = {}

    class Recorder:
        def log(self, metrics):
            logged.update(metrics)

    e = {"status": "ok", "accuracy": 91.5, "bytes_ratio": 0.3, "latency_ratio_b1": 0.6, "latency_ratio_b64": 0.5,
         "max_logit_diff": 0.2, "artifact": "x.onnx"}
    results = {"config": {"name": "c"}, "metrics": {"fp_acc": 92.0}, "export": e}
    pipeline.record(results, tmp_path, Recorder())
    assert logged == {"fp_acc": 92.0, "world_size": 1, "export/accuracy": 91.5, "export/bytes_ratio": 0.3,
                      "export/latency_ratio_b1": 0.6, "export/latency_ratio_b64": 0.5, "export/max_logit_diff": 0.2}


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONF) / "export").glob("*.yaml")))
def test_every_export_option_composes_and_validates(option):
    rc = to_run_config(compose_run(f"export={option}"))
    assert isinstance(rc.export, ExportConfig) and rc.export.name == option


def test_export_with_token_merging_is_refused_before_any_work(tmp_path):
    cfg = compose_run(*TINY, "model=test_vit", "compress=tome", "export=onnx_int8", tmp_path=tmp_path)
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith("export=onnx_int8 is not allowed with compress=tome")
    assert list(tmp_path.iterdir()) == []
    # dry_run's listing says so too
    assert plan_cell(cfg)["error"].startswith("export=onnx_int8 is not allowed with compress=tome")


def test_export_with_token_merging_exits_2_in_one_line(tmp_path):
    r = cli("model=test_vit", "compress=tome", "export=onnx_int8", "dataset=synthetic", "train.epochs=1",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("craft-run: error: export=onnx_int8 is not allowed with compress=tome")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_an_unknown_export_is_refused_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        to_run_config(compose_run("export.name=onnx_int3"))
    assert "\n" not in str(e.value)
    assert str(e.value) == ("export.name='onnx_int3' is not allowed: expected one of none, onnx_fp32, onnx_int4, "
                            "onnx_int8, onnx_int8_searched")
    with pytest.raises(MissingConfigException) as e:
        compose_run("export=onnx_int3")
    listed = str(e.value).split("Available options in 'export':")[1].split()
    assert {"none", "onnx_int8", "onnx_int8_searched", "onnx_int4"} <= set(listed)


# ------------------------------------------------------------------------------------------------- report


def write(path: Path, cfg: dict, fp: float, acc: float, export: dict):
    path.mkdir(parents=True)
    m = {"fp_acc": fp, "compressed_acc": acc, "drop": acc - fp}
    (path / "results.json").write_text(json.dumps({"config": cfg, "metrics": m, "status": "ok", "compression": {},
                                                   "sharpness": {}, "export": export}))


def exported(sim, real, nbytes, b1, b64):
    return {"format": "onnx_int8", "status": "ok", "accuracy": real, "simulated_accuracy": sim, "bytes_ratio": nbytes,
            "latency_ratio_b1": b1, "latency_ratio_b64": b64, "threads": 1}


def test_report_gains_export_columns_and_flags_a_real_model_below_its_simulation(tmp_path, capsys):
    cfg = {"experiment": None}
    w8, w6 = PTQConfig(bits="W8A8"), PTQConfig(bits="W6A6")
    runs = {  # optimizer: per seed (simulated, real, bytes, b1, b64); sam's real model is 1.5 points below
        "adam": [(90.0, 89.8, 0.30, 0.61, 0.55), (92.0, 91.9, 0.31, 0.63, 0.57)],
        "sam": [(93.0, 91.5, 0.30, 0.60, 0.52), (94.0, 92.5, 0.30, 0.66, 0.50)],
    }
    for opt, seeds in runs.items():
        for s, (sim, real, nb, b1, b64) in enumerate(seeds):
            write(tmp_path / f"{opt}-w8-{s}", config(**cfg, optimizer=opt, seed=s, compress=w8), 95.0, sim,
                  exported(sim, real, nb, b1, b64))
            write(tmp_path / f"{opt}-w6-{s}", config(**cfg, optimizer=opt, seed=s, compress=w6), 95.0, sim - 5,
                  {"format": "onnx_int8", "status": "simulated only", "reason": "6-bit activations: no kernel"})
    assert report_main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    head = rows[0]
    assert head[-4:] == ["real W8A8", "bytes W8A8", "lat b1 W8A8", "lat b64 W8A8"]
    by_opt = {r[head.index("optimizer")]: r for r in rows[1:]}
    for opt, seeds in runs.items():
        sim, real, nb, b1, b64 = zip(*seeds)
        r = by_opt[opt]
        flag = "‡" if statistics.mean(real) - statistics.mean(sim) < -1 else ""
        assert r[head.index("real W8A8")] == cell(real, [a - b for a, b in zip(real, sim)]) + flag
        for col, vals in (("bytes W8A8", nb), ("lat b1 W8A8", b1), ("lat b64 W8A8", b64)):
            assert r[head.index(col)] == f"{statistics.mean(vals):.2f}x ± {statistics.stdev(vals):.2f}"
    assert by_opt["sam"][head.index("real W8A8")].endswith("‡")
    assert not by_opt["adam"][head.index("real W8A8")].endswith("‡")
    assert "‡: the real model's accuracy is more than 1 point below the simulated one" in out
    assert "W6A6: export=onnx_int8 simulated only: 6-bit activations: no kernel" in out
    assert not any(h.startswith("real W6A6") for h in head)


def test_report_of_a_sweep_without_export_is_unchanged(tmp_path, capsys):
    for s in range(2):
        write(tmp_path / f"r{s}", config(seed=s, compress=PTQConfig(bits="W8A8")), 95.0, 94.0 - s, {})
    assert report_main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert not any(h.startswith(("real ", "bytes ", "lat ")) for h in table(out)[0]) and "‡" not in out


# ------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_multirun_with_export_then_craft_report(tmp_path):
    sweep = tmp_path / "sweep"
    r = cli("-m", *TINY, "+shared/comp=w8a8,mag50", "export=onnx_int8", "sharpness.enabled=false",
            "export.latency_rounds=3", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(records) == 2 and all(x["export"]["status"] == "ok" for x in records)
    pruned = next(x for x in records if x["config"]["compress"]["name"] == "prune")
    assert pruned["export"]["compressed_storage"] == "zip deflate"
    assert os.path.getsize(pruned["export"]["artifact"]) == pruned["export"]["bytes"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    rep = subprocess.run([sys.executable, "-m", "craft_runner.report.cli", str(sweep), "--no-figures"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr
    head = table(rep.stdout)[0]
    for col in ("real W8A8", "bytes W8A8", "lat b1 W8A8", "lat b64 W8A8", "real magnitude 50%",
                "bytes magnitude 50%"):
        assert col in head, head
    # bytes of the files on disk; the pruned cell's are the deflated file's, well below int8's dense 0.35
    quantized = next(x for x in records if x["config"]["compress"]["name"] == "ptq")["export"]
    ratio = os.path.getsize(quantized["artifact"]) / os.path.getsize(quantized["fp32_artifact"])
    row = table(rep.stdout)[1]
    assert row[head.index("bytes W8A8")] == f"{ratio:.2f}x"
    assert os.path.getsize(pruned["export"]["artifact"]) / os.path.getsize(pruned["export"]["fp32_artifact"]) < 0.3
    assert np.isfinite(pruned["export"]["latency_ratio_b64"])
