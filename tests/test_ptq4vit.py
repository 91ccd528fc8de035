"""PTQ4ViT: explicit attention, calibration captures, Hessian-guided search, twin quantizers, end to end."""

import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.compress import CompressContext, apply_compression, target_layers
from craft_runner.compress.attention import make_attention_explicit
from craft_runner.compress.config import PTQConfig
from craft_runner.compress.ptq4vit import (
    GeluTwinQuantizer,
    SoftmaxTwinQuantizer,
    UniformQuantizer,
    _frozen,
    capture,
    ptq4vit,
    search_layer,
    search_matmul,
)
from craft_runner.compress.quant import (
    fake_quant,
    fine_tune_quantized,
    per_channel_scale,
    symmetric_scale,
    twin_uniform_softmax,
)

CPU = torch.device("cpu")



def small_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, **kw).eval()


def test_explicit_attention_matches_fused_attention():
    model = small_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    mms = make_attention_explicit(model)
    assert [n for n, _ in mms[:2]] == ["blocks.0.attn.matmul_qk", "blocks.0.attn.matmul_av"]
    assert len(mms) == 2 * len(model.blocks) and not model.blocks[0].attn.fused_attn
    calls = []
    h = model.blocks[0].attn.matmul_av.register_forward_hook(lambda m, a, o: calls.append(a[0]))
    with torch.no_grad():
        out = model(x)
    h.remove()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(calls[0].sum(-1), torch.ones(()))  # attn·v sees softmax rows
    assert len(make_attention_explicit(model)) == len(mms)  # idempotent
    copy.deepcopy(model)(x)  # the rebound forward survives the pipeline's deepcopy


def test_capture_gradient_is_the_cross_entropy_gradient():
    model = small_vit()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with _frozen(model):
        data = capture(model, [(model.head, 1), (model.blocks[1].mlp.fc2, 1)], [(x[:2], y[:2]), (x[2:], y[2:])],
                       need_grad=True, loss="ce")
    (feat,), logits, grad = data[model.head]
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert torch.allclose(grad, torch.softmax(ref, -1) - F.one_hot(y, 5), atol=1e-5)  # ∂ΣCE/∂logits
    assert torch.allclose(F.linear(feat, model.head.weight, model.head.bias), logits, atol=1e-5)
    assert data[model.blocks[1].mlp.fc2][0][0].shape == (4, 17, 192)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def _brute_force_weight_scales(lin, x, out, grad, bits, ratios):
    """For every candidate, the weighted error of each output channel, computed channel by channel."""
    s0 = per_channel_scale(lin.weight, bits).flatten()
    errs = torch.zeros(len(ratios), lin.out_features)
    for r_i, r in enumerate(ratios):
        for o in range(lin.out_features):
            wq = fake_quant(lin.weight[o], bits, r * s0[o])
            o_hat = x @ wq + lin.bias[o]
            errs[r_i, o] = ((grad[..., o] * (o_hat - out[..., o])) ** 2).sum()
    return ratios[errs.argmin(0)] * s0


def test_weight_search_is_the_hessian_weighted_argmin():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    x = torch.randn(40, 12)
    with torch.no_grad():
        out = lin(x)
    grad = torch.randn(40, 5) * torch.tensor([0.01, 1, 10, 1, 0.1])
    ratios = torch.linspace(0.3, 1.2, 19)
    w_s, a_s = search_layer(lin, x, out, grad, 3, 16, ratios, rounds=1, w_groups=5,
                            w_s0=per_channel_scale(lin.weight, 3))
    assert a_s is None
    assert torch.allclose(w_s.flatten(), _brute_force_weight_scales(lin, x, out, grad, 3, ratios))
    assert (w_s.flatten() != per_channel_scale(lin.weight, 3).flatten()).any()  # the search did move scales
    # per tensor: one scale, the argmin of the summed error
    w_t, _ = search_layer(lin, x, out, grad, 3, 16, ratios, rounds=1, w_s0=symmetric_scale(lin.weight.abs().max(), 3))
    s0 = symmetric_scale(lin.weight.abs().max(), 3)
    errs = [((grad * (F.linear(x, fake_quant(lin.weight, 3, r * s0), lin.bias) - out)) ** 2).sum() for r in ratios]
    assert torch.isclose(w_t, ratios[torch.stack(errs).argmin()] * s0)


def test_softmax_shift_search_is_the_argmin():
    torch.manual_seed(0)
    a = torch.softmax(3 * torch.randn(2, 2, 6, 6), -1)
    b = torch.randn(2, 2, 6, 4)
    out, grad = a @ b, torch.randn(2, 2, 6, 4)
    # the paper's twin, b quantized at this initial scale during the shift search
    qa, qb = search_matmul(a, b, out, grad, 4, torch.linspace(0.5, 1.2, 8), rounds=1, softmax="paper", max_shift=6,
                           b_s0=symmetric_scale(b.abs().amax(dim=(0, 2, 3), keepdim=True), 4))
    assert isinstance(qa, SoftmaxTwinQuantizer) and isinstance(qb, UniformQuantizer)
    assert qb.scale.shape == (1, 2, 1, 1)  # one scale per head for v
    bq0 = fake_quant(b, 4, symmetric_scale(b.abs().amax(dim=(0, 2, 3), keepdim=True), 4))
    errs = [((grad * (twin_uniform_softmax(a, 4, m) @ bq0 - out)) ** 2).sum() for m in range(7)]
    assert qa.shift == int(torch.stack(errs).argmin())


def test_ptq4vit_at_w6a6_builds_its_quantizers_and_errs_like_base_ptq():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()  # 160x160, 100 patches, 6 blocks
    x = torch.randn(40, 3, 160, 160)
    calib, test = [(x[:8], None)], x[8:]
    with torch.no_grad():
        ref = model(test)
    mse = {}
    for method in ("base", "ptq4vit"):
        m = copy.deepcopy(model)
        cfg = PTQConfig(method=method, bits="W6A6", scale_steps=20, search_rounds=2)
        info = apply_compression(m, cfg, CompressContext(CPU, calib))
        with torch.no_grad():
            mse[method] = F.mse_loss(m(test), ref).item()
    # On random weights and images the loss is flat, so the Hessian-guided score has nothing to follow: which
    # method wins here depends on the float environment (measured base 4.5e-4 / ptq4vit 4.7e-4 on this CPU,
    # 4.4e-4 / 3.1e-4 elsewhere). Whether PTQ4ViT beats BasePTQ is a claim for a trained model (craft_table2),
    # stated over seeds by craft-report; here both stay close to the float model and to each other.
    assert mse["ptq4vit"] < 1.25 * mse["base"] and max(mse.values()) < 1e-3 * ref.var().item() + 1e-3, mse
    assert info["quantized_matmuls"] == 12 and info["twin_softmax_matmuls"] == 6 and info["twin_gelu_layers"] == 6
    blk = m.blocks[2]
    assert isinstance(blk.mlp.fc2.input_quantizer, GeluTwinQuantizer)
    assert isinstance(blk.mlp.fc1.input_quantizer, UniformQuantizer)
    assert isinstance(blk.attn.matmul_av.quant_a, SoftmaxTwinQuantizer)
    assert blk.attn.matmul_qk.quant_a.scale.shape == (1, blk.attn.num_heads, 1, 1)
    for _, layer in target_layers(m, False):  # weights on a 6-bit grid per output channel
        assert all(row.unique().numel() <= 64 for row in layer.weight.flatten(1))


def test_ptq4vit_weight_only_fine_tuning_keeps_the_searched_grid():
    model = small_vit()
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))]
    layers = target_layers(model, False)
    cfg = PTQConfig(method="ptq4vit", bits="W4A16", scale_steps=8, search_rounds=1)
    info, scales = ptq4vit(model, layers, cfg, data)
    assert info["quantized_matmuls"] == 0 and not hasattr(model.blocks[0].mlp.fc1, "input_quantizer")
    before = {m: m.weight.detach().clone() for _, m in layers}

    def fine_tune(m, epochs):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        for _ in range(3):
            F.cross_entropy(m(data[0][0]), data[0][1]).backward()
            opt.step()
            opt.zero_grad()

    fine_tune_quantized(model, layers, 4, 1, fine_tune, scales)
    moved = 0
    for _, m in layers:
        assert torch.equal(m.weight, fake_quant(m.weight, 4, scales[m]))
        moved += not torch.equal(m.weight, before[m])
    assert moved > len(layers) // 2


def test_ptq4vit_runs_on_a_cnn():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    info = apply_compression(model, PTQConfig(method="ptq4vit", bits="W8A8", scale_steps=5, search_rounds=1,
                                              metric="mse"), CompressContext(CPU, [(x[:4], None)]))
    assert info["quantized_layers"] == len(target_layers(model, False)) and info["quantized_matmuls"] == 0
    with torch.no_grad():
        out = model(x)
    assert F.mse_loss(out, ref) < 0.05 * ref.var()


# --------------------------------------------------------------------------- the reference code's PTQ4ViT


def test_twin_softmax_reference_by_hand():
    from craft_runner.compress.quant import twin_softmax_reference

    # k = 4: t = 7 levels above zero per range. Split s = 2^-4 = 1/16, Δ_R1 = 1/112:
    # below s only R1 moves; above s, round(x·7)/7 on top of R1's full value s.
    x = torch.tensor([0.0, 0.004, 0.03, 0.0625, 0.2, 0.5, 1.0])
    expected = torch.tensor([0.0, 0.0, 3 / 112, 7 / 112, 1 / 7 + 1 / 16, 4 / 7 + 1 / 16, 1 + 1 / 16])
    assert torch.allclose(twin_softmax_reference(x, 4, 4), expected, atol=1e-7)
    # s = 1/4 (m = 2): round(s·7) = 2 ≠ 0, so even values below s carry the coarse range's 2/7
    assert torch.allclose(twin_softmax_reference(torch.tensor([0.1]), 4, 2), torch.tensor([2 / 7 + 3 / 28]))


def test_ptq4vit_layer_searches_are_the_reference():
    """Three rounds of Hessian-guided search on a fused qkv Linear (q, k, v scales apart), a
    post-GELU fc2 and the two attention matmuls, against the reference algorithm (tests/ptq_reference.py)."""
    from ptq_reference import linear_search, matmul_search

    from craft_runner.compress.search import candidate_ratios

    torch.manual_seed(0)
    ratios = candidate_ratios(0.01, 1.2, 100)
    kw = dict(metric="hessian", lo=0.01, hi=1.2, n=100, rounds=3)
    qkv = nn.Linear(16, 48)
    x = torch.randn(4, 10, 16)
    with torch.no_grad():
        out = qkv(x)
    grad = torch.randn(4, 10, 48)
    w_s, a_s = search_layer(qkv, x, out, grad, 4, 8, ratios, 3, "hessian", w_groups=3)
    w_ref, a_ref = linear_search(x, qkv.weight.detach(), qkv.bias.detach(), out, 4, 8, n_v=3, grad=grad, **kw)
    assert torch.equal(w_s.flatten()[::16], w_ref) and torch.equal(a_s, a_ref)
    assert len(w_s.unique()) == 3

    fc2 = nn.Linear(24, 8)
    h = F.gelu(3 * torch.randn(4, 10, 24))
    with torch.no_grad():
        out = fc2(h)
    grad = torch.randn(4, 10, 8)
    w_s, a_s = search_layer(fc2, h, out, grad, 6, 6, ratios, 3, "hessian", post_gelu=True)
    w_ref, a_ref = linear_search(h, fc2.weight.detach(), fc2.bias.detach(), out, 6, 6, gelu=True, grad=grad, **kw)
    assert torch.equal(w_s.reshape(1), w_ref) and torch.equal(a_s, a_ref)

    q, k = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 4, 6)
    out, grad = q @ k, torch.randn(2, 2, 6, 6)
    qa, qb = search_matmul(q, k, out, grad, 6, ratios, 3, "hessian")
    a_ref, b_ref = matmul_search(q, k, out, 6, grad=grad, **kw)
    assert torch.equal(qa.scale.flatten(), a_ref) and torch.equal(qb.scale.flatten(), b_ref)

    attn, v = torch.softmax(4 * torch.randn(2, 2, 6, 6), -1), torch.randn(2, 2, 6, 4)
    out, grad = attn @ v, torch.randn(2, 2, 6, 4)
    qa, qb = search_matmul(attn, v, out, grad, 4, ratios, 3, "hessian", softmax="reference")
    split, b_ref = matmul_search(attn, v, out, 4, grad=grad, softmax=True, **kw)
    assert isinstance(qa, SoftmaxTwinQuantizer) and 2.0 ** -qa.shift == split
    assert torch.equal(qb.scale.flatten(), b_ref)


def test_kl_gradient_is_the_reference_codes_and_vanishes():
    """hessian_loss=kl: ∂KL(p ‖ softmax(z))/∂O on mini-batches of 4, p the full-batch prediction of the
    same float model — zero but for rounding, while the paper's cross-entropy gradient is not."""
    model = small_vit()
    x = torch.randn(8, 3, 32, 32)
    with _frozen(model):
        (_,), _, g_kl = capture(model, [(model.head, 1)], [(x, None)], need_grad=True, loss="kl")[model.head]
        (_,), _, g_ce = capture(model, [(model.head, 1)], [(x, None)], need_grad=True, loss="ce")[model.head]
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    expected = []
    for s in range(0, 8, 4):
        z = model(x[s:s + 4]).detach().requires_grad_(True)
        F.kl_div(F.log_softmax(z, -1), p[s:s + 4], reduction="batchmean").backward()
        expected.append(z.grad)
    assert torch.allclose(g_kl, torch.cat(expected), atol=1e-12)
    assert g_kl.abs().max() < 1e-6 * g_ce.abs().max()


def test_ptq4vit_reference_defaults_on_a_vit():
    model = small_vit()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))]
    layers = target_layers(model, False)
    info, scales = ptq4vit(model, layers, PTQConfig(method="ptq4vit", bits="W4A8", scale_steps=10, search_rounds=1),
                           data)
    assert (info["quantized_weights"], info["quantized_inputs"], info["quantized_matmuls"]) == (26, 25, 12)
    assert (info["twin_softmax_matmuls"], info["twin_gelu_layers"], info["hessian_loss"]) == (6, 6, "kl")
    assert not hasattr(model.patch_embed.proj, "input_quantizer")  # the image stays in float
    assert scales[model.patch_embed.proj].shape == (model.patch_embed.proj.out_channels, 1, 1, 1)  # per channel
    assert scales[model.blocks[0].attn.qkv].flatten().unique().numel() == 3  # q, k, v
    assert scales[model.blocks[0].mlp.fc1].dim() == 0  # one per layer
    assert model.blocks[0].attn.matmul_av.quant_a.kind == "reference"
