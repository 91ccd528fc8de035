"""SmoothQuant: the migration is an identity transform of the fp32 model, evens out the channel ranges it is
meant to, uses the reference's scale s = max|X|^α / max|W|^(1−α) (computed here by hand), and is refused in one
line on a model without LayerNorm → Linear pairs."""

import copy

import pytest
import timm
import torch
from torch import nn

from craft_runner.compress import CompressContext, apply_compression, check_compression
from craft_runner.compress.gptq import GPTQConfig
from craft_runner.compress.quant import PTQConfig
from craft_runner.compress.smooth import smooth_model, smooth_pairs
from craft_runner.models import cifar  # noqa: F401  (registers mixer_s_cifar and resnet20 in timm)
from craft_runner.schema import ConfigError


def _vit():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=5).eval()
    with torch.no_grad():  # an outlier channel, as Figure 2 of CrAFT shows them
        model.blocks[1].norm1.weight[7] = 40.0
        model.blocks[2].norm2.bias[3] = 25.0
    return model


def _batches(n=2, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, size, size, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(n)]


def _input_max(model, fc, batches):
    seen = []
    h = fc.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().abs().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    return torch.cat(seen).amax(0)


def test_smoothing_is_an_identity_transform_and_evens_the_ranges():
    model, batches = _vit(), _batches()
    ref = copy.deepcopy(model)
    fc = model.blocks[1].attn.qkv
    a = _input_max(model, fc, batches)
    w = fc.weight.detach().abs().amax(0)
    s = (a.clamp_min(1e-5).pow(0.5) / w.clamp_min(1e-5).pow(0.5)).clamp_min(1e-5)  # SmoothQuant's, by hand
    w_before = fc.weight.detach().clone()
    rec = smooth_model(model, 0.5, batches)
    assert rec["smoothed_pairs"] == 12  # norm1 → qkv and norm2 → fc1 in each of 6 blocks
    assert torch.allclose(fc.weight, w_before * s, rtol=1e-5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=1e-4, atol=1e-4)
    after = _input_max(model, fc, batches)
    assert after.max() < 0.5 * a.max()  # the outlier channel's range went into the weights
    assert after.max() / after.median() < a.max() / a.median()


def test_mixer_pairs_skip_the_token_mixing_mlp():
    torch.manual_seed(0)
    model = timm.create_model("mixer_s_cifar", num_classes=10).eval()
    pairs = smooth_pairs(model)
    assert pairs and all(name.endswith("norm2") for name, _, _ in pairs)
    ref = copy.deepcopy(model)
    smooth_model(model, 0.5, _batches(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_refused_in_one_line_on_a_model_without_pairs():
    model = timm.create_model("resnet20", num_classes=10)
    for cfg in (PTQConfig(smooth_alpha=0.5), GPTQConfig(smooth_alpha=0.5)):
        with pytest.raises(ConfigError, match="compress.smooth_alpha") as e:
            check_compression(model, cfg)
        assert "\n" not in str(e.value)
    check_compression(model, PTQConfig())  # off by default: nothing to refuse
    with pytest.raises(ConfigError, match="compress.smooth_alpha"):
        PTQConfig(smooth_alpha=-0.1)


def test_smoothing_before_w8a8_lowers_the_output_error_of_an_outlier_model():
    model, batches = _vit(), _batches()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for alpha in (None, 0.5):
        m = copy.deepcopy(model)
        cfg = PTQConfig(bits="W8A8", search="none", smooth_alpha=alpha)
        rec = apply_compression(m, cfg, CompressContext(torch.device("cpu"), batches, progress=False))
        with torch.no_grad():
            errs[alpha] = (m(x) - ref).norm().item()
        assert (rec.get("smooth_alpha") == alpha) and isinstance(m.blocks[0].norm1, nn.LayerNorm)
    assert errs[0.5] < errs[None]


def test_a_cell_without_pairs_is_refused_before_any_work(tmp_path):
    from helpers import TINY, compose_run

    from craft_runner import pipeline

    for comp in ("compress=gptq", "compress=ptq"):
        with pytest.raises(ConfigError, match="compress.smooth_alpha is not allowed with model ResNetCifar"):
            pipeline.run(compose_run(*TINY, comp, "compress.smooth_alpha=0.5", tmp_path=tmp_path))
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
