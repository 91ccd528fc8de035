"""Bad input fails in one line before any work, and leaves nothing half-written (issue 22, items 1-6)."""

import json
import logging

import pytest
import torch
from helpers import TINY, compose_run
from test_robust import cli, error_lines

from craft_runner import pipeline
from craft_runner.cache import cache_key
from craft_runner.config import ConfigError, to_run_config
from craft_runner.plan import describe_plan, plan_cell
from craft_runner.train import CheckpointError

FAST = (*TINY, "train.epochs=1", "sharpness.enabled=false")


@pytest.mark.parametrize("override,key", [("+newkey=1", "newkey"), ("+train.epoch=1", "train.epoch"),
                                          ("+compress.foo=1", "compress.foo")])
def test_a_key_no_schema_declares_is_refused_in_one_line(override, key):
    with pytest.raises(ConfigError) as e:
        to_run_config(compose_run(override))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{key} is not allowed: no key")


@pytest.mark.parametrize("override,field,value", [("+model.kwargs.depth=2", "model.kwargs", {"depth": 2}),
                                                  ("+shared/tiny=test_vit", "model.name", "test_vit"),
                                                  ("experiment=craft_table1_small", "dataset.name", "digits")])
def test_declared_additions_still_compose(override, field, value):
    group, key = field.split(".")
    assert getattr(getattr(to_run_config(compose_run(override)), group), key) == value


def test_device_cuda_without_a_gpu_is_refused_before_any_data(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device=cuda is not allowed: torch sees no CUDA GPU"):
        pipeline.run(compose_run(*FAST, "device=cuda", tmp_path=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["paths.cache_dir", "paths.run_dir"])
def test_a_place_under_a_file_is_refused_before_any_work(tmp_path, key):
    (tmp_path / "file").write_text("x")
    cfg = compose_run(*FAST, tmp_path=tmp_path)
    cfg.paths[key.split(".")[1]] = str(tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: {tmp_path / 'file'} is a file"):
        pipeline.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_results_json_of_the_wrong_shape_is_redone(tmp_path, caplog):
    cfg = compose_run(*FAST, tmp_path=tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[]")
    with caplog.at_level(logging.WARNING, logger="craft_runner.pipeline"):
        pipeline.run(cfg)
    assert caplog.text.count("is not a results record") == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"


def test_cached_checkpoint_records_its_key_and_a_moved_one_is_refused(tmp_path, caplog):
    cfg = compose_run(*FAST, tmp_path=tmp_path)
    pipeline.run(cfg)
    key = cache_key(to_run_config(cfg))
    st = torch.load(tmp_path / "cache" / key / "model.pt", weights_only=True)
    assert st["cache_key"] == key and st["key_inputs"]["seed"] == 0 and st["key_inputs"]["version"] == 2
    other = compose_run(*FAST, "seed=1", tmp_path=tmp_path)
    other_dir = tmp_path / "cache" / cache_key(to_run_config(other))
    other_dir.mkdir()
    torch.save(st, other_dir / "model.pt")  # the weights of seed 0 in seed 1's folder
    with pytest.raises(CheckpointError, match=rf"holds the weights of training {key}, not of {other_dir.name}"):
        pipeline.run(other)
    del st["cache_key"]  # an older checkpoint: used, with a warning
    torch.save(st, other_dir / "model.pt")
    with caplog.at_level(logging.WARNING, logger="craft_runner.pipeline"):
        pipeline.run(compose_run(*FAST, "seed=1", "rerun=true", tmp_path=tmp_path))
    assert caplog.text.count("records no cache key") == 1


def test_dry_run_lists_a_cell_without_its_data_as_data_missing(tmp_path):
    cfg = compose_run(*FAST, "dataset=flowers102", f"paths.data_dir={tmp_path / 'none'}", tmp_path=tmp_path)
    line = describe_plan([plan_cell(cfg)])
    assert ", data missing: Flowers-102 (flowers102) not found" in line and "1 without their data" in line


@pytest.mark.slow
@pytest.mark.parametrize("args,start", [
    (("optimizer.lrr=0.1",), "craft-run: error: Could not override 'optimizer.lrr': Key 'lrr' not in"),
    (("train.epochs=many",), "craft-run: error: Error merging override train.epochs=many"),
    (("optimizer=nope",), "craft-run: error: In 'run': Could not find 'optimizer/nope'; expected one of adam, adamw, "),
    (("export=foo",), "craft-run: error: In 'run': Could not find 'export/foo'; expected one of none, onnx_int4, "
                      "onnx_int8, onnx_int8_searched"),
    (("+newkey=1",), "craft-run: error: newkey is not allowed"),
    (("device=cuda",), "craft-run: error: device=cuda is not allowed"),
])
def test_cli_refusals_exit_2_in_one_line_and_leave_nothing(tmp_path, monkeypatch, args, start):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # device=cuda: no GPU visible to the child
    p = cli(*FAST, *args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path)
    lines = error_lines(p.stderr)
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cli_run_dir_under_a_file_exits_2_before_hydra_makes_it(tmp_path):
    (tmp_path / "file").write_text("x")
    p = cli(*FAST, f"hydra.run.dir={tmp_path / 'file' / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path)
    (line,) = error_lines(p.stderr)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert line == f"craft-run: error: hydra.run.dir={tmp_path / 'file' / 'run'} is not allowed: " \
                   f"{tmp_path / 'file'} is a file, not a folder"
