import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_run

import craft_runner.train as train_mod
from craft_runner import pipeline
from craft_runner.cache import cache_key
from craft_runner.config import ConfigError


def run_tiny(tmp_path, *overrides):
    cfg = compose_run(*TINY, *overrides, tmp_path=tmp_path)
    return pipeline.run(cfg)


def test_end_to_end_writes_results(tiny_run):
    m = tiny_run.metrics  # conftest's one tiny training: helpers.TINY, BasePTQ W8A8
    res = json.loads((tiny_run.run_dir / "results.json").read_text())
    assert res["status"] == "ok"
    assert res["metrics"]["fp_acc"] == pytest.approx(m["fp_acc"])
    for k in ("fp_acc", "compressed_acc", "drop", "lambda_max_before", "lambda_max_after", "train_seconds",
              "eval_seconds"):
        assert k in m
    assert m["drop"] == pytest.approx(m["compressed_acc"] - m["fp_acc"])
    assert 0 <= m["fp_acc"] <= 100 and m["lambda_max_after"] > 0
    assert res["config"]["compress"]["w_bits"] == 8 and res["versions"]["torch"] == torch.__version__
    assert m["trained"] is True


def test_second_run_with_other_compression_does_not_train(tiny_run, tiny_cache, tmp_path, monkeypatch):
    first = tiny_run.metrics  # trained it (in its own cache, copied to tmp_path's)

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(train_mod, "fit", no_training)
    second = run_tiny(tmp_path, "compress=prune", "compress.sparsity=0.5")
    assert first["trained"] is True and second["trained"] is False
    assert second["fp_acc"] == first["fp_acc"]
    assert second["lambda_max_after"] == first["lambda_max_after"]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_sam_changes_the_cache_key(tmp_path):
    a = cache_key(pipeline.to_run_config(compose_run(*TINY)))
    b = cache_key(pipeline.to_run_config(compose_run(*TINY, "optimizer=sam")))
    c = cache_key(pipeline.to_run_config(compose_run(*TINY, "compress=prune", "train.progress=true")))
    assert a != b and a == c


def test_killed_run_resumes_with_the_same_metrics(tmp_path, monkeypatch):
    overrides = ("optimizer=sam", "compress=prune", "train.epochs=3")
    whole = run_tiny(tmp_path / "whole", *overrides)

    class Killed(Exception):
        pass

    real = train_mod.atomic_save
    saves = []

    def die_after_first_epoch(obj, path):
        real(obj, path)
        saves.append(path)
        raise Killed

    monkeypatch.setattr(train_mod, "atomic_save", die_after_first_epoch)
    with pytest.raises(Killed):
        run_tiny(tmp_path / "killed", *overrides)
    monkeypatch.setattr(train_mod, "atomic_save", real)
    failed = json.loads((tmp_path / "killed" / "run" / "results.json").read_text())
    assert failed["status"] == "failed"
    resumed = run_tiny(tmp_path / "killed", *overrides)
    for k in ("fp_acc", "compressed_acc", "lambda_max_after", "lambda_max_before"):
        assert resumed[k] == whole[k], k


@pytest.mark.parametrize("override,key", [
    ("model.name=no_such_model", "model.name"),
    ("dataset.name=no_such_set", "dataset.name"),
])
def test_unknown_names_fail_before_anything_is_written(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        run_tiny(tmp_path, override)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_checkpoint_of_the_wrong_shape_fails_clearly(tmp_path):
    import timm

    import craft_runner.models  # noqa: F401

    path = tmp_path / "wrong.pt"
    torch.save(timm.create_model("resnet20", num_classes=7).state_dict(), path)
    with pytest.raises(ConfigError, match="wrong.pt"):
        run_tiny(tmp_path, f"model.checkpoint_path={path}")
    assert not (tmp_path / "run").exists()


def test_own_checkpoint_loads(tmp_path):
    import timm

    import craft_runner.models  # noqa: F401

    path = tmp_path / "ok.pt"
    torch.save(timm.create_model("resnet20", num_classes=4).state_dict(), path)
    m = run_tiny(tmp_path, f"model.checkpoint_path={path}", "train.epochs=0", "sharpness.enabled=false")
    assert 0 <= m["fp_acc"] <= 100


def test_wandb_offline_logger_records_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    m = run_tiny(tmp_path, "logger=wandb", "sharpness.enabled=false", "train.epochs=1")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["metrics"]["fp_acc"] == m["fp_acc"]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "craft_runner.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_value_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    p = _cli("compress=ptq", "compress.w_bits=1", f"hydra.run.dir={tmp_path / 'r'}",
             f"paths.cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert lines == ["craft-run: error: compress.w_bits=1 is not allowed: expected an integer in 2..32 "
                     "(16 or more: not quantized)"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_cli_multirun_and_table(tmp_path):
    sweep = tmp_path / "sweep"
    p = _cli("-m", *TINY, "optimizer=adam,sam", "compress=ptq", "compress.bits=W8A8,W4A16",
             f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list(sweep.rglob("results.json"))) == 4
    assert len(list((tmp_path / "c").iterdir())) == 2
    from craft_runner.report.table import load_results, paper_table

    t = paper_table(load_results(sweep))
    assert list(t["optimizer"]) == ["adam", "sam"] and {"W8A8", "W4A16"} <= set(t.columns)


def test_diagnostics_switches_land_in_results_and_plots(tiny_cache, tmp_path):  # new diagnostics, cached weights
    m = run_tiny(tmp_path, "sharpness.method=lanczos", "sharpness.trace=true", "sharpness.trace_probes=4",
                 "sharpness.spectrum=true", "sharpness.act_ranges=true", "sharpness.before=false")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    after = res["sharpness"]["after"]
    assert after["lambda_max"]["method"] == "lanczos" and m["lambda_max_after"] == after["lambda_max"]["value"]
    assert "lambda_max_before" not in m
    assert m["after/hessian_trace"] == after["trace"]["value"]
    assert after["spectrum"]["by_kind"] and after["act_ranges"]
    pngs = [Path(p) for p in after["plots"].values()] if isinstance(after["plots"], dict) else after["plots"]
    assert pngs and all(Path(p).exists() and Path(p).suffix == ".png" for p in pngs)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_results(tmp_path):
    """A real kill -9 in the middle of training; the same command then resumes and matches."""
    import signal
    import time

    args = (*TINY, "dataset.n_train=512", "train.epochs=6", "optimizer=sam", "compress=ptq")

    def cmd(name):
        return [sys.executable, "-m", "craft_runner.run", *args, f"hydra.run.dir={tmp_path / name / 'run'}",
                f"paths.cache_dir={tmp_path / name / 'cache'}"]

    whole = subprocess.run(cmd("whole"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(cmd("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "killed" / "cache").glob("*/state.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = subprocess.run(cmd("killed"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "run" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "run" / "results.json").read_text())
    assert b["train"]["resumed_from"] >= 1
    for k in ("fp_acc", "compressed_acc", "lambda_max_after"):
        assert a["metrics"][k] == b["metrics"][k], k


def test_nm_groups_that_do_not_fit_a_layer_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"compress.m=32 .*144"):
        run_tiny(tmp_path, "compress=nm", "compress.n=16", "compress.m=32")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
