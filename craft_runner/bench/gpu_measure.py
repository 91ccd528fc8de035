"""The runner's CUDA figures, one subcommand each; every subcommand prints one JSON line.

    craft-gpu-measure throughput            # ViT-B/16 and ResNet-20, Adam and SAM, images/s
    craft-gpu-measure timm-train --run      # the same ViT-B/16 step through timm's own train.py
    craft-gpu-measure timm-train --script benchmark --run   # timm's benchmark.py (no data loader)
    craft-gpu-measure lambda-max            # λmax of ViT-B/16 at CrAFT Table 2's settings
    craft-gpu-measure ptq4vit               # PTQ4ViT on ViT-B/16, 32 calibration images
    craft-gpu-measure baseptq               # BasePTQ, same model and images

(``python -m craft_runner.bench.gpu_measure`` is the same; ``scripts/gpu_session.sh`` runs them all.)

Every subcommand takes ``--device`` (default: cuda when available) and ``--tiny`` (a tiny ViT, a few
images and steps: what the CPU test runs). Models are randomly initialised (``pretrained=False``) and
inputs are random tensors held on the device: the figures are of speed and memory, not of accuracy.

- ``throughput``: images/s of :func:`craft_runner.train.train_step` with :func:`build_optimizer`, bf16
  autocast (``train.amp=auto`` on CUDA), channels-last as the pipeline sets it, batch 64. Each step is
  timed alone (``torch.cuda.synchronize`` before and after) and the median over the timed steps, after
  warm-up, gives ``images_per_s``; ``images_per_s_pipelined`` times the same number of steps back to back
  with one synchronize, and ``fit_images_per_s`` one epoch of :func:`craft_runner.train.fit` over a
  TensorLoader of the same kind of data (the scheduler, the loss accumulation and its loop included).
  ``--timm-flags`` (every subcommand) sets TF32 matmuls and ``cudnn.benchmark`` as timm's train.py does on
  CUDA; the runner sets neither (every JSON line records both).
- ``timm-train``: timm's own ``train.py`` (``--script train``) on a small ImageFolder of JPEGs this script
  writes under /tmp (timm's train.py has no synthetic data set), batch 64, ``--amp --amp-dtype bfloat16``,
  Adam, ``--no-aug`` (resize + centre crop only, so that decoding stays cheap), ``--synchronize-step`` and
  ``--log-interval 1``, so that every step logs its own rate: the median after the warm-up steps is
  ``images_per_s`` (the data loader's wait is inside timm's step time; ``data_s_median`` shows it).
  ``--script benchmark``: timm's ``benchmark.py --bench train`` on random tensors on the device (no
  loader; its mean over its timed steps). train.py and benchmark.py come from timm's repository at the
  installed timm's tag (``scripts/gpu_wheels.sh`` puts them in .timm/). Without ``--run`` the command is
  only printed.
- ``lambda-max``: :func:`craft_runner.diagnostics.run_diagnostics` (what the pipeline calls) with
  conf/experiment/craft_table2.yaml's sharpness settings: 128 images in batches of 16, ``reuse_graph``
  false, power iteration, at most 100 Hessian-vector products, tol 1e-3; seconds, products, seconds per
  product and peak memory.
- ``ptq4vit`` / ``baseptq``: :func:`craft_runner.compress.apply_compression` with a PTQConfig (method
  ptq4vit or base, conf/compress defaults, W8A8 unless ``--bits``) on 32 calibration images; seconds and
  peak memory.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before each measurement) and the
process's peak resident set size on the CPU (``memory_kind`` says which).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

import craft_runner
from craft_runner.compress import CompressContext, PTQConfig, apply_compression
from craft_runner.data import TensorLoader
from craft_runner.device import resolve_device as resolve_run_device
from craft_runner.diagnostics import run_diagnostics
from craft_runner.models import create_model, model_data_config  # the package registers resnet20 in timm
from craft_runner.optim import OptimizerConfig, build_optimizer
from craft_runner.schema import ModelConfig, SharpnessConfig, TrainConfig
from craft_runner.train import fit, to_device, train_step

# The repository (timm's scripts in .timm/, and the PYTHONPATH their subprocess imports craft_runner from).
ROOT = Path(__file__).resolve().parents[2]

VIT = "vit_base_patch16_224"
# --tiny: timm's test_vit cut to two blocks at 32x32 (4 patches), so that the CPU test takes seconds.
TINY_VIT = "test_vit"
TINY_KW = {"img_size": 32, "depth": 2}
TINY_IMG = 32


# ------------------------------------------------------------------------------------------ helpers


def resolve_device(name: str | None) -> torch.device:
    """As ``device=`` in a run (craft_runner.device: auto is the first usable GPU, else the CPU)."""
    dev = resolve_run_device(name or "auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_measure: --device cuda but torch.cuda.is_available() is False")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "memory_kind": "cuda_max_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, peak of the whole process
    return {"peak_memory_bytes": int(kib) * 1024, "memory_kind": "cpu_max_rss"}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        extra = {"cuda": torch.version.cuda, "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory}
    else:
        name, extra = f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})", {}
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "timm": timm.__version__,
            "craft_runner": craft_runner.__version__, "python": platform.python_version(), **extra}


def emit(cmd: str, args: argparse.Namespace, device: torch.device, **fields) -> dict:
    flags = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    record = {"cmd": cmd, "tiny": bool(getattr(args, "tiny", False)), **device_info(device), **flags, **fields,
              "argv": " ".join(shlex.quote(a) for a in sys.argv)}
    print(json.dumps(record), flush=True)
    return record


def build(name: str, num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    """The model as the pipeline builds it: timm through craft_runner's factory, random init, on the device."""
    kwargs = TINY_KW if name == TINY_VIT else {}
    model = create_model(ModelConfig(name=name, pretrained=False, kwargs=dict(kwargs)), num_classes=num_classes)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def input_size(name: str) -> int:
    if name == TINY_VIT:
        return TINY_IMG
    return model_data_config(name)["input_size"][-1]


def random_batches(n: int, batch: int, img: int, num_classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, img, img, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return [(x[i:i + batch].to(device), y[i:i + batch].to(device)) for i in range(0, n, batch)]


def timm_flags(on: bool) -> None:
    """What timm's train.py sets on CUDA (TF32 matmuls, cuDNN autotuning); the runner leaves both off."""
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# ------------------------------------------------------------------------------------------ throughput


def measure_train(model_name: str, opt_name: str, batch: int, img: int, num_classes: int, steps: int, warmup: int,
                  device: torch.device, amp: str, channels_last: bool) -> dict:
    torch.manual_seed(0)
    model = build(model_name, num_classes, device, channels_last)
    opt = build_optimizer(model, OptimizerConfig(name=opt_name, base="adam", lr=1e-4))
    cfg = TrainConfig(epochs=1, batch_size=batch, amp=amp, channels_last=channels_last, progress=False,
                      scheduler="none")
    loss_fn = nn.CrossEntropyLoss()
    # Data held on the device, as the runner holds small data sets: no host-to-device copy per step.
    n_batches = 4
    data = random_batches(batch * n_batches, batch, img, num_classes, device)
    data = [to_device(x, y, device, channels_last) for x, y in data]
    model.train()
    reset_peak(device)
    for i in range(warmup):
        x, y = data[i % n_batches]
        train_step(model, x, y, loss_fn, opt, cfg, device)
    times = []
    for i in range(steps):
        x, y = data[i % n_batches]
        sync(device)
        t0 = time.perf_counter()
        train_step(model, x, y, loss_fn, opt, cfg, device)
        sync(device)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = data[i % n_batches]
        loss = train_step(model, x, y, loss_fn, opt, cfg, device)
    sync(device)
    pipelined = time.perf_counter() - t0
    # One epoch of fit over the same number of batches (a TensorLoader of data on the device).
    xs = torch.cat([x for x, _ in data] * max(1, -(-steps // n_batches)))[:batch * steps]
    ys = torch.cat([y for _, y in data] * max(1, -(-steps // n_batches)))[:batch * steps]
    info = fit(model, TensorLoader(xs, ys, batch, shuffle=True, seed=0), opt, cfg, device, desc="measure")
    med = statistics.median(times)
    return {"model": model_name, "optimizer": opt_name, "batch": batch, "img_size": img, "steps": steps,
            "warmup": warmup, "amp": amp,
            "amp_effective": "bf16" if amp == "bf16" or (amp == "auto" and device.type == "cuda") else "off",
            "channels_last": channels_last, "params": sum(p.numel() for p in model.parameters()),
            "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times), "images_per_s": batch / med,
            "images_per_s_pipelined": batch * steps / pipelined, "fit_images_per_s": len(ys) / info["train_seconds"],
            "final_loss": float(loss), **peak_memory(device)}


def cmd_throughput(args) -> dict:
    device = resolve_device(args.device)
    if args.tiny:
        vit, vit_img, batch, steps, warmup = TINY_VIT, TINY_IMG, 4, 3, 1
    else:
        vit, vit_img, batch, steps, warmup = VIT, 224, args.batch, args.steps, args.warmup
    models = [(vit, vit_img, 1000), ("resnet20", 32, 10)]
    if args.model:
        models = [m for m in models if m[0] == args.model] or [(args.model, input_size(args.model), 1000)]
    results = []
    for name, img, classes in models:
        for opt in args.optimizers.split(","):
            results.append(measure_train(name, opt, batch, img, classes, steps, warmup, device, args.amp,
                                         not args.no_channels_last))
    return emit("throughput", args, device, results=results)


# ------------------------------------------------------------------------------------------ timm's scripts


def make_image_folder(root: Path, n_images: int, img: int, n_classes: int = 10, seed: int = 0) -> Path:
    """``root/train/class_k/i.jpg``: smooth random JPEGs (cheap to decode), made once and reused."""
    train = root / "train"
    stamp = root / f".done-{n_images}-{img}-{n_classes}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        k = i % n_classes
        (train / f"class_{k}").mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize((img, img), Image.BILINEAR).save(train / f"class_{k}" / f"{i:06d}.jpg", quality=90)
    stamp.touch()
    return root


def timm_train_command(args, device: torch.device, data_dir: Path, out_dir: Path) -> list[str]:
    script = Path(args.timm_dir) / ("train.py" if args.script == "train" else "benchmark.py")
    common = ["--model", args.model, "--num-classes", "1000", "-b", str(args.batch), "--opt", "adam",
              "--weight-decay", "0", "--smoothing", "0", "--device", device.type]
    if args.model == TINY_VIT:
        common += ["--model-kwargs", *(f"{k}={v}" for k, v in TINY_KW.items()), "--input-size", "3", str(TINY_IMG),
                   str(TINY_IMG)]
    if args.amp:
        common += ["--amp", "--amp-dtype", "bfloat16"]
    if not args.no_channels_last:
        common += ["--channels-last"]
    if args.script == "benchmark":
        return [sys.executable, str(script), "--bench", "train", *common, "--num-warm-iter", str(args.warmup),
                "--num-bench-iter", str(args.steps)]
    return [sys.executable, str(script), "--data-dir", str(data_dir), "--train-split", "train", "--val-split", "",
            *common, "--lr", "1e-4", "--sched", "cosine", "--epochs", "1", "--warmup-epochs", "0",
            "--cooldown-epochs", "0", "--no-aug", "--log-interval", "1", "--synchronize-step", "--workers",
            str(args.workers), "--pin-mem", "--output", str(out_dir), "--experiment", "measure",
            "--checkpoint-hist", "1", "--seed", "0"]


# timm train.py, one line per logged update ("val (avg)" pairs):
# "Train: 0 [  12/40 ( 32%)]  Loss: 6.91 (6.93)  Time: 0.052s, 1231.65/s  (0.053s, 1207.20/s)  LR: ..  Data: 0.001 (..)"
_TRAIN_LINE = re.compile(r"Train: \d+ \[\s*(\d+)/\s*(\d+).*?Time: ([\d.]+)s,\s*([\d.]+)/s.*?Data: ([\d.]+)")


def parse_timm_train(log: str, warmup: int) -> dict:
    rows = [(int(m[1]), float(m[3]), float(m[4]), float(m[5])) for m in _TRAIN_LINE.finditer(log)]
    if not rows:
        raise ValueError("no 'Train: ... Time: ...s, .../s' line in timm's output")
    timed = [r for r in rows if r[0] >= warmup] or rows
    return {"images_per_s": statistics.median(r[2] for r in timed),
            "step_s_median": statistics.median(r[1] for r in timed),
            "data_s_median": statistics.median(r[3] for r in timed), "timed_steps": len(timed),
            "logged_steps": len(rows)}


def parse_timm_benchmark(log: str) -> dict:
    """benchmark.py ends with '--result' and a JSON object (one model) or a list of them."""
    text = log.rsplit("--result", 1)[-1] if "--result" in log else ""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no '--result' JSON in timm benchmark.py's output")
    res, _ = json.JSONDecoder().raw_decode(text[start:])  # stderr's lines may follow it
    res = res[0] if isinstance(res, list) else res
    return {"images_per_s": float(res["train_samples_per_sec"]), "step_ms": float(res["train_step_time"]),
            "timm_result": res}


def cmd_timm_train(args) -> dict:
    device = resolve_device(args.device)
    if args.tiny:
        # benchmark.py logs every steps // 5 steps: at least 5
        args.model, args.batch, args.steps, args.warmup, args.workers = TINY_VIT, 4, 5, 1, 1
    data_dir = Path(args.data_dir)
    out_dir = Path(args.output or tempfile.mkdtemp(prefix="timm-train-"))
    cmd = timm_train_command(args, device, data_dir, out_dir)
    fields = {"script": args.script, "command": " ".join(shlex.quote(c) for c in cmd),
              "timm_dir": str(args.timm_dir), "batch": args.batch, "amp": "bf16" if args.amp else "off"}
    if not args.run:
        return emit("timm-train", args, device, ran=False, **fields)
    if not Path(cmd[1]).exists():
        raise SystemExit(f"gpu_measure: {cmd[1]} not found; scripts/gpu_wheels.sh puts timm's scripts in .timm/")
    if args.script == "train":
        img = input_size(args.model)
        # Enough images for warm-up and timed steps in one epoch (the last, partial batch is not counted).
        make_image_folder(data_dir, args.batch * (args.warmup + args.steps) + 1, img)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(log[-4000:])
        raise SystemExit(f"gpu_measure: timm's {args.script}.py exited with {proc.returncode}")
    parsed = parse_timm_train(log, args.warmup) if args.script == "train" else parse_timm_benchmark(log)
    return emit("timm-train", args, device, ran=True, wall_s=wall, **fields, **parsed)


# ------------------------------------------------------------------------------------------ λmax


def cmd_lambda_max(args) -> dict:
    device = resolve_device(args.device)
    name = TINY_VIT if args.tiny else args.model
    img = input_size(name)
    n, batch, max_iter = (8, 4, 3) if args.tiny else (args.n_samples, args.batch, args.max_iter)
    torch.manual_seed(0)
    model = build(name, args.num_classes, device, channels_last=True)  # as pipeline.prepare leaves it
    batches = random_batches(n, batch, img, args.num_classes, device, seed=1)
    cfg = SharpnessConfig(n_samples=n, batch_size=batch, reuse_graph=args.reuse_graph, method=args.method,
                          max_iter=max_iter, tol=args.tol)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    out = run_diagnostics(model, batches, cfg)
    sync(device)
    seconds = time.perf_counter() - t0
    lm = out["lambda_max"]
    return emit("lambda-max", args, device, model=name, n_samples=n, batch=batch, reuse_graph=args.reuse_graph,
                method=args.method, max_iter=max_iter, tol=args.tol, lambda_max=lm["value"],
                iterations=lm["iterations"], converged=lm["converged"], seconds=seconds,
                seconds_per_hvp=seconds / max(lm["iterations"], 1), **peak_memory(device))


# ------------------------------------------------------------------------------------------ PTQ


def _ptq_config(method: str, bits: str, calib: int, tiny: bool):
    kw = {"scale_steps": 4, "search_rounds": 1, "max_softmax_shift": 3} if tiny and method == "ptq4vit" else {}
    return PTQConfig(method=method, bits=bits, calib_size=calib, **kw)


def cmd_ptq(args, method: str) -> dict:
    device = resolve_device(args.device)
    name = TINY_VIT if args.tiny else args.model
    img = input_size(name)
    n = 4 if args.tiny else args.calib
    torch.manual_seed(0)
    model = build(name, args.num_classes, device, channels_last=False)
    cfg = _ptq_config(method, args.bits, n, args.tiny)
    # The pipeline's calibration set: n training images in batches of train.eval_batch_size (128 in Table 2).
    calib = random_batches(n, args.eval_batch, img, args.num_classes, device, seed=2)
    cmodel = copy.deepcopy(model)  # as the pipeline does: the float model stays for evaluation
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    info = apply_compression(cmodel, cfg, CompressContext(device, calib))
    sync(device)
    seconds = time.perf_counter() - t0
    return emit("ptq4vit" if method == "ptq4vit" else "baseptq", args, device, model=name, method=method,
                bits=args.bits, calib_images=n, seconds=seconds, quantized_layers=info.get("quantized_layers"),
                quantized_matmuls=info.get("quantized_matmuls"), **peak_memory(device))


# ------------------------------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
        sp.add_argument("--tiny", action="store_true", help="a tiny ViT, few images and steps (the CPU test)")
        sp.add_argument("--timm-flags", action="store_true",
                        help="TF32 matmuls and cudnn.benchmark, as timm's train.py sets them (the runner does not)")
        return sp

    t = common(sub.add_parser("throughput", help="images/s of craft_runner's train_step"))
    t.add_argument("--model", default=None, help=f"one model instead of {VIT} and resnet20")
    t.add_argument("--optimizers", default="adam,sam")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--steps", type=int, default=30, help="timed steps")
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="train.amp (auto: bf16 on CUDA)")
    t.add_argument("--no-channels-last", action="store_true")

    tt = common(sub.add_parser("timm-train", help="timm's own train.py (or benchmark.py) at the same settings"))
    tt.add_argument("--script", default="train", choices=("train", "benchmark"))
    tt.add_argument("--timm-dir", default=str(ROOT / ".timm"), help="folder holding timm's train.py, benchmark.py")
    tt.add_argument("--run", action="store_true", help="run it (otherwise print the command only)")
    tt.add_argument("--model", default=VIT)
    tt.add_argument("--batch", type=int, default=64)
    tt.add_argument("--steps", type=int, default=30)
    tt.add_argument("--warmup", type=int, default=10)
    tt.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    tt.add_argument("--no-amp", dest="amp", action="store_false")
    tt.add_argument("--no-channels-last", action="store_true")
    tt.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "craft-timm-imagefolder"))
    tt.add_argument("--output", default=None, help="timm's output folder (default: a new temporary folder)")
    tt.add_argument("--timeout", type=float, default=1800)

    lm = common(sub.add_parser("lambda-max", help="λmax of ViT-B/16, CrAFT Table 2 settings"))
    lm.add_argument("--model", default=VIT)
    lm.add_argument("--num-classes", type=int, default=102, help="flowers102, Table 2's default data set")
    lm.add_argument("--n-samples", type=int, default=128)
    lm.add_argument("--batch", type=int, default=16)
    lm.add_argument("--reuse-graph", action="store_true", help="Table 2 sets reuse_graph false")
    lm.add_argument("--method", default="power", choices=("power", "lanczos"))
    lm.add_argument("--max-iter", type=int, default=100)
    lm.add_argument("--tol", type=float, default=1e-3)

    for name in ("ptq4vit", "baseptq"):
        q = common(sub.add_parser(name, help=f"{name} on ViT-B/16, time and peak memory"))
        q.add_argument("--model", default=VIT)
        q.add_argument("--num-classes", type=int, default=102)
        q.add_argument("--calib", type=int, default=32, help="calibration images (compress.calib_size)")
        q.add_argument("--eval-batch", type=int, default=128, help="train.eval_batch_size (calibration batches)")
        q.add_argument("--bits", default="W8A8")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    try:
        timm_flags(args.timm_flags)
        return _dispatch(args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


def _dispatch(args) -> dict:
    if args.cmd == "throughput":
        return cmd_throughput(args)
    if args.cmd == "timm-train":
        return cmd_timm_train(args)
    if args.cmd == "lambda-max":
        return cmd_lambda_max(args)
    return cmd_ptq(args, "ptq4vit" if args.cmd == "ptq4vit" else "base")


def cli(argv=None) -> int:
    """The console script ``craft-gpu-measure``: exit status 0 once its JSON line is printed."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
