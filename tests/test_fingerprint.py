"""The environment fingerprint in results.json (issue 28, item 14)."""

import json

import numpy
import onnxruntime
import timm
import torch
from helpers import TINY, compose_run

from craft_runner import pipeline
from craft_runner.fingerprint import COMPARED, differences, environment


def test_the_fingerprint_reads_the_libraries_and_the_flags_as_they_are():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # torch's flag objects are not plain attributes: set and restored by hand
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        env = environment(torch.device("cpu"), "bfloat16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["timm"] == timm.__version__
    assert env["versions"]["numpy"] == numpy.__version__
    assert env["versions"]["onnxruntime"] == onnxruntime.__version__
    assert env["flags"]["matmul_allow_tf32"] is True and env["flags"]["cudnn_allow_tf32"] is False
    assert env["flags"]["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert env["cpu"]["threads"] == torch.get_num_threads() and env["cpu"]["model"]
    assert env["gpu"]["name"] is None and env["gpu"]["cuda"] == torch.version.cuda
    assert env["autocast"] == "bfloat16" and environment(torch.device("cpu"))["autocast"] == "off"
    assert env["tf32"] == {"training": False, "measuring": False}
    assert environment(torch.device("cpu"), training_tf32=True)["tf32"]["training"] is False  # no TF32 on a CPU


def test_differences_compare_what_matters_not_the_thread_count():
    a = environment(torch.device("cpu"))
    b = json.loads(json.dumps(a))
    b["cpu"]["threads"] += 7
    b["cpu"]["cores"] = 999
    assert differences([a, b]) == {}
    b["flags"]["cudnn_allow_tf32"] = not a["flags"]["cudnn_allow_tf32"]
    b["versions"]["timm"] = "0.0.1"
    assert set(differences([a, b, {}])) == {"flags.cudnn_allow_tf32", "versions.timm"}
    assert "cpu.threads" not in COMPARED


def test_results_json_records_the_environment(tmp_path):
    cfg = compose_run(*TINY, "train.epochs=1", "sharpness.enabled=false", tmp_path=tmp_path)
    pipeline.run(cfg)
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    env = r["environment"]
    assert env["device"] == "cpu" and env["autocast"] == "off"  # train.amp=auto on a CPU: float32
    assert env["versions"]["torch"] == torch.__version__
    assert set(env["flags"]) >= {"matmul_allow_tf32", "cudnn_allow_tf32", "deterministic_algorithms",
                                 "cudnn_deterministic"}


def test_the_driver_version_is_read_from_the_kernel_modules_line(tmp_path):
    from craft_runner.fingerprint import nvidia_driver

    f = tmp_path / "version"
    f.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
                 "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\n"
                 "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert nvidia_driver(str(f)) == "550.54.15"
    assert nvidia_driver(str(tmp_path / "absent")) is None
