"""Momentum-SAM (Becker et al. 2024): the SAM perturbation taken along the negative momentum, no extra pass.

As the authors' code (MarlonBecker/MSAM, ``optimizer/msam.py`` and ``adamW_msam.py``) does: during an
epoch the weights sit at the perturbed point w̃ = w − ρ·m/‖m‖, with m the base optimizer's momentum
(SGD's ``momentum_buffer``, Adam's first moment ``exp_avg``, not bias-corrected) and ‖m‖ the global norm
over all parameters; the gradient of the step is taken at w̃. A step moves back to w (with the m and ‖m‖ of
the previous step), takes the base step there, then moves to w − ρ·m'/‖m'‖ with the updated momentum.
The perturbation is removed at every epoch's end (checkpoints, evaluation and the cache hold w) and put
back at the next epoch's start, and after the last epoch one forward-only pass over the training data in
train mode recomputes the BatchNorm statistics (gathered at perturbed weights during training), as the
authors' ``main.py`` does.

Differences from the authors' code, all of order lr·ρ·wd or below: their SGD variant adds the coupled
weight decay of the perturbed weights, their AdamW variant decays after the Adam update; here the base
optimizer (torch's) steps at w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from craft_runner.optim.registry import HParams, OptimInfo, _finite_positive, register_optimizer
from craft_runner.optim.wrapped import Wrapped

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # Adam/AdamW, SGD


class MomentumSAM(Wrapped):
    def __init__(self, params, base_optimizer, rho: float = 1.0, **base_kwargs):
        if not rho > 0:
            raise ValueError(f"optimizer.rho={rho!r} is not allowed for msam: expected a number > 0")
        if base_optimizer is torch.optim.SGD and not base_kwargs.get("momentum", 0) > 0:
            raise ValueError("optimizer=msam perturbs along the momentum: optimizer.momentum must be > 0 with base sgd")
        super().__init__(params, base_optimizer, **base_kwargs)
        self.rho = rho
        # ρ/‖m‖ of the perturbation the weights hold (while perturbed): a 0-dim tensor on the parameters' device,
        # never read on the host (no sync per step); None before the first step
        self.scale: torch.Tensor | None = None
        self.perturbed = False

    def _momenta(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for p in self.params():
            st = self.base_optimizer.state.get(p, {})
            m = next((st[k] for k in MOMENTUM_KEYS if isinstance(st.get(k), torch.Tensor)), None)
            if m is not None:
                out.append((p, m))
        return out

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        pairs = self._momenta()
        if pairs and self.scale is not None:
            step = torch._foreach_mul([m for _, m in pairs], self.scale * sign)
            torch._foreach_add_([p for p, _ in pairs], step)

    def move_up(self) -> None:
        """w → w − ρ·m/‖m‖."""
        if not self.perturbed:
            self._shift(-1.0)
            self.perturbed = True

    def move_back(self) -> None:
        """w − ρ·m/‖m‖ → w."""
        if self.perturbed:
            self._shift(1.0)
            self.perturbed = False

    @torch.no_grad()
    def step(self, closure=None):
        was = self.perturbed
        self.move_back()
        loss = self.base_optimizer.step(closure)
        ms = [m for _, m in self._momenta()]
        if ms:
            norms = torch._foreach_norm(ms)
            if len({n.dtype for n in norms}) > 1:
                norms = [n.float() for n in norms]
            self.scale = self.rho / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-12)
        if was:
            self.move_up()
        return loss

    # ------------------------------------------------------------------ the training hooks

    def begin_epoch(self, model, epoch: int) -> None:
        self.move_up()

    def end_epoch(self, model, epoch: int) -> None:
        self.move_back()

    @torch.no_grad()
    def finish(self, model, loader) -> None:
        """One forward-only epoch in train mode: BatchNorm statistics of the unperturbed weights."""
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return
        was = model.training
        model.train()
        device = next(model.parameters()).device
        for batch in loader:
            model(batch[0].to(device))
        model.train(was)

    def extra_bytes(self) -> int:
        return 0  # the base optimizer's momentum is the direction

    def _extra_state(self) -> dict:
        return {"scale": self.scale}

    def _load_extra_state(self, extra: dict) -> None:
        scale = extra.get("scale")
        # a checkpoint of an older version holds a float; 0.0 there meant "no perturbation yet"
        if scale is None or (not torch.is_tensor(scale) and not scale):
            self.scale = None
        else:
            device = next(iter(self.params()), torch.zeros(())).device
            self.scale = torch.as_tensor(scale, dtype=torch.float32).to(device)
        self.perturbed = False  # checkpoints hold w


@dataclass
class MSAMParams(HParams):
    # the same key as SAM's rho, so the same default; conf/optimizer/msam.yaml sets the authors' 1.0
    rho: float = 0.05

    def check(self) -> None:
        _finite_positive("optimizer.rho", self.rho)


register_optimizer(OptimInfo("msam", MomentumSAM, {"rho": "rho"}, sharpness_aware=True,
                             description="Momentum-SAM (Becker et al. 2024)", hparams=MSAMParams))
