"""What results.json records is what happened (issue 28, item 6): the diagnostics' sample count when the
training split is smaller, the autocast in effect, train.epochs=0 as untrained weights, and the exit status
of a run refused after it started."""

import json

from helpers import TINY, compose_run
from test_faults import craft_run

from craft_runner import pipeline


def _run(tmp_path, *overrides):
    pipeline.run(compose_run(*TINY, *overrides, tmp_path=tmp_path))
    return json.loads((tmp_path / "run" / "results.json").read_text())


def test_n_samples_above_the_training_split_records_the_number_used(tmp_path, caplog):
    r = _run(tmp_path, "train.epochs=1", "sharpness.n_samples=1000", "sharpness.before=false")
    assert r["sharpness"]["after"]["n_samples_used"] == 96  # dataset.n_train
    assert "sharpness.n_samples=1000 is more than the training split holds: 96 used" in caplog.text


def test_epochs_0_is_recorded_as_the_initial_weights_and_autocast_as_in_effect(tmp_path):
    r = _run(tmp_path, "train.epochs=0", "sharpness.enabled=false")
    assert r["train"]["steps"] == 0 and r["train"]["trained"] is False and r["metrics"]["trained"] is False
    assert r["train"]["weights"].startswith("initial (train.epochs=0")
    assert r["train"]["autocast"] == "off" and r["environment"]["autocast"] == "off"  # amp=auto on a CPU
    r = _run(tmp_path / "bf16", "train.epochs=1", "train.amp=bf16", "sharpness.enabled=false")
    assert r["train"]["autocast"] == "bfloat16" and r["environment"]["autocast"] == "bfloat16"
    assert r["train"]["trained"] is True and "weights" not in r["train"]


def test_bad_input_found_after_the_run_started_exits_1_with_its_record(tmp_path, monkeypatch, capsys):
    def unreadable(p, model=None, split="test"):
        raise ValueError("cannot read image /data/bad.JPEG: cannot identify image file")

    monkeypatch.setattr(pipeline, "evaluate", unreadable)
    run_dir = tmp_path / "run"
    code = craft_run(monkeypatch, *TINY, "train.epochs=1", "sharpness.enabled=false",
                     f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("craft-run: error")]
    assert code == 1 and err == ["craft-run: error: cannot read image /data/bad.JPEG: cannot identify image file"]
    r = json.loads((run_dir / "results.json").read_text())
    assert r["status"] == "failed" and "bad.JPEG" in r["error"]
