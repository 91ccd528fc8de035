"""The export formats: fp32, int8 (calibrated or with the cell's searched scales) and int4 MatMulNBits.

Each ``fn(job) -> dict`` writes ``job.artifact`` from ``job.fp32_path`` (the float ONNX file of the
deployable model) and returns what it did; :func:`craft_runner.export.export_cell` measures the rest.
int8 is ONNX Runtime's fast x86 form: static QDQ, per-channel symmetric int8 weights and asymmetric
uint8 activations (U8S8), so that ReLU folds into a zero point of 0 and every Conv becomes QLinearConv.
"""

from __future__ import annotations

import logging

import numpy as np
from torch import nn

from craft_runner.atomic import atomic_path
from craft_runner.export.onnx_io import CalibrationReader, module_scope
from craft_runner.export.registry import register_format

log = logging.getLogger(__name__)

# A format's status when the model has no layer it converts: the artifact would be the fp32 file again.
NOTHING_TO_PACK = "nothing to pack"


@register_format("onnx_fp32")
def onnx_fp32(job) -> dict:
    job.artifact = job.fp32_path
    return {}


# quantize_static's root-logger warnings that say nothing about this export: its advice to pre-process
# (BatchNorm is folded before export; it infers shapes itself), and per-channel axis 1 on a 1-D LayerNorm
# weight (that weight is then quantized per tensor, as intended).
_BENIGN = ("pre-processing before quantization", "is out-of-range for weight")


def _not_benign(record: logging.LogRecord) -> bool:
    return not any(m in record.getMessage() for m in _BENIGN)


def _quantize_int8(job, overrides: dict | None = None, op_types=None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    root = logging.getLogger()
    root.addFilter(_not_benign)
    try:
        with atomic_path(job.artifact) as tmp:
            quantize_static(str(job.fp32_path), str(tmp), CalibrationReader(job.calib),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=op_types, extra_options=extra)
    finally:
        root.removeFilter(_not_benign)


@register_format("onnx_int8")
def onnx_int8(job) -> dict:
    job.artifact = job.out_dir / "model_int8.onnx"
    _quantize_int8(job)
    return {"weights": "int8 per output channel, symmetric", "activations": "uint8 per tensor, calibrated min/max",
            "quant_format": "QDQ"}


def _searched_scales(model: nn.Module) -> dict[str, tuple[float, int, str]]:
    """{module name: (scale, n_bits, kind)} of every per-tensor input quantizer of the simulated model."""
    from craft_runner.compress.qat import PACT
    from craft_runner.compress.quant import ActQuantizer, UniformQuantizer, symmetric_scale

    out = {}
    for name, m in model.named_modules():
        q = getattr(m, "input_quantizer", None)
        if isinstance(q, UniformQuantizer) and q.scale.numel() == 1:
            out[name] = (q.scale.item(), q.n_bits, "input")
        elif isinstance(q, ActQuantizer) and q.keep_dim is None:
            out[name] = (symmetric_scale(q.max_abs, q.n_bits).item(), q.n_bits, "input")
        elif q is not None:
            out[name] = (None, getattr(q, "n_bits", None), type(q).__name__)
        if isinstance(m, PACT):
            out[name] = (m.alpha.item() / (2 ** m.n_bits - 1), m.n_bits, "pact")
    return out


@register_format("onnx_int8_searched")
def onnx_int8_searched(job) -> dict:
    """onnx_int8 with the simulated model's activation scales in place of calibrated ones (one per tensor)."""
    import onnx

    job.artifact = job.out_dir / "model_int8_searched.onnx"
    graph = onnx.load(str(job.fp32_path)).graph
    scales = _searched_scales(job.simulated)
    positive = {o for n in graph.node if n.op_type in ("Relu", "Clip") for o in n.output}
    overrides, owner, not_carried = {}, {}, []
    for name, (scale, bits, kind) in scales.items():
        scope = module_scope(name)
        if scale is None:
            not_carried.append(f"{name}: {kind} (not one scale per tensor)")
            continue
        if kind == "pact":  # the clip's output: unsigned, zero point 0, PACT's own grid
            tensors = [o for n in graph.node if n.name.startswith(scope) for o in n.output][:1]
            zp = 0
        else:
            tensors = [n.input[0] for n in graph.node if n.name.startswith(scope)
                       and n.op_type in ("Conv", "Gemm", "MatMul")][:1]
            zp = None
        if not tensors:
            not_carried.append(f"{name}: no ONNX node found")
            continue
        t = tensors[0]
        if t in owner:
            not_carried.append(f"{name}: shares its input tensor with {owner[t]}, whose scale is used")
            continue
        if zp is None:
            # A symmetric int8 grid is uint8 with zero point 128, exactly; a ReLU output keeps zero point 0
            # (the same step, the range to 255·s instead of 127·s) so that the ReLU fuses.
            zp = 0 if t in positive else 2 ** (bits - 1)
            if zp == 0:
                not_carried.append(f"{name}: non-negative input, clipped at 255·s instead of 127·s")
        owner[t] = name
        overrides[t] = [{"scale": np.array(scale, np.float32), "zero_point": np.array(zp, np.uint8)}]
    _quantize_int8(job, overrides)
    carried = set(overrides)
    q_inputs = {n.input[0] for n in onnx.load(str(job.artifact)).graph.node if n.op_type == "QuantizeLinear"}
    extra = sorted(t for t in q_inputs - carried if t not in {i.name for i in graph.initializer})
    not_carried.append("weight scales: re-derived per output channel from the BN-folded weights")
    if extra:
        not_carried.append(f"{len(extra)} tensors the simulation keeps float are quantized with calibrated scales "
                           f"(e.g. {extra[0]})")
    log.info("onnx_int8_searched: %d searched activation scales injected, %d items not carried over",
             len(overrides), len(not_carried))
    return {"weights": "int8 per output channel, symmetric", "activations": "uint8, the searched scales",
            "quant_format": "QDQ", "injected_scales": len(overrides), "not_carried": not_carried}


def _given_grids(model: nn.Module) -> dict[str, tuple]:
    """{module name: (scale, zero) as (out, groups) arrays} of every Linear whose compressor left its integer grid
    on it (GPTQ's ``gptq_scale`` / ``gptq_zero``)."""
    return {name: (m.gptq_scale.detach().float().cpu().numpy(), m.gptq_zero.detach().float().cpu().numpy())
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m, "gptq_scale") and hasattr(m, "gptq_zero")}


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit codes along the last dim into bytes, the first of each pair in the low nibble (MatMulNBits')."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], -1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _matmul_nbits_from_grids(model, grids: dict, block: int) -> tuple[int, list]:
    """Replace each MatMul / Gemm of a module in ``grids`` by MatMulNBits carrying that module's own codes, scales
    and zero points (q = round(w/scale) + zero, dequantized as scale·(q − zero) by ORT as by the compressor).
    Returns (nodes replaced, what was left float and why)."""
    from onnx import helper, numpy_helper

    from craft_runner.export.onnx_io import module_scope

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced, left = 0, []
    for name, (scale, zero) in grids.items():
        scope = module_scope(name)
        nodes = [n for n in graph.node if n.name.startswith(scope) and n.op_type in ("MatMul", "Gemm")]
        node = next((n for n in nodes if len(n.input) > 1 and n.input[1] in inits), None)
        if node is None:
            left.append(f"{name}: no MatMul/Gemm with a constant weight found")
            continue
        B = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            left.append(f"{name}: a Gemm with transA/alpha/beta")
            continue
        W = B if node.op_type == "Gemm" and attrs.get("transB", 0) else B.T  # (N, K)
        N, K = W.shape
        groups = scale.shape[1]
        if K % block or K // block != groups:
            left.append(f"{name}: {K} inputs are not {groups} blocks of {block}")
            continue
        s = scale.reshape(N, groups, 1)
        z = zero.reshape(N, groups, 1)
        codes = np.rint(W.reshape(N, groups, block) / s) + z
        if codes.min() < 0 or codes.max() > 15 or np.abs((codes - z) * s - W.reshape(N, groups, block)).max() > \
                1e-4 * max(np.abs(W).max(), 1e-12):
            left.append(f"{name}: the exported weight is not on the grid the compressor left")
            continue
        prefix = f"{name}.nbits"
        new_inits = [numpy_helper.from_array(_pack_nibbles(codes.astype(np.uint8)), f"{prefix}.B"),
                     numpy_helper.from_array(scale.reshape(-1).astype(np.float32), f"{prefix}.scales"),
                     numpy_helper.from_array(_pack_nibbles(zero.astype(np.uint8)).reshape(-1), f"{prefix}.zp")]
        out = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        mm_out = f"{prefix}.out" if has_bias else out
        new = [helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in new_inits)], [mm_out],
                                name=f"{node.name}_nbits", domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=block)]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_bias"))
        idx = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate(new):
            graph.node.insert(idx + k, n)
        graph.initializer.extend(new_inits)
        replaced += 1
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)  # the float weights now replaced
    return replaced, left


@register_format("onnx_int4")
def onnx_int4(job) -> dict:
    """MatMulNBits (4-bit weights in blocks, float activations) for every MatMul; Conv as ``int4_conv`` says.
    Linears whose compressor left its own 4-bit grid (GPTQ with compress.group_size = export.block_size) carry
    that grid's codes, scales and zero points; the others are quantized by ORT's symmetric MatMulNBitsQuantizer."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = job.fp32_path
    if job.cfg.int4_conv == "int8":
        job.artifact = job.out_dir / "model_conv_int8.onnx"
        _quantize_int8(job, op_types=["Conv"])
        src = job.artifact
    job.artifact = job.out_dir / "model_int4.onnx"
    grids = _given_grids(job.simulated)
    if grids:
        model = onnx.load(str(src))
        replaced, left = _matmul_nbits_from_grids(model, grids, job.cfg.block_size)
        onnx.save(model, str(job.artifact))
        ops = [n.op_type for n in model.graph.node]
        log.info("onnx_int4: %d MatMulNBits from the compressor's own grids, %d left float", replaced, len(left))
        return {"weights": f"int4 MatMulNBits, blocks of {job.cfg.block_size}, the compressor's asymmetric grids "
                           f"(codes, scales, zero points)", "activations": "float", "block_size": job.cfg.block_size,
                "conv": job.cfg.int4_conv, "matmul_nbits": ops.count("MatMulNBits"), "given_grids": replaced,
                "not_carried": left, "float_matmul_left": ops.count("MatMul") + ops.count("Gemm")}
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=job.cfg.block_size, is_symmetric=True)
    chatty = logging.getLogger(MatMulNBitsQuantizer.__module__)  # one INFO line per node it leaves alone
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        q.process()
    finally:
        chatty.setLevel(level)
    with atomic_path(job.artifact) as tmp:
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
    ops = [n.op_type for n in onnx.load(str(job.artifact)).graph.node]
    if ops.count("MatMulNBits") == 0 and job.cfg.int4_conv != "int8":
        return {"status": NOTHING_TO_PACK,
                "reason": "nothing to pack: every layer stayed fp32 (no MatMul/Gemm with a constant 2-D weight "
                          "for MatMulNBits, and export.int4_conv=fp32 keeps the Conv layers float)"}
    return {"weights": f"int4 MatMulNBits, blocks of {job.cfg.block_size}, symmetric", "activations": "float",
            "block_size": job.cfg.block_size, "conv": job.cfg.int4_conv, "matmul_nbits": ops.count("MatMulNBits"),
            "float_matmul_left": ops.count("MatMul") + ops.count("Gemm")}
