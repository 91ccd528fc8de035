"""Never a lost or false result: non-finite training, tampered or damaged cache files, failing sweep cells,
skipping finished cells, the dry listing, lock waits, downloads without network."""

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_run
from torch import nn

from craft_runner import pipeline
from craft_runner.cache import cache_key, locked
from craft_runner.config import OptimizerConfig, TrainConfig
from craft_runner.data.core import TensorLoader
from craft_runner.optim import build_optimizer
from craft_runner.train import CheckpointError, NonFiniteError, _FiniteCheck, fit, load_state, nonfinite_weights

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def cli(*args, cwd, timeout=900):
    """craft-run in a subprocess, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "craft_runner.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("craft-run: error")]


# ------------------------------------------------------------------------------------------- non-finite


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch, shuffle=True)


class Poisoned:
    """A loader whose batch ``step`` (1-based) of epoch ``epoch`` holds a NaN input."""

    def __init__(self, loader, epoch, step):
        self.loader, self.epoch, self.step, self.n = loader, epoch, step, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.n += 1
        for i, (x, y) in enumerate(self.loader, 1):
            if (self.n, i) == (self.epoch, self.step):
                x = x.clone()
                x[0, 0] = float("nan")
            yield x, y

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, st):
        self.loader.load_state_dict(st)


CFG = TrainConfig(epochs=3, channels_last=False, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_nan_loss_stops_training_naming_epoch_and_step_and_keeps_last_good_state(tmp_path, optimizer):
    model = tiny_net()
    state = tmp_path / "state.pt"
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at epoch 2/3, step 3/4: .*last good checkpoint: "
                                             r"epoch 1\)"):
        fit(model, Poisoned(tiny_loader(), 2, 3), build_optimizer(model, OptimizerConfig(name=optimizer)), CFG, CPU,
            state_path=state)
    st = load_state(state)
    assert st["epoch"] == 1 and not nonfinite_weights(st["model"])
    assert not nonfinite_weights(model)  # on the CPU the check runs before the optimizer step


def test_nan_gradient_is_caught_before_the_step(tmp_path):
    model = tiny_net()
    calls = [0]

    def poison(g):
        calls[0] += 1
        return g * float("nan") if calls[0] == 6 else g

    model[0].weight.register_hook(poison)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at epoch 2/3, step 2/4"):
        fit(model, tiny_loader(), build_optimizer(model, OptimizerConfig(name="adam")), CFG, CPU,
            state_path=tmp_path / "state.pt")
    assert not nonfinite_weights(model)


def test_deferred_check_of_cuda_reports_the_first_bad_step_at_the_end_of_the_epoch():
    """The CUDA path (no sync per step) exercised on the CPU: nothing raises until the epoch ends."""
    model = tiny_net()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    check = _FiniteCheck(CPU, 0, 2, 5, lazy=True)
    for loss in (1.0, 2.0, float("nan"), 1.0, float("inf")):
        check(torch.tensor(loss), model)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at epoch 1/2, step 3/5"):
        check.end_of_epoch(model)
    check = _FiniteCheck(CPU, 1, 2, 3, lazy=True)
    check(torch.tensor(1.0), model)
    model[2].bias.grad[0] = float("inf")
    check(torch.tensor(1.0), model)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at epoch 2/2, step 2/3"):
        check.end_of_epoch(model)
    model[2].bias.grad = None
    check = _FiniteCheck(CPU, 0, 1, 1, lazy=True)
    check(torch.tensor(1.0), model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # an update that overflowed with finite gradients
    with pytest.raises(NonFiniteError, match=r"non-finite weights at epoch 1/1"):
        check.end_of_epoch(model)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_schema_rejects_non_finite_lr_and_rho(value):
    from craft_runner.config import ConfigError

    for key in ("lr", "rho"):
        with pytest.raises(ConfigError, match=rf"optimizer.{key}=.* not allowed: expected a finite positive number"):
            OptimizerConfig(**{key: float(value)})


@pytest.mark.slow
def test_cli_training_to_nan_fails_the_run_and_caches_nothing(tmp_path):
    """`craft-run optimizer=sgd optimizer.lr=1e6`: one line naming the epoch and step, results.json failed,
    no model.pt; a second run fails the same way instead of loading anything."""
    args = (*TINY, "train.epochs=3", "optimizer=sgd", "optimizer.lr=1e6", "sharpness.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}")
    for _ in range(2):
        p = cli(*args, cwd=tmp_path)
        assert p.returncode == 1, p.stderr[-2000:]
        lines = error_lines(p.stderr)
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert lines[0].startswith("craft-run: error: non-finite ") and "at epoch 1/3, step " in lines[0], lines
        res = json.loads((tmp_path / "run" / "results.json").read_text())
        assert res["status"] == "failed" and res["error"] == "NonFiniteError: " + lines[0].split("error: ", 1)[1]
        assert not list((tmp_path / "cache").rglob("model.pt"))


# ------------------------------------------------------------------------------------------- cache files


class Planted:
    """A pickle that creates ``marker`` when it is unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cache_dir(tmp_path, *overrides):
    cfg = compose_run(*TINY, "sharpness.enabled=false", *overrides, tmp_path=tmp_path)
    d = tmp_path / "cache" / cache_key(pipeline.to_run_config(cfg))
    d.mkdir(parents=True)
    return cfg, d


@pytest.mark.parametrize("name", ["model.pt", "state.pt"])
def test_planted_pickle_in_the_cache_never_runs(tmp_path, name):
    cfg, d = _cache_dir(tmp_path)
    marker = tmp_path / "code-ran"
    with open(d / name, "wb") as f:
        pickle.dump({"model": Planted(marker), "meta": {}}, f)
    with pytest.raises(CheckpointError, match=rf"{name} cannot be loaded: it holds Python objects other than "
                                              r"tensors .* \(refused: loading it could run code\); delete it"):
        pipeline.run(cfg)
    assert not marker.exists()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and "CheckpointError" in res["error"]


@pytest.mark.parametrize("name", ["model.pt", "state.pt"])
def test_truncated_cache_file_fails_in_one_line_naming_it(tmp_path, name):
    cfg, d = _cache_dir(tmp_path)
    torch.save({"model": tiny_net().state_dict(), "meta": {}}, d / name)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        pipeline.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / name)) and "truncated" in msg and f"rm {d / name}" in msg


def test_cached_non_finite_weights_are_refused(tmp_path):
    cfg, d = _cache_dir(tmp_path)
    st = tiny_net().state_dict()
    st["0.bias"][0] = float("nan")
    torch.save({"model": st, "meta": {}}, d / "model.pt")
    with pytest.raises(CheckpointError, match="weights are not all finite"):
        pipeline.run(cfg)


@pytest.mark.slow
def test_cli_truncated_model_pt_gives_one_line(tmp_path):
    cfg, d = _cache_dir(tmp_path)
    (d / "model.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    p = cli(*TINY, "sharpness.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    (line,) = error_lines(p.stderr)
    assert line.startswith(f"craft-run: error: {d / 'model.pt'} cannot be loaded: it is truncated or not a torch "
                           f"checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive"), line
    assert line.endswith(f"; delete it (rm {d / 'model.pt'}) to train again"), line


# ------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_sweep_with_a_bad_cell_runs_the_others_summarises_and_skips_done_cells(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ("-m", *TINY, "train.epochs=1", "sharpness.enabled=false", "compress=ptq",
            f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}")
    bits = "compress.bits=W8A8,W1A8,W6A6"

    plan = cli(*args, bits, "dry_run=true", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "3 cells, 1 unique trainings (0 cached, 1 to train), 0 cells done already, 1 invalid" in plan.stdout
    assert "compress.bits=W1A8: invalid: compress.w_bits=1 is not allowed" in plan.stdout
    assert not sweep.exists() and not cache.exists()

    p = cli(*args, bits, cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]
    results = {json.loads(f.read_text()).get("config", {}).get("compress", {}).get("w_bits", "bad"):
               json.loads(f.read_text()) for f in sweep.rglob("results.json")}
    assert results[8]["status"] == "ok" and results[6]["status"] == "ok", p.stderr[-3000:]
    assert results["bad"]["status"] == "failed" and "compress.w_bits=1 is not allowed" in results["bad"]["error"]
    assert "1 of 3 cells of the sweep failed" in p.stderr and "compress.bits=W1A8: failed: compress.w_bits=1" \
        in p.stderr
    assert len(list(cache.glob("*/model.pt"))) == 1

    plan = cli(*args, bits, "dry_run=true", cwd=tmp_path)
    assert "3 cells, 1 unique trainings (1 cached, 0 to train), 2 cells done already, 1 invalid" in plan.stdout

    ok_files = [f for f in sweep.rglob("results.json") if json.loads(f.read_text())["status"] == "ok"]
    stamps = {f: f.stat().st_mtime_ns for f in ok_files}
    again = cli(*args, "compress.bits=W8A8,W6A6", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already done (results.json ok, same config): skipped") == 2
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())
    forced = cli(*args, "compress.bits=W8A8,W6A6", "rerun=true", cwd=tmp_path)
    assert forced.returncode == 0 and "skipped" not in forced.stdout, forced.stderr[-2000:]
    assert all(f.stat().st_mtime_ns != t for f, t in stamps.items())


def test_a_job_waiting_on_the_training_lock_says_so(tmp_path, caplog):
    import fcntl

    d = tmp_path / "key"
    d.mkdir()
    holder = open(d / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("pid 123 on elsewhere\n")
    holder.flush()
    entered = threading.Event()

    def job():
        with locked(d):
            entered.set()

    with caplog.at_level(logging.INFO, logger="craft_runner.pipeline"):
        t = threading.Thread(target=job)
        t.start()
        deadline = time.time() + 10
        while "waiting for the training lock" not in caplog.text and time.time() < deadline:
            time.sleep(0.01)
        assert not entered.is_set()
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        t.join(10)
    assert entered.is_set()
    assert f"waiting for the training lock {d / '.lock'}, held by pid 123 on elsewhere" in caplog.text


# ------------------------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("name", ["cifar10", "flowers102"])
def test_download_without_network_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, name):
    import urllib.error
    import urllib.request

    from craft_runner.data import DataRootError, build_data
    from craft_runner.schema import DatasetConfig

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "keep.txt").write_text("the user's")
    with pytest.raises(DataRootError) as e:
        build_data(DatasetConfig(name=name, download=True), data_dir=str(tmp_path / "data" / "sets"))
    assert "\n" not in str(e.value) and "could not download it into" in str(e.value)
    assert "Temporary failure in name resolution" in str(e.value) and "nothing was left behind" in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt"]
