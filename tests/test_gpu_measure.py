"""craft_runner.bench.gpu_measure at --device cpu --tiny: every subcommand prints one JSON line with positive
figures."""

import json
from pathlib import Path

import pytest
import timm
from PIL import Image

from craft_runner.bench import gpu_measure as gm

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rec = gm.main(list(argv))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(rec))
    assert rec["device_type"] == "cpu" and rec["tiny"] is True and rec["torch"] and rec["timm"]
    return rec


def test_throughput_of_train_step_adam_and_sam(capsys):
    rec = run(capsys, "throughput", "--device", "cpu", "--tiny")
    got = {(r["model"], r["optimizer"]) for r in rec["results"]}
    assert got == {("test_vit", "adam"), ("test_vit", "sam"), ("resnet20", "adam"), ("resnet20", "sam")}
    for r in rec["results"]:
        for k in ("images_per_s", "images_per_s_pipelined", "fit_images_per_s", "step_s_median", "peak_memory_bytes",
                  "params"):
            assert r[k] > 0, k
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s_median"])
        assert r["amp_effective"] == "off" and r["memory_kind"] == "cpu_max_rss"  # auto: bf16 on CUDA only
    assert rec["cudnn_benchmark"] is False  # the runner as it is, unless --timm-flags


def test_lambda_max_at_table2_settings(capsys):
    rec = run(capsys, "lambda-max", "--device", "cpu", "--tiny")
    assert rec["reuse_graph"] is False and rec["method"] == "power"
    assert rec["iterations"] == 3 and rec["seconds"] > 0 and rec["seconds_per_hvp"] > 0
    assert rec["peak_memory_bytes"] > 0 and isinstance(rec["lambda_max"], float)


@pytest.mark.parametrize("cmd,method", [("ptq4vit", "ptq4vit"), ("baseptq", "base")])
def test_ptq_time_and_memory(capsys, cmd, method):
    rec = run(capsys, cmd, "--device", "cpu", "--tiny")
    assert rec["cmd"] == cmd and rec["method"] == method and rec["bits"] == "W8A8"
    # test_vit cut to 2 blocks: patch embedding + 4 Linear per block + head; 2 matmuls per block
    assert rec["quantized_layers"] == 1 + 4 * 2 + 1 and rec["quantized_matmuls"] == 2 * 2
    assert rec["seconds"] > 0 and rec["peak_memory_bytes"] > 0 and rec["calib_images"] == 4


def test_timm_flags_are_recorded_and_restored(capsys):
    before = gm.torch.backends.cuda.matmul.allow_tf32, gm.torch.backends.cudnn.benchmark
    rec = run(capsys, "baseptq", "--device", "cpu", "--tiny", "--timm-flags")
    assert rec["allow_tf32"] is True and rec["cudnn_benchmark"] is True
    assert (gm.torch.backends.cuda.matmul.allow_tf32, gm.torch.backends.cudnn.benchmark) == before


def test_timm_train_command_has_the_same_settings(capsys, tmp_path):
    rec = run(capsys, "timm-train", "--device", "cpu", "--tiny", "--data-dir", str(tmp_path / "d"))
    assert rec["ran"] is False
    cmd = rec["command"]
    for flag in ("--amp --amp-dtype bfloat16", "-b 4", "--opt adam", "--val-split ''", "--channels-last",
                 "--log-interval 1", "--synchronize-step", "--model test_vit", "--input-size 3 32 32"):
        assert flag in cmd, flag
    full = gm.timm_train_command(gm.parser().parse_args(["timm-train"]), gm.torch.device("cuda"), tmp_path, tmp_path)
    assert full[full.index("--model") + 1] == "vit_base_patch16_224" and full[full.index("-b") + 1] == "64"
    bench = gm.timm_train_command(gm.parser().parse_args(["timm-train", "--script", "benchmark"]),
                                  gm.torch.device("cuda"), tmp_path, tmp_path)
    assert bench[1].endswith("benchmark.py") and "--bench" in bench and "--amp-dtype" in bench


def test_parse_timm_logs():
    lines = "\n".join(
        f"INFO:train:Train: 0 [{i:>4d}/5 ({20 * (i + 1):>3.0f}%)]  Loss: 6.9 (6.9)  Time: {t:.3f}s, {64 / t:>7.2f}/s  "
        f"(0.100s, 640.00/s)  LR: 1.000e-04  Data: {d:.3f} (0.010)" for i, (t, d) in
        enumerate([(1.0, 0.5), (0.2, 0.01), (0.1, 0.02), (0.3, 0.03), (0.1, 0.04)]))
    got = gm.parse_timm_train(lines, warmup=1)
    assert got["timed_steps"] == 4 and got["logged_steps"] == 5
    assert got["images_per_s"] == pytest.approx((320 + 640) / 2)  # median of 320, 640, 213.33, 640 (step 0 skipped)
    assert got["data_s_median"] == pytest.approx(0.025)
    with pytest.raises(ValueError):
        gm.parse_timm_train("nothing", warmup=0)
    bench = ('INFO: done\n--result\n{\n "model": "vit", "train_samples_per_sec": 1234.5, "train_step_time": 51.8\n}\n'
             "INFO:timm: a later stderr line\n")
    assert gm.parse_timm_benchmark(bench)["images_per_s"] == 1234.5


def test_image_folder_for_timm(tmp_path):
    root = gm.make_image_folder(tmp_path / "f", 7, 24, n_classes=3)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 7 and {f.parent.name for f in files} == {"class_0", "class_1", "class_2"}
    assert Image.open(files[0]).size == (24, 24)


def _timm_scripts_match():
    version = ROOT / ".timm" / "VERSION"
    return version.exists() and version.read_text().strip() == timm.__version__


@pytest.mark.slow
@pytest.mark.skipif(not _timm_scripts_match(), reason="no .timm/train.py of the installed timm (scripts/gpu_wheels.sh)")
@pytest.mark.parametrize("script", ["train", "benchmark"])
def test_timm_scripts_run_tiny(capsys, tmp_path, script):
    rec = run(capsys, "timm-train", "--device", "cpu", "--tiny", "--run", "--script", script,
              "--data-dir", str(tmp_path / "d"), "--output", str(tmp_path / "o"))
    assert rec["ran"] is True and rec["images_per_s"] > 0
