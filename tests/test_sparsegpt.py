"""SparseGPT against independent computations: a slow textbook OBS pruning loop written here from the paper's
equations, and magnitude pruning's output error on the same layer at the same sparsity or N:M pattern."""

import pytest
import torch
from torch import nn

from craft_runner.compress import CompressContext, apply_compression, check_compression
from craft_runner.compress.prune import PruneConfig
from craft_runner.compress.sparsegpt import SparseGPTConfig, sparsegpt_matrix
from craft_runner.schema import ConfigError

D = torch.float64


def layer_data(rows=8, cols=12, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=D) @ torch.randn(cols, cols, generator=g, dtype=D)
    W = torch.randn(rows, cols, generator=g, dtype=D)
    return W, X, 2 * X.t() @ X / n


def textbook_sparsegpt(W, H, sparsity=0.5, n=0, m=0, damp=0.01):
    """One column at a time over the whole layer (one block): the saliency w²/[H⁻¹_q]²_qq with H⁻¹_q the inverse
    with columns < q removed; prune, push the error onto the rest with −err·H⁻¹[q, :]/H⁻¹[q, q], remove q."""
    W = W.clone()
    R, C = W.shape
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(C, dtype=D))
    # the diagonal each column will see when reached (elimination of the earlier ones)
    d, Hk = [], Hinv.clone()
    for q in range(C):
        d.append(Hk[q, q].item())
        Hk = Hk - Hk[:, q:q + 1] @ Hk[q:q + 1, :] / Hk[q, q]
    d = torch.tensor(d, dtype=D)
    if not n:
        sal = W.pow(2) / d  # U_qq = sqrt(d_q): w²/U_qq² = w²/d_q
        thresh = sal.flatten().sort().values[int(sal.numel() * sparsity)]
        mask = sal <= thresh
    else:
        mask = torch.zeros_like(W, dtype=torch.bool)
    for q in range(C):
        if n and q % m == 0:
            sal = W[:, q:q + m].pow(2) / d[q:q + m]
            for r in range(R):
                mask[r, q + torch.argsort(sal[r])[:n]] = True
        target = torch.where(mask[:, q], torch.zeros_like(W[:, q]), W[:, q])
        err = (W[:, q] - target) / Hinv[q, q]
        W -= err[:, None] * Hinv[q, :][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return W, mask


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"n": 2, "m": 4}, {"n": 1, "m": 4}])
def test_equals_the_textbook_obs_loop(kw):
    W, _, H = layer_data()
    got = sparsegpt_matrix(W[None], H[None], block_size=12, **kw)["Q"][0]
    want, mask = textbook_sparsegpt(W, H, **kw)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert torch.equal(got == 0, mask)


def test_nm_keeps_m_minus_n_per_group_with_lazy_blocks():
    W, _, H = layer_data(rows=16, cols=32)
    Q = sparsegpt_matrix(W[None], H[None], n=2, m=4, block_size=8)["Q"][0]
    assert torch.all((Q.reshape(16, 8, 4) != 0).sum(-1) == 2)


def magnitude(W, sparsity=0.5, n=0, m=0):
    W = W.clone()
    if n:
        g = W.reshape(W.shape[0], -1, m)
        idx = g.abs().argsort(-1)[..., :n]
        return g.scatter(-1, idx, 0).reshape(W.shape)
    k = int(W.numel() * sparsity)
    W.view(-1)[W.abs().flatten().argsort()[:k]] = 0
    return W


def scaled_layer(seed, rows=32, cols=64, n=512):
    """Inputs as a layer sees them: channels of different scales, moderately correlated."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(cols, dtype=D) + 0.7 * torch.randn(cols, cols, generator=g, dtype=D) / cols ** 0.5
    X = torch.randn(n, cols, generator=g, dtype=D) @ A * torch.exp(0.5 * torch.randn(cols, generator=g, dtype=D))
    W = torch.randn(rows, cols, generator=g, dtype=D)
    return W, X, 2 * X.t() @ X / n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"sparsity": 0.8}, {"n": 2, "m": 4}, {"n": 4, "m": 8}])
def test_output_error_below_magnitude_pruning(kw, seed):
    W, X, H = scaled_layer(seed)
    Q = sparsegpt_matrix(W[None], H[None], **kw)["Q"][0]
    M = magnitude(W, **kw)
    assert (Q == 0).sum() >= (M == 0).sum()
    assert torch.linalg.norm(X @ (W - Q).t()) < 0.9 * torch.linalg.norm(X @ (W - M).t())


def test_compress_sparsegpt_skips_what_prune_skips():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=5).eval()
    batches = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    rec = apply_compression(model, SparseGPTConfig(pattern="nm", n=2, m=4),
                            CompressContext(torch.device("cpu"), batches, progress=False))
    assert (model.patch_embed.proj.weight != 0).all() and (model.head.weight != 0).all()  # dense, as prune's
    fc1 = model.blocks[0].mlp.fc1.weight
    assert torch.all((fc1.reshape(fc1.shape[0], -1, 4) == 0).sum(-1) == 2)
    assert rec["pruned_layers"] == 24 and rec["sparsity"] == pytest.approx(0.5)
    # an N:M group that does not fit a layer fails before training, as compress=nm
    with pytest.raises(ConfigError, match="compress.m=5"):
        check_compression(model, SparseGPTConfig(pattern="nm", n=1, m=5, block_size=125))
    with pytest.raises(ConfigError, match="compress.m=5"):
        check_compression(model, PruneConfig(pattern="nm", n=1, m=5))


def test_bad_sparsegpt_settings_fail_in_one_line():
    for kw, key in [({"sparsity": 1.0}, "compress.sparsity"), ({"pattern": "nm", "n": 4, "m": 4}, "compress.n"),
                    ({"pattern": "nm", "n": 2, "m": 3}, "compress.block_size"), ({"damp": -1}, "compress.damp")]:
        with pytest.raises(ConfigError, match=key) as e:
            SparseGPTConfig(**kw)
        assert "\n" not in str(e.value)


def test_conv_layers_are_pruned_through_unfold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 4))
    batches = [(torch.randn(16, 3, 6, 6), None)]
    apply_compression(model, SparseGPTConfig(sparsity=0.6), CompressContext(torch.device("cpu"), batches,
                                                                            progress=False))
    for i in (2, 4):
        assert (model[i].weight == 0).float().mean() >= 0.6
