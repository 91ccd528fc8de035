"""GPTQ against independent computations: a slow textbook OBS loop written here from the paper's equations, the
reference's asymmetric min-max grid by hand, and round-to-nearest's output error on the same layer."""

import copy

import pytest
import torch
from torch import nn

from craft_runner.compress import CompressContext, apply_compression, check_compression
from craft_runner.compress.gptq import GPTQConfig, gptq_matrix
from craft_runner.compress.obs import HessianAccumulator, weight_matrix
from craft_runner.schema import ConfigError

D = torch.float64


def grid(x, bits):
    """The reference's asymmetric min-max grid of one row (or group), by hand: (scale, zero)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    scale = (hi - lo) / (2 ** bits - 1)
    return scale, round(-lo / scale)


def rtn(x, scale, zero, bits):
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1) - zero)


def textbook_gptq(W, H, bits, damp=0.01, group=0, order=None):
    """OBS one column at a time (Frantar et al. eqs. 2-3): quantize column q, spread its error over the others
    with −err·H⁻¹[q, :]/H⁻¹[q, q], then remove q from H⁻¹ (Gaussian elimination of row and column q)."""
    W = W.clone()
    C = W.shape[1]
    order = list(range(C)) if order is None else list(order)
    Hd = H + damp * H.diagonal().mean() * torch.eye(C, dtype=D)
    Hinv = torch.linalg.inv(Hd)
    rows = [grid(W[r], bits) for r in range(W.shape[0])]
    Q = torch.zeros_like(W)
    for k, q in enumerate(order):
        if group and k % group == 0:
            cols = order[k:k + group]
            rows = [grid(W[r, cols], bits) for r in range(W.shape[0])]
        qcol = torch.tensor([rtn(W[r, q], *rows[r], bits) for r in range(W.shape[0])], dtype=D)
        err = (W[:, q] - qcol) / Hinv[q, q]
        W -= err[:, None] * Hinv[q, :][None, :]
        Q[:, q] = qcol
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return Q


def layer_data(rows=8, cols=12, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=D)
    X = torch.randn(n, cols, generator=g, dtype=D) @ mix  # correlated inputs: the OBS update matters
    W = torch.randn(rows, cols, generator=g, dtype=D)
    return W, X, 2 * X.t() @ X / n


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block", [12, 5, 1])
def test_equals_the_textbook_obs_loop(bits, block):
    W, _, H = layer_data()
    got = gptq_matrix(W[None], H[None], bits, block_size=block)["Q"][0]
    assert torch.allclose(got, textbook_gptq(W, H, bits), atol=1e-10, rtol=0)


def test_groups_and_act_order_equal_the_textbook_loop():
    W, _, H = layer_data(cols=16)
    # groups as the sweep reaches them (block = group: the reference's grid then sees every earlier update)
    got = gptq_matrix(W[None], H[None], 3, group_size=4, block_size=4)["Q"][0]
    assert torch.allclose(got, textbook_gptq(W, H, 3, group=4), atol=1e-10, rtol=0)
    order = torch.argsort(H.diagonal(), descending=True).tolist()
    got = gptq_matrix(W[None], H[None], 3, act_order=True, block_size=16)["Q"][0]
    assert torch.allclose(got, textbook_gptq(W, H, 3, order=order), atol=1e-10, rtol=0)


def test_weights_land_on_the_per_channel_asymmetric_grid_and_dead_inputs_are_zeroed():
    W, X, _ = layer_data(rows=6, cols=10)
    X[:, 3] = 0  # a dead input: H_33 = 0
    H = 2 * X.t() @ X / len(X)
    out = gptq_matrix(W[None], H[None], 3)
    Q = out["Q"][0]
    assert torch.all(Q[:, 3] == 0)
    for r in range(6):
        w = W[r].clone()
        w[3] = 0
        scale, zero = grid(w, 3)  # the grid is taken once, from the weights with dead columns zeroed
        assert out["scale"][0, r, 0].item() == pytest.approx(scale) and out["zero"][0, r, 0].item() == zero
        codes = Q[r] / scale + zero
        assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.min() >= 0 and codes.max() <= 7


@pytest.mark.parametrize("bits,group", [(4, 0), (3, 0), (3, 16), (2, 0)])
def test_output_error_below_round_to_nearest(bits, group):
    W, X, H = layer_data(rows=32, cols=64, n=512, seed=1)
    Q = gptq_matrix(W[None], H[None], bits, group_size=group)["Q"][0]
    R = torch.empty_like(W)
    for r in range(W.shape[0]):
        for c0 in range(0, 64, group or 64):
            cols = slice(c0, c0 + (group or 64))
            R[r, cols] = rtn(W[r, cols], *grid(W[r, cols], bits), bits)
    err = torch.linalg.norm(X @ (W - Q).t())
    assert err < 0.8 * torch.linalg.norm(X @ (W - R).t())


def test_conv_through_unfold_and_depthwise_groups():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.Conv2d(6, 6, 3, padding=1, groups=6)):
        # spatially smooth inputs: neighbouring patch elements correlate, so the OBS update has work to do
        x = nn.functional.interpolate(torch.randn(16, conv.in_channels, 4, 4), size=9, mode="bilinear")
        acc = HessianAccumulator(conv)
        acc.add(x[:7])
        acc.add(x[7:])
        # independent: every output position's patch as one input row, per group
        cols = nn.functional.unfold(x, 3, padding=1, stride=conv.stride)  # (B, C·9, L)
        g = conv.groups
        patches = cols.reshape(16, g, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, cols.shape[1] // g)
        H = 2 * patches.transpose(1, 2) @ patches / patches.shape[1]
        assert torch.allclose(acc.H, H, rtol=1e-4, atol=1e-5)
        W = weight_matrix(conv)
        ref = conv(x)
        q = gptq_matrix(W, acc.H, 3)["Q"]
        naive = torch.stack([torch.stack([rtn(w, *grid(w, 3), 3) for w in Wg]) for Wg in W])
        out_q = nn.functional.conv2d(x, q.reshape(conv.weight.shape), conv.bias, conv.stride, 1, 1, g)
        out_r = nn.functional.conv2d(x, naive.reshape(conv.weight.shape), conv.bias, conv.stride, 1, 1, g)
        assert (out_q - ref).norm() < (out_r - ref).norm()


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=5).eval()


def test_compress_gptq_on_a_tiny_vit_keeps_per_row_grids_and_reports_each_layer(caplog):
    model = _vit()
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    caplog.set_level("INFO")
    rec = apply_compression(model, GPTQConfig(bits="W3A16", group_size=32),
                            CompressContext(torch.device("cpu"), batches, progress=False))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert rec["quantized_weights"] == len(linears)  # stem and classifier too, as BasePTQ
    qkv = model.blocks[0].attn.qkv  # the fused qkv: one Linear, one Hessian
    w = qkv.weight.detach().reshape(qkv.out_features, -1, 32)
    for r in range(0, qkv.out_features, 17):
        for g in range(w.shape[1]):
            assert len(torch.unique(w[r, g])) <= 8
    assert qkv.gptq_scale.shape == (qkv.out_features, qkv.in_features // 32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPTQ ")]
    assert any(f"GPTQ {len(linears)}/{len(linears)}" in ln for ln in lines)
    assert any("blocks.0.attn.qkv" in ln and "ETA" in ln for ln in lines)


def test_bad_gptq_settings_fail_in_one_line():
    for kw, key in [({"bits": "W1A16"}, "compress.w_bits"), ({"bits": "W12A16"}, "compress.w_bits"),
                    ({"group_size": 1}, "compress.group_size"), ({"damp": 0.0}, "compress.damp"),
                    ({"smooth_alpha": 1.5}, "compress.smooth_alpha"), ({"sequential": "row"}, "compress.sequential")]:
        with pytest.raises(ConfigError, match=key) as e:
            GPTQConfig(**kw)
        assert "\n" not in str(e.value)


def test_gptq_with_activations_uses_baseptq_input_quantizers():
    model = _vit()
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    ref = copy.deepcopy(model)
    rec = apply_compression(model, GPTQConfig(bits="W8A8"), CompressContext(torch.device("cpu"), batches,
                                                                           progress=False))
    assert rec["quantized_inputs"] >= 20 and rec["quantized_matmuls"] == 12
    assert hasattr(model.blocks[0].mlp.fc1, "input_quantizer")
    assert not hasattr(model.patch_embed.proj, "input_quantizer")  # the stem's image input stays float
    x = batches[0][0]
    assert (model(x) - ref(x)).abs().max() < 0.5
    check_compression(model, GPTQConfig())
