"""compress.fold_bn (issue 19 item 2): BatchNorm folded into the Conv2d before it, before PTQ / QAT."""

import pytest
import torch
from torch import nn

from craft_runner.compress import CompressContext, apply_compression, compression_label
from craft_runner.compress.fold import fold_bn
from craft_runner.compress.qat import QATConfig
from craft_runner.compress.quant import PTQConfig

CPU = torch.device("cpu")


def _set_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():  # statistics far from the identity, so folding changes the weights
        bn.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 4, 3, stride=2, bias=True)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(self.stem(x)))).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    m = _Net()
    _set_bn(m.stem[1], seed + 1)
    _set_bn(m.bn, seed + 2)
    return m.eval()


def _by_hand(conv, bn):
    """W·γ/√(var+eps) and β + (b − mean)·γ/√(var+eps), element by element in float64."""
    w, b = conv.weight.detach().double(), conv.bias
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    wf, bf = torch.empty_like(w), torch.empty_like(b)
    for c in range(w.shape[0]):
        k = bn.weight[c].item() / (bn.running_var[c].item() + bn.eps) ** 0.5
        wf[c] = w[c] * k
        bf[c] = bn.bias[c].item() + (b[c].item() - bn.running_mean[c].item()) * k
    return wf.float(), bf.float()


def test_folded_outputs_weights_and_biases_match_the_formula():
    m = _net()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(x)
    stem_conv, conv = m.stem[0], m.conv
    hand = [_by_hand(stem_conv, m.stem[1]), _by_hand(conv, m.bn)]
    assert fold_bn(m.train(), x) == 2
    assert m.training  # the mode is given back
    assert m.stem[0] is stem_conv and m.conv is conv  # folded in place: lists of layers stay valid
    assert isinstance(m.stem[1], nn.Identity) and isinstance(m.bn, nn.Identity)
    for c, (wf, bf) in zip((stem_conv, conv), hand):
        torch.testing.assert_close(c.weight.detach(), wf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c.bias.detach(), bf, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        got = m.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_no_conv_bn_pair_is_a_no_op():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert fold_bn(m, x) == 0
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    info = apply_compression(m, PTQConfig(search="none", bits="W4A16", fold_bn=True), CompressContext(CPU, [(x, None)]))
    assert info["fold_bn"] is True and info["bn_folded"] == 0


def test_a_bn_that_does_not_follow_its_conv_is_refused():
    class Swapped(nn.Module):  # registered conv then bn, but runs bn first
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x))

    m = Swapped().eval()
    _set_bn(m.bn, 3)
    with pytest.raises(RuntimeError, match=r"^folding BatchNorm changed the outputs .*Conv registered before it$"):
        fold_bn(m, torch.randn(2, 4, 3, 3))


def test_base_ptq_with_fold_bn_quantizes_the_folded_weights():
    """Max-based BasePTQ, per output channel: scale = max|W_folded|/(2^(b−1)−1), by hand."""
    bits = 4
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    m = _net()
    hand = {"stem.0": _by_hand(m.stem[0], m.stem[1])[0], "conv": _by_hand(m.conv, m.bn)[0]}
    cfg = PTQConfig(search="none", bits=f"W{bits}A16", fold_bn=True)
    info = apply_compression(m, cfg, CompressContext(CPU, [(x, None)]))
    assert info["fold_bn"] is True and info["bn_folded"] == 2
    top = 2 ** (bits - 1) - 1
    for name, wf in hand.items():
        w = dict(m.named_modules())[name].weight.detach()
        for c in range(wf.shape[0]):
            s = wf[c].abs().max().item() / top
            q = [min(max(round(v / s), -top - 1), top) * s for v in wf[c].flatten().tolist()]
            torch.testing.assert_close(w[c].flatten(), torch.tensor(q), rtol=1e-5, atol=1e-6)
    # unfolded (the default): the scales come from the raw Conv weights instead
    m2 = _net()
    raw = m2.conv.weight.detach().clone()
    info2 = apply_compression(m2, PTQConfig(search="none", bits=f"W{bits}A16"), CompressContext(CPU, [(x, None)]))
    assert info2["fold_bn"] is False and isinstance(m2.bn, nn.BatchNorm2d)
    s = raw[0].abs().max().item() / top
    assert torch.allclose(m2.conv.weight[0].flatten(),
                          torch.tensor([min(max(round(v / s), -top - 1), top) * s for v in raw[0].flatten().tolist()]))


def test_fold_bn_shows_in_the_labels_only_when_true():
    assert compression_label({"name": "ptq", "w_bits": 8, "a_bits": 8}) == "W8A8"
    assert compression_label({"name": "ptq", "w_bits": 8, "a_bits": 8, "fold_bn": False}) == "W8A8"
    assert compression_label({"name": "ptq", "w_bits": 8, "a_bits": 8, "fold_bn": True}) == "W8A8 +foldBN"
    assert compression_label({"name": "ptq", "method": "ptq4vit", "w_bits": 6, "a_bits": 6, "fold_bn": True,
                              "finetune_epochs": 1}) == "ptq4vit W6A6 +foldBN +ft1"
    assert compression_label({"name": "qat", "w_bits": 4, "a_bits": 4}) == "QAT W4A4"
    assert compression_label({"name": "qat", "w_bits": 4, "a_bits": 4, "fold_bn": True}) == "QAT W4A4 +foldBN"
    assert PTQConfig().fold_bn is False and QATConfig().fold_bn is False


def test_qat_with_fold_bn_removes_the_batchnorms_before_quantizing():
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    m = _net()
    conv = m.conv
    wf = _by_hand(m.conv, m.bn)[0]
    info = apply_compression(m, QATConfig(epochs=0, bits="W4A4", fold_bn=True, weight_quant="symmetric"),
                             CompressContext(CPU, [(x, None)]))
    assert info["fold_bn"] is True and info["bn_folded"] == 2
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    # the (unskipped) middle conv's symmetric per-channel grid is the folded weight's
    top = 7
    s = wf[0].abs().max().item() / top
    q = torch.tensor([min(max(round(v / s), -8), top) * s for v in wf[0].flatten().tolist()])
    torch.testing.assert_close(conv.weight[0].detach().flatten(), q, rtol=1e-5, atol=1e-6)


def test_fold_bn_with_bn_recalibration_is_refused_in_one_line():
    from craft_runner.compress.qat import QATConfig
    from craft_runner.schema import ConfigError

    for cls in (PTQConfig, QATConfig):
        with pytest.raises(ConfigError, match=r"^compress.bn_recalib=8 is not allowed: expected 0 with "
                                              r"compress.fold_bn=true"):
            cls(fold_bn=True, bn_recalib=8)
        cls(fold_bn=True)
        cls(bn_recalib=8)
