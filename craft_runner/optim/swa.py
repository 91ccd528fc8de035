"""Stochastic weight averaging (Izmailov et al. 2018) as a flatness baseline, on torch.optim.swa_utils.

The base optimizer trains as usual under the run's learning-rate schedule; from epoch
⌈``swa_start`` · epochs⌉ on (0.75 of the run by default) the weights at the end of every epoch enter an
equal-weight running average (``AveragedModel``). After the last epoch the averaged weights replace the
model's and its BatchNorm statistics are recomputed on the training data (``update_bn``), so that λmax,
compression, evaluation and the cache all see the averaged model. The house's choice: the run's own schedule
(cosine by default) rather than SWALR's constant or cyclic rate, so that SWA changes nothing but the averaging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from craft_runner.optim.registry import HParams, OptimInfo, register_optimizer
from craft_runner.optim.wrapped import Wrapped, module_bytes
from craft_runner.schema import _check


class SWA(Wrapped):
    def __init__(self, params, base_optimizer, swa_start: float = 0.75, **base_kwargs):
        if not 0 <= swa_start < 1:
            raise ValueError(f"optimizer.swa_start={swa_start!r} is not allowed: expected a fraction in [0, 1)")
        super().__init__(params, base_optimizer, **base_kwargs)
        self.swa_start = swa_start
        self.averaged: Optional[AveragedModel] = None
        self.start_epoch = 0

    def prepare(self, model, loader, epochs: int) -> None:
        self.averaged = AveragedModel(model, use_buffers=False)
        self.start_epoch = math.ceil(self.swa_start * epochs)

    def end_epoch(self, model, epoch: int) -> None:
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(model)

    @torch.no_grad()
    def finish(self, model, loader) -> None:
        if self.averaged is None or int(self.averaged.n_averaged) == 0:
            return
        for p, a in zip(model.parameters(), self.averaged.module.parameters()):
            p.copy_(a)
        device = next(model.parameters()).device
        update_bn(((b[0].to(device),) for b in loader), model)

    def extra_bytes(self) -> int:
        return module_bytes(self.averaged.module) if self.averaged is not None else 0

    def _extra_state(self) -> dict:
        return {"averaged": self.averaged.state_dict() if self.averaged is not None else None}

    def _load_extra_state(self, extra: dict) -> None:
        if extra.get("averaged") is not None and self.averaged is not None:
            self.averaged.load_state_dict(extra["averaged"])


@dataclass
class SWAParams(HParams):
    # averaging starts at this fraction of the epochs
    swa_start: float = 0.75

    def check(self) -> None:
        _check(0 <= self.swa_start < 1, "optimizer.swa_start", self.swa_start, "a fraction in [0, 1)")


register_optimizer(OptimInfo("swa", SWA, {"swa_start": "swa_start"}, sharpness_aware=True,
                             description="stochastic weight averaging", hparams=SWAParams))
