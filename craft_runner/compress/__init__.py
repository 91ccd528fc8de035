"""Compression methods behind one entry point, :func:`apply_compression`.

Methods are looked up by name in the compressor registry (:mod:`.registry`); each takes the model
(changed in place), the layers it may touch and a :class:`CompressContext`, and returns a dict of what
it did (recorded in results.json under ``compression``):

- ``ptq``: BasePTQ or PTQ4ViT (:mod:`.quant`, :mod:`.ptq4vit`), optionally followed by fine-tuning with
  the weights kept quantized;
- ``prune``: magnitude or Wanda, unstructured or N:M, one-shot or iterative (:mod:`.prune`);
- ``qat``: PACT quantization-aware training (:mod:`.qat`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from craft_runner.compress.prune import PruneConfig
from craft_runner.compress.qat import QATConfig
from craft_runner.compress.quant import PTQConfig
from craft_runner.compress.registry import (
    CompressConfig,
    compressors,
    get_compressor,
    register_compressor,
    target_layers,
)
from craft_runner.device import full_fp32

__all__ = ["CompressContext", "CompressConfig", "PTQConfig", "PruneConfig", "QATConfig", "apply_compression",
           "check_compression", "compression_label", "compressors", "get_compressor", "register_compressor",
           "target_layers"]


@dataclass
class CompressContext:
    device: torch.device
    calib_batches: list = field(default_factory=list)
    # Fine-tunes the model for a number of epochs with the run's optimizer and data.
    fine_tune: Optional[Callable[[nn.Module, int], None]] = None
    # Long searches (PTQ) report each op: a bar on a terminal (None) or log lines only (False), as train.progress.
    progress: Optional[bool] = None


def _resolve(cfg: CompressConfig):
    info = get_compressor(cfg.name)
    if not isinstance(cfg, info.schema):
        raise TypeError(f"compress.name={cfg.name!r} needs a {info.schema.__name__}, got {type(cfg).__name__}")
    return info


def check_compression(model: nn.Module, cfg: CompressConfig) -> None:
    """Checks against the built model, before any training (e.g. N:M groups must fit every layer)."""
    info = _resolve(cfg)
    if info.check is not None:
        info.check(model, cfg)


def compression_label(cfg: dict) -> str:
    """The table label of a compress config (as a dict, e.g. from results.json)."""
    return get_compressor(cfg.get("name", "none")).label(cfg)


@full_fp32()  # searches and scores measured in float32, TF32 off (a fine-tuning inside sets train.tf32)
def apply_compression(model: nn.Module, cfg: CompressConfig, ctx: CompressContext) -> dict:
    """Compress ``model`` in place as ``cfg`` says; returns a JSON-serialisable record."""
    info = _resolve(cfg)
    if cfg.name == "none":
        return {}
    layers = target_layers(model, cfg.skip_first_last)
    return {"name": cfg.name, **info.fn(model, layers, cfg, ctx)}
