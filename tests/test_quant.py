import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from craft_runner.compress import CompressContext, apply_compression, target_layers
from craft_runner.compress.config import PTQConfig
from craft_runner.compress.quant import (
    GELU_NEG_RANGE,
    base_ptq,
    fake_quant,
    per_channel_scale,
    qrange,
    twin_uniform_gelu,
    twin_uniform_softmax,
)
from craft_runner.config import ConfigError


def test_fake_quant_by_hand():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.1, 0.24, 0.26, 0.9, 2.0])
    # 3 bits: integers -4..3, scale 0.25 → grid -1.0 .. 0.75
    got = fake_quant(x, 3, 0.25)
    expected = torch.tensor([-1.0, -0.25, 0.0, 0.0, 0.25, 0.25, 0.75, 0.75])
    assert torch.equal(got, expected)
    assert qrange(8) == (-128, 127) and qrange(4) == (-8, 7)


def test_fake_quant_matches_torch_per_channel_affine():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3)
    for bits in (4, 6, 8):
        s = per_channel_scale(w, bits)
        qmin, qmax = qrange(bits)
        ref = torch.fake_quantize_per_channel_affine(w, s.flatten(), torch.zeros(5, dtype=torch.int32), 0,
                                                     qmin, qmax)
        assert torch.allclose(fake_quant(w, bits, s), ref, atol=1e-6)
        # the largest |w| of every channel is on the grid's edge
        assert torch.allclose(s.flatten() * qmax, w.abs().flatten(1).amax(1))


def test_base_ptq_weights_and_calibrated_activation_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    w0 = [m.weight.detach().clone() for m in (model[0], model[2])]
    batches = [(torch.randn(16, 4), None), (3 * torch.randn(16, 4), None)]
    layers = target_layers(model, skip_first_last=False)
    # search=none: the max-based variant (per-channel weights, stem input quantized) this test pins
    base_ptq(model, layers, PTQConfig(w_bits=4, a_bits=8, search="none"), batches)
    for m, w in zip((model[0], model[2]), w0):
        assert torch.allclose(m.weight, fake_quant(w, 4, per_channel_scale(w, 4)))
        assert m.weight.unique().numel() <= 16 * m.weight.shape[0]
    expected_max = max(b[0].abs().max() for b in batches)
    assert torch.isclose(model[0].input_quantizer.max_abs, expected_max)
    x = torch.randn(3, 4)
    scale = expected_max / 127
    ref = model[2](torch.relu(nn.functional.linear(fake_quant(x, 8, scale), model[0].weight, model[0].bias)))
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_sixteen_bits_means_not_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    w0 = model[0].weight.detach().clone()
    base_ptq(model, target_layers(model, False), PTQConfig(w_bits=16, a_bits=32), [(torch.randn(2, 4), None)])
    assert torch.equal(model[0].weight, w0) and not hasattr(model[0], "input_quantizer")


# --------------------------------------------------------------------------- STE, twin uniform, fine-tuning


def test_fake_quant_gradient_is_torch_straight_through():
    x = torch.tensor([-1.3, -1.0, -0.26, 0.1, 0.74, 0.76, 0.8, 2.0], requires_grad=True)
    fake_quant(x, 3, 0.25).backward(torch.arange(1.0, 9.0))
    xr = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(xr, 0.25, 0, -4, 3).backward(torch.arange(1.0, 9.0))
    assert torch.equal(x.grad, xr.grad)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[3] == 4  # clipped: 0, inside: passed through


def test_twin_uniform_softmax_two_ranges_by_hand():
    # k = 4: each range has 2^3 = 8 levels; Δ_R2 = 1/7 covers [0, 1], Δ_R1 = Δ_R2 / 2^2 = 1/28.
    # R1 holds x < 7.5/28 = 0.2679 (its grid does not clip there), R2 the rest.
    x = torch.tensor([0.0, 0.01, 0.1, 0.24, 0.26, 0.27, 0.45, 0.93, 1.0])
    expected = torch.tensor([0, 0, 3 / 28, 7 / 28, 7 / 28, 2 / 7, 3 / 7, 7 / 7, 7 / 7])
    assert torch.allclose(twin_uniform_softmax(x, 4, 2), expected, atol=1e-7)
    # shift 0: both ranges coincide, plain unsigned 3-bit uniform on [0, 1]
    assert torch.allclose(twin_uniform_softmax(x, 4, 0), torch.round(x * 7) / 7)
    # larger shift: finer small values
    small = torch.tensor([0.003])
    assert abs(twin_uniform_softmax(small, 8, 5) - 0.003) < abs(twin_uniform_softmax(small, 8, 0) - 0.003)


def test_twin_uniform_gelu_two_ranges_by_hand():
    # k = 4: negatives on Δ_R1 = 0.16997/8 (R1 = [-0.16997, 0]), positives on Δ_R2 = 0.5 (R2 = [0, 3.5]).
    d1 = GELU_NEG_RANGE / 8
    x = torch.tensor([-0.17, -0.1, -0.01, 0.0, 0.2, 0.3, 1.4, 5.0])
    expected = torch.tensor([-8 * d1, -5 * d1, 0.0, 0.0, 0.0, 0.5, 1.5, 3.5])
    assert torch.allclose(twin_uniform_gelu(x, 4, 0.5), expected, atol=1e-7)
    gelu_min = torch.nn.functional.gelu(torch.linspace(-3, 0, 10001)).min()
    assert abs(gelu_min + GELU_NEG_RANGE) < 1e-6


def sgd_fine_tune(batches, lr=0.5, steps=3):
    def fine_tune(model, epochs):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps * epochs):
            for x, y in batches:
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
    return fine_tune


@pytest.mark.parametrize("bits", ["W4A16", "W4A8"])
def test_ptq_fine_tuning_keeps_weights_quantized(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(2)]
    probe = copy.deepcopy(model)
    # search=none: the per-channel max grid and quantized stem input this test pins
    apply_compression(probe, PTQConfig(bits=bits, search="none"), CompressContext(torch.device("cpu"), data))
    info = apply_compression(model, PTQConfig(bits=bits, finetune_epochs=1, search="none"),
                             CompressContext(torch.device("cpu"), data, sgd_fine_tune(data)))
    assert info["finetune_epochs"] == 1 and info["w_bits"] == 4
    for m, p in ((model[0], probe[0]), (model[2], probe[2])):
        assert not parametrize.is_parametrized(m)
        assert not torch.equal(m.weight, p.weight)  # fine-tuning moved the weights ...
        on_grid = fake_quant(m.weight, 4, per_channel_scale(m.weight, 4))
        assert torch.equal(m.weight, on_grid)  # ... and left them on a 4-bit grid
        assert all(row.unique().numel() <= 16 for row in m.weight)
    assert hasattr(model[0], "input_quantizer") == (bits == "W4A8")


def test_base_ptq_quantizes_vit_attention_matmuls():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    # search=none: max-calibrated per-tensor operands (ActQuantizer.max_abs), which this test reads
    info = apply_compression(model, PTQConfig(bits="W8A8", search="none"),
                             CompressContext(torch.device("cpu"), [(x, None)]))
    assert info["quantized_matmuls"] == 2 * len(model.blocks)
    mm = model.blocks[0].attn.matmul_av
    assert mm.quant_a.max_abs <= 1.0 and mm.quant_a.max_abs > 0  # attention probabilities
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.1)
    fp = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8)
    info = apply_compression(fp, PTQConfig(bits="W8A16"), CompressContext(torch.device("cpu"), [(x, None)]))
    assert info["quantized_matmuls"] == 0 and not hasattr(fp.blocks[0].attn, "matmul_qk")


def test_ptq_config_errors_are_one_line():
    for kwargs, key in [(dict(method="gptq"), "compress.method"), (dict(scale_min=0.5, scale_max=0.4), "scale_max"),
                        (dict(metric="cosine"), "compress.metric"), (dict(finetune_epochs=-1), "finetune_epochs"),
                        (dict(weight_granularity="group"), "weight_granularity"),
                        (dict(max_softmax_shift=40), "max_softmax_shift")]:
        with pytest.raises(ConfigError, match=key) as e:
            PTQConfig(**kwargs)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- every option end to end

OPTION_OVERRIDES = {
    "ptq4vit": ["compress.scale_steps=4", "compress.search_rounds=1"],
    "imp": ["compress.steps=2"],
    "qat": ["compress.epochs=1"],
}


def _conf_options():
    from pathlib import Path

    from helpers import CONF

    return sorted(p.stem for p in (Path(CONF) / "compress").glob("*.yaml"))


@pytest.mark.parametrize("option", _conf_options())
def test_every_compress_option_end_to_end(option):
    import dataclasses
    import json

    import timm
    from helpers import compose_run

    from craft_runner.config import to_run_config
    from craft_runner.report.table import compression_label

    cfg = to_run_config(compose_run(f"compress={option}", *OPTION_OVERRIDES.get(option, []))).compress
    torch.manual_seed(0)
    if option == "ptq4vit":
        model = timm.create_model("test_vit", num_classes=4, img_size=32, patch_size=8)
    else:
        model = timm.create_model("test_resnet", num_classes=4)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))) for _ in range(2)]
    tuned = []

    def fine_tune(m, epochs):
        tuned.append(epochs)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for x, y in data:
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    info = apply_compression(model, cfg, CompressContext(torch.device("cpu"), data, fine_tune))
    json.dumps(info)
    assert compression_label(dataclasses.asdict(cfg))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(data[0][0])).all()
    if cfg.name == "none":
        assert info == {}
        return
    assert info["name"] == cfg.name
    if cfg.name == "prune":
        assert info["layer_sparsity"] and abs(info["sparsity"] - cfg.sparsity) < 0.01
        assert all(abs(s - cfg.sparsity) < 0.01 for s in info["layer_sparsity"].values())
        assert len(tuned) == (cfg.steps if cfg.schedule == "iterative" else 0)
    elif cfg.name == "ptq":
        assert info["quantized_layers"] > 0 and info["method"] == cfg.method
        assert tuned == ([cfg.finetune_epochs] if cfg.finetune_epochs else [])
    elif cfg.name == "qat":
        assert info["act_quantizers"] > 0 and tuned == [cfg.epochs]
