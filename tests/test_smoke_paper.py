"""craft_runner.bench.smoke_paper (make smoke-paper): the projection's arithmetic against a hand computation (fast),
and a short run of the real architectures on CPU (slow)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from craft_runner.bench import smoke_paper as smoke

ROOT = Path(__file__).resolve().parent.parent


def test_ptq_units_by_hand():
    # 32 images x (capture 1 + 1 round x 2 sides x 100 candidates); PTQ4ViT: capture 3, 3 rounds.
    assert smoke.ptq_units(32, 1, 100, 8, 8, "cosine", "cosine") == 32 * 201
    assert smoke.ptq_units(32, 3, 100, 6, 6, "hessian", "cosine") == 32 * 603
    assert smoke.ptq_units(32, 3, 100, 6, 16, "hessian", "cosine") == 32 * 303  # weight-only: one side
    assert smoke.ptq_units(32, 1, 100, 8, 8, "none", "none") == 32


def test_train_flops_rule():
    assert smoke.train_flops_per_image(10.0, "adam") == 30.0
    assert smoke.train_flops_per_image(10.0, "sam") == 60.0


def test_project_by_hand():
    """Two cells sharing one training (train and λmax counted once), evaluation and PTQ per cell."""
    w = {"training": "k1", "train_kind": "m|adam|base", "train_images": 5 * 100, "lambda_kind": "m",
         "hvp_images": 2 * 10 * 4, "eval_kind": "m", "eval_images": 2 * 50, "ptq_kind": "m|base", "ptq_units": 7,
         "finetune_images": 0}
    sam = {**w, "training": "k2", "train_kind": "m|sam|base"}
    f = 1e9
    per_unit = {("train", "m|adam|base"): 3 * f, ("train", "m|sam|base"): 6 * f, ("lambda_max", "m"): 4 * f,
                ("evaluate", "m"): f, ("ptq", "m|base"): 2 * f}
    sustained = {"bf16": 1e12, "fp32": 1e11}
    out = smoke.project([w, w, sam], per_unit, sustained)
    assert out["cells"] == 3 and out["trainings"] == 2
    train = 500 * 3 * f + 500 * 6 * f
    fp32 = 2 * 80 * 4 * f + 3 * 100 * f + 3 * 7 * 2 * f
    assert out["flops"] == pytest.approx(train + fp32)
    assert out["gpu_hours_projected"] == pytest.approx((train / 1e12 + fp32 / 1e11) / 3600)
    assert sum(c["gpu_hours"] for c in out["components"]) == pytest.approx(out["gpu_hours_projected"])


def test_sustained_throughput_is_peak_times_utilisation():
    s = smoke.sustained_flops("craft_table2")
    assert s["bf16"] == pytest.approx(989.5e12 * smoke.UTILISATION["craft_table2"])
    assert s["fp32"] == pytest.approx(67e12 * smoke.UTILISATION["craft_table2"])


def test_paper_work_counts_the_sweep():
    """SNT Table 3 (PTQ) as its experiment file defines it: 9 cells, 9 trainings of 200 epochs over CIFAR."""
    with smoke.composer() as compose:
        snt = smoke.paper_work(compose, "snt_table3_ptq")
    assert (len(snt), len({c["training"] for c in snt})) == (9, 9)
    assert all(c["train_images"] == 200 * 50000 for c in snt)
    # λmax before and after, 100 products at most on 256 images; W4 + one epoch of fine-tuning on ResNet-20's row.
    assert all(c["hvp_images"] == 2 * 100 * 256 for c in snt)
    assert sorted(c["finetune_images"] for c in snt) == [0] * 6 + [50000] * 3


@pytest.mark.parametrize("argv, msg", [(["--steps", "0"], "--steps=0"), (["--images", "4"], "--images=4"),
                                       (["--img-size", "50"], "--img-size=50"), (["--calib", "99"], "--calib=99")])
def test_bad_arguments_fail_in_one_line(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        smoke.main(["--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_smoke_paper_runs_every_stage(tmp_path):
    """The real architectures, one step per stage: ViT-B/16 (depth 12, width 768, 12 heads) at 32x32 to keep the
    test short, the SNT models at their own 32x32."""
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "craft_runner.bench.smoke_paper", "--out", str(out), "--images", "8",
                           "--steps", "1", "--calib", "1", "--img-size", "32"], capture_output=True, text=True,
                          cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "projection.json").read_text())
    assert not (out / "work").exists()  # generated images and cache removed
    expected = {f"craft_table2/{s}" for s in ("finetune_adam", "finetune_sam", "lambda_max", "evaluate", "baseptq",
                                              "ptq4vit", "wanda", "nm_2_4", "tome")}
    for row in smoke.SNT_ROWS:
        expected |= {f"snt_table3_ptq/{row}/{s}" for s in ("train_adam", "train_sam", "train_arch", "lambda_max",
                                                           "evaluate", "ptq")}
    assert set(r["stages"]) == expected
    for name, s in r["stages"].items():
        assert s["steps"] >= 1 and s["seconds"] > 0 and s["peak_memory_gb"] > 0 and s["flops"] > 0, name
    vit = r["models"]["vit_base_patch16_224.augreg_in21k"]
    assert vit["params"] > 85e6 and vit["num_classes"] == smoke.VIT_CLASSES
    assert vit["paper_forward_flops_per_image"] > 30e9  # counted at 224 although the run was at 32
    assert r["stages"]["craft_table2/finetune_adam"]["batch"] == 8  # the paper's batch for Pets
    assert r["stages"]["snt_table3_ptq/resnet20_cifar100_w4ft/train_adam"]["batch"] == 128
    # The projection, recomputed from the recorded FLOPs and throughput.
    total = 0.0
    for name, e in r["experiments"].items():
        sustained = r["throughput"]["sustained_flops"][name]
        hours = sum(c["units"] * c["flops_per_unit"] / sustained[c["precision"]] for c in e["components"]) / 3600
        assert hours == pytest.approx(e["gpu_hours_projected"], rel=1e-9)
        assert sum(c["flops"] for c in e["components"]) == pytest.approx(e["flops"], rel=1e-9)
        assert sustained["bf16"] == pytest.approx(r["throughput"]["peak_flops"]["bf16"]
                                                  * r["throughput"]["utilisation"][name])
        total += hours
    assert math.isfinite(total) and total > 0
    assert r["gpu_hours_projected"] == pytest.approx(total, rel=1e-9)
    craft = r["experiments"]["craft_table2"]
    # 7 tasks x 2 optimizers x 4 quantizers (BasePTQ, PTQ4ViT, GPTQ, SmoothQuant + BasePTQ) x 6 widths (W3A16 added)
    assert (craft["cells"], craft["trainings"]) == (7 * 2 * 4 * 6, 14)
    # Training by 3 forward FLOPs per image (6 with SAM) at the paper's input size.
    train = {c["kind"]: c for c in r["experiments"]["craft_table2"]["components"] if c["stage"] == "train"}
    f = vit["paper_forward_flops_per_image"]
    assert train["vit_base_patch16_224.augreg_in21k|sam|base"]["flops_per_unit"] == pytest.approx(6 * f)
    assert train["vit_base_patch16_224.augreg_in21k|adam|base"]["units"] == 5 * sum(
        smoke.SPLITS[t][0] for t in smoke.SPLITS)
