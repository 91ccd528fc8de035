"""Training and evaluation loops, one for every optimizer, with atomic per-epoch checkpoints."""

from __future__ import annotations

import contextlib
import contextvars
import functools
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
from craft_runner.device import full_fp32, tf32
from craft_runner.optim import is_two_pass, needs_second_pass
from craft_runner.optim.wrapped import HOOKS, hook
from craft_runner.schema import ConfigError, TrainConfig

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot go on (non-finite training, an unreadable cache file); the message is one line."""


class NonFiniteError(RunError):
    """Training produced a non-finite loss, gradient or weight; nothing of it is cached."""


class CheckpointError(RunError):
    """A checkpoint or cache file that is truncated, foreign, or holds more than tensors and plain containers."""


def _first_line(e: BaseException, limit: int = 120) -> str:
    """An exception's type and the first sentence of its message."""
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(e).__name__}: {first}"[:limit] if first else type(e).__name__


def load_checkpoint(path: Path, map_location=None, required: tuple = (), fix: str = "delete it") -> dict:
    """``torch.load(weights_only=True)`` of a dict holding ``required``; anything else raises a one-line
    :class:`CheckpointError` naming the file and ``fix``. A pickle that needs code to load is refused unread."""
    import pickle

    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            reason = ("it holds Python objects other than tensors and plain containers "
                      "(refused: loading it could run code)")
        else:
            reason = f"it is not a torch checkpoint ({_first_line(e)})"
    except Exception as e:  # weights_only runs no code: anything else is a damaged file (KeyError, EOFError, ...)
        reason = f"it is truncated or not a torch checkpoint ({_first_line(e)})"
    else:
        missing = [k for k in required if not isinstance(st, dict) or k not in st]
        if not missing:
            return st
        reason = f"it is not a craft-runner checkpoint (no {', '.join(map(repr, missing))})"
    raise CheckpointError(f"{path} cannot be loaded: {reason}; {fix}")


def nonfinite_tensors(tensors) -> bool:
    """True if any floating-point tensor holds an inf or a NaN (one fused norm, one sync)."""
    floats = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    return bool(floats) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(floats)))


def nonfinite_weights(state_or_model) -> bool:
    """Any non-finite parameter or buffer in a model or a state dict."""
    tensors = state_or_model.values() if isinstance(state_or_model, dict) else state_or_model.state_dict().values()
    return nonfinite_tensors(tensors)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device, mode: str) -> Optional[torch.dtype]:
    """``train.amp``: auto (bf16 on a CUDA GPU with native bf16, compute capability >= 8.0; float32 elsewhere,
    since older GPUs emulate bf16 slowly), bf16 (on any device) or off. None means float32."""
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto" and device.type == "cuda" and _native_bf16(device):
        return torch.bfloat16
    return None


def autocast_name(device: torch.device, mode: str) -> Optional[str]:
    """The autocast dtype training runs under on ``device`` (``train.amp`` resolved) as recorded, e.g.
    "bfloat16"; None for float32."""
    dtype = amp_dtype(device, mode)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


@functools.cache
def _native_bf16(device: torch.device) -> bool:
    # asked once per device: autocast() runs on every training step
    return torch.cuda.get_device_capability(device)[0] >= 8


# Set inside :func:`float32_fine_tune`: autocast stays off whatever train.amp says.
_FLOAT32_ONLY = contextvars.ContextVar("craft_float32_only", default=False)


def autocast(device: torch.device, mode: str):
    dtype = None if _FLOAT32_ONLY.get() else amp_dtype(device, mode)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def float32_fine_tune():
    """Training inside runs without autocast, whatever ``train.amp`` says: the fine-tuning of a fake-quantized
    model (QAT, PTQ + fine-tuning). Under bf16 autocast a layer would compute with its fake-quantized weights and
    inputs rounded again to bf16's 8-bit mantissa, off their grid by up to half a step at 8 bits."""
    token = _FLOAT32_ONLY.set(True)
    try:
        yield
    finally:
        _FLOAT32_ONLY.reset(token)


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm still normalises with batch statistics, but its running stats (and count) stay as they are.

    The buffers are copied before and copied back after (on the device: no host sync), so a non-finite batch
    statistic inside leaves them untouched. davda54/sam sets BN momentum to 0 instead: the same running
    statistics for a finite batch, but 0·NaN = NaN poisons them, and its count still grows by one."""
    saved = [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in (getattr(m, k) for k in _BN_STATS) if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


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
               cfg: TrainConfig, device: torch.device,
               check: Optional[Callable[[torch.Tensor, nn.Module], None]] = None,
               idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One optimizer step; returns the loss at the unperturbed weights (detached).

    A two-pass (sharpness-aware) optimizer is asked whether *this* step needs the gradient at perturbed
    weights; when it does not (LookSAM between its SAM steps, randomised SAM's plain steps) the step costs
    one forward-backward and the gradient at w is kept. Under DistributedDataParallel the first backward of
    a two-pass step is not all-reduced: each rank perturbs with its local gradient (the SAM-DDP practice of
    the reference implementations, m-sharpness with m = the per-rank batch), and the second backward is
    all-reduced, so every rank applies the same mean of the perturbed gradients. Clipping acts on the
    gradient the base optimizer gets. The second pass never updates BatchNorm running statistics.
    ``check(loss, model)`` sees the loss and the update gradient just before the optimizer step (it may raise,
    leaving the weights as they were). Hooks of the optimizer (:mod:`craft_runner.optim.wrapped`), asked by
    capability: ``extra_loss(logits, x, idx)`` adds a term to the first pass's loss (SAF, MESA; ``idx`` the
    batch's sample indices), ``after_step(model)`` runs after the step (MESA's EMA); an optimizer with
    ``splits_batch`` (RWP) takes its two passes on the two halves of the batch.
    """
    two_pass = is_two_pass(opt)
    second = two_pass and needs_second_pass(opt)
    x2, y2 = x, y
    if second and getattr(opt, "splits_batch", False) and len(y) > 1:
        h = len(y) // 2
        x, y, x2, y2 = x[:h], y[:h], x[h:], y[h:]
    extra_loss = hook(opt, "extra_loss")
    with _local_grads(model, second):
        with autocast(device, cfg.amp):
            logits = model(x)
            loss = loss_fn(logits, y)
            term = extra_loss(logits, x, idx) if extra_loss is not None else None
            if term is not None:
                loss = loss + term
        loss.backward()
    if second:
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            with autocast(device, cfg.amp):
                loss2 = loss_fn(model(x2), y2)
            loss2.backward()
    if two_pass:
        unperturb = getattr(opt, "unperturb", None)
        if unperturb is not None:
            unperturb()  # weights back at w, .grad = the update gradient (LookSAM composes it here)
        if check is not None:
            check(loss, model)
        _clip(model, cfg.grad_clip)
        opt.second_step(zero_grad=True)
    else:
        if check is not None:
            check(loss, model)
        _clip(model, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after_step = hook(opt, "after_step")
    if after_step is not None:
        after_step(_unwrapped(model))
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


def _rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors and plain numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss_next}}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"].cpu())
    if st.get("cuda") and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


STATE_KEYS = ("model", "optimizer", "scheduler", "loader", "epoch", "history", "train_seconds", "rng")


def load_state(state_path: Path) -> Optional[dict]:
    """The training state at ``state_path`` (None when there is none); a damaged one raises CheckpointError."""
    if not Path(state_path).exists():
        return None
    return load_checkpoint(state_path, "cpu", STATE_KEYS,
                           fix=f"delete it (rm {state_path}) to train from the start")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over the ranks of a process group (so that every rank stops together)."""
    if not _distributed():
        return flag
    dev = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(float(flag), device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _sum_over_ranks(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """An epoch's loss sum and sample count over every rank (the epoch's loss is the global mean)."""
    if not _distributed():
        return total, count
    dev = total.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.stack([total.detach().double().to(dev), torch.tensor(float(count), dtype=torch.float64, device=dev)])
    torch.distributed.all_reduce(t)
    return t[0], int(t[1].item())


class _FiniteCheck:
    """Stops training at the first non-finite loss or update gradient.

    On the CPU the check runs every step, before the optimizer step (a host sync costs nothing there), so the
    weights stay as they were. On CUDA the step index of the first non-finite value is kept on the device and
    read once at the end of the epoch (no sync per step); the epoch's weights are then discarded, never saved.
    """

    def __init__(self, device: torch.device, epoch: int, epochs: int, steps: int, lazy: Optional[bool] = None):
        self.device, self.epoch, self.epochs, self.steps = device, epoch, epochs, steps
        self.step = 0
        self.lazy = device.type == "cuda" if lazy is None else lazy
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device) if self.lazy else None

    def error(self, what: str, step: int) -> NonFiniteError:
        last = f"epoch {self.epoch}" if self.epoch > 0 else "none: the initial weights"
        return NonFiniteError(
            f"non-finite {what} at epoch {self.epoch + 1}/{self.epochs}, step {step}/{self.steps}: training stopped "
            f"and nothing cached (last good checkpoint: {last}); lower optimizer.lr or set train.grad_clip")

    def __call__(self, loss: torch.Tensor, model: nn.Module) -> None:
        self.step += 1
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        if not self.lazy:
            if not bool(torch.isfinite(loss)):
                raise self.error("loss", self.step)
            if not bool(torch.isfinite(norm)):
                raise self.error("gradient", self.step)
            return
        loss_ok, grad_ok = torch.isfinite(loss.detach().float()), torch.isfinite(norm)
        code = torch.where(loss_ok, 1, 0) + 2 * self.step  # odd: the gradient, even: the loss
        self.first_bad = torch.where((self.first_bad < 0) & ~(loss_ok & grad_ok), code, self.first_bad)

    def end_of_epoch(self, model: nn.Module) -> None:
        """The deferred CUDA check and the weights (an update can overflow with finite gradients)."""
        bad = None
        if self.lazy and (code := int(self.first_bad)) >= 0:
            bad = self.error("gradient" if code % 2 else "loss", code // 2)
        elif nonfinite_weights(model):
            bad = self.error("weights", self.step)
        if _any_rank(bad is not None, self.device):
            raise bad or self.error("loss or gradient on another rank", self.step)


def fit(model: nn.Module, loader: Iterable, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
        state_path: Optional[Path] = None, desc: str = "train", on_epoch: Optional[Callable[[dict], None]] = None,
        state: Optional[dict] = None, extra_state: Optional[dict] = None, save_state: bool = True) -> dict:
    """Train for ``cfg.epochs``; with ``state_path``, checkpoint every epoch and resume from it.

    ``state``: the checkpoint already read from ``state_path`` (:func:`load_state`), else it is read here.
    ``on_epoch(record)`` runs after each epoch, before its checkpoint, with ``{"epoch", "loss", "lr", "steps",
    "second_passes", "seconds"}``. ``extra_state`` is stored in every checkpoint (e.g. the W&B run id);
    ``save_state=False`` reads but never writes it (the ranks other than 0 of a distributed run).
    A non-finite loss, gradient or weight raises :class:`NonFiniteError` (one line naming the epoch and step)
    and leaves the last good checkpoint as it was.

    Returns ``{"train_seconds", "epochs", "history", "resumed_from", "steps", "second_pass_fraction"}``:
    ``train_seconds`` is the wall time of the training epochs (end to end, no checkpoint writing), summed over
    resumptions; ``second_pass_fraction`` the share of steps that took a second forward-backward.

    Precision: autocast as ``cfg.amp`` says (never inside :func:`float32_fine_tune`), TF32 as ``cfg.tf32`` says
    (the previous flags restored afterwards).
    """
    if _FLOAT32_ONLY.get() and amp_dtype(device, cfg.amp) is not None:
        log.info("%s: a quantized model, fine-tuned in float32 (train.amp=%s not applied: bf16 would round its "
                 "fake-quantized values off their grid)", desc, cfg.amp)
    # TF32 as train.tf32 says, for the training only (measurements run with it off).
    with tf32(cfg.tf32):
        return _fit(model, loader, opt, cfg, device, state_path, desc, on_epoch, state, extra_state, save_state)


def _fit(model, loader, opt, cfg: TrainConfig, device: torch.device, state_path, desc, on_epoch, state, extra_state,
         save_state) -> dict:
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # The schedule drives the base optimizer of a sharpness-aware wrapper (they share param_groups).
    sched = build_scheduler(getattr(opt, "base_optimizer", opt), cfg, len(loader))
    start, history, seconds = 0, [], 0.0
    hooks = {name: hook(opt, name) for name in HOOKS}
    with_index = bool(getattr(opt, "wants_indices", False))
    if with_index:
        if not hasattr(loader, "with_index"):
            raise ConfigError(f"optimizer={type(opt).__name__} needs the sample index of each training batch, which "
                              f"only the in-memory loader gives: set dataset.on_device=true")
        loader.with_index = True
    if hooks["prepare"] is not None:  # before the checkpoint is loaded: it may restore what prepare allocates
        hooks["prepare"](_unwrapped(model), loader, cfg.epochs)
    if state is None and state_path is not None:
        state = load_state(state_path)
    if state is not None:
        _unwrapped(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _load_loader_state(loader, state["loader"])
        _set_rng_state(state["rng"])
        start, history, seconds = state["epoch"], list(state["history"]), state["train_seconds"]
        log.info("resuming %s from epoch %d of %d (%s)", desc, start, cfg.epochs, state_path)
    resumed_from = start
    sampler = getattr(loader, "sampler", None)
    for epoch in range(start, cfg.epochs):
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new order every epoch
            sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        total, count, steps, second_passes = torch.zeros((), device=device), 0, 0, 0
        check = _FiniteCheck(device, epoch, cfg.epochs, len(loader))
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if cfg.progress else True)
        if hooks["begin_epoch"] is not None:
            hooks["begin_epoch"](_unwrapped(model), epoch)
        for batch in bar:
            idx = batch[2] if with_index else None
            x, y = to_device(batch[0], batch[1], device, cfg.channels_last)
            second_passes += needs_second_pass(opt)
            loss = train_step(model, x, y, loss_fn, opt, cfg, device, check=check, idx=idx)
            sched.step()
            total += loss * len(y)
            count += len(y)
            steps += 1
        if hooks["end_epoch"] is not None:  # before the checks and the checkpoint (MSAM moves back to w)
            hooks["end_epoch"](_unwrapped(model), epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        check.end_of_epoch(model)
        seconds += elapsed
        total, count = _sum_over_ranks(total, count)
        history.append({"epoch": epoch + 1, "loss": float(total) / max(count, 1), "lr": sched.get_last_lr()[0],
                        "steps": steps, "second_passes": second_passes, "seconds": elapsed})
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, cfg.epochs, history[-1]["loss"])
        if on_epoch is not None:  # before the checkpoint: a record is never lost (a resumed epoch repeats it)
            on_epoch(dict(history[-1]))
        if state_path is not None and save_state:
            atomic_save({
                "model": _unwrapped(model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "loader": _loader_state(loader), "epoch": epoch + 1,
                "history": history, "train_seconds": seconds, "rng": _rng_state(), **(extra_state or {}),
            }, state_path)
    if hooks["finish"] is not None and cfg.epochs > 0:  # SWA's averaged weights, BN statistics; counted as training
        t0 = time.perf_counter()
        hooks["finish"](_unwrapped(model), loader)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
    if with_index:
        loader.with_index = False
    steps = sum(h.get("steps", 0) for h in history)
    passes = sum(h.get("second_passes", 0) for h in history)
    return {"train_seconds": seconds, "epochs": cfg.epochs, "history": history, "resumed_from": resumed_from,
            "steps": steps, "second_pass_fraction": passes / steps if steps else 0.0,
            "optimizer_extra_bytes": hooks["extra_bytes"]() if hooks["extra_bytes"] is not None else 0}


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
@full_fp32()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device, amp: str = "off",
             channels_last: bool = False) -> float:
    """Top-1 accuracy in percent (float32 computations with TF32 off)."""
    from torchmetrics.classification import MulticlassAccuracy

    # One process's own test set: no all-gather, even inside a process group (rank 0 evaluates alone).
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False).to(device)
    was_training = model.training
    model.eval()
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
        metric.update(logits.float(), y)
    model.train(was_training)
    return 100.0 * float(metric.compute())

