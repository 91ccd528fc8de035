"""The compressor registry: name → (schema dataclass, function, table label), one entry per method.

A method's module owns its schema and registers its function with :func:`register_compressor`; every
module of this package is imported on the first lookup, so a new compressor is one module plus one
``conf/compress/<option>.yaml`` (whose defaults list names ``<name>_schema``).

A compressor is ``fn(model, layers, cfg, ctx) -> dict``: it changes ``model`` in place (``layers``: the
Conv2d/Linear layers it may touch, see :func:`target_layers`) and returns what it
did, JSON-serialisable. ``label(cfg_dict) -> str`` names a configuration in tables ("W4A16", "wanda 50%").
``check(model, cfg)``, optional, runs against the built model before any training.
``caps`` (:class:`Capabilities`) says what the report and the export need to know of the method — its bits,
whether it zeroes weights, whether it changes the token count, what it can export — so that no code outside
this registry tests a compressor's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from torch import nn

from craft_runner.discovery import Registry
from craft_runner.schema import _check


@dataclass
class CompressConfig:
    """Fields shared by every compression method; ``name`` picks the method (``none``: no compression)."""

    name: str = "none"
    calib_size: int = 32  # training images used for calibration
    calib_seed: int = 0
    # Keep the stem and the classifier in full precision / dense.
    skip_first_last: bool = False
    # Recompute BatchNorm running statistics on this many training batches after compression (0: off,
    # as in both papers); see craft_runner.compress.bn.recalibrate_bn.
    bn_recalib: int = 0

    def __post_init__(self):
        _check(self.calib_size >= 1, "compress.calib_size", self.calib_size, "an integer >= 1")
        _check(self.bn_recalib >= 0, "compress.bn_recalib", self.bn_recalib, "an integer >= 0 (0: off)")


def check_bits(key: str, bits: int) -> None:
    _check(2 <= bits <= 32, key, bits, "an integer in 2..32 (16 or more: not quantized)")


def parse_bits(cfg) -> None:
    """``bits: WxAy`` (e.g. W6A16) overrides ``w_bits`` and ``a_bits``; both are then range-checked."""
    if cfg.bits is not None:
        m = re.fullmatch(r"W(\d+)A(\d+)", str(cfg.bits).upper())
        _check(m is not None, "compress.bits", cfg.bits, "the form WxAy, e.g. W8A8 or W4A16")
        cfg.w_bits, cfg.a_bits = int(m.group(1)), int(m.group(2))
    check_bits("compress.w_bits", cfg.w_bits)
    check_bits("compress.a_bits", cfg.a_bits)


@dataclass(frozen=True)
class Capabilities:
    """What a compressor is, as the report and the export read it (declared at registration)."""

    # Its config carries w_bits / a_bits (compress.bits=WxAy): a bit-width column of Tables 2/3, the export's
    # checks of which widths have a kernel.
    quantizes: bool = False
    # It zeroes weights: a sparsity column (Figure 4, SNT Figures 5/7), the artifact stored deflate-compressed.
    sparse: bool = False
    # It changes the number of tokens inside the graph (token pruning / merging): nothing exports it.
    changes_tokens: bool = False
    # Its activation quantizers hold one scale per tensor that export=onnx_int8_searched can inject.
    injects_scales: bool = False
    # The export formats it can produce; None: every registered one.
    exports: Optional[tuple] = None
    # Prefix of its columns in the papers' tables ("GPTQ" → "GPTQ W4A16"); "" for the papers' own methods.
    tag: str = ""
    # fn(cfg) → why this configuration has no real kernel in any export format (None: it has one).
    no_kernel: Optional[Callable] = None


@dataclass(frozen=True)
class CompressorInfo:
    name: str
    schema: type
    fn: Callable
    label: Callable[[dict], str]
    check: Optional[Callable] = None
    caps: Capabilities = Capabilities()


_REGISTRY: Registry[CompressorInfo] = Registry("compress.name", "compressor", __file__, __package__,
                                                same=lambda a, b: a.fn is b.fn)


def register_compressor(name: str, schema: type, label: Callable[[dict], str], check: Optional[Callable] = None,
                        caps: Capabilities = Capabilities()):
    """Decorator: register ``fn(model, layers, cfg, ctx) -> dict`` under ``name`` with its capabilities."""
    if not (isinstance(schema, type) and issubclass(schema, CompressConfig)):
        raise TypeError(f"compressor {name!r}: its schema must subclass CompressConfig, got {schema!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.register(name, CompressorInfo(name, schema, fn, label, check, caps))
        return fn

    return deco


def compressors() -> dict[str, CompressorInfo]:
    return _REGISTRY.entries()


def get_compressor(name: str) -> CompressorInfo:
    """The registered compressor, or a one-line ConfigError listing the known names."""
    return _REGISTRY.get(name)


def capabilities(name: Optional[str]) -> Capabilities:
    """A compressor's capabilities; a name nothing is registered under (results from another installation,
    ``none``) has none."""
    info = compressors().get(name or "none")
    return info.caps if info is not None else Capabilities()


def target_layers(model: nn.Module, skip_first_last: bool) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers in module order; optionally without the stem and the classifier."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if skip_first_last and len(layers) > 2:
        head = model.get_classifier() if hasattr(model, "get_classifier") else layers[-1][1]
        layers = [(n, m) for n, m in layers[1:] if m is not head]
    return layers


def _none(model, layers, cfg, ctx) -> dict:
    return {}


register_compressor("none", CompressConfig, label=lambda c: "none")(_none)
