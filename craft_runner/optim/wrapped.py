"""A wrapper optimizer sharing ``param_groups`` with the base optimizer it builds, and the training hooks.

The cheap flatness methods (Momentum-SAM, SAF, MESA, SWA) are not all optimizers: some add a loss term,
hold an EMA model or an averaged copy of the weights. Each is still one registered name, built as a
:class:`Wrapped` optimizer around ``optimizer.base``, and it tells the training loop what it needs through
optional methods, asked for by capability (:func:`hook`), never by name:

- ``prepare(model, loader, epochs)``: once, before a checkpoint is loaded (allocates buffers, EMA models)
- ``wants_indices``: the loader must yield ``(x, y, sample_index)``
- ``begin_epoch(model, epoch)`` / ``end_epoch(model, epoch)``: around each training epoch
- ``extra_loss(logits, x, idx)``: a term added to the loss of the (first) forward pass
- ``after_step(model)``: after each optimizer step
- ``finish(model, loader)``: once, after the last epoch (averaged weights swapped in, BN statistics)
- ``extra_bytes()``: memory held beyond the base optimizer's state
"""

from __future__ import annotations

import torch

HOOKS = ("prepare", "begin_epoch", "end_epoch", "extra_loss", "after_step", "finish", "extra_bytes")


def hook(opt, name: str):
    """The optimizer's hook ``name`` (a bound method), or None."""
    fn = getattr(opt, name, None)
    return fn if callable(fn) else None


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(list(module.state_dict().values()))


class Wrapped(torch.optim.Optimizer):
    """``step()`` is the base optimizer's; ``state_dict`` is the base's plus an ``"extra"`` entry."""

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], **base_kwargs):
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        return self.base_optimizer.step(closure)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        sd = self.base_optimizer.state_dict()
        sd["extra"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("extra", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self._load_extra_state(extra)

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]
