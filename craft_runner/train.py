"""Training and evaluation loops, one for every optimizer, with atomic per-epoch checkpoints."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from craft_runner.atomic import atomic_save
from craft_runner.optim import is_two_pass, needs_second_pass
from craft_runner.schema import TrainConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, mode: str):
    """``train.amp``: auto (bf16 on CUDA only), bf16 (on any device) or off."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm still normalises with batch statistics, but its running stats (and count) stay as they are."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            count = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, count))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "none":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool = False):
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
    return x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)


def _clip(model: nn.Module, max_norm: Optional[float]) -> None:
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _local_grads(model: nn.Module, local: bool):
    """DDP: keep this backward's gradients on the rank (no all-reduce); elsewhere a no-op."""
    if local and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, opt: torch.optim.Optimizer,
               cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One optimizer step; returns the loss at the unperturbed weights (detached).

    A two-pass (sharpness-aware) optimizer is asked whether *this* step needs the gradient at perturbed
    weights; when it does not (LookSAM between its SAM steps, randomised SAM's plain steps) the step costs
    one forward-backward and the gradient at w is kept. Under DistributedDataParallel the first backward of
    a two-pass step is not all-reduced: each rank perturbs with its local gradient (the SAM-DDP practice of
    the reference implementations, m-sharpness with m = the per-rank batch), and the second backward is
    all-reduced, so every rank applies the same mean of the perturbed gradients. Clipping acts on the
    gradient the base optimizer gets. The second pass never updates BatchNorm running statistics.
    """
    two_pass = is_two_pass(opt)
    second = two_pass and needs_second_pass(opt)
    with _local_grads(model, second):
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x), y)
        loss.backward()
    if second:
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            with autocast(device, cfg.amp):
                loss2 = loss_fn(model(x), y)
            loss2.backward()
    if two_pass:
        unperturb = getattr(opt, "unperturb", None)
        if unperturb is not None:
            unperturb()  # weights back at w, .grad = the update gradient (LookSAM composes it here)
        _clip(model, cfg.grad_clip)
        opt.second_step(zero_grad=True)
    else:
        _clip(model, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def _loader_state(loader) -> Optional[dict]:
    if hasattr(loader, "state_dict"):
        return loader.state_dict()
    gen = getattr(loader, "generator", None)
    return {"generator": gen.get_state()} if gen is not None else None


def _load_loader_state(loader, state: Optional[dict]) -> None:
    if not state:
        return
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state)
    elif getattr(loader, "generator", None) is not None:
        loader.generator.set_state(state["generator"])


def fit(model: nn.Module, loader: Iterable, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
        state_path: Optional[Path] = None, desc: str = "train") -> dict:
    """Train for ``cfg.epochs``; with ``state_path``, checkpoint every epoch and resume from it.

    Returns ``{"train_seconds", "epochs", "history", "resumed_from", "steps", "second_pass_fraction"}``:
    ``train_seconds`` is the wall time of the training epochs (end to end, no checkpoint writing), summed over
    resumptions; ``second_pass_fraction`` the share of steps that took a second forward-backward.
    """
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # The schedule drives the base optimizer of a sharpness-aware wrapper (they share param_groups).
    sched = build_scheduler(getattr(opt, "base_optimizer", opt), cfg, len(loader))
    start, history, seconds = 0, [], 0.0
    if state_path is not None and Path(state_path).exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _load_loader_state(loader, st["loader"])
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        start, history, seconds = st["epoch"], st["history"], st["train_seconds"]
        log.info("resuming %s from epoch %d of %d (%s)", desc, start, cfg.epochs, state_path)
    resumed_from = start
    for epoch in range(start, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        total, count, steps, second_passes = torch.zeros((), device=device), 0, 0, 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if cfg.progress else True)
        for x, y in bar:
            x, y = to_device(x, y, device, cfg.channels_last)
            second_passes += needs_second_pass(opt)
            loss = train_step(model, x, y, loss_fn, opt, cfg, device)
            sched.step()
            total += loss * len(y)
            count += len(y)
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": float(total) / max(count, 1), "lr": sched.get_last_lr()[0],
                        "steps": steps, "second_passes": second_passes})
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, cfg.epochs, history[-1]["loss"])
        if state_path is not None:
            atomic_save({
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "loader": _loader_state(loader), "epoch": epoch + 1, "history": history,
                "train_seconds": seconds,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            }, state_path)
    steps = sum(h.get("steps", 0) for h in history)
    passes = sum(h.get("second_passes", 0) for h in history)
    return {"train_seconds": seconds, "epochs": cfg.epochs, "history": history, "resumed_from": resumed_from,
            "steps": steps, "second_pass_fraction": passes / steps if steps else 0.0}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device, amp: str = "off",
             channels_last: bool = False) -> float:
    """Top-1 accuracy in percent."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    was_training = model.training
    model.eval()
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
        metric.update(logits.float(), y)
    model.train(was_training)
    return 100.0 * float(metric.compute())

