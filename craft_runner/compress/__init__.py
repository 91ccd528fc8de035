"""Compression methods behind one entry point, :func:`apply_compression`.

Each method takes the model (changed in place), the layers it may touch and a
:class:`CompressContext`, and returns a dict of what it did (recorded in results.json).

- ``ptq``: BasePTQ or PTQ4ViT (:mod:`.quant`, :mod:`.ptq4vit`), optionally followed by
  fine-tuning with the weights kept quantized;
- ``prune``: magnitude or Wanda, unstructured or N:M, one-shot or iterative (:mod:`.prune`);
- ``qat``: PACT quantization-aware training (:mod:`.qat`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from craft_runner.compress.config import CompressConfig

log = logging.getLogger(__name__)


@dataclass
class CompressContext:
    device: torch.device
    calib_batches: list = field(default_factory=list)
    # Fine-tunes the model for a number of epochs with the run's optimizer and data.
    fine_tune: Optional[Callable[[nn.Module, int], None]] = None


def target_layers(model: nn.Module, skip_first_last: bool) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers in module order; optionally without the stem and the classifier."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if skip_first_last and len(layers) > 2:
        head = model.get_classifier() if hasattr(model, "get_classifier") else layers[-1][1]
        layers = [(n, m) for n, m in layers[1:] if m is not head]
    return layers


def check_compression(model: nn.Module, cfg: CompressConfig) -> None:
    """What can be checked against the built model before training: N:M groups must fit every layer."""
    if cfg.name == "prune" and cfg.pattern == "nm":
        from craft_runner.compress.prune import _nm_prunable

        _nm_prunable(target_layers(model, cfg.skip_first_last), cfg)


def apply_compression(model: nn.Module, cfg: CompressConfig, ctx: CompressContext) -> dict:
    """Compress ``model`` in place as ``cfg`` says; returns a JSON-serialisable record."""
    if cfg.name == "none":
        return {}
    layers = target_layers(model, cfg.skip_first_last)
    if cfg.name == "ptq":
        from craft_runner.compress.quant import base_ptq, fine_tune_quantized

        if cfg.method == "ptq4vit":
            from craft_runner.compress.ptq4vit import ptq4vit

            info, scales = ptq4vit(model, layers, cfg, ctx.calib_batches)
        else:
            info, scales = base_ptq(model, layers, cfg, ctx.calib_batches)
        if cfg.finetune_epochs:
            fine_tune_quantized(model, layers, cfg.w_bits, cfg.finetune_epochs, ctx.fine_tune, scales)
        return {**info, "name": "ptq", "finetune_epochs": cfg.finetune_epochs}
    if cfg.name == "prune":
        from craft_runner.compress.prune import prune_model

        return {"name": "prune", **prune_model(model, layers, cfg, ctx)}
    if cfg.name == "qat":
        from craft_runner.compress.qat import pact_qat

        return {"name": "qat", **pact_qat(model, layers, cfg, ctx)}
    raise ValueError(f"compress.name={cfg.name!r} is not implemented")
