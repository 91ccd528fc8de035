"""PACT QAT: straight-through gradients, signed variant for PReLU/RPReLU, module surgery, training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.compress import CompressContext, apply_compression, target_layers
from craft_runner.compress.config import QATConfig
from craft_runner.compress.qat import PACT, SignedPACT, find_activations, insert_pact, pact_quant, signed_pact_quant
from craft_runner.compress.quant import fake_quant, per_channel_scale
from craft_runner.config import ConfigError

CPU = torch.device("cpu")



def test_pact_forward_and_straight_through_gradients_by_hand():
    x = torch.tensor([-1.0, 0.0, 0.3, 0.99, 1.0, 2.5], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    y = pact_quant(x, alpha, 2)  # 2 bits: levels 0, 1/3, 2/3, 1
    assert torch.allclose(y, torch.tensor([0, 0, 1 / 3, 1, 1, 1]))
    y.backward(torch.arange(1.0, 7.0))
    # ∂y_q/∂x = 1 on [0, α), else 0; ∂y_q/∂α = 1 where x >= α (PACT), weighted by the upstream 1..6
    assert torch.equal(x.grad, torch.tensor([0.0, 2, 3, 4, 0, 0]))
    assert alpha.grad.item() == 5 + 6


def test_signed_pact_forward_and_gradients_by_hand():
    x = torch.tensor([-2.0, -0.5, -0.2, 0.3, 1.0, 3.0], requires_grad=True)
    lo = torch.tensor(-0.5, requires_grad=True)
    hi = torch.tensor(1.0, requires_grad=True)
    # 2 bits on [-0.5, 1]: step 0.5, zero point 1, grid {-0.5, 0, 0.5, 1}
    y = signed_pact_quant(x, lo, hi, 2)
    assert torch.allclose(y, torch.tensor([-0.5, -0.5, 0.0, 0.5, 1.0, 1.0]))
    y.backward(torch.arange(1.0, 7.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 0, 3, 4, 0, 0]))
    assert lo.grad.item() == 1 + 2 and hi.grad.item() == 5 + 6


def test_pact_l2_on_alpha_only_while_training():
    m = PACT(4, alpha=2.0, weight_decay=0.1)
    x = torch.tensor([0.5, 3.0, 4.0])
    m.train()
    m(x).sum().backward()
    assert m.alpha.grad.item() == pytest.approx(2 + 0.1 * 2.0)  # two clipped values + λα
    m.alpha.grad = None
    m.eval()
    m(x).sum().backward()
    assert m.alpha.grad.item() == pytest.approx(2.0)


def snt_like_cnn():
    from craft_runner.models.snt import RPReLU

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.PReLU(8),
        nn.Conv2d(8, 8, 3, padding=1), RPReLU(8, fused=False),  # fused: compiled, tests/test_snt.py
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_surgery_replaces_relu_and_wraps_negative_activations():
    torch.manual_seed(0)
    model = snt_like_cnn()
    with torch.no_grad():
        model[5].zeta.fill_(-0.3)  # RPReLU shifted down: its outputs go below zero
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        h1 = model[1](model[0](x).clone())
        h5 = model[:6](x)
    assert [k for _, _, k in find_activations(model)] == ["unsigned", "signed", "signed"]
    init = insert_pact(model, 4, [(x, None)], alpha_init=None, weight_decay=0.0)
    assert isinstance(model[1], PACT) and model[1].alpha.item() == pytest.approx(h1.max().item())
    for i in (3, 5):
        assert isinstance(model[i], nn.Sequential) and isinstance(model[i][1], SignedPACT)
    assert type(model[5][0]).__name__ == "RPReLU"
    assert init["5"]["alpha_lo"] == pytest.approx(h5.min().item()) and init["5"]["alpha_lo"] < 0
    assert init["5"]["alpha_hi"] == pytest.approx(h5.max().item())
    with torch.no_grad():
        q5 = model[:6](x)
    assert q5.unique().numel() <= 16 and (q5 < 0).any()  # 4-bit, negative values kept
    fixed = snt_like_cnn()
    init = insert_pact(fixed, 4, [(x, None)], alpha_init=6.0, weight_decay=0.0)
    assert init["1"] == {"alpha": 6.0} and init["3"] == {"alpha_lo": -6.0, "alpha_hi": 6.0}


def test_qat_trains_alpha_and_leaves_quantized_weights():
    torch.manual_seed(0)
    model = snt_like_cnn()
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    dense = copy.deepcopy(model)
    layers_seen = []

    def fine_tune(m, epochs):
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        for _ in range(epochs):
            for x, y in data:
                F.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad()
        layers_seen.extend(n for n, mod in m.named_modules() if parametrize.is_parametrized(mod, "weight"))

    # The earlier defaults, pinned: every activation quantized, symmetric weights, calibrated α.
    cfg = QATConfig(epochs=2, act_quant="activations", weight_quant="symmetric", alpha_init=None,
                    alpha_weight_decay=1e-4)
    info = apply_compression(model, cfg, CompressContext(CPU, data, fine_tune))
    assert layers_seen == ["2", "4"]  # stem and classifier stay in float (skip_first_last)
    assert info["act_quantizers"] == 3 and info["signed_act_quantizers"] == 2 and info["epochs"] == 2
    assert info["alpha"]["1"]["alpha"] != info["alpha_init"]["1"]["alpha"]  # α learned
    for i in (2, 4):
        w = model[i].weight
        assert not parametrize.is_parametrized(model[i])
        assert torch.equal(w, fake_quant(w, 4, per_channel_scale(w, 4)))
        assert not torch.equal(w, dense[i].weight)
    with torch.no_grad():
        act = model[:2](data[0][0])
    assert act.unique().numel() <= 16 and act.min() >= 0


def test_qat_on_snt_resnet20_with_rprelu():
    import timm

    from craft_runner.models import RPReLU, apply_snt

    torch.manual_seed(0)
    model = apply_snt(timm.create_model("resnet20", num_classes=3), preact=True, rprelu=True)
    for m in model.modules():
        if isinstance(m, RPReLU):
            m.fused = False  # no torch.compile in a fast test (the fused kernels: tests/test_snt.py)
    x = torch.randn(4, 3, 8, 8)
    cfg = QATConfig(epochs=0, act_quant="activations", weight_quant="symmetric", alpha_init=None)
    info = apply_compression(model, cfg, CompressContext(CPU, [(x, None)]))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "RPReLU" in kinds and "SignedPACT" in kinds
    assert info["signed_act_quantizers"] >= 1 and info["act_quantizers"] >= info["signed_act_quantizers"]
    for _, layer in target_layers(model, True):
        w = layer.weight
        assert torch.equal(w, fake_quant(w, 4, per_channel_scale(w, 4)))
    model(x)


def test_qat_config_errors_are_one_line():
    for kwargs, key in [(dict(bits="W4"), "compress.bits"), (dict(epochs=-1), "compress.epochs"),
                        (dict(alpha_init=0.0), "compress.alpha_init"), (dict(a_bits=1), "compress.a_bits"),
                        (dict(alpha_weight_decay=-1.0), "alpha_weight_decay")]:
        with pytest.raises(ConfigError, match=key) as e:
            QATConfig(**kwargs)
        assert "\n" not in str(e.value)
    assert (QATConfig(bits="W8A4").w_bits, QATConfig(bits="W8A4").a_bits) == (8, 4)


# --------------------------------------------------------------------------- distiller's PACTQuantizer


def test_dorefa_weights_by_hand():
    from craft_runner.compress.qat import dorefa_weight

    torch.manual_seed(0)
    w = (torch.randn(6, 5) * 0.7).requires_grad_(True)
    for k in (2, 4):
        q = dorefa_weight(w, k)
        # distiller's dorefa_quantize_param written out: tanh, to [0, 1] by the tensor's max, k-bit grid, to [-1, 1]
        t = torch.tanh(w.detach())
        v = t / (2 * t.abs().max()) + 0.5
        n = 2 ** k - 1
        assert torch.allclose(q, 2 * torch.round(v * n) / n - 1, atol=1e-6)
        assert q.detach().unique().numel() <= 2 ** k and q.abs().max() <= 1 + 1e-6
    # straight-through round: the gradient is that of the unrounded map 2·(tanh(w)/(2·max|tanh w|) + ½) − 1
    dorefa_weight(w, 4).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    t2 = torch.tanh(w2)
    (t2 / t2.abs().max()).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_qat_defaults_follow_distiller():
    from helpers import compose_run

    from craft_runner.config import to_run_config

    cfg = QATConfig()
    assert (cfg.weight_quant, cfg.act_quant, cfg.alpha_init, cfg.skip_first_last) == ("dorefa", "distiller", 8.0,
                                                                                       True)
    # α decays like the optimizer's weights (distiller's act_clip_decay=None)
    assert to_run_config(compose_run("compress=qat", "optimizer=sgd")).compress.alpha_weight_decay == 5e-4
    assert to_run_config(compose_run("compress=qat", "optimizer=adam")).compress.alpha_weight_decay == 0.0
    with pytest.raises(ConfigError, match="compress.weight_quant"):
        QATConfig(weight_quant="lsq")
    with pytest.raises(ConfigError, match="compress.act_quant"):
        QATConfig(act_quant="all")


def _layer_inputs(model, layers, x):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
             for n, m in layers]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv1_cifar", "mixer_s_cifar"])
def test_every_quantized_layer_gets_a_quantized_input_on_base_and_snt(name):
    import timm

    from craft_runner.models import apply_snt

    counts = {}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for arch in ("base", "snt"):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10)
        if arch == "snt":
            apply_snt(model, preact=True, rprelu=True)
        layers = target_layers(model, True)
        info = apply_compression(model, QATConfig(epochs=0, bits="W4A4", act_quant="layer_inputs"),
                                 CompressContext(CPU, [(x, None)]))
        counts[arch] = info["quantized_inputs"]
        assert info["quantized_inputs"] == info["quantized_weights"] == len(layers) and not info["float_inputs"]
        # independently: what each layer reads takes at most 2^4 values, and its weight at most 2^4 values in [-1, 1]
        for lname, inp in _layer_inputs(model, layers, x).items():
            assert inp.unique().numel() <= 16, (arch, lname)
        for lname, layer in layers:
            assert layer.weight.unique().numel() <= 16 and layer.weight.abs().max() <= 1 + 1e-6, (arch, lname)
    assert counts["base"] == counts["snt"]


def test_layer_input_quantizers_signed_for_layernorm_unsigned_for_pooled_relu():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.ReLU()
            self.norm = nn.LayerNorm(8)
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.act(self.conv(x))
            pooled = h.mean(dim=(2, 3))  # new values: not on the ReLU's grid any more
            return self.head(self.fc1(self.norm(pooled)) + self.fc2(pooled))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        h = model.act(model.conv(x))
        normed = model.norm(h.mean(dim=(2, 3)))
        pooled = h.mean(dim=(2, 3))
    cfg = QATConfig(epochs=0, w_bits=16, a_bits=4, alpha_init=None, skip_first_last=False, act_quant="layer_inputs")
    info = apply_compression(model, cfg, CompressContext(CPU, [(x, None)]))
    # conv reads the image, fc1 a LayerNorm output, fc2 and head computed values: each gets its own quantizer
    assert info["act_quantizers"] == 0 and info["input_quantizers"] == 4 and info["quantized_inputs"] == 4
    assert isinstance(model.act, nn.ReLU)  # feeds no layer directly: stays float
    assert isinstance(model.fc1.input_quantizer, SignedPACT) and isinstance(model.fc2.input_quantizer, PACT)
    assert model.fc1.input_quantizer.alpha_lo.item() == pytest.approx(normed.min().item())
    assert model.fc1.input_quantizer.alpha_hi.item() == pytest.approx(normed.max().item())
    assert model.fc2.input_quantizer.alpha.item() == pytest.approx(pooled.max().item())
    assert info["quantized_weights"] == 0


# --------------------------------------------------------------------------- distiller's coverage (the default)


def test_distiller_coverage_replaces_relus_but_the_first_and_last_called():
    class Net(nn.Module):
        # modules defined in the reverse of the order forward calls them: the coverage follows the calls
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.act_c, self.act_b, self.act_a = nn.ReLU(), nn.ReLU(), nn.ReLU()
            self.six, self.gelu = nn.ReLU6(), nn.GELU()
            self.fc2, self.fc1, self.stem = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(4, 8)

        def forward(self, x):
            h = self.act_a(self.stem(x))
            h = self.gelu(self.act_b(self.fc1(h)))
            return self.head(self.act_c(self.six(self.fc2(h))))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 4)
    with torch.no_grad():
        b = model.act_b(model.fc1(model.act_a(model.stem(x))))
    info = apply_compression(model, QATConfig(epochs=0, w_bits=16, alpha_init=None), CompressContext(CPU, [(x, None)]))
    # by hand: ReLUs called a, b, c; a (the stem's output) and c (the classifier's input) stay float; ReLU6 and
    # GELU are not nn.ReLU, which is all distiller's replacement factory holds
    assert isinstance(model.act_b, PACT) and model.act_b.alpha.item() == pytest.approx(b.max().item())
    assert type(model.act_a) is nn.ReLU and type(model.act_c) is nn.ReLU
    assert type(model.six) is nn.ReLU6 and type(model.gelu) is nn.GELU
    assert info["act_quant"] == "distiller" and info["act_quantizers"] == 1 and info["input_quantizers"] == 0
    assert sorted(info["float_inputs"]) == ["fc1", "fc2"]  # fc1 reads act_a (float), fc2 the GELU's output
    cfg = QATConfig(epochs=0, w_bits=16, skip_first_last=False)
    model = Net()
    apply_compression(model, cfg, CompressContext(CPU, [(x, None)]))
    assert all(isinstance(m, PACT) for m in (model.act_a, model.act_b, model.act_c))


@pytest.mark.parametrize("name, relus", [("resnet20", 19), ("mobilenetv1_cifar", 27)])
def test_distiller_coverage_on_the_snt_backbones(name, relus):
    import timm

    from craft_runner.models import apply_snt

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    assert sum(type(m) is nn.ReLU for m in model.modules()) == relus
    info = apply_compression(model, QATConfig(epochs=0), CompressContext(CPU, [(x, None)]))
    # every ReLU but the stem's act1 and the last block's act2; the first quantized layer reads the stem's act1
    assert info["act_quantizers"] == relus - 2 and type(model.act1) is nn.ReLU
    layers = len(target_layers(model, True))
    assert info["quantized_inputs"] == layers - 1
    # arch=snt: every activation is an RPReLU, none is an nn.ReLU: distiller quantizes no activation
    torch.manual_seed(0)
    snt = apply_snt(timm.create_model(name, num_classes=10), preact=True, rprelu=True)
    info = apply_compression(snt, QATConfig(epochs=0), CompressContext(CPU, [(x, None)]))
    assert info["act_quantizers"] == info["quantized_inputs"] == 0 and info["quantized_weights"] == layers
