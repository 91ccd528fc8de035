"""Token compression of timm ViTs: token merging (ToMe) and token pruning by class attention (EViT).

Both change the number of tokens inside the network, so they trade accuracy for speed rather than
memory; each records the measured speed-up (images/s compressed over uncompressed, same batch,
same device) and the number of tokens each block's MLP sees. The speed-up is timed on one thread, the
two models alternated (order swapped every round), for as many rounds as its 95% interval needs to be
within ``speed_ci`` (relative half-width; at least ``speed_reps``, at most ``speed_max_reps`` rounds or
``speed_budget_s`` seconds), and recorded with that interval, the rounds, the stop reason and the cores
other processes kept busy meanwhile (:mod:`craft_runner.timing`). r = 0 / keep rate 1 in every block is
the uncompressed model: speed-up exactly 1.0, not timed.

**ToMe** (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023). In every block, between
attention and MLP, the tokens are split alternately into A (even positions) and B (odd positions);
each token of A is linked to its most similar token of B by the cosine similarity of the attention
keys (mean over heads); the r links with the highest similarity are merged, each A token into its
B token, as size-weighted averages x_b ← (Σ s_i x_i) / (Σ s_i), and sizes add up. Prefix tokens
(class, register, distillation) get similarity −inf and are never merged. At most
⌊(N − prefix)/2⌋ tokens merge in a block. Proportional attention adds log(s_j) to the attention
logits of key j, so a merged token counts as the s_j tokens it stands for. Output order: prefix
tokens, the unmerged A tokens in their original order, then B.

**Token pruning** (Liang et al., "EViT: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022). In each configured block, between attention and MLP, the patch tokens are ranked by the
class token's attention to them (softmax row of the class query, mean over heads); the top
⌈keep_rate · n⌉ are kept, and with ``fuse`` the pruned ones become one extra token
Σ a_i x_i (EViT's own weighting: the class attention a_i as is; ``fuse_mode=mean`` divides by Σ a_i).

The model instance is patched in place (its blocks' forward and, for ToMe, its pooling); nothing
of timm's classes changes. With r = 0 / keep rate 1 the patched forward runs timm's own code, so
the logits are exactly the uncompressed ones.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from craft_runner.compress.registry import Capabilities, CompressConfig, register_compressor
from craft_runner.schema import _check, _check_choice
from craft_runner.timing import PairedTiming, interleaved_ratio

TIMING_THREADS = 1  # speed is timed on one thread: on a shared machine more time the pool's waits, not the model

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- schemas


def _check_speed(cfg) -> None:
    _check(cfg.speed_batch >= 1, "compress.speed_batch", cfg.speed_batch, "an integer >= 1")
    _check(cfg.speed_warmup >= 0, "compress.speed_warmup", cfg.speed_warmup, "an integer >= 0")
    _check(cfg.speed_reps >= 0, "compress.speed_reps", cfg.speed_reps, "an integer >= 0 (0: no timing)")
    _check(cfg.speed_max_reps >= max(cfg.speed_reps, 1), "compress.speed_max_reps", cfg.speed_max_reps,
           f"an integer >= speed_reps ({cfg.speed_reps}) and >= 1")
    _check(0 < cfg.speed_ci < 1, "compress.speed_ci", cfg.speed_ci,
           "a relative half-width in (0, 1) for the speed-up's 95% interval")
    _check(cfg.speed_budget_s is None or cfg.speed_budget_s > 0, "compress.speed_budget_s", cfg.speed_budget_s,
           "null or seconds > 0")


@dataclass
class ToMeConfig(CompressConfig):
    """Token merging (ToMe): ``r`` tokens merged in every block, or ``r_schedule`` (one r per block,
    padded with 0 when shorter than the depth); proportional attention on by default (ToMe's
    setting for off-the-shelf models). Speed is timed on ``speed_batch`` calibration images (see the
    module's docstring for ``speed_*``)."""

    name: str = "tome"
    r: int = 8
    r_schedule: Optional[list] = None
    proportional_attn: bool = True
    speed_batch: int = 32
    speed_warmup: int = 3
    speed_reps: int = 10
    speed_max_reps: int = 100
    speed_ci: float = 0.05
    speed_budget_s: Optional[float] = 120.0

    def __post_init__(self):
        super().__post_init__()
        _check(self.r >= 0, "compress.r", self.r, "an integer >= 0")
        if self.r_schedule is not None:
            _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.r_schedule),
                   "compress.r_schedule", self.r_schedule, "null or a list of integers >= 0, one per block")
            self.r_schedule = list(self.r_schedule)
        _check_speed(self)


@dataclass
class TokenPruneConfig(CompressConfig):
    """Token pruning by class-token attention (EViT): ``keep_rate`` of the patch tokens kept in each
    of ``blocks`` (null: depth//4, depth//2, 3·depth//4, EViT's 3, 6, 9 for 12 blocks), or
    ``keep_rate_schedule`` (one rate per block, padded with 1.0). ``fuse`` adds the pruned tokens
    as one token; ``fuse_mode`` sum is EViT's Σ a_i x_i, mean divides it by Σ a_i."""

    name: str = "token_prune"
    keep_rate: float = 0.7
    blocks: Optional[list] = None
    keep_rate_schedule: Optional[list] = None
    fuse: bool = True
    fuse_mode: str = "sum"
    speed_batch: int = 32
    speed_warmup: int = 3
    speed_reps: int = 10
    speed_max_reps: int = 100
    speed_ci: float = 0.05
    speed_budget_s: Optional[float] = 120.0

    def __post_init__(self):
        super().__post_init__()
        _check(0.0 < self.keep_rate <= 1.0, "compress.keep_rate", self.keep_rate, "a value in (0, 1]")
        if self.blocks is not None:
            ok = all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in self.blocks)
            _check(ok and len(set(self.blocks)) == len(self.blocks), "compress.blocks", self.blocks,
                   "null or a list of distinct block indices >= 0")
            self.blocks = list(self.blocks)
        if self.keep_rate_schedule is not None:
            _check(all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                       for v in self.keep_rate_schedule),
                   "compress.keep_rate_schedule", self.keep_rate_schedule,
                   "null or a list of values in (0, 1], one per block")
            self.keep_rate_schedule = [float(v) for v in self.keep_rate_schedule]
        _check_choice("compress.fuse_mode", self.fuse_mode, ("sum", "mean"))
        _check_speed(self)


def tome_label(c: dict) -> str:
    sched = c.get("r_schedule")
    r = ",".join(map(str, sched)) if sched else c.get("r", 8)
    return f"ToMe r={r}" + ("" if c.get("proportional_attn", True) else " no-prop")


def token_prune_label(c: dict) -> str:
    sched = c.get("keep_rate_schedule")
    rate = ",".join(f"{v:g}" for v in sched) if sched else f"{c.get('keep_rate', 0.7):g}"
    return f"token prune {rate}" + ("" if c.get("fuse", True) else " no-fuse")


# ------------------------------------------------------------------------------------------- ToMe


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1):
    """ToMe's matching on ``metric`` (B, N, C): A = even positions, B = odd positions.

    Returns (src, dst, keep): for each image the A-indices of the r tokens to merge, the B-indices
    they merge into, and the A-indices left unmerged (ascending). Tokens at positions < ``protected``
    take part in no merge. r is capped at (N − protected) // 2.
    """
    n = metric.shape[1]
    r = min(r, max(n - protected, 0) // 2)
    m = nn.functional.normalize(metric, dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarities
    scores[:, :(protected + 1) // 2, :] = -math.inf  # protected A tokens are never a source
    scores[:, :, :protected // 2] = -math.inf  # nor is anything merged into a protected B token
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    keep = order[:, r:].sort(dim=-1).values
    return src, best_dst.gather(1, src), keep


def merge_tokens(x: torch.Tensor, size: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, keep: torch.Tensor,
                 protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of A[src] into B[dst]; returns the tokens [prefix, A[keep], B] and their sizes."""
    c = x.shape[-1]
    xs = x * size
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, c), xa.gather(1, src[..., None].expand(-1, -1, c)))
    sb = sb.scatter_add(1, dst[..., None], sa.gather(1, src[..., None]))
    keep = keep[:, (protected + 1) // 2:]  # protected A tokens come back through the prefix slice
    nb = protected // 2
    # unmerged A tokens are taken from x itself: x·s/s need not round back to x
    x_out = torch.cat([x[:, :protected], x[:, ::2].gather(1, keep[..., None].expand(-1, -1, c)),
                       xb[:, nb:] / sb[:, nb:]], dim=1)
    s_out = torch.cat([size[:, :protected], sa.gather(1, keep[..., None]), sb[:, nb:]], dim=1)
    return x_out, s_out


# ------------------------------------------------------------------------------------------- pruning


def prune_by_class_attention(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, fuse: bool,
                             fuse_mode: str = "sum", protected: int = 1) -> torch.Tensor:
    """EViT: keep the ⌈keep_rate·n⌉ patch tokens with the highest class attention ``cls_attn``
    (B, n), in their original order, after the prefix tokens; optionally one fused token last."""
    n = x.shape[1] - protected
    left = math.ceil(keep_rate * n)
    if left >= n:
        return x
    c = x.shape[-1]
    patches = x[:, protected:]
    top = cls_attn.topk(left, dim=-1).indices.sort(dim=-1).values
    parts = [x[:, :protected], patches.gather(1, top[..., None].expand(-1, -1, c))]
    if fuse:
        dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, top, False)
        w = (cls_attn * dropped).to(x.dtype)
        if fuse_mode == "mean":
            w = w / w.sum(dim=1, keepdim=True)
        parts.append((w[..., None] * patches).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------------- patching


@dataclass
class _TokenState:
    """Shared by the patched blocks of one model: the plan and what one forward carries along."""

    method: str
    protected: int
    plan: list  # per block: r (tome) or keep rate (token_prune)
    proportional_attn: bool = False
    fuse: bool = True
    fuse_mode: str = "sum"
    active: bool = True
    size: Optional[torch.Tensor] = None  # (B, N, 1) token sizes, ToMe only
    qkv: Optional[torch.Tensor] = None
    capture: bool = False
    tokens_in: int = 0  # tokens entering the first block in the last forward
    tokens: list = field(default_factory=list)  # tokens each block's MLP saw in the last forward


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    st: _TokenState = self._tok_state
    if not st.active:
        return self._tok_orig_forward(x, attn_mask=attn_mask, is_causal=is_causal)
    if attn_mask is not None or is_causal:
        raise ValueError(f"{st.method}: attention masks are not supported with token compression")
    if self._tok_index == 0:  # a new forward starts
        st.size, st.tokens, st.tokens_in = None, [], x.shape[1]
    step = st.plan[self._tok_index]
    reduce = step > 0 if st.method == "tome" else step < 1.0
    bias = None
    if st.size is not None and st.proportional_attn:
        bias = st.size.log().to(x.dtype)[:, None, None, :, 0]  # log(s_j) on the logits of key j
    st.capture = reduce
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
    st.capture = False
    if reduce:
        qkv, st.qkv = st.qkv, None
        x = _reduce(self.attn, st, x, qkv, step)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    st.tokens.append(x.shape[1])
    return x


def _split_qkv(attn: nn.Module, qkv: torch.Tensor):
    b, n, _ = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k)  # (B, H, N, D) as the attention used them


def _reduce(attn: nn.Module, st: _TokenState, x: torch.Tensor, qkv: torch.Tensor, step) -> torch.Tensor:
    q, k = _split_qkv(attn, qkv)
    if st.method == "tome":
        size = st.size if st.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        src, dst, keep = bipartite_soft_matching(k.mean(dim=1), step, st.protected)
        x, st.size = merge_tokens(x, size, src, dst, keep, st.protected)
        return x
    # the class token's attention row: softmax over all keys, then mean over heads, patch columns only
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
    cls_attn = logits.softmax(dim=-1)[:, :, 0, st.protected:].mean(dim=1)
    return prune_by_class_attention(x, cls_attn, step, st.fuse, st.fuse_mode, st.protected)


def _pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """timm's pooling, with 'avg' (and the mean of 'avgmax') weighted by token size after merging."""
    st: _TokenState = self._tok_state
    pool_type = self.global_pool if pool_type is None else pool_type
    if not st.active or st.size is None or pool_type not in ("avg", "avgmax"):
        return self._tok_orig_pool(x, pool_type)
    start = 0 if self.pool_include_prefix else self.num_prefix_tokens
    xs, s = x[:, start:], st.size[:, start:].to(x.dtype)
    mean = (xs * s).sum(dim=1) / s.sum(dim=1)
    return mean if pool_type == "avg" else 0.5 * (xs.amax(dim=1) + mean)


def _check_vit(model: nn.Module, method: str) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    ok = isinstance(model, VisionTransformer) and len(model.blocks) > 0 and all(
        isinstance(b, Block) and type(b).forward is Block.forward and isinstance(b.attn, Attention)
        and getattr(b.attn, "gate", None) is None for b in model.blocks)
    if not ok:
        raise ValueError(f"{method} needs a timm VisionTransformer with standard Block/Attention modules; "
                         f"got {type(model).__name__}")
    if method == "token_prune" and not model.has_class_token:
        raise ValueError("token_prune ranks tokens by the class token's attention; this ViT has no class token")
    if method == "tome" and model.attn_pool is not None:
        raise ValueError(f"tome does not support attention pooling (global_pool={model.global_pool!r})")


def _capture_qkv(mod: nn.Module, inp, out: torch.Tensor) -> None:
    """Forward hook on qkv: hands its output (q and k) to the block that reduces tokens next."""
    if mod._tok_state.capture:
        mod._tok_state.qkv = out


def _patch(model: nn.Module, st: _TokenState) -> None:
    """Rebind the forward of every block (and ToMe's pooling) of this model instance; idempotent."""
    model._tok_state = st
    for i, blk in enumerate(model.blocks):
        if not hasattr(blk, "_tok_orig_forward"):
            blk._tok_orig_forward = blk.forward
            blk.forward = types.MethodType(_block_forward, blk)
            blk.attn.qkv.register_forward_hook(_capture_qkv)
        # the state hangs on the modules (not in closures), so a deep copy of the model gets its own
        blk._tok_state, blk._tok_index, blk.attn.qkv._tok_state = st, i, st
    if not hasattr(model, "_tok_orig_pool"):
        model._tok_orig_pool = model.pool
        model.pool = types.MethodType(_pool, model)


def _tome_plan(depth: int, cfg: ToMeConfig) -> list[int]:
    if cfg.r_schedule is None:
        return [cfg.r] * depth
    if len(cfg.r_schedule) > depth:
        raise ValueError(f"compress.r_schedule has {len(cfg.r_schedule)} entries; the model has {depth} blocks")
    return list(cfg.r_schedule) + [0] * (depth - len(cfg.r_schedule))


def default_prune_blocks(depth: int) -> list[int]:
    """EViT's 4th, 7th and 10th of 12 blocks, scaled to ``depth``."""
    return sorted({depth // 4, depth // 2, (3 * depth) // 4})


def _prune_plan(depth: int, cfg: TokenPruneConfig) -> list[float]:
    if cfg.keep_rate_schedule is not None:
        if len(cfg.keep_rate_schedule) > depth:
            raise ValueError(f"compress.keep_rate_schedule has {len(cfg.keep_rate_schedule)} entries; "
                             f"the model has {depth} blocks")
        return list(cfg.keep_rate_schedule) + [1.0] * (depth - len(cfg.keep_rate_schedule))
    blocks = default_prune_blocks(depth) if cfg.blocks is None else cfg.blocks
    if any(b >= depth for b in blocks):
        raise ValueError(f"compress.blocks={blocks} names a block beyond the model's {depth} blocks (0..{depth - 1})")
    return [cfg.keep_rate if i in blocks else 1.0 for i in range(depth)]


def token_counts(n_tokens: int, st: _TokenState) -> list[int]:
    """Tokens each block's MLP sees, for ``n_tokens`` input tokens (what the patched forward does)."""
    out, n = [], n_tokens
    for step in st.plan:
        if st.method == "tome":
            n -= min(step, max(n - st.protected, 0) // 2)
        elif step < 1.0:
            patches = n - st.protected
            left = math.ceil(step * patches)
            if left < patches:
                n = st.protected + left + int(st.fuse)
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batch(model: nn.Module, x: torch.Tensor) -> float:
    _sync(x.device)
    t0 = time.perf_counter()
    model(x)
    _sync(x.device)
    return time.perf_counter() - t0


def measure_throughput(model: nn.Module, x: torch.Tensor, warmup: int = 3, reps: int = 10) -> float:
    """Images per second of ``model`` on batch ``x`` (on x's device): batch size over the median time of
    ``reps`` timed forwards after ``warmup`` untimed ones, in eval mode without gradients."""
    if reps < 1:
        raise ValueError(f"reps={reps} is not allowed: expected an integer >= 1")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            times = [_time_batch(model, x) for _ in range(reps)]
    finally:
        model.train(was_training)
    return x.shape[0] / statistics.median(times)


def _paired_throughput(model: nn.Module, st: _TokenState, x: torch.Tensor, cfg) -> PairedTiming:
    """Uncompressed (A) against compressed (B) forwards of batch ``x``, on one thread, alternated with the
    order swapped every round, until the 95% interval of the speed-up is within ``cfg.speed_ci`` of it
    (relative half-width) or ``cfg.speed_max_reps`` rounds or ``cfg.speed_budget_s`` seconds; at least
    ``cfg.speed_reps`` rounds (see :func:`craft_runner.timing.interleaved_ratio`)."""
    was_training = model.training
    model.eval()

    def forward(on: bool):
        def run():
            st.active = on
            _sync(x.device)
            model(x)
            _sync(x.device)
        return run

    try:
        with torch.inference_mode():
            return interleaved_ratio(forward(False), forward(True), warmup=cfg.speed_warmup,
                                     min_reps=cfg.speed_reps, max_reps=cfg.speed_max_reps,
                                     target_halfwidth=cfg.speed_ci, confidence=0.95, budget_s=cfg.speed_budget_s,
                                     threads=TIMING_THREADS)
    finally:
        st.active = True
        model.train(was_training)


def _speed_batch(ctx, n: int) -> Optional[torch.Tensor]:
    xs, have = [], 0
    for x, _ in ctx.calib_batches:
        xs.append(x)
        have += x.shape[0]
        if have >= n:
            break
    return torch.cat(xs)[:n].to(ctx.device) if xs else None


def _no_change(st: _TokenState) -> bool:
    """r = 0 / keep rate 1 in every block: the patched forward runs timm's own code, nothing is reduced."""
    return all((step <= 0) if st.method == "tome" else (step >= 1.0) for step in st.plan)


def _record(model: nn.Module, st: _TokenState, cfg, ctx) -> dict:
    """Tokens per block and the speed-up with its 95% interval, how it was timed and the machine's load."""
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens  # at the model's configured image size
    out = {"tokens_in": n0, "tokens_per_block": token_counts(n0, st), "device": str(ctx.device),
           "batch_size": None, "throughput_before": None, "throughput_after": None, "speedup": None,
           "speedup_ci_low": None, "speedup_ci_high": None, "speedup_confidence": 0.95, "timed": False,
           "timing_note": None, "timing_threads": None, "timing_reps": 0, "timing_stop": None,
           "timing_ci_target": cfg.speed_ci, "timing_rel_halfwidth": None, "timing_seconds": None,
           "foreign_load": None, "foreign_load_source": None, "cpu_count": os.cpu_count()}
    if _no_change(st):  # exactly the uncompressed model: x1 by definition, nothing to time
        what = "r=0 in every block" if st.method == "tome" else "keep rate 1 in every block"
        out.update(speedup=1.0, speedup_ci_low=1.0, speedup_ci_high=1.0,
                   timing_note=f"not timed: {what} is the uncompressed model, x1 by definition")
        return out
    if cfg.speed_reps <= 0:
        out["timing_note"] = "not timed: compress.speed_reps=0"
        return out
    x = _speed_batch(ctx, cfg.speed_batch)
    if x is None:
        log.warning("%s: no calibration batches, speed not measured", st.method)
        out["timing_note"] = "not timed: no calibration batches"
        return out
    tm = _paired_throughput(model, st, x, cfg)
    b = x.shape[0]
    before, after = b / tm.gmean_a, b / tm.gmean_b
    out.update(batch_size=b, throughput_before=before, throughput_after=after, speedup=tm.ratio,
               speedup_ci_low=tm.ci_low, speedup_ci_high=tm.ci_high, timed=True, timing_threads=tm.threads,
               timing_reps=tm.reps, timing_stop=tm.stop, timing_rel_halfwidth=tm.rel_halfwidth,
               timing_seconds=tm.seconds, foreign_load=tm.foreign_load, foreign_load_source=tm.foreign_load_source,
               tokens_in=st.tokens_in, tokens_per_block=list(st.tokens))  # as counted in the timed forwards
    ci = "" if tm.ci_low is None else f" [{tm.ci_low:.2f}, {tm.ci_high:.2f}]"
    load = "" if tm.foreign_load is None else f"; other processes kept {tm.foreign_load:.1f} cores busy"
    log.info("%s: %.1f -> %.1f images/s (x%.2f%s, 95%%) at batch %d on %s, %d thread, %d pairs (stop: %s)%s",
             st.method, before, after, tm.ratio, ci, b, ctx.device, tm.threads, tm.reps, tm.stop, load)
    if tm.stop != "ci":
        log.warning("%s: speed-up x%.2f is less certain than asked: 95%% interval ±%.0f%% after %d pairs "
                    "(target ±%.0f%%; stopped by %s)", st.method, tm.ratio, 100 * tm.rel_halfwidth, tm.reps,
                    100 * cfg.speed_ci, "compress.speed_max_reps" if tm.stop == "max_reps" else
                    "compress.speed_budget_s")
    cores = os.cpu_count() or 1
    if tm.foreign_load is not None and tm.foreign_load > max(cores - tm.threads, 0) * 0.5:
        log.warning("%s: other processes kept %.1f of %d cores busy while timing; the speed-up may be off",
                    st.method, tm.foreign_load, cores)
    return out


# ------------------------------------------------------------------------------------------- compressors


@register_compressor("tome", ToMeConfig, label=tome_label, check=lambda model, cfg: _check_vit(model, "tome"),
                     caps=Capabilities(changes_tokens=True))
def tome(model: nn.Module, layers, cfg: ToMeConfig, ctx) -> dict:
    """Token merging in every block of a timm ViT (in place); returns tokens per block and the speed-up.
    ``layers`` is unused (the method acts on tokens, not on weights)."""
    _check_vit(model, "tome")
    plan = _tome_plan(len(model.blocks), cfg)
    st = _TokenState("tome", model.num_prefix_tokens, plan, proportional_attn=cfg.proportional_attn)
    _patch(model, st)
    return {"name": "tome", "r_per_block": plan, "proportional_attn": cfg.proportional_attn,
            **_record(model, st, cfg, ctx)}


@register_compressor("token_prune", TokenPruneConfig, label=token_prune_label,
                     check=lambda model, cfg: _check_vit(model, "token_prune"), caps=Capabilities(changes_tokens=True))
def token_prune(model: nn.Module, layers, cfg: TokenPruneConfig, ctx) -> dict:
    """EViT token pruning in the configured blocks of a timm ViT (in place); returns tokens per block
    and the speed-up. ``layers`` is unused."""
    _check_vit(model, "token_prune")
    plan = _prune_plan(len(model.blocks), cfg)
    st = _TokenState("token_prune", model.num_prefix_tokens, plan, fuse=cfg.fuse, fuse_mode=cfg.fuse_mode)
    _patch(model, st)
    return {"name": "token_prune", "keep_rate_per_block": plan, "fuse": cfg.fuse, "fuse_mode": cfg.fuse_mode,
            **_record(model, st, cfg, ctx)}
