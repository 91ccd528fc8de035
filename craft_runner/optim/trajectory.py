"""SAF and MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free"): the trajectory loss.

Both add to the cross-entropy λ·T²·mean_i KL(softmax(z̄_i/T) ‖ softmax(z_i/T)), z_i the current logits of
sample i, z̄_i a reference output, gradients through z_i only. As the authors' code (AngusDujw/SAF,
``SAF_train.py`` / ``MESA_train.py``) does:

- SAF: z̄_i are the logits sample i got E epochs ago (``saf_epochs_ago``, 3), kept in a ring of E + 1
  slots per sample (the current epoch's logits are written to slot ``epoch % (E+1)``), λ = 0.16;
- MESA: z̄_i are the outputs of an EMA of the model (weights and BatchNorm buffers, decay
  ``ema_decay`` 0.9998 per step, as timm's ``ModelEmaV2``; evaluated in eval mode, before the step), λ = 0.3;
- both: T = 5, the term is on in epochs ``traj_start_epoch`` < epoch < ``traj_end_epoch`` (0-based; 5 and
  the end of training by default; the authors' 300 / 360 were their run lengths).

SAF needs each sample's index: the loader yields ``(x, y, index)`` (``wants_indices``), which the in-memory
loader does; its memory is n_train × (E+1) × classes floats, MESA's one copy of the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from craft_runner.optim.registry import HParams, OptimInfo, _finite_positive, register_optimizer
from craft_runner.optim.wrapped import Wrapped, module_bytes, tensor_bytes
from craft_runner.schema import _check


def trajectory_kl(logits: torch.Tensor, reference: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over the batch of KL(softmax(reference/T) ‖ softmax(logits/T))."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    p = F.softmax(reference.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="none").sum(1).mean() * temperature ** 2


class _Trajectory(Wrapped):
    def __init__(self, params, base_optimizer, coef: float = 0.16, temperature: float = 5.0, start_epoch: int = 5,
                 end_epoch: Optional[int] = None, **base_kwargs):
        if not coef >= 0:
            raise ValueError(f"optimizer.traj_coef={coef!r} is not allowed: expected a number >= 0")
        if not temperature > 0:
            raise ValueError(f"optimizer.traj_temperature={temperature!r} is not allowed: expected a number > 0")
        super().__init__(params, base_optimizer, **base_kwargs)
        self.coef, self.temperature = coef, temperature
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.epoch = 0

    def active(self) -> bool:
        return self.epoch > self.start_epoch and (self.end_epoch is None or self.epoch < self.end_epoch)

    def begin_epoch(self, model, epoch: int) -> None:
        self.epoch = epoch


class SAF(_Trajectory):
    wants_indices = True

    def __init__(self, params, base_optimizer, epochs_ago: int = 3, **kwargs):
        if epochs_ago < 1:
            raise ValueError(f"optimizer.saf_epochs_ago={epochs_ago!r} is not allowed: expected an integer >= 1")
        super().__init__(params, base_optimizer, **kwargs)
        self.epochs_ago = epochs_ago
        self.logits: Optional[torch.Tensor] = None  # (n_train, E+1, classes)

    def prepare(self, model, loader, epochs: int) -> None:
        n = len(getattr(loader, "y", ()))
        if not n:
            raise ValueError("optimizer=saf needs the sample index of each training batch: hold the data set as "
                             "tensors (dataset.on_device=true) or use optimizer=mesa")
        self._n, self._device = n, next(model.parameters()).device

    def extra_loss(self, logits: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> Optional[torch.Tensor]:
        slots = self.epochs_ago + 1
        if self.logits is None:
            self.logits = torch.zeros(self._n, slots, logits.shape[1], device=self._device)
        idx = idx.to(self.logits.device)
        self.logits[idx, self.epoch % slots] = logits.detach().float()
        if not self.active():
            return None
        past = self.logits[idx, (self.epoch - self.epochs_ago) % slots]
        return self.coef * trajectory_kl(logits, past, self.temperature)

    def extra_bytes(self) -> int:
        return tensor_bytes([self.logits])

    def _extra_state(self) -> dict:
        return {"logits": self.logits}

    def _load_extra_state(self, extra: dict) -> None:
        saved = extra.get("logits")
        self.logits = saved.to(self._device) if saved is not None else None


class MESA(_Trajectory):
    def __init__(self, params, base_optimizer, ema_decay: float = 0.9998, **kwargs):
        if not 0 < ema_decay < 1:
            raise ValueError(f"optimizer.ema_decay={ema_decay!r} is not allowed: expected a value in (0, 1)")
        kwargs.setdefault("coef", 0.3)
        super().__init__(params, base_optimizer, **kwargs)
        self.ema_decay = ema_decay
        self.ema: Optional[torch.nn.Module] = None

    def prepare(self, model, loader, epochs: int) -> None:
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.ema(x)

    def extra_loss(self, logits: torch.Tensor, x: torch.Tensor, idx) -> Optional[torch.Tensor]:
        if not self.active():
            return None
        return self.coef * trajectory_kl(logits, self._reference(x), self.temperature)

    @torch.no_grad()
    def after_step(self, model) -> None:
        """ema ← d·ema + (1 − d)·model over parameters and buffers (integer buffers copied)."""
        for e, m in zip(self.ema.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.mul_(self.ema_decay).add_(m.detach(), alpha=1 - self.ema_decay)
            else:
                e.copy_(m)

    def extra_bytes(self) -> int:
        return module_bytes(self.ema) if self.ema is not None else 0

    def _extra_state(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def _load_extra_state(self, extra: dict) -> None:
        if extra.get("ema") is not None and self.ema is not None:
            self.ema.load_state_dict(extra["ema"])


@dataclass
class TrajectoryParams(HParams):
    """Weight, temperature and epoch window (start < epoch < end, 0-based; null: to the end) of the KL term."""

    method: ClassVar[str] = ""
    traj_coef: float = 0.16
    traj_temperature: float = 5.0
    traj_start_epoch: int = 5
    traj_end_epoch: Optional[int] = None

    def check(self) -> None:
        _check(self.traj_coef >= 0, "optimizer.traj_coef", self.traj_coef, "a number >= 0")
        _finite_positive("optimizer.traj_temperature", self.traj_temperature)

    def check_run(self, train: Any) -> None:
        # the term is on in epochs start < epoch < end (0-based): a window past the run's end would train plain
        # Adam under SAF's or MESA's name
        start, end = self.traj_start_epoch, self.traj_end_epoch
        _check(start + 1 < train.epochs, "optimizer.traj_start_epoch", start,
               f"an epoch below train.epochs - 1 = {train.epochs - 1} (the {self.method} term is on from "
               f"epoch traj_start_epoch + 1, 0-based)")
        _check(end is None or end > start + 1, "optimizer.traj_end_epoch", end,
               f"null or above traj_start_epoch + 1 = {start + 1} (the term is on in start < epoch < end)")


@dataclass
class SAFParams(TrajectoryParams):
    method: ClassVar[str] = "saf"
    # the outputs of saf_epochs_ago epochs ago
    saf_epochs_ago: int = 3

    def check(self) -> None:
        super().check()
        _check(self.saf_epochs_ago >= 1, "optimizer.saf_epochs_ago", self.saf_epochs_ago, "an integer >= 1")

    def check_run(self, train: Any) -> None:
        super().check_run(train)
        # SAF's first active epoch reads the logits of saf_epochs_ago epochs before it: they must exist
        start = self.traj_start_epoch
        _check(start + 1 >= self.saf_epochs_ago, "optimizer.traj_start_epoch", start,
               f"at least saf_epochs_ago - 1 = {self.saf_epochs_ago - 1} (SAF compares with the logits of "
               f"{self.saf_epochs_ago} epochs before its first active epoch)")


@dataclass
class MESAParams(TrajectoryParams):
    method: ClassVar[str] = "mesa"
    # an EMA model with this decay per step
    ema_decay: float = 0.9998

    def check(self) -> None:
        super().check()
        _check(0 < self.ema_decay < 1, "optimizer.ema_decay", self.ema_decay, "a value in (0, 1)")


_TRAJ = {"coef": "traj_coef", "temperature": "traj_temperature", "start_epoch": "traj_start_epoch",
         "end_epoch": "traj_end_epoch"}
register_optimizer(OptimInfo("saf", SAF, {**_TRAJ, "epochs_ago": "saf_epochs_ago"}, sharpness_aware=True,
                             description="SAF (Du et al. 2022): KL to the outputs of E epochs ago", hparams=SAFParams))
register_optimizer(OptimInfo("mesa", MESA, {**_TRAJ, "ema_decay": "ema_decay"}, sharpness_aware=True,
                             description="MESA (Du et al. 2022): KL to an EMA model's outputs", hparams=MESAParams))
