"""A real SLURM job array: `craft-run -m hydra/launcher=local_slurm ...` through hydra-submitit-launcher.

Needs a cluster that answers: on one machine, `sudo scripts/local_slurm.sh` starts one (a few seconds once
installed). Skipped otherwise.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest

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
    if p.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        pytest.skip(f"SLURM does not answer or has no usable node (sinfo rc={p.returncode}, states={sorted(states)}, "
                    f"{p.stderr.strip()[:200]!r}); start it with sudo scripts/local_slurm.sh")


@pytest.mark.slow
def test_multirun_as_a_real_slurm_job_array(tmp_path):
    _slurm_or_skip()
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "craft_runner.run", "-m", "hydra/launcher=local_slurm",
           "hydra.launcher.timeout_min=10", *TINY, "optimizer=adam,sam",
           f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"]
    p = None
    try:
        # The launcher waits for the array; a job that never starts fails here instead of hanging.
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=170)
    finally:
        if p is None or p.returncode != 0:  # leave nothing queued or running behind
            ids = {d.name.split("_")[0] for d in (sweep / ".submitit").glob("*") if d.is_dir()}
            if ids and shutil.which("scancel"):
                subprocess.run(["scancel", *sorted(ids)], capture_output=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

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
