"""A full disk (ENOSPC) and artifacts written in place (issue 28, items 1 and 2): one line naming the file and
the free space, the cell failed alone, the sweep's summary printed, nothing half-written left behind."""

import errno
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY
from hydra.core.global_hydra import GlobalHydra

from craft_runner import atomic, results
from craft_runner import run as run_mod
from craft_runner.atomic import DiskFullError, atomic_path, atomic_save, atomic_write_json, disk_full

FAST = (*TINY, "train.epochs=1", "sharpness.enabled=false")
_open = open


class _FullFile(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk(monkeypatch, *names, after=0):
    """Writes through craft_runner.atomic to a file whose name ends with one of ``names`` fail with ENOSPC,
    once ``after`` such writes have succeeded (per file)."""
    seen: dict = {}

    def fake_open(path, mode="r", *args, **kwargs):
        target = Path(path).name.split(".tmp")[0]
        if "w" in mode and any(target.endswith(n) for n in names):
            where = str(Path(path).parent / target)
            seen[where] = seen.get(where, 0) + 1
            if seen[where] > after:
                return io.BufferedWriter(_FullFile(path, "w"))
        return _open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def test_disk_full_is_one_line_with_the_file_and_the_free_space(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "model.pt"
    atomic_save({"w": torch.ones(3)}, target)
    full_disk(monkeypatch, "model.pt")
    with pytest.raises(DiskFullError) as e:
        atomic_save({"w": torch.zeros(10_000)}, target)  # torch.save would say "unexpected pos"
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"no space left on device: cannot write {target} (")
    assert " free)" in line and "unexpected pos" not in line
    assert torch.load(target)["w"].tolist() == [1.0, 1.0, 1.0]  # the old file is whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]  # no temporary left


def test_a_failing_path_writer_leaves_no_file(tmp_path):
    out = tmp_path / "export" / "model_fp32.onnx"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        assert tmp.suffix == ".onnx" and tmp.parent == out.parent
        tmp.write_bytes(b"half a model")
        raise RuntimeError("the exporter died")
    assert list(out.parent.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole" and [p.name for p in out.parent.iterdir()] == ["model_fp32.onnx"]


def test_disk_full_of_any_oserror():
    e = disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/run.log"))
    assert isinstance(e, DiskFullError) and str(e).startswith("no space left on device: cannot write /x/run.log (")
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None


def test_a_failure_record_that_cannot_be_written_sets_the_running_one_aside(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    results.write({"status": "running"}, run_dir)
    full_disk(monkeypatch, "results.json")
    assert not results.write_failed({"status": "running"}, run_dir, "RuntimeError: boom")
    assert not (run_dir / "results.json").exists() and (run_dir / "results.json.incomplete").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: boom" in err and "no space left on device" in err
    state, why = results.status(run_dir)
    assert state == "failed" and "boom" in why


def craft_run(monkeypatch, *args) -> int:
    """craft-run in this process (its exit status)."""
    monkeypatch.setattr(sys, "argv", ["craft-run", *args])
    GlobalHydra.instance().clear()
    try:
        run_mod.main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.slow
def test_a_full_cache_fails_a_single_run_in_one_line(tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch, "model.pt")
    run_dir = tmp_path / "run"
    code = craft_run(monkeypatch, *FAST, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("craft-run: error")]
    assert code == 1 and len(err) == 1
    assert err[0].startswith("craft-run: error: no space left on device: cannot write ") and "model.pt" in err[0]
    r = json.loads((run_dir / "results.json").read_text())
    assert r["status"] == "failed" and "no space left on device" in r["error"] and "unexpected pos" not in r["error"]
    assert (run_dir / "config.yaml").stat().st_size > 0


@pytest.mark.slow
def test_a_full_disk_fails_each_cell_alone_and_the_summary_still_prints(tmp_path, monkeypatch, capsys):
    # The cache is full, and so is the run directory once its "running" record is written.
    full_disk(monkeypatch, "model.pt", "results.json", after=1)
    sweep = tmp_path / "sweep"
    code = craft_run(monkeypatch, "-m", *FAST, "seed=0,1", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.sweep.dir={sweep}")
    err = capsys.readouterr().err
    assert code == 1
    assert "2 of 2 cells of the sweep failed or did not finish" in err
    summary = err.split("cells of the sweep failed or did not finish", 1)[1]
    assert summary.count("failed: ") == 2 and summary.count("no space left on device") >= 2
    for d in (p for p in sweep.iterdir() if p.is_dir()):
        assert not (d / "results.json").exists()  # never left saying "running"
        assert json.loads((d / "results.json.incomplete").read_text())["status"] == "running"
        assert (d / "config.yaml").stat().st_size > 0


def test_config_yaml_is_never_left_empty(tmp_path, monkeypatch):
    full_disk(monkeypatch, "config.yaml")
    with pytest.raises(DiskFullError):
        atomic.atomic_write_text("seed: 0\n", tmp_path / "config.yaml")
    assert list(tmp_path.iterdir()) == []


def test_results_json_writer_supersedes_a_set_aside_record(tmp_path):
    (tmp_path / "results.json.incomplete").write_text("{}")
    results.write({"status": "ok"}, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    atomic_write_json([], tmp_path / "results.json")
    assert results.status(tmp_path)[0] == "failed"  # valid JSON but not a record: unreadable, not missing


def test_run_log_on_a_full_disk_warns_once_and_never_raises_out_of_the_job(tmp_path, capsys):
    import logging

    handler = run_mod.RunLog(tmp_path / "run.log")
    handler.stream.close()
    handler.stream = io.TextIOWrapper(io.BufferedWriter(_FullFile(tmp_path / "full", "w"), buffer_size=1))
    for i in range(3):
        handler.emit(logging.LogRecord("craft_runner", logging.INFO, "", 0, "x" * 100 + str(i), None, None))
    handler.close()  # flushing on a full disk: no exception
    err = capsys.readouterr().err
    assert err.count("craft-run: warning:") == 1 and "no space left on device" in err and "Traceback" not in err
