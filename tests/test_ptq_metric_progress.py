"""BasePTQ/PTQ4ViT search metric (issue 22 item 10) and the search's progress and batching (item 13)."""


import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, compose_run
from torch import nn

from craft_runner import pipeline
from craft_runner.compress import CompressContext, apply_compression
from craft_runner.compress.quant import PTQConfig, fake_quant, init_scale
from craft_runner.compress.search import candidate_ratios
from craft_runner.config import ConfigError, to_run_config

CPU = torch.device("cpu")


def _tiny_linear(seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(12, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 12, generator=g) * torch.linspace(0.2, 2.0, 6).reshape(6, 1))
        lin.bias.copy_(torch.randn(6, generator=g) * 0.1)
    x = torch.randn(40, 12, generator=g) * torch.linspace(0.5, 3.0, 12)
    y = torch.randint(0, 6, (40,), generator=g)
    return nn.Sequential(lin).eval(), x, y


def _by_hand(lin, x, out, grad, w_bits, a_bits, ratios, metric):
    """One round of the weight-then-input search, candidate by candidate, as the docs define it:
    hessian: argmin mean((dL/dO ⊙ (Ô − O))²); cosine: argmax of the mean cosine over tokens."""
    w, b = lin.weight.detach(), lin.bias.detach()

    def err(o):
        if metric == "hessian":
            return float(((grad * (o - out)) ** 2).mean())
        return -float(F.cosine_similarity(o, out, dim=-1).mean())

    w0 = init_scale(w.abs().max(), w_bits)
    a0 = init_scale(x.abs().max(), a_bits) if a_bits < 16 else None
    xq = x if a0 is None else fake_quant(x, a_bits, a0)
    w_errs = [err(F.linear(xq, fake_quant(w, w_bits, r * w0), b)) for r in ratios]
    w_s = ratios[min(range(len(ratios)), key=w_errs.__getitem__)] * w0
    if a0 is None:
        return w_s, None, w_errs
    wq = fake_quant(w, w_bits, w_s)
    a_errs = [err(F.linear(fake_quant(x, a_bits, r * a0), wq, b)) for r in ratios]
    return w_s, ratios[min(range(len(ratios)), key=a_errs.__getitem__)] * a0, w_errs


@pytest.mark.parametrize("bits", ["W3A16", "W3A4"])
def test_base_ptq_hessian_metric_is_the_brute_force_argmin_and_not_overridden(bits):
    model, x, y = _tiny_linear(0)
    lin = model[0]
    with torch.no_grad():
        out = lin(x)
    grad = torch.softmax(out, -1) - F.one_hot(y, 6).float()  # ∂/∂O of the summed cross-entropy (hessian_loss=ce)
    kw = dict(method="base", bits=bits, scale_steps=40, quant_stem_input=True, hessian_loss="ce")
    cfg = PTQConfig(metric="hessian", **kw)
    ratios = candidate_ratios(cfg.scale_min, cfg.scale_max, cfg.scale_steps)
    w_bits, a_bits = cfg.w_bits, cfg.a_bits
    want_w, want_a, errs = _by_hand(lin, x, out, grad, w_bits, a_bits, ratios, "hessian")
    best = sorted(errs)
    assert best[1] - best[0] > 1e-4 * abs(best[0])  # a clear argmin: float tolerance cannot flip it
    cos_w, cos_a, _ = _by_hand(lin, x, out, grad, w_bits, a_bits, ratios, "cosine")
    assert not torch.isclose(want_w, cos_w)  # the two metrics choose apart, so an override would show

    w_fp = lin.weight.detach().clone()
    info = apply_compression(model, cfg, CompressContext(CPU, [(x, y)]))
    assert info["method"] == "base" and info["metric"] == "hessian" and info["hessian_loss"] == "ce"
    assert torch.equal(lin.weight, fake_quant(w_fp, w_bits, want_w))
    if want_a is not None:
        assert torch.isclose(lin.input_quantizer.scale, want_a)

    # the default, cosine, chooses the cosine argmin on the same layer
    model, x, y = _tiny_linear(0)
    info = apply_compression(model, PTQConfig(**kw), CompressContext(CPU, [(x, y)]))
    assert info["metric"] == "cosine" and info["hessian_loss"] is None
    assert torch.equal(model[0].weight, fake_quant(w_fp, w_bits, cos_w))
    if cos_a is not None:
        assert torch.isclose(model[0].input_quantizer.scale, cos_a)


def test_metric_defaults_and_choices():
    assert (PTQConfig().metric, PTQConfig(method="ptq4vit").metric, PTQConfig(search="none").metric) == \
           ("cosine", "hessian", None)
    for kw in [dict(metric="hessian"), dict(metric="mse"), dict(method="ptq4vit", metric="mse"),
               dict(method="ptq4vit", metric="cosine", weight_granularity="tensor"),
               dict(metric="hessian", weight_granularity="channel")]:
        assert PTQConfig(**kw).metric == kw["metric"]
    for kw, match in [(dict(metric="l2"),
                       r"^compress.metric='l2' is not allowed: expected one of cosine, hessian, mse$"),
                      (dict(method="ptq4vit", metric="hesian"), r"^compress.metric='hesian'"),
                      (dict(search="none", metric="hessian"), r"^compress.metric='hessian' .*search=none"),
                      (dict(method="ptq4vit", metric="cosine"),
                       r"^compress.weight_granularity='mixed' .*metric=cosine")]:
        with pytest.raises(ValueError, match=match) as e:
            PTQConfig(**kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["ptq", "ptq4vit"])
def test_a_bad_metric_is_refused_before_any_work(tmp_path, method):
    overrides = (*TINY, f"compress={method}", "compress.metric=cosinus")
    with pytest.raises(ConfigError, match=r"^compress.metric='cosinus' is not allowed") as e:
        to_run_config(compose_run(*overrides))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^compress.metric='cosinus'"):
        pipeline.run(compose_run(*overrides, tmp_path=tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert to_run_config(compose_run(*TINY, f"compress={method}", "compress.metric=hessian")).compress.metric == \
           "hessian"
