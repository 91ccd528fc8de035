"""PTQ4ViT (Yuan et al., ECCV 2022): twin uniform quantization and Hessian-guided scale search.

What is quantized (W = w_bits, A = a_bits; 16 or more bits: left in float):

- every target Conv2d/Linear: weights symmetric uniform (one scale per output channel, or per
  layer with ``weight_granularity=tensor``), input symmetric uniform with one scale per tensor —
  except the input of an MLP's ``fc2`` that follows a GELU, which gets post-GELU twin uniform
  quantization (:func:`~craft_runner.compress.quant.twin_uniform_gelu`);
- with ``quant_attention``, both matmuls of every timm ViT attention (run as explicit matmuls):
  q·kᵀ with one scale per head for q and for kᵀ, attn·v with post-softmax twin uniform
  quantization of attn (:func:`~craft_runner.compress.quant.twin_uniform_softmax`) and one scale
  per head for v.

Scales are searched layer by layer on calibration data (``parallel`` calibration of the reference
code: every layer sees full-precision inputs). A scale's candidates are r · s₀, s₀ the max-based
scale and r in linspace(scale_min, scale_max, scale_steps + 1) ∪ {1}; the softmax twin searches
the shift m of Δ_R1 = Δ_R2/2^m in 0..max_softmax_shift. Weight and activation (or the two matmul
operands) are searched alternately for ``search_rounds`` rounds, each minimising the
Hessian-guided distance of the layer output O,

    E[ (∂L/∂O)² ⊙ (Ô − O)² ]

(the diagonal Gauss-Newton / Fisher approximation of the Hessian w.r.t. O), or plain E[(Ô − O)²]
with ``metric=mse``. Per-channel and per-head scales are chosen independently, since an output
channel (head) depends only on its own scale. ∂L/∂O is the gradient of the cross-entropy of the
full-precision model with the calibration labels (the argmax prediction when a batch has none):
the reference code's KL divergence to the full-precision prediction has zero gradient at the
full-precision model.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.compress.attention import make_attention_explicit
from craft_runner.compress.quant import (
    FULL_PRECISION_BITS,
    attach_input_quantizer,
    fake_quant,
    per_channel_scale,
    symmetric_scale,
    twin_uniform_gelu,
    twin_uniform_softmax,
)

log = logging.getLogger(__name__)


class UniformQuantizer(nn.Module):
    """Symmetric uniform fake quantizer with a fixed scale (broadcast against the input)."""

    def __init__(self, n_bits: int, scale: torch.Tensor):
        super().__init__()
        self.n_bits = n_bits
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x.float(), self.n_bits, self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, scale_shape={tuple(self.scale.shape)}"


class SoftmaxTwinQuantizer(nn.Module):
    def __init__(self, n_bits: int, shift: int):
        super().__init__()
        self.n_bits, self.shift = n_bits, int(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_uniform_softmax(x, self.n_bits, self.shift)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, shift={self.shift}"


class GeluTwinQuantizer(nn.Module):
    def __init__(self, n_bits: int, delta_pos: torch.Tensor):
        super().__init__()
        self.n_bits = n_bits
        self.register_buffer("delta_pos", delta_pos.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_uniform_gelu(x, self.n_bits, self.delta_pos)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"


# --------------------------------------------------------------------------- calibration data


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients (only activation gradients are wanted)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32, copy=True)


def capture(model: nn.Module, specs: list[tuple[nn.Module, int]], batches, need_grad: bool) -> dict:
    """For each (module, n_inputs) of ``specs``: its first n_inputs inputs, its output and (with
    ``need_grad``) ∂L/∂output over all calibration batches, concatenated along the batch dim, all in
    one pass per batch. L = summed cross-entropy with the batch labels."""
    store = {m: ([], [], []) for m, _ in specs}
    n_in = dict(specs)

    def hook(mod, args, out):
        ins, outs, grads = store[mod]
        # Copies: a later in-place op (ReLU(inplace=True)) must not change what was captured.
        ins.append(tuple(_copy(a) for a in args[:n_in[mod]]))
        outs.append(_copy(out))
        if need_grad:
            out.register_hook(lambda g: grads.append(_copy(g)))

    handles = [m.register_forward_hook(hook) for m, _ in specs]
    try:
        for x, y in batches:
            if need_grad:
                with torch.enable_grad():
                    logits = model(x.detach().requires_grad_(True))
                    target = logits.argmax(-1) if y is None else y
                    F.cross_entropy(logits.float(), target, reduction="sum").backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for m, k in specs:
        ins, outs, grads = store.pop(m)
        if not outs:  # never called on the calibration data
            continue
        result[m] = (tuple(torch.cat([i[j] for i in ins]) for j in range(k)), torch.cat(outs),
                     torch.cat(grads) if need_grad else None)
    return result


def _distance(out: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor | None, keep_dim: int | None) -> torch.Tensor:
    """Σ (grad ⊙ (out − ref))², summed over every dim but ``keep_dim`` (all when None)."""
    d = out - ref
    if grad is not None:
        d = d * grad
    d = d.pow(2)
    if keep_dim is None:
        return d.sum()
    return d.sum(dim=[i for i in range(d.dim()) if i != keep_dim])


def _argmin_scale(errs: list[torch.Tensor], ratios: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """Best r · s₀ per element of s₀ (errs: one tensor per ratio, shaped like s₀'s entries)."""
    e = torch.stack([x.reshape(-1) for x in errs])  # (ratios, n)
    best = ratios.to(s0)[e.argmin(0)]
    return best.view(s0.shape) * s0


# --------------------------------------------------------------------------- layer search


def _layer_fn(module: nn.Module):
    if isinstance(module, nn.Linear):
        return lambda x, w: F.linear(x, w, None if module.bias is None else module.bias.float())
    return lambda x, w: F.conv2d(x, w, None if module.bias is None else module.bias.float(), module.stride,
                                 module.padding, module.dilation, module.groups)


def search_layer(module: nn.Module, x: torch.Tensor, out: torch.Tensor, grad, w_bits: int, a_bits: int,
                 post_gelu: bool, ratios: torch.Tensor, rounds: int, per_channel: bool):
    """Searched weight scale (shaped to broadcast against the weight, or None) and input quantizer
    parameter (uniform scale or post-GELU Δ_R2, or None) of one Conv2d/Linear."""
    f = _layer_fn(module)
    w = module.weight.detach().float()
    ch_dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
    keep = ch_dim if per_channel else None
    qw, qa = w_bits < FULL_PRECISION_BITS, a_bits < FULL_PRECISION_BITS
    w_s0 = per_channel_scale(w, w_bits) if per_channel else symmetric_scale(w.abs().max(), w_bits)
    w_s = w_s0
    if post_gelu:
        a_s0 = symmetric_scale(x.max().clamp_min(0), a_bits)

        def act(s):
            return twin_uniform_gelu(x, a_bits, s)
    else:
        a_s0 = symmetric_scale(x.abs().max(), a_bits)

        def act(s):
            return fake_quant(x, a_bits, s)
    a_s = a_s0 if qa else None
    xq = act(a_s) if qa else x
    for _ in range(rounds if qa else 1):
        if qw:
            errs = [_distance(f(xq, fake_quant(w, w_bits, r * w_s0)), out, grad, keep) for r in ratios]
            w_s = _argmin_scale(errs, ratios, w_s0)
        wq = fake_quant(w, w_bits, w_s) if qw else w
        if qa:
            errs = [_distance(f(act(r * a_s0), wq), out, grad, None) for r in ratios]
            a_s = _argmin_scale(errs, ratios, a_s0)
            xq = act(a_s)
    return (w_s if qw else None), a_s


def search_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, grad, n_bits: int, softmax_a: bool,
                  ratios: torch.Tensor, rounds: int, max_shift: int):
    """Searched operand quantizers of a @ b for (batch, heads, ·, ·) operands: per-head scales, or
    the twin softmax shift m for a post-softmax ``a``. Returns (quant_a, quant_b) modules."""
    def head_scale(t):
        return symmetric_scale(t.abs().amax(dim=(0, 2, 3), keepdim=True), n_bits)

    a_s0, b_s0 = head_scale(a), head_scale(b)
    a_s, b_s, shift = a_s0, b_s0, 0

    def qa(s=None, m=None):
        return twin_uniform_softmax(a, n_bits, m) if softmax_a else fake_quant(a, n_bits, s)

    aq = qa(a_s, shift)
    bq = fake_quant(b, n_bits, b_s)
    for _ in range(rounds):
        if softmax_a:
            errs = [_distance(qa(m=m) @ bq, out, grad, None) for m in range(max_shift + 1)]
            shift = int(torch.stack(errs).argmin())
            aq = qa(m=shift)
        else:
            errs = [_distance(fake_quant(a, n_bits, r * a_s0) @ bq, out, grad, 1) for r in ratios]
            a_s = _argmin_scale(errs, ratios, a_s0)
            aq = qa(a_s)
        errs = [_distance(aq @ fake_quant(b, n_bits, r * b_s0), out, grad, 1) for r in ratios]
        b_s = _argmin_scale(errs, ratios, b_s0)
        bq = fake_quant(b, n_bits, b_s)
    quant_a = SoftmaxTwinQuantizer(n_bits, shift) if softmax_a else UniformQuantizer(n_bits, a_s)
    return quant_a, UniformQuantizer(n_bits, b_s)


GELU_NAMES = ("GELU", "GELUTanh")  # torch's and timm's classes; both have min ≈ −0.17


def post_gelu_linears(model: nn.Module) -> set:
    """``fc2`` of every MLP whose ``act`` is a GELU feeding it directly (timm Mlp, Mixer MLPs)."""
    found = set()
    for m in model.modules():
        fc2, act = getattr(m, "fc2", None), getattr(m, "act", None)
        if (isinstance(fc2, nn.Linear) and type(act).__name__ in GELU_NAMES
                and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)):
            found.add(fc2)
    return found


def ptq4vit(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, calib_batches) -> tuple[dict, dict]:
    """PTQ4ViT in place on ``layers`` (and the attention matmuls); returns (record, {layer: weight scale})."""
    if not calib_batches:
        raise ValueError("PTQ4ViT needs calibration batches")
    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    quant_act = a_bits < FULL_PRECISION_BITS
    matmuls = make_attention_explicit(model) if cfg.quant_attention and quant_act else []
    gelu_fc2 = post_gelu_linears(model) if cfg.twin else set()
    need_grad = cfg.metric == "hessian"
    ratios = torch.unique(torch.cat([torch.linspace(cfg.scale_min, cfg.scale_max, cfg.scale_steps + 1),
                                     torch.ones(1)]))
    per_channel = cfg.weight_granularity == "channel"
    # One calibration pass per group of ops (a top-level block) bounds the memory held at once.
    order = {m: i for i, m in enumerate(model.modules())}
    ops = sorted([(n, m, 1) for n, m in layers] + [(n, m, 2) for n, m in matmuls], key=lambda t: order[t[1]])
    groups: dict[str, list] = {}
    for op in ops:
        groups.setdefault(".".join(op[0].split(".")[:2]), []).append(op)
    layer_q, mm_q = {}, {}
    with _frozen(model):
        for group in groups.values():
            data = capture(model, [(m, k) for _, m, k in group], calib_batches, need_grad)
            for name, m, k in group:
                if m not in data:
                    log.warning("PTQ4ViT: %s is not used in the forward pass, left in float", name)
                    continue
                inputs, out, grad = data.pop(m)
                if k == 1:
                    layer_q[m] = search_layer(m, inputs[0], out, grad, w_bits, a_bits, m in gelu_fc2, ratios,
                                              cfg.search_rounds, per_channel)
                else:
                    mm_q[m] = search_matmul(*inputs, out, grad, a_bits, name.endswith("matmul_av") and cfg.twin,
                                            ratios, cfg.search_rounds, cfg.max_softmax_shift)
                del inputs, out, grad
    scales = {}
    for _, m in layers:
        w_s, a_s = layer_q.get(m, (None, None))
        if w_s is not None:
            with torch.no_grad():
                m.weight.copy_(fake_quant(m.weight.float(), w_bits, w_s).to(m.weight.dtype))
            scales[m] = w_s
        if a_s is not None:
            q = GeluTwinQuantizer(a_bits, a_s) if m in gelu_fc2 else UniformQuantizer(a_bits, a_s)
            attach_input_quantizer(m, q)
    for _, mm in matmuls:
        if mm in mm_q:
            mm.quant_a, mm.quant_b = mm_q[mm]
    shifts = {n: mm.quant_a.shift for n, mm in matmuls if isinstance(mm.quant_a, SoftmaxTwinQuantizer)}
    n_images = sum(len(x) for x, _ in calib_batches)
    info = {"method": "ptq4vit", "w_bits": w_bits, "a_bits": a_bits, "quantized_layers": len(layers),
            "quantized_matmuls": len(matmuls), "twin_gelu_layers": sum(m in gelu_fc2 for _, m in layers) if quant_act
            else 0, "twin_softmax_matmuls": len(shifts), "softmax_shift": shifts, "metric": cfg.metric,
            "search_rounds": cfg.search_rounds, "weight_granularity": cfg.weight_granularity,
            "calib_images": n_images}
    log.info("PTQ4ViT W%dA%d: %d layers, %d matmuls (%d twin softmax, %d twin GELU), %d calibration images",
             w_bits, a_bits, len(layers), len(matmuls), len(shifts), info["twin_gelu_layers"], n_images)
    return info, scales
