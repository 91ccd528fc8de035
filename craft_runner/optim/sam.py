"""The sharpness-aware family: SAM, ASAM, LookSAM and randomised SAM, each wrapping any base optimizer.

Notation: w the weights, g = ∇L(w) the gradient at w, ρ the radius, T an elementwise scale.

- SAM (Foret et al. 2021): e = ρ·g/‖g‖₂, update the base optimizer with g_s = ∇L(w + e).
- ASAM (Kwon et al. 2021, ``adaptive=True``): e = ρ·T²g/‖T g‖₂; the rest as SAM. T is chosen by
  ``asam_variant``: ``"kwon"`` (default; the authors' code, SamsungLabs/ASAM ``asam.py``) T = |w| + η on
  every parameter whose name contains ``weight`` (convolution, linear and normalisation weights) and T = 1
  on all others (biases; also RPReLU shifts/slopes, position embeddings, class tokens), η = ``eta``
  (0.01); ``"davda54"`` (davda54/sam, pytorch-optimizer's ``SAM(adaptive=True)``) T = |w| on every
  parameter, no η. The names come from the param groups' ``param_names`` (what torch.optim keeps when
  given ``model.named_parameters()``; :func:`craft_runner.optim.param_groups` sets them).
- LookSAM (Liu et al. 2022, Algorithm 1): a full SAM step every ``k`` steps (steps 0, k, 2k, ...), storing
  g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g, the part of g_s orthogonal to g; on the other steps no perturbation and
  no second pass, the base optimizer gets g + α·(‖g‖/‖g_v‖)·g_v. Norms and inner products are global
  (over all parameters), as in the paper.
- Randomised SAM (SS-SAM, Zhao et al. 2022): each step is a SAM step with probability ``p``, else a
  plain base step. The draw for step t is a pure function of (seed, t): resumable and identical on every
  rank of a data-parallel job.

Why not pytorch-optimizer's classes: its ``SAM`` (and ``adaptive=True``) computes the same update as
:class:`SAM` here (``tests/test_optim.py`` checks it), but the training loop needs three things its API
lacks: a per-step answer to "is there a second pass now?", a point between restoring the weights and
the base step where the final gradient can be clipped, and a LookSAM with global (not per-tensor)
decomposition, which is what the LookSAM paper writes (its ``LookSAM`` decomposes each parameter
tensor separately; also checked in the tests).

Protocol (what :func:`craft_runner.train.train_step` does; ``step(closure)`` does the same)::

    loss(w).backward()                       # g; under DDP *not* all-reduced when a second pass follows
    if opt.needs_second_pass_now():
        opt.first_step(zero_grad=True)       # w ← w + e(g); BN running stats frozen for the next pass
        loss(w + e).backward()               # g_s, all-reduced under DDP
    opt.unperturb()                          # w restored; .grad ← the gradient the base optimizer uses
    clip_grad_norm_(...)                     # optional, on that very gradient
    opt.second_step(zero_grad=True)          # base step, step counter + 1
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from craft_runner.optim.registry import HParams, OptimInfo, _finite_positive, register_optimizer
from craft_runner.schema import _check, _check_choice

ASAM_VARIANTS = ("kwon", "davda54")


def _flat_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖concat(tensors)‖₂ as a 0-dim tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def _flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SharpnessAware(torch.optim.Optimizer):
    """Base of the family: a wrapper that shares ``param_groups`` with the base optimizer it builds.

    The learning-rate scheduler must drive ``base_optimizer`` (the groups are the same dicts, so
    ``opt.param_groups[i]['lr']`` reads the scheduled value). ``state_dict`` is the base optimizer's
    plus a ``"sharpness_aware"`` entry (step counter and any stored ascent direction).
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, perturb_eps: float = 1e-12, eta: float = 0.01,
                 asam_variant: str = "kwon", **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if asam_variant not in ASAM_VARIANTS:
            raise ValueError(f"asam_variant must be one of {', '.join(ASAM_VARIANTS)}, got {asam_variant!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(params, {"rho": rho, "adaptive": adaptive, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.perturb_eps = perturb_eps
        # Not group keys: loading a checkpoint replaces the groups by the saved ones, which may predate them.
        self.eta, self.asam_variant = eta, asam_variant
        if asam_variant == "kwon" and any(g["adaptive"] and "param_names" not in g for g in self.param_groups):
            raise ValueError("asam_variant='kwon' tells weights (T = |w| + eta) from biases (T = 1) by name: "
                             "pass model.named_parameters() or groups with 'param_names', or use 'davda54'")
        self.steps = 0  # completed steps (base optimizer updates)
        self.second_passes = 0  # how many of them took a second forward-backward
        self._perturbed = False  # weights currently hold w + e
        self._second = False  # this step took a second pass
        self._composed = False  # .grad already holds the update gradient for this step

    # ----------------------------------------------------------------------------- the capability

    def needs_second_pass_now(self) -> bool:
        """Whether the coming step takes the gradient at perturbed weights (a second forward-backward)."""
        return True

    # ----------------------------------------------------------------------------- the step parts

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _scaled(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(params with T ≠ 1, their T, params with T = 1) among the group's parameters with a gradient."""
        ps = [p for p in group["params"] if p.grad is not None]
        if not group["adaptive"]:
            return [], [], ps
        if not ps:
            return [], [], []
        if self.asam_variant == "davda54":
            return ps, torch._foreach_abs(ps), []
        names = dict(zip(map(id, group["params"]), group["param_names"]))
        weights = [p for p in ps if "weight" in names[id(p)]]
        ts = torch._foreach_add(torch._foreach_abs(weights), self.eta) if weights else []
        return weights, ts, [p for p in ps if "weight" not in names[id(p)]]

    @torch.no_grad()
    def _perturbation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, e) for every parameter with a gradient: ρ·g/‖g‖ or, adaptive, ρ·T²g/‖Tg‖."""
        parts = []
        for group in self.param_groups:
            scaled, ts, plain = self._scaled(group)
            tg = torch._foreach_mul([p.grad for p in scaled], ts) if scaled else []  # T g
            parts.append((group, scaled, ts, tg, plain))
        norm = _flat_norm([t for *_, tg, _ in parts for t in tg]
                          + [p.grad for *_, plain in parts for p in plain]).add_(self.perturb_eps)
        out = []
        for group, scaled, ts, tg, plain in parts:
            if not scaled and not plain:
                continue
            scale = (group["rho"] / norm).to((scaled or plain)[0])
            if scaled:
                e = torch._foreach_mul(tg, ts)  # T² g
                torch._foreach_mul_(e, scale)
                out.extend(zip(scaled, e))
            if plain:
                out.extend(zip(plain, torch._foreach_mul([p.grad for p in plain], scale)))
        return out

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w ← w + e(g), keeping w to restore; call only when :meth:`needs_second_pass_now`."""
        pairs = self._perturbation()
        self._on_first_step()
        for p, _ in pairs:
            self.state[p]["old_p"] = p.detach().clone()
        if pairs:
            torch._foreach_add_([p for p, _ in pairs], [e for _, e in pairs])
        self._perturbed = self._second = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _on_first_step(self) -> None:
        """Hook: the gradient g at w is still in ``.grad`` (LookSAM stores it)."""

    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore w (if perturbed) and leave in ``.grad`` the gradient the base optimizer will use."""
        if self._composed:
            return
        if self._perturbed:
            for g in self.param_groups:
                for p in g["params"]:
                    old = self.state[p].pop("old_p", None)
                    if old is not None:
                        p.copy_(old)
            self._perturbed = False
        self._compose(self._second)
        self._composed = True

    def _compose(self, second_pass: bool) -> None:
        """Hook: turn ``.grad`` (g_s after a second pass, g otherwise) into the update gradient."""

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w if needed, then the base optimizer's step with the gradient now in ``.grad``."""
        self.unperturb()
        self.base_optimizer.step()
        self.steps += 1
        self.second_passes += int(self._second)
        self._second = self._composed = False
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Closure API (pytorch-optimizer / davda54 style): gradients at w must already be in ``.grad``."""
        if self.needs_second_pass_now():
            if closure is None:
                raise RuntimeError(f"{type(self).__name__} needs a closure that recomputes loss and gradients")
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                closure()
        self.second_step()

    # ----------------------------------------------------------------------------- checkpoints

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        sd = self.base_optimizer.state_dict()
        sd["sharpness_aware"] = {"steps": self.steps, "second_passes": self.second_passes, **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sharpness_aware", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.steps = int(extra.get("steps", 0))
        self.second_passes = int(extra.get("second_passes", 0))
        self._load_extra_state(extra)


class SAM(SharpnessAware):
    """SAM, or ASAM with ``adaptive=True``: every step takes the second pass."""


class LookSAM(SharpnessAware):
    """LookSAM (Liu et al. 2022): a SAM step every ``k`` steps, the stored g_v reused in between."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive: bool = False, **base_kwargs):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **base_kwargs)
        self.k, self.alpha = k, alpha
        self._g: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._gv: Optional[dict[torch.Tensor, torch.Tensor]] = None  # param -> g_v

    def needs_second_pass_now(self) -> bool:
        return self.steps % self.k == 0

    def _on_first_step(self) -> None:
        self._g = [(p, p.grad.detach().clone()) for p in self._params_with_grad()]

    def _compose(self, second_pass: bool) -> None:
        if second_pass:
            # g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g, over the parameters that had a gradient at w
            ps = [p for p, _ in self._g if p.grad is not None]
            g = [gi for p, gi in self._g if p.grad is not None]
            gs = [p.grad for p in ps]
            coef = _flat_dot(g, gs) / (_flat_dot(g, g) + self.perturb_eps)
            gv = torch._foreach_sub(gs, torch._foreach_mul(g, coef))
            if _distributed():  # each rank decomposed against its local g: use the mean, the same everywhere
                flat = torch.cat([t.flatten() for t in gv])
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                gv = list(torch.split(flat, [t.numel() for t in gv]))
                gv = [a.view_as(b) for a, b in zip(gv, gs)]
            self._gv = dict(zip(ps, gv))
            self._g = None
            return
        if not self._gv:
            return
        ps = [p for p in self._params_with_grad() if p in self._gv]
        if not ps:
            return
        g = [p.grad for p in ps]
        gv = [self._gv[p] for p in ps]
        scale = self.alpha * _flat_norm(g) / (_flat_norm(gv) + self.perturb_eps)
        torch._foreach_add_(g, torch._foreach_mul(gv, scale))

    def _extra_state(self) -> dict:
        if not self._gv:
            return {"gv": None}
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"gv": {index[p]: v for p, v in self._gv.items()}}

    def _load_extra_state(self, extra: dict) -> None:
        saved = extra.get("gv")
        if not saved:
            self._gv = None
            return
        params = [p for g in self.param_groups for p in g["params"]]
        self._gv = {params[int(i)]: v.to(params[int(i)]) for i, v in saved.items()}


class RandomSAM(SharpnessAware):
    """Randomised SAM (SS-SAM): a SAM step with probability ``p``, else a plain base step."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, p: float = 0.25, seed: int = 0,
                 adaptive: bool = False, **base_kwargs):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **base_kwargs)
        self.p, self.seed = p, seed

    @staticmethod
    def draw(seed: int, step: int) -> float:
        """A uniform number in [0, 1) that depends only on (seed, step)."""
        h = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2.0 ** 64

    def needs_second_pass_now(self) -> bool:
        return self.draw(self.seed, self.steps) < self.p


def expected_cost(opt: torch.optim.Optimizer) -> float:
    """Forward-backward passes per step on average (1 for a plain optimizer, 2 for SAM)."""
    if isinstance(opt, LookSAM):
        return 1.0 + 1.0 / opt.k
    if isinstance(opt, RandomSAM):
        return 1.0 + opt.p
    if isinstance(opt, SharpnessAware) or (hasattr(opt, "first_step") and hasattr(opt, "second_step")):
        return 2.0
    return 1.0


@dataclass
class SAMParams(HParams):
    rho: float = 0.05
    # ASAM's perturbation (e = rho T^2 g / ||T g||) for any SAM variant; asam sets it.
    adaptive: bool = False
    # ASAM's T: kwon = |w| + eta on weights, 1 on biases (SamsungLabs/ASAM); davda54 = |w| everywhere.
    asam_variant: str = "kwon"
    eta: float = 0.01

    def check(self) -> None:
        _finite_positive("optimizer.rho", self.rho)
        _check_choice("optimizer.asam_variant", self.asam_variant, ASAM_VARIANTS)
        _check(self.eta >= 0, "optimizer.eta", self.eta, "a number >= 0")


@dataclass
class LookSAMParams(SAMParams):
    # a full SAM step every k steps; alpha weighs the reused orthogonal direction g_v
    k: int = 5
    alpha: float = 0.7

    def check(self) -> None:
        super().check()
        _check(self.k >= 1, "optimizer.k", self.k, "an integer >= 1")
        _check(self.alpha >= 0, "optimizer.alpha", self.alpha, "a number >= 0")


@dataclass
class RandomSAMParams(SAMParams):
    # probability that a step is a SAM step; the draw for step t depends on (seed, t) only
    sam_prob: float = 0.25
    seed: int = 0

    def check(self) -> None:
        super().check()
        _check(0 <= self.sam_prob <= 1, "optimizer.sam_prob", self.sam_prob, "a value in [0, 1]")


_ASAM_T = {"eta": "eta", "asam_variant": "asam_variant"}  # used only when the perturbation is adaptive
_SAM = {"rho": "rho", "adaptive": "adaptive", **_ASAM_T}
register_optimizer(OptimInfo("sam", SAM, _SAM, sharpness_aware=True, description="SAM (Foret et al.)",
                             hparams=SAMParams))
register_optimizer(OptimInfo("asam", SAM, {"rho": "rho", **_ASAM_T}, {"adaptive": True}, sharpness_aware=True,
                             description="ASAM (Kwon et al.)", hparams=SAMParams))
register_optimizer(OptimInfo("looksam", LookSAM, {**_SAM, "k": "k", "alpha": "alpha"}, sharpness_aware=True,
                             description="LookSAM (Liu et al. 2022)", hparams=LookSAMParams))
register_optimizer(OptimInfo("randsam", RandomSAM, {**_SAM, "p": "sam_prob", "seed": "seed"}, sharpness_aware=True,
                             description="randomised SAM (SS-SAM)", hparams=RandomSAMParams))

__all__ = ["ASAM_VARIANTS", "SharpnessAware", "SAM", "LookSAM", "RandomSAM", "expected_cost"]
