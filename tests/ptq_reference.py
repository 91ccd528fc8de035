"""An independent, loop-by-candidate implementation of the PTQ4ViT reference code's layer-wise
calibration (hahnyuan/PTQ4ViT: quant_layers/{linear,conv,matmul}.py, configs/{BasePTQ,PTQ4ViT}.py),
written from its equations for the tests; it shares no code with craft_runner.compress.

Per layer: initial scale max/(2^(b-1) - 0.5); candidates (lo + i (hi - lo)/n) x that scale for
i = 0..n-1; per round the weight scale (input quantized at its current scale), then the input
scale; the similarity of each candidate's output to the full-precision output is reduced as the
code does (mean over tokens / positions / rows, sum over images) and the largest wins, per q/k/v
block, per output channel or per head where the code keeps one scale per group.
"""

import torch
import torch.nn.functional as F


def quant(x, s, bits):
    n = 2 ** (bits - 1)
    return (x / s).round().clamp(-n, n - 1) * s


def quant_gelu(x, s, bits):
    n = 2 ** (bits - 1)
    s_neg = 0.16997124254703522 / n
    return (x / s).round().clamp(0, n - 1) * s + (x / s_neg).round().clamp(-n, 0) * s_neg


def quant_softmax(x, split, bits):
    top = 2 ** (bits - 1) - 1
    d = split / top
    return ((x.clamp(split, 1) * top).round().clamp(0, top) / top
            + (x.clamp(0, split) / d).round().clamp(0, top) * d)


# Float sums of the two implementations differ in the last bits: a choice within this relative
# distance of the best score is a tie. STATS counts exact agreements and ties.
TIE = 1e-6
STATS = {"exact": 0, "tie": 0}


def choose(sims, cands, follow=None):
    """The best candidate; with ``follow`` (the implementation's choice), check that it is one of the
    candidates and scores within TIE of the best, and continue with it."""
    sims = torch.stack(sims).detach()
    best = int(sims.argmax())
    if follow is None:
        return cands[best]
    hit = [i for i, c in enumerate(cands) if torch.equal(c.reshape(()), follow.reshape(()))]
    assert hit, f"{follow} is not one of the candidates"
    top, got = float(sims[best]), float(sims[hit[0]])
    assert got >= top - TIE * abs(top), f"candidate {hit[0]} scores {got}, the best ({best}) {top}"
    STATS["exact" if hit[0] == best else "tie"] += 1
    return follow.reshape(())


def init(t, bits):
    return t / (2 ** (bits - 1) - 0.5)


def ratios(lo, hi, n):
    return [torch.tensor(lo + i * (hi - lo) / n) for i in range(n)]


def similarity(out, ref, metric, grad, feat_dim):
    """The code's per-vector similarity over ``feat_dim`` (cosine, or minus the mean weighted squared error)."""
    if metric == "cosine":
        return F.cosine_similarity(ref, out, dim=feat_dim)
    d = out - ref if grad is None else grad * (out - ref)
    return -(d ** 2).mean(feat_dim)


def reduce_images(sim):
    """(images, ...) → mean over every dim but the first, then sum over images."""
    return sim.reshape(sim.shape[0], -1).mean(1).sum()


def linear_search(x, w, b, out, w_bits, a_bits, n_v=1, quant_input=True, gelu=False, metric="cosine", grad=None,
                  lo=0.5, hi=1.2, n=100, rounds=1, follow=None):
    """x (images, tokens, in) → (weight scale per block (n_v,), input scale or None). ``follow``:
    (weight scales per block, input scale) to check and continue with (one round only)."""
    rows = w.shape[0] // n_v
    w_s = init(w.reshape(n_v, -1).abs().amax(1), w_bits)
    a_s = init(x.max() if gelu else x.abs().max(), a_bits) if quant_input else None
    q_in = (lambda t, s: quant_gelu(t, s, a_bits)) if gelu else (lambda t, s: quant(t, s, a_bits))
    w0, a0 = w_s.clone(), a_s
    for _ in range(rounds if quant_input else 1):
        xq = q_in(x, a_s) if quant_input else x
        best = []
        for j in range(n_v):
            blk = slice(j * rows, (j + 1) * rows)
            g = None if grad is None else grad[..., blk]
            sims = [reduce_images(similarity(F.linear(xq, quant(w[blk], r * w0[j], w_bits), b[blk]), out[..., blk],
                                             metric, g, -1)) for r in ratios(lo, hi, n)]
            best.append(choose(sims, [r * w0[j] for r in ratios(lo, hi, n)], None if follow is None else follow[0][j]))
        w_s = torch.stack(best)
        if quant_input:
            wq = torch.cat([quant(w[j * rows:(j + 1) * rows], w_s[j], w_bits) for j in range(n_v)])
            sims = [reduce_images(similarity(F.linear(q_in(x, r * a0), wq, b), out, metric, grad, -1))
                    for r in ratios(lo, hi, n)]
            a_s = choose(sims, [r * a0 for r in ratios(lo, hi, n)], None if follow is None else follow[1])
    return w_s, a_s


def conv_search(conv, x, out, w_bits, a_bits, quant_input=True, lo=0.5, hi=1.2, n=100, follow=None):
    """BasePTQ's layer-wise conv (cosine over the output channels of each position), one round."""
    w = conv.weight.detach()

    def run(xx, ww):
        return F.conv2d(xx, ww, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    w0 = init(w.abs().max(), w_bits)
    a0 = init(x.abs().max(), a_bits) if quant_input else None
    xq = quant(x, a0, a_bits) if quant_input else x
    sims = [reduce_images(F.cosine_similarity(out, run(xq, quant(w, r * w0, w_bits)), dim=1))
            for r in ratios(lo, hi, n)]
    w_s = choose(sims, [r * w0 for r in ratios(lo, hi, n)], None if follow is None else follow[0])
    a_s = None
    if quant_input:
        wq = quant(w, w_s, w_bits)
        sims = [reduce_images(F.cosine_similarity(out, run(quant(x, r * a0, a_bits), wq), dim=1))
                for r in ratios(lo, hi, n)]
        a_s = choose(sims, [r * a0 for r in ratios(lo, hi, n)], None if follow is None else follow[1])
    return w_s, a_s


def matmul_search(a, b, out, bits, metric="cosine", grad=None, softmax=False, lo=0.5, hi=1.2, n=100, rounds=1,
                  follow=None):
    """a (images, heads, M, K) @ b (images, heads, K, N) → (a's per-head scales or the softmax
    split, b's per-head scales). The code's batching matmul keeps one scale per head."""
    heads = a.shape[1]

    def per_head(t):
        return init(t.abs().amax(dim=(0, 2, 3)), bits)

    def head_sims(o):  # (images, heads, M, N) → per head: mean over rows, sum over images
        return similarity(o, out, metric, grad, -1).mean(2).sum(0)

    def pick(make_out, s0, got):
        sims = torch.stack([head_sims(make_out((r * s0).reshape(1, heads, 1, 1))) for r in ratios(lo, hi, n)])
        return torch.stack([choose(list(sims[:, h]), [r * s0[h] for r in ratios(lo, hi, n)],
                                   None if got is None else got[h]) for h in range(heads)])

    a0, b0 = per_head(a), per_head(b)
    a_s, b_s, split = a0, b0, None
    for _ in range(rounds):
        if softmax:  # split 2^-i, i = 0..19, searched with b in float; score averaged over heads and rows
            sims = [similarity(quant_softmax(a, 2.0 ** -i, bits) @ b, out, metric, grad, -1).mean((1, 2)).sum()
                    for i in range(20)]
            split = 2.0 ** -int(torch.stack(sims).argmax())
            aq = quant_softmax(a, split, bits)
        else:
            bq = quant(b, b_s.reshape(1, heads, 1, 1), bits)
            a_s = pick(lambda s, bq=bq: quant(a, s, bits) @ bq, a0, None if follow is None else follow[0])
            aq = quant(a, a_s.reshape(1, heads, 1, 1), bits)
        b_s = pick(lambda s, aq=aq: aq @ quant(b, s, bits), b0, None if follow is None else follow[1])
    return (split if softmax else a_s), b_s
