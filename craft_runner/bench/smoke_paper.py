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
its own). What is capped, and to what, is recorded per stage. GPTQ (W4A16, per channel) and SparseGPT (50 %) are
timed on one transformer block of ViT-B/16 only (its qkv, proj, fc1 and fc2: the Hessians from one pass of the
block over --calib images, then each layer's OBS sweep; the whole model would take too long on a CPU) and scaled
to the model by its layer count (:func:`obs_per_unit`).

Per stage: wall seconds, peak resident memory (the process's RSS read from /proc/self/statm every 10 ms while the
stage runs, freed heap returned with malloc_trim before it; GB = 1e9 bytes), steps done, and the FLOPs the stage
executed, counted by torch's FlopCounterMode (matmuls and convolutions; the fused CPU attention kernel is added
by its formula). The projection: each stage's FLOPs per work unit (training image, image of a Hessian-vector
product, calibration image x search candidate, evaluated image) times the units of every cell of the experiment's
sweep at paper scale (the sweep read from conf/experiment/<name>.yaml, every cell composed), divided by an
H100's sustained throughput (see GPU below). GPTQ / SparseGPT cells (craft_table2, craft_table3, craft_fig4)
add a calibration part per image (one forward of the model per layer group, as the runner's block-by-block
calibration runs it, plus every layer's Hessian accumulation scaled from the measured block's, linear in the
images, so the reference's 128 are projected from the few measured) and a sweep part per compressed model.
Writes ``<out>/projection.json`` atomically.
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
from craft_runner.compress.gptq import gptq_matrix, layer_groups
from craft_runner.compress.obs import HessianAccumulator, weight_matrix
from craft_runner.compress.prune import block_of
from craft_runner.compress.quant import PTQConfig
from craft_runner.compress.quantizers import FULL_PRECISION_BITS
from craft_runner.compress.registry import target_layers
from craft_runner.compress.sparsegpt import sparsegpt_matrix
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
# Tables whose GPTQ / SparseGPT cells are projected (issue 31's columns); only ViT-B/16's cells have a measurement.
# craft_table3 and craft_fig4 are ViT-B/16 at 224 as craft_table2 is: its utilisation is theirs (OBS_UTILISATION).
OBS_TABLES = ("craft_table2", "craft_table3", "craft_fig4")
OBS_UTILISATION = UTILISATION["craft_table2"]
# FLOPs of inverse_hessian per Hessian, x columns³ (torch's FlopCounterMode does not count LAPACK): Cholesky
# (potrf, C³/3), the inverse from it (potri, 2C³/3), the inverse's Cholesky (C³/3); LAPACK's operation counts.
CHOLESKY_FLOPS = 4 / 3


def obs_uncounted_flops(groups: int, rows: int, columns: int, block_size: int) -> float:
    """What FlopCounterMode misses of one layer's OBS sweep (it counts matmuls only): the inverse Hessian's
    factorisations (CHOLESKY_FLOPS x C³ per group) and the in-block update W1[:, j:] -= e·U1[j, j:], a multiply
    and a subtract per row for each of the b(b+1)/2 entries of a block's upper triangle."""
    inblock = sum(b * (b + 1) for b in (min(block_size, columns - i) for i in range(0, columns, block_size)))
    return groups * (CHOLESKY_FLOPS * columns ** 3 + rows * inblock)

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


def obs_work(rc, c) -> dict:
    """A GPTQ / SparseGPT cell's compressor work: one model's calibration images and OBS sweep; GPTQ below 16-bit
    activations adds BasePTQ's input-scale search (one side) on the quantized model, as :func:`gptq.gptq` runs it."""
    work = {"obs_kind": f"{rc.model.name}|{c.name}", "obs_calib_images": c.calib_size}
    if c.name == "gptq" and c.a_bits < FULL_PRECISION_BITS:
        a = PTQConfig(w_bits=FULL_PRECISION_BITS, a_bits=c.a_bits, calib_size=c.calib_size,
                      scale_steps=c.scale_steps, search_rounds=c.search_rounds)
        work.update(ptq_kind=f"{rc.model.name}|base", finetune_images=0,
                    ptq_units=ptq_units(a.calib_size, a.search_rounds, a.scale_steps, a.w_bits, a.a_bits, a.metric,
                                        a.search))
    return work


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
    elif c.name in ("gptq", "sparsegpt"):
        work.update(obs_work(rc, c))
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
        if "obs_kind" in w:  # GPTQ / SparseGPT: calibration images, then one model's sweep
            add("obs_calib", w["obs_kind"], w["obs_calib_images"], "fp32")
            add("obs_sweep", w["obs_kind"], 1, "fp32")
    return {"cells": len(cells), "trainings": len(trained), **components_of(totals, per_unit, sustained)}


def components_of(totals: dict, per_unit: dict, sustained: dict) -> dict:
    """{(stage, kind, precision): units} -> the components, their FLOPs and GPU hours."""
    components, flops, seconds = [], 0.0, 0.0
    for (stage, kind, precision), units in sorted(totals.items()):
        f = units * per_unit[(stage, kind)]
        components.append({"stage": stage, "kind": kind, "precision": precision, "units": units,
                           "flops_per_unit": per_unit[(stage, kind)], "flops": f,
                           "gpu_hours": f / sustained[precision] / 3600})
        flops += f
        seconds += f / sustained[precision]
    return {"components": components, "flops": flops, "gpu_hours_projected": seconds / 3600}


def project_obs(cells: list[dict], per_unit: dict, sustained: dict) -> dict:
    """The GPTQ / SparseGPT cells of a table alone: their count per (model|method), and the compute of those whose
    model the smoke measured (the others are counted under ``not_projected``)."""
    counts: dict = {}
    missing: dict = {}
    totals: dict = {}
    for w in cells:
        if "obs_kind" not in w:
            continue
        kind = w["obs_kind"]
        counts[kind] = counts.get(kind, 0) + 1
        if ("obs_sweep", kind) not in per_unit:
            missing[kind] = missing.get(kind, 0) + 1
            continue
        parts = [(("obs_calib", kind, "fp32"), w["obs_calib_images"]), (("obs_sweep", kind, "fp32"), 1)]
        if "ptq_kind" in w:  # GPTQ at A < 16: BasePTQ's input search after it
            parts.append((("ptq", w["ptq_kind"], "fp32"), w["ptq_units"]))
        for key, units in parts:
            totals[key] = totals.get(key, 0) + units
    return {"cells": counts, "not_projected": missing, **components_of(totals, per_unit, sustained)}


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


class _Captured(Exception):
    """Raised by a pre-hook once a module's input is kept: the rest of the forward is not needed."""


def module_inputs(model, module, batches) -> list:
    """``module``'s input on every ``(x, y)`` batch, the forward stopped there (eval mode, no grad)."""
    xs = []

    def keep(_mod, args):
        xs.append(args[0].detach())
        raise _Captured

    handle, was = module.register_forward_pre_hook(keep), model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                with contextlib.suppress(_Captured):
                    model(x)
    finally:
        handle.remove()
        model.train(was)
    return xs


def obs_matrix(c, W, H) -> dict:
    """One layer's GPTQ or SparseGPT with the composed config's settings (the runner's own functions)."""
    if c.name == "gptq":
        return gptq_matrix(W, H, c.w_bits, c.group_size, c.sym, c.act_order, c.damp, c.block_size)
    n, m = (c.n, c.m) if c.pattern == "nm" else (0, 0)
    return sparsegpt_matrix(W, H, c.sparsity, n, m, c.damp, c.block_size)


# The OBS sweeps are thousands of small ops per layer: on this shared 2-core machine two OpenMP threads made
# GPTQ of a qkv layer (2304 x 768) 13.5 s against 0.37 s with one (load average 5), so they are timed on one.
OBS_SWEEP_THREADS = 1


def measure_obs_block(model, c, batches) -> dict:
    """GPTQ / SparseGPT (config ``c``) on one layer group of ``model``, the middle one of the runner's
    block-by-block order (a transformer block: qkv, proj, fc1, fc2): its Hessians from one pass of the block over
    ``batches`` (its inputs captured first, not timed), then each layer's OBS sweep, each timed and FLOP-counted;
    the weights are left as they were. Also the model's layer and group counts, for the scaling."""
    layers = target_layers(model, c.skip_first_last)
    groups = layer_groups(model, layers, c.sequential)
    group = max(groups[len(groups) // 2:], key=len)  # a middle block (not the stem or the head alone)
    block = model.get_submodule(block_of(model, group[0][0]))
    xs = module_inputs(model, block, batches)
    was = block.training
    block.eval()
    with torch.no_grad(), flop_counter() as fwd:
        for x in xs:
            block(x)
    acc = {m: HessianAccumulator(m) for _, m in group}

    def hook(mod, args, _out):
        acc[mod].add(args[0])

    handles = [m.register_forward_hook(hook) for _, m in group]
    try:
        with torch.no_grad(), flop_counter() as fc:
            t0 = time.perf_counter()
            for x in xs:
                block(x)
            pass_seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
        block.train(was)
    images = sum(len(x) for x in xs)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(OBS_SWEEP_THREADS)
    try:
        for name, m in group:
            W = weight_matrix(m)
            with flop_counter() as lc:
                t0 = time.perf_counter()
                obs_matrix(c, W, acc[m].H)
                seconds = time.perf_counter() - t0
            G, R, C = W.shape
            out[name] = {"rows": R, "columns": C, "groups": G, "seconds": seconds,
                         "flops": int(lc.get_total_flops()) + obs_uncounted_flops(G, R, C, c.block_size)}
    finally:
        torch.set_num_threads(threads)
    return {"block": block_of(model, group[0][0]), "layers": out, "calib_images": images,
            "tokens_per_image": xs[0].shape[1] if xs[0].dim() == 3 else None,
            "hessian_pass_seconds": pass_seconds,
            "hessian_flops_per_image": (fc.get_total_flops() - fwd.get_total_flops()) / images,
            "sweep_seconds": sum(v["seconds"] for v in out.values()),
            "sweep_flops": sum(v["flops"] for v in out.values()),
            "model_layers": len(layers), "model_layer_groups": len(groups), "block_layers": len(group),
            "sweep_threads": OBS_SWEEP_THREADS}


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

# issue 31's compressors on ViT-B/16: GPTQ W4A16 per channel (craft_table2/3's column), SparseGPT 50 % (craft_fig4's).
OBS_STAGES = {"gptq": ["compress=gptq", "compress.bits=W4A16"],
              "sparsegpt": ["compress=sparsegpt", "compress.sparsity=0.5"]}


def obs_stages(p, compose, base: list, rec: Recorder, experiment: str) -> None:
    """GPTQ and SparseGPT on one block of ``p.model`` (:func:`measure_obs_block`), over the --calib images
    ``base`` sets (compress.calib_size), recorded as ``<experiment>/gptq`` and ``<experiment>/sparsegpt``."""
    for method, overrides in OBS_STAGES.items():
        rc = to_run_config(compose([*base, *overrides]))
        c = rc.compress
        batches = p.data.calib_batches(c.calib_size, rc.train.eval_batch_size, c.calib_seed, p.device)

        def fn(c=c, batches=batches):
            m = measure_obs_block(p.model, c, batches)
            n = len(m["layers"])
            return {**m, "steps": n, "units": n, "step": "layer (Hessian pass of its block, then its OBS sweep)",
                    "unit": "layer", "seconds_per_layer": m["sweep_seconds"] / n,
                    "block_seconds": m["hessian_pass_seconds"] + m["sweep_seconds"]}

        rec.run(f"{experiment}/{method}", fn, experiment=experiment, model=rc.model.name, method=method,
                capped={"calib_size": c.calib_size, "layers": "one block"})


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
    obs_stages(p, compose, base, rec, experiment)
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
        elif stage in OBS_STAGES:
            s.update(obs_per_unit(s, m))
            kind = f"{s['model']}|{stage}"
            out[("obs_calib", kind)] = s["paper_flops_per_calib_image"]
            out[("obs_sweep", kind)] = s["paper_flops_per_model"]
    return out


def obs_per_unit(s: dict, m: dict) -> dict:
    """A measured GPTQ / SparseGPT block (``s``) scaled to the whole model ``m`` at the paper's input size, by the
    layer count (model layers / block layers: the stem and head, one layer each, are counted as an average layer of
    the block, an overestimate as the block's fc2 has 4x the columns). Per calibration image: one model forward per
    layer group (the runner's block-by-block calibration passes the whole model) plus the Hessian accumulations,
    these by the tokens at the paper's size; per model: the layers' OBS sweeps (FLOPs and CPU seconds)."""
    scale = s["model_layers"] / s["block_layers"]
    tokens = s["tokens_per_image"]
    if tokens is None:
        token_scale = 1.0
    else:  # ViT: prefix tokens + patches, the patches growing with the area
        patches = (m["img_size"] // 16) ** 2
        token_scale = (tokens - patches + patches * (m["paper_img_size"] / m["img_size"]) ** 2) / tokens
    return {"layer_scale": scale, "paper_token_scale": token_scale,
            "paper_flops_per_calib_image": (s["model_layer_groups"] * m["paper_forward_flops_per_image"]
                                            + scale * s["hessian_flops_per_image"] * token_scale),
            "paper_flops_per_model": scale * s["sweep_flops"],
            "columns_per_model": scale * sum(v["columns"] for v in s["layers"].values()),
            "cpu_sweep_seconds_per_model": scale * s["sweep_seconds"]}


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
        cells = {e: paper_work(compose, e) for e in ("craft_table2", "snt_table3_ptq", *OBS_TABLES)}
    for s in rec.stages.values():  # how many forward passes of one image a unit costs, a check on the units
        s["forward_equivalents_per_unit"] = s["flops_per_unit"] / models[s["model"]]["forward_flops_per_image"]
    per_unit = per_unit_flops(rec.stages, models)
    experiments = {e: project(cells[e], per_unit, sustained_flops(e)) for e in ("craft_table2", "snt_table3_ptq")}
    obs_sustained = {k: v * OBS_UTILISATION for k, v in PEAK_FLOPS.items()}
    compressors = {e: project_obs(cells[e], per_unit, obs_sustained) for e in OBS_TABLES}
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
                       "compressors_utilisation": OBS_UTILISATION,
                       "precision": "train (and PTQ's fine-tuning) bf16 autocast; λmax, PTQ, evaluation float32"},
        "data_splits": SPLITS, "experiments": experiments, "gpu_hours_projected": total,
        # GPTQ / SparseGPT cells alone (craft_table2's are in its experiment above too), at OBS_UTILISATION.
        "compressors": compressors,
        "compressors_note": "FLOPs over sustained FP32 as every stage; the OBS sweep is column by column, on a GPU "
                            "bound by kernel launches more than FLOPs: its part is a lower bound",
    }
    atomic_write_json(result, out / "projection.json")
    shutil.rmtree(work, ignore_errors=True)
    print(f"smoke-paper: {len(rec.stages)} stages in {wall:.0f} s; projected "
          + ", ".join(f"{e} {v['gpu_hours_projected']:.2f}" for e, v in experiments.items())
          + f" GPU hours on one {GPU}, {total:.2f} in all -> {out / 'projection.json'}")
    print("smoke-paper: GPTQ / SparseGPT cells alone: " + ", ".join(
        f"{e} {sum(v['cells'].values())} cells {v['gpu_hours_projected']:.3f} h" for e, v in compressors.items()))
    return result


def cli(argv=None) -> int:
    """The console script ``craft-smoke-paper``: exit status 0 once projection.json is written."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
