"""W&B: the mode rule (offline unless there is a credential for the W&B host that answers), and what a run
records — group, tags, a unique readable name, per-epoch curves, the summary, a resumed run continuing its W&B
run — read back from the offline files with wandb's own record schema (tests/wandb_records.py)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY, compose_run
from wandb_records import run_summary

from craft_runner import pipeline
from craft_runner.schema import LoggerConfig
from craft_runner.tracking import PROBE_TIMEOUT_S, run_name, run_tags, wandb_mode

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No W&B settings from the environment; HOME in tmp_path."""
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_netrc_for_another_host_is_no_wandb_credential(clean_env):
    (clean_env / ".netrc").write_text("machine github.com login me password secret\n")
    mode, why = wandb_mode(LoggerConfig(name="wandb"))
    assert mode == "offline" and "no W&B credential for api.wandb.ai" in why


@pytest.fixture
def silent_server():
    """A host that accepts connections and never answers (what a firewall or a dead proxy looks like)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_key_without_network_falls_back_to_offline_within_seconds(clean_env, monkeypatch, silent_server):
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    t0 = time.perf_counter()
    mode, why = wandb_mode(LoggerConfig(name="wandb"))
    assert mode == "offline" and f"{silent_server} does not answer" in why
    assert time.perf_counter() - t0 < PROBE_TIMEOUT_S + 2
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    assert wandb_mode(LoggerConfig(name="wandb"))[0] == "offline"
    assert wandb_mode(LoggerConfig(name="wandb", mode="online"))[0] == "offline"  # even when asked for online


def test_a_credential_for_a_host_that_answers_goes_online(clean_env, monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        assert wandb_mode(LoggerConfig(name="wandb"))[0] == "offline"  # no credential for it
        (clean_env / ".netrc").write_text("machine api.wandb.ai login user password k3y\n")
        assert wandb_mode(LoggerConfig(name="wandb"))[0] == "offline"  # a key for another W&B host
        (clean_env / ".netrc").write_text("machine 127.0.0.1 login user password k3y\n")
        assert wandb_mode(LoggerConfig(name="wandb")) == ("online", "credential for 127.0.0.1")
        assert wandb_mode(LoggerConfig(name="wandb", mode="offline"))[0] == "offline"
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert wandb_mode(LoggerConfig(name="wandb"))[0] == "offline"
    finally:
        server.shutdown()


def _variant(base: dict, **changes) -> dict:
    """``base`` with ``group__field=value`` changes (a config dict as results.json holds it)."""
    import copy

    c = copy.deepcopy(base)
    for key, value in changes.items():
        group, _, name = key.partition("__")
        if name:
            c[group][name] = value
        else:
            c[group] = value
    return c


def test_names_are_readable_and_unique_per_cell_and_tags_name_every_choice():
    import dataclasses

    base = dataclasses.asdict(pipeline.to_run_config(compose_run(*TINY, "compress=ptq", "compress.bits=W4A16")))
    cells = {
        "w4": base, "w8": _variant(base, compress__w_bits=8, compress__a_bits=8, compress__bits="W8A8"),
        "lr": _variant(base, optimizer__lr=0.01), "seed": _variant(base, seed=1),
        "sam": _variant(base, optimizer__name="sam"), "snt": _variant(base, arch__name="snt", arch__preact=True,
                                                                       arch__rprelu=True),
        "preact": _variant(base, arch__name="snt", arch__preact=True), "model": _variant(base, model__name="test_vit"),
    }
    names = {k: run_name(c) for k, c in cells.items()}
    assert names["w4"].startswith("adam-base-W4A16-s0-") and names["w8"].startswith("adam-base-W8A8-s0-")
    assert names["seed"].startswith("adam-base-W4A16-s1-") and names["sam"].startswith("sam-base-W4A16-s0-")
    assert names["snt"].startswith("adam-snt-W4A16-s0-") and names["preact"].startswith("adam-snt_preact-W4A16-")
    assert names["lr"].startswith("adam-base-W4A16-s0-") and names["model"].startswith("adam-base-W4A16-s0-")
    assert len(set(names.values())) == len(names)  # what the readable part omits is in the digest
    # where results go is no part of a cell
    assert run_name(_variant(base, logger__name="wandb", logger__group="g", paths__run_dir="x")) == names["w4"]
    tags = run_tags(_variant(base, optimizer__name="sam", seed=3))
    assert tags == ["model:resnet20", "dataset:synthetic", "optimizer:sam", "arch:base", "compress:W4A16", "seed:3"]
    prune = dataclasses.asdict(pipeline.to_run_config(compose_run(*TINY, "compress=prune", "compress.sparsity=0.5")))
    assert "compress:magnitude 50%" in run_tags(prune) and "-magnitude50%-" in run_name(prune)


def _offline_runs(run_dir: Path) -> list[dict]:
    runs = [run_summary(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert runs, f"no offline W&B run in {run_dir}"
    return runs


@pytest.mark.slow
def test_sweep_logs_grouped_tagged_uniquely_named_runs_with_curves_offline_despite_a_foreign_netrc(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine github.com login me password secret\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "-m", "craft_runner.run", "-m", *TINY, "train.epochs=2", "logger=wandb",
                        "optimizer=adam,sam", "compress=ptq", "compress.bits=W8A8,W4A16", "sharpness.spectrum=true",
                        f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    cells = sorted(f.parent for f in sweep.rglob("results.json"))
    assert len(cells) == 4
    names = set()
    for cell in cells:
        res = json.loads((cell / "results.json").read_text())
        (run,) = _offline_runs(cell)
        assert res["status"] == "ok" and res["wandb"]["mode"] == "offline"
        assert run["id"] == res["wandb"]["id"] == (cell / "wandb_id").read_text().strip()
        cfg = res["config"]
        label = cfg["compress"]["bits"]
        assert run["group"] == str(sweep) and run["name"].startswith(f"{cfg['optimizer']['name']}-base-{label}-s0-")
        assert {"model:resnet20", "dataset:synthetic", f"optimizer:{cfg['optimizer']['name']}", "arch:base",
                f"compress:{label}", "seed:0"} <= set(run["tags"])
        names.add(run["name"])
        curves = [row for row in run["history"] if "train/loss" in row]
        assert [row["epoch"] for row in curves] == [1, 2]  # trained here or loaded from the cache: both have them
        assert [row["train/loss"] for row in curves] == [h["loss"] for h in res["train"]["history"]]
        assert all(row["train/second_pass_share"] == (1.0 if cfg["optimizer"]["name"] == "sam" else 0.0)
                   for row in curves)
        assert all("train/lr" in row and row["train/epoch_seconds"] > 0 for row in curves)
        for k in ("fp_acc", "compressed_acc", "drop", "lambda_max_before", "lambda_max_after"):
            assert run["summary"][k] == pytest.approx(res["metrics"][k]), k
        assert any(f.endswith(".png") and "spectrum" in f for f in run["files"])
    assert len(names) == 4


@pytest.mark.slow
def test_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Killed after epoch 1; the same command (same run dir) and the same cell elsewhere (a new run dir, the
    W&B id then comes from the training state) both continue the same W&B run."""
    import craft_runner.train as train_mod

    overrides = (*TINY, "train.epochs=3", "logger=wandb", "sharpness.enabled=false")

    class Killed(Exception):
        pass

    real, saves = train_mod.atomic_save, []

    def die_after_a_save(obj, path):
        real(obj, path)
        saves.append(path)
        if len(saves) in (1, 2):
            raise Killed

    monkeypatch.setattr(train_mod, "atomic_save", die_after_a_save)
    with pytest.raises(Killed):  # epoch 1 saved, then killed
        pipeline.run(compose_run(*overrides, tmp_path=tmp_path))
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    with pytest.raises(Killed):  # the same run directory: epoch 2, killed again
        pipeline.run(compose_run(*overrides, tmp_path=tmp_path))
    cfg = compose_run(*overrides, f"paths.cache_dir={tmp_path / 'cache'}", f"paths.run_dir={tmp_path / 'elsewhere'}")
    pipeline.run(cfg)  # a new run directory, same cell: epoch 3
    last = json.loads((tmp_path / "elsewhere" / "results.json").read_text())
    assert last["status"] == "ok" and last["train"]["resumed_from"] == 2
    run_id = first["wandb"]["id"]
    assert last["wandb"]["id"] == run_id and last["wandb"]["resumed"]
    runs = _offline_runs(tmp_path / "run") + _offline_runs(tmp_path / "elsewhere")
    assert [r["id"] for r in runs] == [run_id] * 3
    epochs = [[row["epoch"] for row in r["history"] if "train/loss" in row] for r in runs]
    assert epochs == [[1], [1, 2], [1, 2, 3]]  # a continued run logs the state's epochs again (W&B keeps one)


def test_log_report_writes_a_report_run_with_tables_and_images(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from craft_runner.tracking import log_report

    png = tmp_path / "fig.png"
    plt.plot([0, 1], [1, 0])
    plt.savefig(png)
    plt.close()
    table = pd.DataFrame({"optimizer": ["adam", "sam"], "W4A16": [90.0, 95.0]})
    run_id = log_report("craft_table2", {"table": table}, [png], LoggerConfig(name="wandb", mode="offline"),
                        directory=tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    run = run_summary(run_dir)
    assert run["group"] == "craft_table2" and run["job_type"] == "report" and run["name"] == "report-craft_table2"
    (row,) = run["history"]
    assert row["table/_type"] == "table-file" and row["table/nrows"] == 2 and row["fig/_type"] == "image-file"


def test_craft_report_wandb_logs_the_table_and_figure_to_the_runs_group(tmp_path, monkeypatch):
    """`craft-report --wandb`: one report run per experiment in the group its runs logged to, holding the
    table (as printed) and the figure, read back from the offline files."""
    import dataclasses

    from craft_runner.compress.registry import CompressConfig
    from craft_runner.optim import OptimizerConfig
    from craft_runner.report.cli import main
    from craft_runner.schema import RunConfig

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    for opt, lam in (("adam", 40.0), ("sam", 10.0)):
        for seed in (0, 1):
            rc = RunConfig(optimizer=OptimizerConfig(name=opt), seed=seed, experiment="craft_table5_small",
                           compress=CompressConfig(),
                           logger=LoggerConfig(name="wandb", group="my-sweep", project="proj"))
            d = tmp_path / "sweep" / f"{opt}{seed}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({
                "config": dataclasses.asdict(rc), "status": "ok", "compression": {}, "sharpness": {},
                "metrics": {"fp_acc": 90.0 + seed, "lambda_max_after": lam + seed, "lambda_max_before": 50.0}}))
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--wandb", "--wandb-mode", "offline"]) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = run_summary(run_dir)
    assert run["group"] == "my-sweep" and run["job_type"] == "report"
    (row,) = run["history"]
    assert row["craft_table5_small/_type"] == "table-file" and row["craft_table5_small/nrows"] == 1  # one task
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs and all(row[f"{stem}/_type"] == "image-file" for stem in pngs)
