"""Paper-scale dry run: the real architectures of CrAFT Table 2 and SNT Table 3 (PTQ), a few steps per stage on
generated images, and a projection of the full tables' GPU hours.

    craft-smoke-paper --out outputs/smoke              # make smoke-paper (python -m craft_runner.bench.smoke_paper)
    craft-smoke-paper --out /tmp/s --images 8 --steps 1 --calib 2   # the slow test's minimum

Every stage goes through the runner's own code with the experiment's composed config (Hydra, as craft-run
composes it), ``model.pretrained=false`` (random init: no weights can be fetched) and the data set swapped for
``dataset=imagenet`` over a generated ImageFolder (``dataset.root``): ViT-B/16 at 224x224 with 37 classes (Oxford
Pets', batch 8 as conf/shared/task/oxford_pets.yaml), the SNT models at 32x32 with 100 or 10 classes at batch
128. Stages: fine-tune with Adam and with SAM (:func:`pipeline.train_or_load`, one epoch over the folder), λmax
(:class:`pipeline.Diagnostics`), evaluation (:func:`pipeline.evaluate`), and BasePTQ, PTQ4ViT, Wanda, N:M 2:4 and
ToMe (:func:`pipeline.compress`, the run's compression stage, fine-tuning included; its evaluation is a stage of
its own). What is capped, and to what, is recorded per stage.

Per stage: wall seconds, peak resident memory (the process's RSS read from /proc/self/statm every 10 ms while the
stage runs, freed heap returned with malloc_trim before it; GB = 1e9 bytes), steps done, and the FLOPs the stage
executed, counted by torch's FlopCounterMode (matmuls and convolutions; the fused CPU attention kernel is added
by its formula). The projection: each stage's FLOPs per work unit (training image, image of a Hessian-vector
product, calibration image x search candidate, evaluated image) times the units of every cell of the experiment's
sweep at paper scale (the sweep read from conf/experiment/<name>.yaml, every cell composed), divided by an
H100's sustained throughput (see GPU below). Writes ``<out>/projection.json`` atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import math
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import craft_runner
from craft_runner import pipeline
from craft_runner.atomic import atomic_write_json
from craft_runner.config import register_configs, to_run_config
from craft_runner.models import create_model
from craft_runner.schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Official split sizes (train as the runner reads it, test), images. Sources: torchvision's dataset docs and the
# data sets' papers: Flowers-102 train+val 1020+1020 / test 6149 (Nilsback & Zisserman 2008); Stanford Cars
# 8144 / 8041 (Krause et al. 2013); Oxford-IIIT Pets trainval 3680 / test 3669 (Parkhi et al. 2012); FGVC Aircraft
# trainval 6667 / test 3333 (Maji et al. 2013); Food-101 75750 / 25250 (Bossard et al. 2014); CIFAR-10 and
# CIFAR-100 50000 / 10000 (Krizhevsky 2009).
SPLITS = {
    "flowers102": (2040, 6149),
    "stanford_cars": (8144, 8041),
    "oxford_pets": (3680, 3669),
    "fgvc_aircraft": (6667, 3333),
    "food101": (75750, 25250),
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
}

# GPU: NVIDIA H100 SXM5, dense peak from NVIDIA's H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS
# "with sparsity" (989.5 dense); FP32 67 TFLOPS. Training runs in bf16 autocast on it (train.amp=auto); λmax,
# PTQ, pruning and evaluation run in float32 and the runner leaves TF32 off, so they get the FP32 peak.
GPU = "NVIDIA H100 SXM5 (80 GB)"
GPU_SOURCE = "NVIDIA H100 Tensor Core GPU datasheet: BF16 1979 TFLOPS with 2:4 sparsity = 989.5 dense; FP32 67"
PEAK_FLOPS = {"bf16": 989.5e12, "fp32": 67.0e12}
# Assumed share of that peak sustained (nothing has been measured on a GPU yet: craft-gpu-measure throughput
# would replace it). ViT-B/16 at 224 is large GEMMs: 40 %, typical of well-fed transformer training. The SNT
# models at 32x32 are small kernels that cannot fill an H100 (launch- and memory-bound): 10 %.
UTILISATION = {"craft_table2": 0.40, "snt_table3_ptq": 0.10}

# The smoke's data: ViT-B/16 gets Oxford Pets' 37 classes (CrAFT's batch 8 task); SNT's rows their own counts.
VIT_TASK = "oxford_pets"
VIT_CLASSES = 37
SNT_ROWS = {"resnet20_cifar100_w4ft": 100, "mixer_s_cifar10_w8a8": 10, "mobilenetv1_cifar100_w8a8": 100}
SNT_APPROACHES = ("adam", "sam", "arch")
VAL_IMAGES = 4
FOLDER_CLASSES = 8  # ImageFolder needs an image in every class folder
SNT_BATCH = 128


class SmokeError(ValueError):
    """Bad arguments: one line, before any work."""


# ------------------------------------------------------------------------------------------ projection arithmetic


def sustained_flops(experiment: str) -> dict:
    """FLOP/s one GPU sustains per precision for ``experiment``."""
    return {k: v * UTILISATION[experiment] for k, v in PEAK_FLOPS.items()}


# Forward-and-backward passes per training step of each optimizer (SAM: a second one at the perturbed weights).
PASSES = {"sam": 2, "asam": 2}


def train_flops_per_image(forward_flops: float, optimizer: str) -> float:
    """FLOPs of training on one image: forward + backward = 3 forward, times the optimizer's passes."""
    return 3 * forward_flops * PASSES.get(optimizer, 1)


def ptq_units(calib: int, rounds: int, steps: int, w_bits: int, a_bits: int, metric: str, search: str) -> int:
    """Work of one PTQ run in calibration image x pass: the capture pass (3 with the Hessian metric's backward)
    plus, per round, one pass of every op per scale candidate of each quantized side (weights, inputs)."""
    capture = 3 if metric == "hessian" else 1
    if search == "none":
        return calib * capture
    sides = int(w_bits < 16) + int(a_bits < 16)
    return calib * (capture + rounds * sides * steps)


def cell_work(rc) -> dict:
    """The paper-scale work of one cell, in the units the smoke measures per stage (plain numbers, no torch)."""
    n_train, n_test = SPLITS[rc.dataset.name]
    s, c = rc.sharpness, rc.compress
    train_kind = f"{rc.model.name}|{rc.optimizer.name}|{rc.arch.name}"
    whens = int(s.before) + int(s.after) if s.enabled and s.lambda_max else 0
    work = {"train_kind": train_kind, "train_images": rc.train.epochs * n_train,
            "lambda_kind": rc.model.name, "hvp_images": whens * s.max_iter * s.n_samples,
            "eval_kind": rc.model.name, "eval_images": n_test * (2 if c.name != "none" else 1)}
    if c.name == "ptq":
        work.update(ptq_kind=f"{rc.model.name}|{c.method}",
                    ptq_units=ptq_units(c.calib_size, c.search_rounds, c.scale_steps, c.w_bits, c.a_bits, c.metric,
                                        c.search),
                    finetune_images=c.finetune_epochs * n_train)
    return work


def project(cells: list[dict], per_unit: dict, sustained: dict) -> dict:
    """Components of an experiment's compute: ``cells`` are :func:`cell_work` dicts with a ``training`` key (the
    cache key: training and λmax are done once per key), ``per_unit`` maps (stage, kind) to measured FLOPs per
    unit, ``sustained`` FLOP/s per precision. Returns the components, total FLOPs and GPU hours."""
    totals: dict = {}

    def add(stage, kind, units, precision):
        key = (stage, kind, precision)
        totals[key] = totals.get(key, 0) + units

    trained = set()
    for w in cells:
        if w["training"] not in trained:
            trained.add(w["training"])
            add("train", w["train_kind"], w["train_images"], "bf16")
            if w["hvp_images"]:
                add("lambda_max", w["lambda_kind"], w["hvp_images"], "fp32")
        add("evaluate", w["eval_kind"], w["eval_images"], "fp32")
        if "ptq_kind" in w:
            add("ptq", w["ptq_kind"], w["ptq_units"], "fp32")
            if w["finetune_images"]:  # fine-tuning after PTQ: a training of the same kind, in bf16
                add("train", w["train_kind"], w["finetune_images"], "bf16")
    components, flops, seconds = [], 0.0, 0.0
    for (stage, kind, precision), units in sorted(totals.items()):
        f = units * per_unit[(stage, kind)]
        components.append({"stage": stage, "kind": kind, "precision": precision, "units": units,
                           "flops_per_unit": per_unit[(stage, kind)], "flops": f,
                           "gpu_hours": f / sustained[precision] / 3600})
        flops += f
        seconds += f / sustained[precision]
    return {"cells": len(cells), "trainings": len(trained), "components": components, "flops": flops,
            "gpu_hours_projected": seconds / 3600}


# ------------------------------------------------------------------------------------------ measurement


class PeakRSS:
    """The process's peak resident set size while in the block, sampled every ``interval`` seconds."""

    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls._page

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _release_memory() -> None:
    """Collect and hand freed heap back to the kernel, so a stage's peak is not an earlier stage's leftover."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def flop_counter():
    """torch's FlopCounterMode, plus the fused CPU attention kernel (absent from its registry) by its formula."""
    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})


def forward_flops(model, img: int) -> int:
    """FLOPs of one forward pass of one image (eval mode)."""
    was = model.training
    model.eval()
    x = torch.zeros(1, 3, img, img)
    with torch.no_grad(), flop_counter() as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops())


def paper_forward_flops(model_cfg) -> int:
    """Forward FLOPs per image of the model at its own (the paper's) input size, when the smoke ran it smaller."""
    cfg = dataclasses.replace(model_cfg, kwargs={k: v for k, v in model_cfg.kwargs.items() if k != "img_size"})
    return forward_flops(create_model(cfg, num_classes=model_cfg.num_classes), 224)


class Recorder:
    def __init__(self):
        self.stages: dict = {}

    def run(self, name: str, fn, **info) -> dict:
        """Run ``fn()`` (returning steps, units and extra fields) timed, RSS-sampled and FLOP-counted."""
        _release_memory()
        print(f"smoke-paper: {name} ...", flush=True)
        with PeakRSS() as mem, flop_counter() as fc:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        rec = {**info, "seconds": seconds, "peak_memory_gb": mem.peak / 1e9, **out,
               "flops": int(fc.get_total_flops())}
        rec["flops_per_unit"] = rec["flops"] / rec["units"]
        self.stages[name] = rec
        print(f"smoke-paper: {name}: {seconds:.1f} s, {mem.peak / 1e9:.2f} GB, {rec['steps']} steps, "
              f"{rec['flops'] / 1e9:.1f} GFLOP", flush=True)
        return rec


# ------------------------------------------------------------------------------------------ data and configs


def make_folder(root: Path, n_train: int, size: int, seed: int = 0) -> Path:
    """``root/train/c#/*.png`` (``n_train`` images over at most FOLDER_CLASSES class folders) and ``root/val/``
    (VAL_IMAGES images): smooth random images, as an ImageFolder (dataset=imagenet). The model's head has the
    paper's classes all the same (model.num_classes)."""
    rng = np.random.default_rng(seed)
    classes = min(n_train, FOLDER_CLASSES)
    for split, n in (("train", n_train), ("val", VAL_IMAGES)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            small.resize((size, size), Image.BILINEAR).save(d / f"{i:05d}.png")
    return root


@contextlib.contextmanager
def composer():
    """Within it, compose(overrides) -> the run config as craft-run composes it (Hydra's global state is cleared
    on leaving)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        yield lambda overrides: compose("run", overrides=list(overrides))


def sweep_cells(compose, experiment: str) -> list[list[str]]:
    """Every cell of the experiment's sweep as overrides (conf/experiment/<name>.yaml's sweeper params)."""
    conf = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    params = conf["hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [[f"experiment={experiment}", *combo] for combo in itertools.product(*axes)]


def paper_work(compose, experiment: str) -> list[dict]:
    cells = []
    for overrides in sweep_cells(compose, experiment):
        rc = to_run_config(compose(overrides))
        cells.append({**cell_work(rc), "training": pipeline.cache_key(rc)})
    return cells


# ------------------------------------------------------------------------------------------ the stages


def run_stages(args, compose, rec: Recorder, work: Path) -> dict:
    """Every stage on the real models; returns the FLOPs per image forward of each model."""
    steps, calib = args.steps, args.calib
    common = ["model.pretrained=false", "dataset=imagenet", "dataset.num_workers=0", "train.progress=false",
              f"paths.cache_dir={work / 'cache'}", f"paths.run_dir={work / 'run'}", "sharpness.plots=false",
              f"sharpness.max_iter={steps}", "sharpness.tol=1e-12", "train.epochs=1"]
    models: dict = {}

    def compress_stage(p, name, base, overrides, info):
        rc = to_run_config(compose([*base, *overrides]))
        q = dataclasses.replace(p, rc=rc)

        def fn():  # the run's compression stage on a copy of the trained model (its fine-tuning included)
            _, out = pipeline.compress(q)
            return info(rc.compress, out, q)

        return rec.run(name, fn, experiment=name.split("/")[0], model=rc.model.name, method=name.split("/")[-1],
                       capped=capped(rc))

    def capped(rc) -> dict:
        c = rc.compress
        fields = ("calib_size", "scale_steps", "search_rounds", "speed_batch", "speed_reps", "speed_warmup")
        return {k: getattr(c, k) for k in fields if hasattr(c, k)}

    def train_stage(p, name):
        def fn():
            info = pipeline.train_or_load(p)
            return {"steps": info["steps"], "units": info["steps"] and p.data.n_train * info["epochs"],
                    "step": f"optimizer step of {p.rc.train.batch_size} images", "unit": "training image",
                    "train_seconds": info["train_seconds"]}

        return rec.run(name, fn, experiment=name.split("/")[0], model=p.rc.model.name, optimizer=p.rc.optimizer.name,
                       arch=p.rc.arch.name, batch=p.rc.train.batch_size, img_size=p.data.img_size)

    def lambda_stage(p, name):
        s = p.rc.sharpness

        def fn():
            d = pipeline.Diagnostics(p)
            d.measure("after")
            lm = d.results["after"]["lambda_max"]
            n = min(s.n_samples, p.data.n_train)
            return {"steps": lm["iterations"], "units": lm["iterations"] * n, "lambda_max": lm["value"],
                    "step": f"Hessian-vector product over {n} images", "unit": "image of a Hessian-vector product"}

        return rec.run(name, fn, experiment=name.split("/")[0], model=p.rc.model.name, method=s.method,
                       reuse_graph=s.reuse_graph, capped={"n_samples": s.n_samples, "max_iter": s.max_iter})

    def eval_stage(p, name):
        def fn():
            acc = pipeline.evaluate(p)
            return {"steps": p.data.n_test, "units": p.data.n_test, "accuracy": acc, "step": "evaluated image",
                    "unit": "evaluated image"}

        return rec.run(name, fn, experiment=name.split("/")[0], model=p.rc.model.name)

    def ptq_info(c, out, q):
        units = ptq_units(c.calib_size, c.search_rounds, c.scale_steps, c.w_bits, c.a_bits, c.metric, c.search)
        # The fine-tuning after PTQ (SNT's W4 row) is projected as training: its images are kept apart.
        return {"steps": units, "units": units, "step": "calibration image x pass (capture, scale candidates)",
                "unit": "calibration image x pass", "quantized_layers": out.get("quantized_layers"),
                "finetune_images": c.finetune_epochs * q.data.n_train,
                "finetune_optimizer": q.rc.optimizer.name}

    def calib_info(c, out, q):
        return {"steps": c.calib_size, "units": c.calib_size, "step": "calibration image",
                "unit": "calibration image", "sparsity": out.get("sparsity")}

    def tome_info(c, out, q):
        reps = c.speed_warmup + c.speed_reps
        return {"steps": max(reps, 1), "units": max(reps, 1),
                "step": f"timed batch of {c.speed_batch} images (both models)", "unit": "timed batch",
                "speedup": out.get("speedup")}

    # ---- CrAFT Table 2: ViT-B/16 at 224, the task's batch (8), the experiment's fine-tuning recipe
    experiment = "craft_table2"
    vit_root = make_folder(work / "vit", args.images, args.img_size)
    size = [] if args.img_size == 224 else [f"+model.kwargs.img_size={args.img_size}",
                                            f"dataset.img_size={args.img_size}"]
    base = [f"experiment={experiment}", f"+shared/task={VIT_TASK}", *common, f"dataset.root={vit_root}",
            f"model.num_classes={VIT_CLASSES}", *size,
            f"sharpness.n_samples={min(args.images, 8)}", "sharpness.batch_size=8", f"compress.calib_size={calib}"]
    p = None
    for opt in ("adam", "sam"):
        del p
        _release_memory()
        p = pipeline.prepare(compose([*base, f"optimizer={opt}"]))
        p.data.num_classes = p.rc.model.num_classes  # the folder holds a few of the head's classes
        train_stage(p, f"{experiment}/finetune_{opt}")
    fwd = forward_flops(p.model, p.data.img_size)
    models[p.rc.model.name] = {"img_size": p.data.img_size, "params": sum(t.numel() for t in p.model.parameters()),
                               "num_classes": p.rc.model.num_classes, "forward_flops_per_image": fwd,
                               "paper_img_size": 224, "paper_forward_flops_per_image": fwd if args.img_size == 224
                               else paper_forward_flops(p.rc.model)}
    lambda_stage(p, f"{experiment}/lambda_max")
    eval_stage(p, f"{experiment}/evaluate")
    search = [f"compress.scale_steps={steps}", "compress.search_rounds=1"]
    for method, stage in (("base", "baseptq"), ("ptq4vit", "ptq4vit")):
        compress_stage(p, f"{experiment}/{stage}", base, [f"compress.method={method}", "compress.bits=W8A8", *search],
                       ptq_info)
    compress_stage(p, f"{experiment}/wanda", base, ["compress=wanda", "compress.sparsity=0.5",
                                              f"compress.calib_size={calib}"], calib_info)
    compress_stage(p, f"{experiment}/nm_2_4", base, ["compress=nm", "+shared/prune_shape=nm2_4",
                                                     "compress.criterion=wanda", f"compress.calib_size={calib}"],
                   calib_info)
    compress_stage(p, f"{experiment}/tome", base, ["+shared/comp=tome16", f"compress.speed_batch={calib}",
                                             "compress.speed_warmup=0", f"compress.speed_reps={steps}",
                                             f"compress.speed_max_reps={steps}", f"compress.calib_size={calib}"],
                   tome_info)
    del p
    _release_memory()

    # ---- SNT Table 3 (PTQ): its three models at 32x32, full width, batch 128, each approach
    experiment = "snt_table3_ptq"
    for row, classes in SNT_ROWS.items():
        root = work / "snt" if (work / "snt").exists() else make_folder(work / "snt", SNT_BATCH, 32)
        base = [f"experiment={experiment}", f"+shared/snt_row={row}", *common, f"dataset.root={root}",
                f"model.num_classes={classes}",
                f"train.epochs={steps}", "sharpness.n_samples=16", "sharpness.batch_size=16",
                f"compress.calib_size={calib}"]
        p = None
        for approach in SNT_APPROACHES:
            base_a = [*base, f"+shared/approach={approach}"]
            del p
            p = pipeline.prepare(compose(base_a))
            p.data.num_classes = p.rc.model.num_classes
            train_stage(p, f"{experiment}/{row}/train_{approach}")
            if approach == "adam":
                model_name = p.rc.model.name
                fwd = forward_flops(p.model, p.data.img_size)
                models[model_name] = {"img_size": p.data.img_size, "num_classes": p.rc.model.num_classes,
                                      "params": sum(t.numel() for t in p.model.parameters()),
                                      "forward_flops_per_image": fwd, "paper_img_size": p.data.img_size,
                                      "paper_forward_flops_per_image": fwd}
                lambda_stage(p, f"{experiment}/{row}/lambda_max")
                eval_stage(p, f"{experiment}/{row}/evaluate")
                # The row's own compression, on Adam's weights.
                compress_stage(p, f"{experiment}/{row}/ptq", base_a, [], ptq_info)
        del p
        _release_memory()
    return models


# ------------------------------------------------------------------------------------------ projection


def per_unit_flops(stages: dict, models: dict) -> dict:
    """(stage, kind) -> FLOPs per unit at the paper's input size, keyed as :func:`project` looks them up: the
    measured forward equivalents per unit times the paper-size forward FLOPs (the same as measured at 224)."""
    out = {}
    for name, s in stages.items():
        stage = name.split("/")[-1]
        m = models[s["model"]]
        s["paper_flops_per_unit"] = s["forward_equivalents_per_unit"] * m["paper_forward_flops_per_image"]
        if stage.startswith(("finetune_", "train_")):
            # Training by the rule, 3 forward FLOPs per image (forward + backward), twice with SAM's second
            # pass: FlopCounterMode overcounts grouped (depthwise) convolutions' backward, so MobileNet's measured
            # figure is not used; forward_equivalents_per_unit shows the measured ratio (3.0 and 6.0 elsewhere).
            s["paper_flops_per_unit"] = train_flops_per_image(m["paper_forward_flops_per_image"], s["optimizer"])
            out[("train", f"{s['model']}|{s['optimizer']}|{s['arch']}")] = s["paper_flops_per_unit"]
        elif stage in ("lambda_max", "evaluate"):
            out[(stage, s["model"])] = s["paper_flops_per_unit"]
        elif stage in ("baseptq", "ptq4vit", "ptq"):
            # Less the fine-tuning's FLOPs (3 forward per image, its optimizer's passes), at the smoke's size.
            tuned = s["finetune_images"] * train_flops_per_image(m["forward_flops_per_image"], s["finetune_optimizer"])
            s["search_flops_per_unit"] = (s["flops"] - tuned) / s["units"]
            s["paper_flops_per_unit"] = (s["search_flops_per_unit"] / m["forward_flops_per_image"]
                                         * m["paper_forward_flops_per_image"])
            method = {"baseptq": "base", "ptq4vit": "ptq4vit"}.get(stage, "base")
            out[("ptq", f"{s['model']}|{method}")] = s["paper_flops_per_unit"]
    return out


def check_args(args) -> None:
    if args.steps < 1:
        raise SmokeError(f"--steps={args.steps} is not allowed: expected an integer >= 1")
    if args.images < 8:
        raise SmokeError(f"--images={args.images} is not allowed: expected >= 8 (one ViT batch of the paper's 8)")
    if args.img_size < 16 or args.img_size % 16:
        raise SmokeError(f"--img-size={args.img_size} is not allowed: expected a multiple of 16 (ViT-B/16's patch)")
    if not 1 <= args.calib <= args.images:
        raise SmokeError(f"--calib={args.calib} is not allowed: expected an integer in 1..--images ({args.images})")
    try:
        pipeline.check_writable(args.out, "--out")
    except ConfigError as e:
        raise SmokeError(str(e)) from None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/smoke", help="folder for projection.json (default: outputs/smoke)")
    p.add_argument("--images", type=int, default=16,
                   help="training images of ViT-B/16's ImageFolder: one fine-tuning epoch is images/8 steps")
    p.add_argument("--steps", type=int, default=2,
                   help="λmax products, PTQ scale candidates, ToMe timed batches, SNT training steps (batch 128)")
    p.add_argument("--calib", type=int, default=4, help="calibration images of PTQ, Wanda, N:M and ToMe")
    p.add_argument("--img-size", type=int, default=224,
                   help="ViT-B/16's input size (224, the paper's; smaller only to keep a test short)")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except SmokeError as e:
        p.error(str(e))
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # generated images, cache and diagnostics of the last run
    work.mkdir(parents=True)
    rec = Recorder()
    t0 = time.perf_counter()
    with composer() as compose:
        models = run_stages(args, compose, rec, work)
        wall = time.perf_counter() - t0
        cells = {e: paper_work(compose, e) for e in ("craft_table2", "snt_table3_ptq")}
    for s in rec.stages.values():  # how many forward passes of one image a unit costs, a check on the units
        s["forward_equivalents_per_unit"] = s["flops_per_unit"] / models[s["model"]]["forward_flops_per_image"]
    per_unit = per_unit_flops(rec.stages, models)
    experiments = {e: project(c, per_unit, sustained_flops(e)) for e, c in cells.items()}
    total = sum(e["gpu_hours_projected"] for e in experiments.values())
    if not (math.isfinite(total) and total > 0):
        raise RuntimeError(f"smoke-paper: projected GPU hours {total} is not a positive number")
    result = {
        "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": wall,
        "host": {"device": f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
                 "torch": torch.__version__, "craft_runner": craft_runner.__version__},
        "args": vars(args), "memory_kind": "peak RSS of the process during the stage, /proc/self/statm sampled "
                                           "every 10 ms after malloc_trim; GB = 1e9 bytes",
        "flops_kind": "torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention; elementwise not counted)",
        "models": models, "stages": rec.stages,
        "throughput": {"gpu": GPU, "source": GPU_SOURCE, "peak_flops": PEAK_FLOPS, "utilisation": UTILISATION,
                       "sustained_flops": {e: sustained_flops(e) for e in UTILISATION},
                       "precision": "train (and PTQ's fine-tuning) bf16 autocast; λmax, PTQ, evaluation float32"},
        "data_splits": SPLITS, "experiments": experiments, "gpu_hours_projected": total,
    }
    atomic_write_json(result, out / "projection.json")
    shutil.rmtree(work, ignore_errors=True)
    print(f"smoke-paper: {len(rec.stages)} stages in {wall:.0f} s; projected "
          + ", ".join(f"{e} {v['gpu_hours_projected']:.2f}" for e, v in experiments.items())
          + f" GPU hours on one {GPU}, {total:.2f} in all -> {out / 'projection.json'}")
    return result


def cli(argv=None) -> int:
    """The console script ``craft-smoke-paper``: exit status 0 once projection.json is written."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
