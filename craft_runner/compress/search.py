"""Layer-wise scale search shared by BasePTQ and PTQ4ViT, as in the PTQ4ViT reference code.

Every quantized op (Conv2d, Linear, and the attention matmuls q·kᵀ and attn·v) is calibrated on
its own, from the inputs and output the full-precision network gives it on the calibration data
("parallel" calibration: no layer sees the quantization error of the layers before it).

Scales: the initial scale is s₀ = max/(2^(b−1) − ½) (per weight group, per activation tensor, per
head of a matmul operand); the candidates are r·s₀ with r = lo + i·(hi − lo)/n, i = 0..n−1 (the
reference's ``eq_alpha``, ``eq_beta``, ``eq_n``: its list has n + 1 entries but its loop visits
the first n). For ``rounds`` rounds, the weight scale is searched (input quantized at its current
scale), then the input scale (weight at its searched scale); for a matmul a·b, first a's then b's.

The score of a candidate compares the op's output Ô with the full-precision output O:

- ``cosine`` (BasePTQ): cosine similarity of the output vectors — over the output features of a
  Linear's token (of each q/k/v block in the weight search of a fused qkv), over the channels of
  a Conv2d's output position, over the last dim of a matmul's output row — averaged over them;
- ``hessian`` (PTQ4ViT): −mean((∂L/∂O ⊙ (Ô − O))²); ``mse``: −mean((Ô − O)²).

Groups whose outputs depend only on their own scale (q/k/v blocks, output channels, heads) are
scored separately and pick their best candidate independently. The candidates are evaluated in
batches (one batched matmul or convolution per chunk of candidates).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from craft_runner.compress.attention import make_attention_explicit
from craft_runner.compress.quantizers import (
    FULL_PRECISION_BITS,
    GELU_NEG_RANGE,
    GeluTwinQuantizer,
    SoftmaxTwinQuantizer,
    UniformQuantizer,
    attach_input_quantizer,
    fake_quant,
    init_scale,
    twin_softmax,
)

log = logging.getLogger(__name__)

# The reference computes ∂L/∂O on calibration mini-batches of 4 images (HessianQuantCalibrator(batch_size=4)).
HESSIAN_BATCH = 4
# Elements of the largest tensor one chunk of candidates may produce (bounds memory, keeps GEMMs large).
CHUNK_ELEMENTS = {"cpu": 2 ** 24, "cuda": 2 ** 27}
# Elements of candidate outputs scored per block (hessian, mse): small enough to stay in cache.
SCORE_BLOCK = 2 ** 18
# Bytes of calibration inputs/outputs/gradients captured in one pass over the calibration data.
CAPTURE_BYTES = {"cpu": 2 ** 30, "cuda": 2 ** 32}


def candidate_ratios(lo: float, hi: float, n: int) -> torch.Tensor:
    """lo + i·(hi − lo)/n for i = 0..n−1 (float32, as the reference builds them)."""
    return torch.tensor([lo + i * (hi - lo) / n for i in range(n)])


# --------------------------------------------------------------------------- calibration data


@contextlib.contextmanager
def frozen(model: nn.Module):
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


def capture(model: nn.Module, specs: list[tuple[nn.Module, int]], batches, need_grad: bool, loss: str = "kl") -> dict:
    """For each (module, n_inputs) of ``specs``: its first n_inputs inputs, its output and (with
    ``need_grad``) ∂L/∂output over all calibration batches, concatenated along the batch dim.

    ``loss`` for the gradient: ``kl`` — the reference code's: the full-precision prediction p of
    each calibration batch is computed first, then, on mini-batches of HESSIAN_BATCH images,
    L = KL(p ‖ softmax(z)) with z the logits of the same full-precision model (mean over the
    mini-batch); ``ce`` — the paper's task loss: summed cross-entropy with the batch labels (the
    argmax prediction when a batch has none).
    """
    if loss not in ("kl", "ce"):
        raise ValueError(f"capture: loss must be 'kl' or 'ce', got {loss!r}")
    store = {m: ([], [], []) for m, _ in specs}
    n_in = dict(specs)
    recording = [True]

    def hook(mod, args, out):
        if not recording[0]:
            return
        ins, outs, grads = store[mod]
        # Copies: a later in-place op (ReLU(inplace=True)) must not change what was captured.
        ins.append(tuple(_copy(a) for a in args[:n_in[mod]]))
        outs.append(_copy(out))
        if need_grad:
            out.register_hook(lambda g: grads.append(_copy(g)))

    handles = [m.register_forward_hook(hook) for m, _ in specs]
    try:
        for x, y in batches:
            if not need_grad:
                with torch.no_grad():
                    model(x)
            elif loss == "ce":
                with torch.enable_grad():
                    logits = model(x.detach().requires_grad_(True))
                    target = logits.argmax(-1) if y is None else y
                    F.cross_entropy(logits.float(), target, reduction="sum").backward()
            else:
                recording[0] = False
                with torch.no_grad():
                    p = F.softmax(model(x).float(), dim=-1)
                recording[0] = True
                for s in range(0, len(x), HESSIAN_BATCH):
                    with torch.enable_grad():
                        z = model(x[s:s + HESSIAN_BATCH].detach().requires_grad_(True))
                        F.kl_div(F.log_softmax(z.float(), dim=-1), p[s:s + HESSIAN_BATCH],
                                 reduction="batchmean").backward()
    finally:
        for h in handles:
            h.remove()
    # One tensor at a time, each list freed as soon as it is joined: the captured bytes are held once, plus
    # one joined tensor (what _passes budgets), not twice.
    result = {}
    for m in list(store):
        ins, outs, grads = store.pop(m)
        if not outs:
            continue
        columns = [list(c) for c in zip(*ins)]  # per input: its parts over the batches
        ins.clear()
        inputs = [_joined(c) for c in columns]
        result[m] = (inputs, _joined(outs), _joined(grads) if need_grad else None)
    return result


def _joined(parts: list) -> torch.Tensor:
    """torch.cat of ``parts``, emptying the list first, so the parts are freed as soon as the result exists."""
    items = list(parts)
    parts.clear()
    return torch.cat(items)


# --------------------------------------------------------------------------- scoring


def _fq(x: torch.Tensor, n_bits: int, scale: torch.Tensor) -> torch.Tensor:
    """fake_quant's values without its autograd bookkeeping (the search needs no gradient)."""
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)


class _Scorer:
    """Error to minimise, (k, G), of k candidate outputs against the reference output.

    Outputs come as (k, *positions, G, F) — G groups scored apart, F the features over which the
    cosine is taken or the squared error averaged — the reference as (*positions, G, F); the
    scores are averaged over the positions.
    """

    def __init__(self, ref: torch.Tensor, grad, metric: str):
        self.metric, self.ref, self.grad = metric, ref, grad
        self.groups, self.feats = ref.shape[-2], ref.shape[-1]
        if metric == "cosine":
            self.ref_norm = torch.linalg.vector_norm(ref, dim=-1)
            self.ref_col = ref.reshape(-1, self.feats, 1) if self.groups == 1 else None

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        k = out.shape[0]
        if self.metric == "cosine":
            if self.ref_col is not None:  # positions first: one batched matmul gives every candidate's dot products
                out = out.reshape(k, -1, self.feats).transpose(0, 1)
                dot = torch.bmm(out, self.ref_col).reshape(out.shape[0], k)
                norm = torch.linalg.vector_norm(out, dim=-1).mul_(self.ref_norm.reshape(-1, 1))
                # x·y / max(|x||y|, 1e-8): torch.cosine_similarity as the reference code used it
                return dot.div_(norm.clamp_min_(1e-8)).mean(0).neg_().reshape(k, 1)
            norm = torch.linalg.vector_norm(out, dim=-1).mul_(self.ref_norm)
            e = out.mul_(self.ref).sum(-1).div_(norm.clamp_min_(1e-8)).neg_()
        else:
            e = self._squared_error(out)
        return e.reshape(k, -1, self.groups).mean(1)

    def _squared_error(self, out: torch.Tensor) -> torch.Tensor:
        """mean over F of (grad ⊙ (out − ref))², (k, *positions, G), contiguous as a reduction gives it.

        ``out`` is the candidates' fresh output: it is overwritten. Its elementwise passes go block by block
        of the first position dim, so that each block stays in cache across them (the chunk is far larger)."""
        e = out.new_empty(out.shape[:-1])
        rows = out.shape[1] if out.dim() > 3 else 1
        step = max(1, SCORE_BLOCK // max(out.numel() // rows, 1))
        for i in range(0, rows, step):
            blk = slice(i, i + step) if out.dim() > 3 else slice(None)
            d = out[:, blk].sub_(self.ref[blk])
            if self.grad is not None:
                d.mul_(self.grad[blk])
            d.pow_(2)
            # A mean over one feature is the value itself (the size-1 reduction was a fifth of the per-channel search).
            e[:, blk] = d.squeeze(-1) if self.feats == 1 else d.mean(-1)
        return e


def _chunks(n: int, per_candidate: int, device: torch.device) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(per_candidate, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _argmin_scale(run, scorer: _Scorer, ratios, s0, per_candidate):
    """Per group g, the r_k·s₀[g] whose output scores best; ``run(s)`` maps candidate scales (k, G)
    to the op's outputs, (k, *positions, G, F)."""
    ratios = ratios.to(s0)
    errs = [scorer(run(ratios[c, None] * s0[None])) for c in _chunks(len(ratios), per_candidate, s0.device)]
    return ratios[torch.cat(errs).argmin(0)] * s0


# --------------------------------------------------------------------------- Conv2d / Linear


def _maybe(t, shape):
    return None if t is None else t.reshape(shape)


def _group_max(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.detach().abs().reshape(groups, -1).amax(1)


def _rows(s: torch.Tensor, out_features: int, w_dim: int) -> torch.Tensor:
    """Group scales (..., G) → one per weight row, shaped (..., O, 1, ...) to broadcast against W."""
    s = s.repeat_interleave(out_features // s.shape[-1], dim=-1)
    return s.reshape(*s.shape, *([1] * (w_dim - 1)))


def _gelu_twin_of(x: torch.Tensor, n_bits: int):
    """twin_uniform_gelu(x, n_bits, Δ) as a function of Δ, for k candidates at once: the negative range
    (fixed Δ_R1) and the sign are computed once, not once per candidate."""
    levels = 2 ** (n_bits - 1)
    delta_neg = GELU_NEG_RANGE / levels
    neg = torch.clamp(torch.round(x / delta_neg), -levels, 0) * delta_neg
    negative = x < 0

    def act(t, s):  # t: x, or x with a leading candidate dim of 1
        pos = torch.div(t, s).round_().clamp_(0, levels - 1).mul_(s)
        return torch.where(negative, neg, pos)

    return act


def _conv(module: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, bias, groups: int) -> torch.Tensor:
    pad = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pad = 0
    return F.conv2d(x, w, bias, module.stride, pad, module.dilation, groups)


def search_layer(module: nn.Module, x: torch.Tensor, out: torch.Tensor, grad, w_bits: int, a_bits: int,
                 ratios: torch.Tensor, rounds: int, metric: str = "hessian", w_groups: int = 1,
                 post_gelu: bool = False, quant_input: bool = True, w_s0=None, a_s0=None):
    """Searched weight scale and input quantizer parameter of one Conv2d/Linear.

    ``w_groups``: the weight's rows split into that many equal blocks with one scale each (1: per
    layer, 3: q/k/v of a fused qkv, out_features: per output channel). ``post_gelu``: the input
    uses twin uniform post-GELU quantization (the searched parameter is Δ_R2 of the positive
    range). ``w_s0``/``a_s0`` replace the initial scales. Returns (weight scale — a scalar for one
    group, else one per row shaped to broadcast against the weight — or None; input scale or None).
    """
    is_conv = isinstance(module, nn.Conv2d)
    w = module.weight.detach().float()
    bias = None if module.bias is None else module.bias.detach().float()
    n_out = w.shape[0]
    if n_out % w_groups:
        raise ValueError(f"search_layer: {n_out} output rows do not split into {w_groups} groups")
    qw = w_bits < FULL_PRECISION_BITS
    qa = a_bits < FULL_PRECISION_BITS and quant_input
    w_s0 = init_scale(_group_max(w, w_groups), w_bits) if w_s0 is None else w_s0.float().reshape(-1).expand(w_groups)

    if a_s0 is None:
        a_s0 = init_scale(x.max().clamp_min(0) if post_gelu else x.abs().max(), a_bits)
    a_s0 = torch.as_tensor(a_s0, dtype=torch.float32, device=x.device).reshape(1)

    g_rows = n_out // w_groups
    if is_conv:
        cl = torch.channels_last
        x_flat = x.contiguous(memory_format=cl)
        # channels-last outputs: (B, H, W, channels) is a free view, channels innermost for the scoring
        ref = out.permute(0, 2, 3, 1).reshape(-1, n_out)

        def out_w(xq, s):  # the k candidate weights as one grouped convolution → (k, B·H·W, G, O/G)
            k, g = s.shape[0], module.groups
            wq = _fq(w.unsqueeze(0), w_bits, _rows(s, n_out, w.dim()))  # (k, O, C/g, kh, kw)
            wq = wq.reshape(k, g, n_out // g, *w.shape[1:]).transpose(0, 1).reshape(k * n_out, *w.shape[1:])
            b = None if bias is None else bias.reshape(g, 1, -1).expand(g, k, -1).reshape(-1)
            o = _conv(module, xq, wq.contiguous(memory_format=cl), b, g).permute(0, 2, 3, 1)
            o = o.reshape(-1, g, k, n_out // g).transpose(1, 2) if g > 1 else o.reshape(-1, k, n_out)
            return o.reshape(-1, k, w_groups, g_rows).transpose(0, 1)

        def out_a(s, wq):  # the k candidate inputs as one batch → (k, B·H·W, 1, O)
            k = s.shape[0]
            xq = act(x_flat.unsqueeze(0), s.reshape(k, 1, 1, 1, 1)).reshape(-1, *x.shape[1:])
            o = _conv(module, xq.contiguous(memory_format=cl), wq.contiguous(memory_format=cl), bias, module.groups)
            return o.permute(0, 2, 3, 1).reshape(k, -1, 1, n_out)
    else:
        x_flat, ref = x.reshape(-1, x.shape[-1]), out.reshape(-1, n_out)

        def out_w(xq, s):  # (N, I) @ (I, k·O) → (k, N, G, O/G)
            wq = _fq(w.unsqueeze(0), w_bits, _rows(s, n_out, 2)).reshape(-1, w.shape[1])
            o = xq @ wq.t() if bias is None else torch.addmm(bias.repeat(s.shape[0]), xq, wq.t())
            return o.reshape(o.shape[0], -1, w_groups, g_rows).transpose(0, 1)

        def out_a(s, wq):
            return F.linear(act(x_flat.unsqueeze(0), s.reshape(-1, 1, 1)), wq, bias).unsqueeze(2)

    if post_gelu:
        act = _gelu_twin_of(x_flat, a_bits)
    else:
        def act(t, s):
            return _fq(t, a_bits, s)
    grad_ref = None if grad is None else (grad.permute(0, 2, 3, 1) if is_conv else grad).reshape(ref.shape)
    score_w = _Scorer(ref.reshape(-1, w_groups, g_rows), _maybe(grad_ref, (-1, w_groups, g_rows)), metric)
    score_a = _Scorer(ref.reshape(-1, 1, n_out), _maybe(grad_ref, (-1, 1, n_out)), metric)
    per_w = max(ref.numel(), w.numel())
    per_a = ref.numel() + x.numel()
    w_s, a_s = w_s0, (a_s0 if qa else None)
    xq = act(x_flat, a_s0) if qa else x_flat
    for _ in range(rounds if qa else 1):
        if qw:
            w_s = _argmin_scale(lambda s, xq=xq: out_w(xq, s), score_w, ratios, w_s0, per_w)
        wq = _fq(w, w_bits, _rows(w_s, n_out, w.dim())) if qw else w
        if qa:
            a_s = _argmin_scale(lambda s, wq=wq: out_a(s, wq), score_a, ratios, a_s0, per_a)
            xq = act(x_flat, a_s)
    w_scale = None
    if qw:
        w_scale = w_s.reshape(()) if w_groups == 1 else _rows(w_s, n_out, w.dim())
    return w_scale, (a_s.reshape(()) if qa else None)


# --------------------------------------------------------------------------- attention matmuls


def search_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, grad, n_bits: int, ratios: torch.Tensor,
                  rounds: int, metric: str = "hessian", softmax: str | None = None, max_shift: int = 19,
                  per_head: bool = True, a_s0=None, b_s0=None):
    """Searched operand quantizers of a @ b for (batch, heads, ·, ·) operands.

    Uniform operands get one scale per head (``per_head``) or one per tensor. ``softmax``
    (``reference`` or ``paper``): ``a`` holds attention probabilities and gets twin uniform
    quantization, whose shift m (R1's step Δ_R2/2^m) is searched in 0..max_shift — with ``b`` in
    float in the reference code, quantized at its current scale otherwise. Returns (quant_a, quant_b).
    """
    heads = a.shape[1]
    g = heads if per_head else 1

    def s0_of(t, given):
        if given is not None:
            return given.float().reshape(-1).expand(g)
        m = t.abs().amax(dim=(0, 2, 3)) if per_head else t.abs().max().reshape(1)
        return init_scale(m, n_bits)

    def shaped(s):  # (k, G) → broadcast against (k, B, H, ·, ·)
        return s.reshape(s.shape[0], 1, g, 1, 1)

    def view(o):  # (k, B, H, M, N) → (k, B, M, H, N) per head, (k, B·H·M, 1, N) per tensor
        return o.transpose(2, 3) if per_head else view_all(o)

    def view_all(o):
        return o.reshape(o.shape[0], -1, 1, o.shape[-1])

    a_s0, b_s0 = s0_of(a, a_s0), s0_of(b, b_s0)
    a_s, b_s, shift = a_s0, b_s0, 0
    per = out.numel() + max(a.numel(), b.numel())
    score = _Scorer(view(out.unsqueeze(0))[0], None if grad is None else view(grad.unsqueeze(0))[0], metric)

    def quant_a(s=None, m=None):
        return twin_softmax(a, n_bits, m, softmax) if softmax else _fq(a, n_bits, shaped(s[None])[0])

    bq = _fq(b, n_bits, shaped(b_s[None])[0])
    aq = None
    for _ in range(rounds):
        if softmax:
            b_used = b if softmax == "reference" else bq
            score_all = _Scorer(view_all(out.unsqueeze(0))[0], None if grad is None else view_all(grad.unsqueeze(0))[0],
                                metric)
            errs = torch.cat([score_all(view_all((quant_a(m=m) @ b_used).unsqueeze(0))) for m in range(max_shift + 1)])
            shift = int(errs.reshape(-1).argmin())
            aq = quant_a(m=shift)
        else:
            a_s = _argmin_scale(lambda s, bq=bq: view(_fq(a.unsqueeze(0), n_bits, shaped(s)) @ bq), score, ratios, a_s0,
                                per)
            aq = quant_a(a_s)
        b_s = _argmin_scale(lambda s, aq=aq: view(aq @ _fq(b.unsqueeze(0), n_bits, shaped(s))), score, ratios, b_s0,
                            per)
        bq = _fq(b, n_bits, shaped(b_s[None])[0])

    def head_scale(s):
        return s.reshape(1, heads, 1, 1) if per_head else s.reshape(())

    qa_mod = SoftmaxTwinQuantizer(n_bits, shift, softmax) if softmax else UniformQuantizer(n_bits, head_scale(a_s))
    return qa_mod, UniformQuantizer(n_bits, head_scale(b_s))


# --------------------------------------------------------------------------- the whole model


@dataclass
class SearchPlan:
    """What to search, op by op (built by BasePTQ / PTQ4ViT from their configs)."""

    w_bits: int
    a_bits: int
    metric: str  # cosine | hessian | mse
    ratios: torch.Tensor
    rounds: int
    w_groups: dict = field(default_factory=dict)  # layer → number of weight scale groups
    float_input: set = field(default_factory=set)  # layers whose input stays in float (the stem)
    post_gelu: set = field(default_factory=set)  # layers with post-GELU twin input quantization
    softmax: str | None = None  # twin kind for attn·v's probabilities, or None (plain uniform)
    max_shift: int = 19
    per_head: bool = True
    loss: str = "kl"


def _passes(model: nn.Module, ops: list, calib_batches, need_grad: bool) -> list[list]:
    """Ops split into calibration passes: whole top-level blocks, as many per pass as the captured
    tensors allow (CAPTURE_BYTES, sized from one image), so that small models need one pass."""
    blocks: dict[str, list] = {}
    for op in ops:
        blocks.setdefault(".".join(op[0].split(".")[:2]), []).append(op)
    per_image, n_in = {}, {m: k for _, m, k in ops}

    def probe(mod, args, out):
        per_image[mod] = sum(a.numel() for a in args[:n_in[mod]]) + out.numel() * (2 if need_grad else 1)

    x = calib_batches[0][0][:1]
    handles = [m.register_forward_hook(probe) for _, m, _ in ops]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    n_images = sum(len(b[0]) for b in calib_batches)
    budget = CAPTURE_BYTES.get(x.device.type, CAPTURE_BYTES["cuda"])
    # A pass holds what it captures, and while capture() joins a tensor its parts and the result: the
    # captured bytes plus the largest single tensor (an op's output is at most its per-image share).
    passes, size, top = [], budget + 1, 0
    for block in blocks.values():
        b = 4 * n_images * sum(per_image.get(m, 0) for _, m, _ in block)
        largest = 4 * n_images * max((per_image.get(m, 0) for _, m, _ in block), default=0)
        if size + b + max(top, largest) > budget:
            passes.append([])
            size, top = 0, 0
        passes[-1] += block
        size += b
        top = max(top, largest)
    return passes


class SearchProgress:
    """Op i/N with its name, the elapsed time and an ETA (mean time per op so far × ops left): a tqdm bar
    on a terminal, one log line per op otherwise — train.fit's convention (``progress``: None or True
    lets tqdm show the bar only on a terminal, False never)."""

    def __init__(self, total: int, desc: str, progress: bool | None = None):
        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="op", leave=False,
                        disable=None if progress in (None, True) else True)

    def step(self, name: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        if self.bar.disable:
            log.info("%s %d/%d %s: elapsed %s, ETA %s", self.desc, self.done, self.total, name,
                     _clock(elapsed), _clock(eta))
        else:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def search_model(model: nn.Module, layers: list[tuple[str, nn.Module]], matmuls: list[tuple[str, nn.Module]],
                 plan: SearchPlan, calib_batches, progress: bool | None = None,
                 desc: str = "PTQ search") -> tuple[dict, dict]:
    """Search every op of ``layers`` and ``matmuls`` on the full-precision model, reporting each op as
    it is done (:class:`SearchProgress`). Returns ({layer: (weight scale or None, input scale or None)},
    {matmul: (quant_a, quant_b)})."""
    need_grad = plan.metric == "hessian"
    order = {m: i for i, m in enumerate(model.modules())}
    ops = sorted([(n, m, 1) for n, m in layers] + [(n, m, 2) for n, m in matmuls], key=lambda t: order[t[1]])
    layer_q, mm_q = {}, {}
    bar = SearchProgress(len(ops), desc, progress)
    with frozen(model), contextlib.closing(bar):
        for group in _passes(model, ops, calib_batches, need_grad):
            data = capture(model, [(m, k) for _, m, k in group], calib_batches, need_grad, plan.loss)
            for name, m, k in group:
                if m not in data:
                    log.warning("PTQ: %s is not used in the forward pass, left in float", name)
                    bar.step(name)
                    continue
                inputs, out, grad = data.pop(m)
                if k == 1:
                    layer_q[m] = search_layer(m, inputs[0], out, grad, plan.w_bits, plan.a_bits, plan.ratios,
                                              plan.rounds, plan.metric, plan.w_groups.get(m, 1), m in plan.post_gelu,
                                              m not in plan.float_input)
                else:
                    softmax = plan.softmax if name.endswith("matmul_av") else None
                    mm_q[m] = search_matmul(*inputs, out, grad, plan.a_bits, plan.ratios, plan.rounds, plan.metric,
                                            softmax, plan.max_shift, plan.per_head)
                del inputs, out, grad
                bar.step(name)
    return layer_q, mm_q


# --------------------------------------------------------------------------- model structure


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


def fused_qkv_linears(model: nn.Module) -> set:
    """The ``qkv`` Linear of every attention module (one with ``num_heads``): q, k and v row blocks."""
    return {m.qkv for m in model.modules()
            if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear)
            and m.qkv.out_features % 3 == 0}


def stem_layers(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> set:
    """The layer that takes the image: timm's ``first_conv`` when the model names one, else the
    first Conv2d/Linear in module order — if it is among ``layers``."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    named = dict(model.named_modules())
    if first not in named:
        first = next((n for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    stem = named.get(first)
    return {m for _, m in layers if m is stem}


def weight_groups(model: nn.Module, layers: list[tuple[str, nn.Module]], granularity: str) -> dict:
    """Number of weight scales per layer: ``tensor`` — one (three for a fused qkv: q, k, v);
    ``channel`` — one per output channel; ``mixed`` — channel for Conv2d, tensor for Linear."""
    qkv = fused_qkv_linears(model)
    out = {}
    for _, m in layers:
        per_channel = granularity == "channel" or (granularity == "mixed" and isinstance(m, nn.Conv2d))
        out[m] = m.weight.shape[0] if per_channel else (3 if m in qkv else 1)
    return out


# --------------------------------------------------------------------------- BasePTQ / PTQ4ViT


def run_ptq(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, calib_batches, method: str,
            progress: bool | None = None):
    """Searched PTQ in place: ``method`` base (plain uniform quantizers) or ptq4vit (twin uniform
    post-softmax / post-GELU quantizers with ``cfg.twin``), both scoring candidates by ``cfg.metric``;
    ``progress`` as for :class:`SearchProgress`. Returns (record, {layer: weight scale})."""
    if not calib_batches:
        raise ValueError(f"{method} PTQ needs calibration batches")
    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    quant_act = a_bits < FULL_PRECISION_BITS
    matmuls = make_attention_explicit(model) if cfg.quant_attention and quant_act else []
    is_ptq4vit = method == "ptq4vit"
    twin = is_ptq4vit and cfg.twin
    plan = SearchPlan(
        w_bits=w_bits, a_bits=a_bits, metric=cfg.metric,
        ratios=candidate_ratios(cfg.scale_min, cfg.scale_max, cfg.scale_steps), rounds=cfg.search_rounds,
        w_groups=weight_groups(model, layers, cfg.weight_granularity),
        float_input=set() if cfg.quant_stem_input else stem_layers(model, layers),
        post_gelu=post_gelu_linears(model) if twin else set(), softmax=cfg.twin_softmax if twin else None,
        max_shift=cfg.max_softmax_shift, per_head=cfg.operand_granularity == "head", loss=cfg.hessian_loss)
    layer_q, mm_q = search_model(model, layers, matmuls, plan, calib_batches, progress,
                                 "BasePTQ search" if method == "base" else "PTQ4ViT search")
    scales, n_w, n_in, n_gelu = {}, 0, 0, 0
    for _, m in layers:
        w_s, a_s = layer_q.get(m, (None, None))
        if w_s is not None:
            with torch.no_grad():
                m.weight.copy_(fake_quant(m.weight.float(), w_bits, w_s).to(m.weight.dtype))
            scales[m] = w_s
            n_w += 1
        if a_s is not None:
            gelu = m in plan.post_gelu
            attach_input_quantizer(m, (GeluTwinQuantizer if gelu else UniformQuantizer)(a_bits, a_s))
            n_in += 1
            n_gelu += gelu
    for _, mm in matmuls:
        if mm in mm_q:
            mm.quant_a, mm.quant_b = mm_q[mm]
    n_images = sum(len(x) for x, _ in calib_batches)
    info = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "quantized_layers": len(layers),
            "quantized_weights": n_w, "quantized_inputs": n_in, "quantized_matmuls": len(mm_q),
            "search_rounds": cfg.search_rounds, "scale_candidates": [cfg.scale_min, cfg.scale_max, cfg.scale_steps],
            "weight_granularity": cfg.weight_granularity, "operand_granularity": cfg.operand_granularity,
            "calib_images": n_images, "metric": cfg.metric,
            "hessian_loss": cfg.hessian_loss if cfg.metric == "hessian" else None}
    if is_ptq4vit:
        shifts = {n: mm.quant_a.shift for n, mm in matmuls if hasattr(mm.quant_a, "shift")}
        info.update(twin_gelu_layers=n_gelu, twin_softmax_matmuls=len(shifts), softmax_shift=shifts,
                    twin_softmax=cfg.twin_softmax if twin else None)
    else:
        info["search"] = "cosine"  # searched (compress.search), with the score in "metric"
    log.info("%s W%dA%d: %d weights, %d inputs, %d matmuls searched on %d calibration images", method, w_bits,
             a_bits, n_w, n_in, len(mm_q), n_images)
    return info, scales
