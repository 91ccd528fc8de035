"""A real SLURM job array: `craft-run -m hydra/launcher=local_slurm ...` through hydra-submitit-launcher.

Needs a cluster that answers: on one machine, `sudo scripts/local_slurm.sh` starts one (a few seconds once
installed). Skipped otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "dataset=synthetic", "dataset.img_size=16", "dataset.n_train=96", "dataset.n_test=48", "dataset.num_classes=4",
    "train.epochs=1", "train.batch_size=32", "train.progress=false",
    "sharpness.n_samples=32", "sharpness.batch_size=32", "sharpness.max_iter=5",
    "compress=ptq", "compress.calib_size=16",
]


def _slurm_or_skip() -> None:
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM here: sbatch is not on PATH (sudo scripts/local_slurm.sh starts a one-node cluster)")
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SLURM does not answer: sinfo failed ({e}); start it with sudo scripts/local_slurm.sh")
    states = set(p.stdout.split())
    for _ in range(120):  # a node still cleaning up after the previous test's job takes new ones in seconds
        if p.returncode != 0 or states != {"completing"}:
            break
        time.sleep(0.5)
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        states = set(p.stdout.split())
    if p.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        pytest.skip(f"SLURM does not answer or has no usable node (sinfo rc={p.returncode}, states={sorted(states)}, "
                    f"{p.stderr.strip()[:200]!r}); start it with sudo scripts/local_slurm.sh")


def _cancel(sweep: Path) -> None:
    """Leave nothing queued or running behind: scancel every SLURM job submitit made for the sweep."""
    ids = {d.name.split("_")[0] for d in (sweep / ".submitit").glob("*") if d.is_dir()}
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(ids)], capture_output=True)


def _run_array(cmd, sweep: Path, timeout: int, **kw) -> subprocess.CompletedProcess:
    """Run the launcher, which waits for the array (a job that never starts fails at the timeout instead of
    hanging), and cancel the sweep's jobs unless it succeeded."""
    p = None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    finally:
        if p is None or p.returncode != 0:
            _cancel(sweep)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.mark.slow
def test_multirun_as_a_real_slurm_job_array(tmp_path):
    _slurm_or_skip()
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "craft_runner.run", "-m", "hydra/launcher=local_slurm",
           "hydra.launcher.timeout_min=10", *TINY, "optimizer=adam,sam",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    _run_array(cmd, sweep, 170, cwd=tmp_path)

    results = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    assert sorted(r["config"]["optimizer"]["name"] for r in results) == ["adam", "sam"]
    assert all(r["status"] == "ok" for r in results), [r["status"] for r in results]
    for r in results:  # slurm.yaml's setup sets OMP_NUM_THREADS from SLURM_CPUS_PER_TASK (cpus_per_task=1)
        assert not r["device"].startswith("cpu") or r["device"] == "cpu (1 threads)", r["device"]

    # Ran under SLURM, as one array: submitit's folder per task is <array job id>_<index>, and each task's
    # log names that SLURM job id and ends in success.
    tasks = sorted(d.name for d in (sweep / ".submitit").glob("*_*") if d.is_dir())
    assert len(tasks) == 2 and {t.split("_")[0] for t in tasks} == {tasks[0].split("_")[0]}, tasks
    assert sorted(t.split("_")[1] for t in tasks) == ["0", "1"]
    for t in tasks:
        log = (sweep / ".submitit" / t / f"{t}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={t}," in log and "Exiting after successful completion" in log, log[-1000:]

    # SLURM's own record (kept MinJobAge, 300 s by default, after the end): both tasks complete (the launcher
    # returns once the results are written, while the tasks' Python may still be exiting), and they ran in the
    # submitting directory, where hydra.job.chdir=false leaves them.
    job, records = tasks[0].split("_")[0], []
    for _ in range(60):
        show = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        records = [ln for ln in show.splitlines() if f"ArrayJobId={job} " in ln]
        if not records or all(" JobState=COMPLETED " in ln for ln in records):
            break
        time.sleep(0.5)
    if records:  # empty only if the controller already forgot the job
        assert len(records) == 2, records
        for ln in records:
            assert " JobState=COMPLETED " in ln and f" WorkDir={tmp_path} " in ln, ln


EPOCHS = 16  # 1-4 s each on one CPU: far more than KillWait (5 s, scripts/local_slurm.sh) is left after the requeue


def _jobs(sweep):
    """The SLURM ids of a sweep's jobs: submitit's folder per job (<array job>_<index> for an array)."""
    return sorted(d.name for d in (sweep / ".submitit").glob("*") if d.is_dir())


@pytest.mark.slow
def test_requeued_job_resumes_after_its_last_checkpoint_and_continues_its_wandb_run(tmp_path):
    """`scontrol requeue` of a running job: SLURM signals it (submitit lets it run on through SIGTERM), kills it
    after KillWait (5 s here) and starts it again; the job resumes at the epoch after its last checkpoint, ends ok,
    and its W&B run continues under the same id (offline files). SIGTERM also ends the first attempt's W&B
    service: the requeued attempt logs the epochs W&B missed, from the training state."""
    _slurm_or_skip()
    from wandb_records import finished_records

    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "craft_runner.run", "-m", "hydra/launcher=local_slurm",
           "hydra.launcher.timeout_min=15", *TINY, "dataset.n_train=512", f"train.epochs={EPOCHS}", "optimizer=sam",
           "logger=wandb", "sharpness.enabled=false",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and launcher.poll() is None:
            states = list(cache.glob("*/state.pt"))
            if states and _jobs(sweep):
                break
            time.sleep(0.2)
        if launcher.poll() is not None:
            pytest.fail("the job ended before it could be requeued: " + launcher.communicate()[1][-2000:])
        (task,) = _jobs(sweep)
        epoch_at_requeue = torch.load(states[0], weights_only=True)["epoch"]  # a completed epoch's checkpoint
        rq = subprocess.run(["scontrol", "requeue", task], capture_output=True, text=True, timeout=30)
        assert rq.returncode == 0, rq.stderr
        out, err = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            _cancel(sweep)
    assert launcher.returncode == 0, out[-2000:] + err[-3000:]

    (results,) = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    run_dir = next(sweep.rglob("results.json")).parent
    assert results["status"] == "ok", results.get("error")
    assert epoch_at_requeue >= 1
    assert results["train"]["resumed_from"] >= epoch_at_requeue, (
        "the requeued attempt did not resume: did the first one finish its training within KillWait? "
        "(scontrol show config | grep KillWait)")
    assert [h["epoch"] for h in results["train"]["history"]] == list(range(1, EPOCHS + 1))
    log = (run_dir / "run.log").read_text()
    assert f"resuming sam from epoch {results['train']['resumed_from']} of {EPOCHS}" in log
    # The same W&B run, twice: the first attempt and the requeued one (offline run directories, one id).
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ids = {d.name.rsplit("-", 1)[1] for d in runs}
    assert ids == {results["wandb"]["id"]} and results["wandb"]["resumed"] is True
    epochs = []
    for d, wait_s in zip(runs, (0, 60)):  # the first attempt was killed: it never gets an exit record
        history = [r for r in finished_records(d, wait_s) if r.WhichOneof("record_type") == "history"]
        epochs.append([json.loads(i.value_json) for r in history for i in r.history.item
                       if (i.key or i.nested_key[0]) == "epoch"])
    # the requeued attempt logs the epochs of the training state (the first attempt's W&B service may have
    # died before writing them), then the ones it trains
    assert epochs[1] == list(range(1, EPOCHS + 1)), epochs


@pytest.mark.slow
def test_two_slurm_tasks_train_one_run_with_ddp(tmp_path):
    """hydra.launcher.tasks_per_node=2 on the one-node cluster (CPU, gloo): the SLURM tasks join one process group
    (craft_runner.distributed reads SLURM_PROCID/SLURM_NTASKS) and write one results.json with world_size 2."""
    _slurm_or_skip()
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "craft_runner.run", "-m", "hydra/launcher=local_slurm",
           "hydra.launcher.timeout_min=10", "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=4", *TINY,
           "device=cpu", "optimizer=adam,sam",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    _run_array(cmd, sweep, 600, cwd=tmp_path, env=env)
    results = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    assert sorted(r["config"]["optimizer"]["name"] for r in results) == ["adam", "sam"]
    assert all(r["status"] == "ok" and r["world_size"] == 2 for r in results), results
