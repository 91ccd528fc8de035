import torch
from torch import nn

from craft_runner.compress import target_layers
from craft_runner.compress.quant import base_ptq, fake_quant, per_channel_scale, qrange


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
    base_ptq(model, layers, w_bits=4, a_bits=8, calib_batches=batches)
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
    base_ptq(model, target_layers(model, False), w_bits=16, a_bits=32, calib_batches=[(torch.randn(2, 4), None)])
    assert torch.equal(model[0].weight, w0) and not hasattr(model[0], "input_quantizer")
