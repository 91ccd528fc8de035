"""The PTQ search's per-op progress and its batched scoring (issue 22 item 13)."""

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.compress import CompressContext, apply_compression
from craft_runner.compress import search as S
from craft_runner.compress.quant import PTQConfig

CPU = torch.device("cpu")
LINE = re.compile(r"^(BasePTQ|PTQ4ViT) search (\d+)/(\d+) (\S+): elapsed \d+:\d\d, ETA \d+:\d\d$")


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2,
                                                            num_heads=2, num_classes=3).eval()


@pytest.mark.parametrize("method", ["base", "ptq4vit"])
@pytest.mark.parametrize("progress", [None, False])
def test_every_op_is_reported_in_order(caplog, method, progress, monkeypatch):
    model = _vit()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = CompressContext(CPU, [(x, None)])
    if progress is not None:  # train.progress, as the pipeline's context would carry it
        monkeypatch.setattr(ctx, "progress", progress, raising=False)
    cfg = PTQConfig(method=method, bits="W6A6", scale_steps=4, search_rounds=1)
    with caplog.at_level(logging.INFO, logger="craft_runner.compress.search"):
        apply_compression(model, cfg, ctx)
    lines = [LINE.match(r.getMessage()) for r in caplog.records if " search " in r.getMessage()]
    assert lines and all(lines)
    # ops in module order: every Conv2d/Linear and (quant_attention) both attention matmuls
    want = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) or n.endswith(("matmul_qk", "matmul_av"))]
    assert len(want) == 2 * 6 + 2  # per block qkv, q·kᵀ, attn·v, proj, fc1, fc2; patch embedding; head
    assert [m.group(4) for m in lines] == want
    assert [int(m.group(2)) for m in lines] == list(range(1, len(want) + 1))
    assert {int(m.group(3)) for m in lines} == {len(want)}
    assert {m.group(1) for m in lines} == {"BasePTQ" if method == "base" else "PTQ4ViT"}


def _quant(x, n_bits, s):
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return torch.clamp(torch.round(x / s), lo, hi) * s


@pytest.mark.parametrize("block", [S.SCORE_BLOCK, 50])  # one block per chunk, and many
def test_per_channel_hessian_search_is_the_hand_loop(block, monkeypatch):
    """Per output channel c, argmin over r of mean_positions (g·(conv_c(x; q(W_c, r·s0_c)) − O_c))²,
    candidate by candidate."""
    monkeypatch.setattr(S, "SCORE_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=g) * torch.tensor([0.1, 0.5, 1.0, 3.0]).reshape(4, 1, 1, 1))
    x = torch.randn(5, 3, 6, 6, generator=g)
    with torch.no_grad():
        out = conv(x)
    grad = torch.randn(out.shape, generator=g)
    bits, ratios = 3, S.candidate_ratios(0.3, 1.2, 25)
    w = conv.weight.detach()
    want = []
    for c in range(4):
        s0 = w[c].abs().max() / (2 ** (bits - 1) - 0.5)
        errs = []
        for r in ratios:
            wq = w.clone()
            wq[c] = _quant(w[c], bits, r * s0)
            o = F.conv2d(x, wq, conv.bias.detach(), padding=1)
            errs.append(float(((grad[:, c] * (o[:, c] - out[:, c])) ** 2).mean()))
        best = sorted(errs)
        assert best[1] - best[0] > 1e-5 * best[0]  # a clear argmin
        want.append(ratios[min(range(len(errs)), key=errs.__getitem__)] * s0)
    w_s, a_s = S.search_layer(conv, x, out, grad, bits, 16, ratios, 1, "hessian", w_groups=4)
    assert a_s is None
    torch.testing.assert_close(w_s.reshape(-1), torch.stack(want), rtol=0, atol=0)


@pytest.mark.parametrize("block", [S.SCORE_BLOCK, 50])
def test_post_gelu_input_search_is_the_hand_loop(block, monkeypatch):
    """Twin uniform post-GELU input, Δ_R2 = r·s0 with s0 = max(x, 0)/(2^(b−1) − ½), mse, by its formula."""
    monkeypatch.setattr(S, "SCORE_BLOCK", block)
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(10, 6)
    x = F.gelu(torch.randn(30, 10, generator=g) * 2)
    with torch.no_grad():
        out = lin(x)
    bits, ratios = 4, S.candidate_ratios(0.2, 1.2, 30)
    levels = 2 ** (bits - 1)
    d_neg = 0.16997124254703522 / levels
    s0 = x.max() / (levels - 0.5)
    errs = []
    for r in ratios:
        d = r * s0
        xq = torch.where(x < 0, torch.clamp(torch.round(x / d_neg), -levels, 0) * d_neg,
                         torch.clamp(torch.round(x / d), 0, levels - 1) * d)
        with torch.no_grad():
            errs.append(float(((lin(xq) - out) ** 2).mean()))
    best = sorted(errs)
    assert best[1] - best[0] > 1e-5 * best[0]
    want = ratios[min(range(len(errs)), key=errs.__getitem__)] * s0
    _, a_s = S.search_layer(lin, x, out, None, 16, bits, ratios, 1, "mse", post_gelu=True)
    torch.testing.assert_close(a_s, want, rtol=0, atol=0)
