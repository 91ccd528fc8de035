"""The ``export`` schema and the checks of an export against the cell's compression, before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from craft_runner.compress.registry import capabilities
from craft_runner.schema import ConfigError, _check, _check_choice

FULL_PRECISION_BITS = 16


@dataclass
class ExportConfig:
    """A real artifact of the compressed model (``name``: the format; ``none``: no export)."""

    name: str = "none"
    # torchscript: torch.onnx's TorchScript exporter (fast; node names keep the module path, which
    # onnx_int8_searched needs); dynamo: torch.export + onnxscript.
    exporter: str = "torchscript"
    opset: int = 17
    # ONNX Runtime's intra-op threads for latency and accuracy. 1: a sweep runs cells side by side on
    # shared cores, and one thread makes the ratio a property of the kernels, not of the scheduler.
    threads: int = 1
    # Latency: warm-up runs, then this many interleaved rounds (one run of each model per round), median.
    latency_warmup: int = 5
    latency_rounds: int = 30
    # onnx_int4: MatMulNBits block size (a power of 2 >= 16) and what Conv layers become (fp32 or int8).
    block_size: int = 32
    int4_conv: str = "fp32"
    # The artifact also stored zip-compressed (deflate), its bytes the ones reported. auto: for pruning cells.
    compressed_storage: str = "auto"

    def __post_init__(self):
        from craft_runner.export.registry import format_names

        _check_choice("export.name", self.name, format_names())
        _check_choice("export.exporter", self.exporter, ("torchscript", "dynamo"))
        _check(13 <= self.opset <= 21, "export.opset", self.opset, "an integer in 13..21")
        _check(self.threads >= 1, "export.threads", self.threads, "an integer >= 1")
        _check(self.latency_warmup >= 0, "export.latency_warmup", self.latency_warmup, "an integer >= 0")
        _check(self.latency_rounds >= 1, "export.latency_rounds", self.latency_rounds, "an integer >= 1")
        bs = self.block_size
        _check(bs >= 16 and bs & (bs - 1) == 0, "export.block_size", bs, "a power of 2 >= 16 (MatMulNBits)")
        _check_choice("export.int4_conv", self.int4_conv, ("fp32", "int8"))
        _check_choice("export.compressed_storage", self.compressed_storage, ("auto", "true", "false"))
        _check(self.name != "onnx_int8_searched" or self.exporter == "torchscript", "export.exporter",
               self.exporter, "torchscript with export=onnx_int8_searched (its node names locate the scales)")


def _bits(compress) -> tuple[int, int]:
    w = getattr(compress, "w_bits", FULL_PRECISION_BITS)
    a = getattr(compress, "a_bits", FULL_PRECISION_BITS)
    return w, a


def simulated_only(export: ExportConfig, compress) -> Optional[str]:
    """Why the cell's compression has no real kernel in ``export``'s format (None: it has one)."""
    if export.name == "none":
        return None
    caps = capabilities(getattr(compress, "name", "none"))
    w, a = _bits(compress)
    reason = caps.no_kernel(compress) if caps.no_kernel is not None else None
    if reason is not None:
        return reason
    if a < FULL_PRECISION_BITS and a != 8:
        return f"{a}-bit activations have no ONNX Runtime kernel (uint8 only)"
    if export.name == "onnx_int4" and a < FULL_PRECISION_BITS:
        return f"MatMulNBits keeps activations in float: the A{a} cell has no int4 kernel (export=onnx_int8 for A8)"
    if export.name == "onnx_int4":
        if w < FULL_PRECISION_BITS and w != 4:
            return f"W{w} weights are not MatMulNBits' 4-bit ones"
        group = getattr(compress, "group_size", None)
        if caps.quantizes and group is not None and w < FULL_PRECISION_BITS and group != export.block_size:
            return (f"the weights' grids are per {'output channel' if not group else f'{group} columns'}, not "
                    f"MatMulNBits' blocks of export.block_size={export.block_size} (set compress.group_size="
                    f"{export.block_size})")
        return None
    if w < FULL_PRECISION_BITS and w != 8:
        return f"W{w} weights have no int8 ONNX Runtime kernel of that width (export=onnx_int4 for W4)"
    return None


def check_export(export: ExportConfig, compress, model=None) -> None:
    """Combinations that cannot be exported at all: a one-line ConfigError before any training."""
    if export.name == "none":
        return
    name = getattr(compress, "name", "none")
    caps = capabilities(name)
    if caps.changes_tokens:
        raise ConfigError(f"export={export.name} is not allowed with compress={name}: it changes the number of "
                          f"tokens inside the graph, which the exported model does not")
    if caps.exports is not None and export.name not in caps.exports:
        raise ConfigError(f"export={export.name} is not allowed with compress={name}: it exports to "
                          f"{', '.join(caps.exports) or 'no format'}")
    if export.name == "onnx_int8_searched":
        _check(caps.injects_scales and _bits(compress)[1] < FULL_PRECISION_BITS, "export", export.name,
               "a quantizer with quantized activations (a compressor that declares injectable scales, e.g. "
               "compress=ptq or qat): onnx_int8_searched injects its activation scales; onnx_int8 calibrates its "
               "own")
    if export.name == "onnx_int4" and model is not None:
        from torch import nn

        _check(any(isinstance(m, nn.Linear) for m in model.modules()), "export", export.name,
               "a model with Linear layers (MatMulNBits quantizes MatMul only)")
