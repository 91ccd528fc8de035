"""The float model that deploys, its ONNX file, ONNX Runtime sessions, latency and graph inspection.

The simulated model carries fake quantizers (forward pre-hooks, PACT clips, operand quantizers of
explicit attention matmuls) and pruning reparametrisations; :func:`deployable_copy` takes them out
(PACT's clip stays, as the float clip it computes) and folds every BatchNorm into the Conv before it,
so the exported graph is the float network whose weights the compressor chose.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.atomic import atomic_path
from craft_runner.compress.fold import fold_bn

log = logging.getLogger(__name__)


class Clip(nn.Module):
    """clip(x, lo, hi): a PACT quantizer without its rounding (exported as ONNX Clip)."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _strip_quantizers(model: nn.Module) -> None:
    from torch.nn.utils import prune as tprune

    from craft_runner.compress.attention import QuantMatMul
    from craft_runner.compress.qat import PACT, SignedPACT

    for m in list(model.modules()):
        if hasattr(m, "input_quantizer"):
            for key, hook in list(m._forward_pre_hooks.items()):
                if getattr(hook, "__name__", "") == "_quantize_input_hook":
                    del m._forward_pre_hooks[key]
            del m.input_quantizer
        if isinstance(m, QuantMatMul):
            m.quant_a, m.quant_b = nn.Identity(), nn.Identity()
        if hasattr(m, "weight_mask") and hasattr(m, "weight_orig"):
            tprune.remove(m, "weight")
        if parametrize.is_parametrized(m):
            for p in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, p, leave_parametrized=True)
    for name, m in list(model.named_modules()):
        if isinstance(m, PACT):
            _replace(model, name, Clip(0.0, m.alpha.item()))
        elif isinstance(m, SignedPACT):
            _replace(model, name, Clip(m.alpha_lo.item(), m.alpha_hi.item()))


def deployable_copy(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, dict]:
    """A CPU float32 copy without fake quantizers, BatchNorm folded; refuses a fold that changes outputs."""
    m = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    _strip_quantizers(m)
    return m, {"bn_folded": fold_bn(m, sample)}


def export_onnx(model: nn.Module, path: Path, sample: torch.Tensor, exporter: str, opset: int) -> Path:
    """``model`` as ONNX with a dynamic batch dimension (input ``input``, output ``logits``), written to a
    temporary file renamed once whole (a failed export leaves no truncated ``path``)."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (sample,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamo=True, opset_version=max(opset, 18), dynamic_shapes=({0: batch},),
                              verbose=False)
        else:
            torch.onnx.export(model, (sample,), str(tmp), input_names=["input"], output_names=["logits"],
                              dynamo=False, opset_version=opset, dynamic_axes={"input": {0: "batch"}})
        _unshare_vectors(tmp)
    return path


def _unshare_vectors(path: Path) -> int:
    """Give each node its own copy of a 1-D initializer that several nodes share. torch.onnx merges equal
    initializers — the all-zero biases and all-one norm weights of an untrained model — and ORT's quantizer
    leaves a Conv whose bias is shared in float. Returns how many copies were made."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    vectors = {i.name: i for i in graph.initializer if len(i.dims) == 1}
    seen: dict[str, int] = {}
    copies = []
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in vectors:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                t = onnx.TensorProto()
                t.CopyFrom(vectors[name])
                t.name = f"{name}__{seen[name]}"
                node.input[k] = t.name
                copies.append(t)
    if copies:
        graph.initializer.extend(copies)
        onnx.save(model, str(path))
    return len(copies)


def session(path: Path, threads: int, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is None:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with atomic_path(optimized_path) as tmp:  # ORT writes the optimised graph while it builds the session
        so.optimized_model_filepath = str(tmp)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {"input": x})[0]


def latency_ratio(real, fp32, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Median seconds per run of each session on ``x``, measured interleaved (one run of each per round)."""
    for _ in range(warmup):
        run(real, x), run(fp32, x)
    t_real, t_fp = [], []
    for _ in range(rounds):
        for sess, out in ((real, t_real), (fp32, t_fp)):
            t0 = time.perf_counter()
            run(sess, x)
            out.append(time.perf_counter() - t0)
    a, b = float(np.median(t_real)), float(np.median(t_fp))
    return {"ratio": a / b, "real_ms": 1e3 * a, "fp32_ms": 1e3 * b}


def op_counts(path: Path) -> dict:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


class CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over the cell's calibration images."""

    def __init__(self, batches: list[np.ndarray]):
        self._it = iter([{"input": b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def module_scope(name: str) -> str:
    """The TorchScript exporter's node-name prefix of module ``name`` ("layer1.0.conv1" →
    "/layer1/layer1.0/conv1/"): an index joins its container's name."""
    parts, out = name.split("."), []
    for i, p in enumerate(parts):
        out.append(f"{parts[i - 1]}.{p}" if p.isdigit() and i else p)
    return "/" + "/".join(out) + "/"
