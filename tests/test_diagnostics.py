import json

import numpy as np
import pytest
import torch
from torch import nn

from craft_runner.config import ConfigError, SharpnessConfig
from craft_runner.diagnostics import (
    activation_ranges,
    block_modules,
    explained_variance,
    layer_kind,
    run_diagnostics,
    weight_spectrum,
)


def test_explained_variance_matches_numpy_pca():
    rng = np.random.default_rng(0)
    for shape in [(12, 5), (5, 12), (8, 3, 3, 3)]:
        w = rng.standard_normal(shape) * np.linspace(0.1, 3, shape[-1])
        m = w.reshape(shape[0], -1)
        c = m - m.mean(axis=0, keepdims=True)
        s = np.linalg.svd(c, compute_uv=False)
        expected = np.cumsum(s ** 2) / np.sum(s ** 2)
        got = explained_variance(torch.tensor(w, dtype=torch.float32)).numpy()
        assert got.shape == (min(m.shape),)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        # sklearn's PCA gives the same shares (PCA of the rows of W, columns centred)
        from sklearn.decomposition import PCA

        ratio = PCA(n_components=min(m.shape)).fit(m).explained_variance_ratio_
        np.testing.assert_allclose(got[: len(ratio)], np.cumsum(ratio), rtol=1e-4, atol=1e-6)


def test_weight_spectrum_shares_and_kinds_on_a_vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=5)
    sp = weight_spectrum(model, k=16)
    kinds = {v["kind"] for v in sp["layers"].values()}
    assert {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "patch_embed", "head"} <= kinds
    w = model.blocks[0].mlp.fc1.weight.detach().double().numpy()
    c = w - w.mean(axis=0)
    s2 = np.linalg.svd(c, compute_uv=False) ** 2
    assert sp["layers"]["blocks.0.mlp.fc1"]["share"] == pytest.approx(s2[:16].sum() / s2.sum(), rel=1e-6)
    fc1 = [v["share"] for n, v in sp["layers"].items() if v["kind"] == "mlp.fc1"]
    assert sp["by_kind"]["mlp.fc1"]["share"] == pytest.approx(sum(fc1) / len(fc1))
    assert sp["by_kind"]["mlp.fc1"]["layers"] == len(model.blocks)
    # a fraction of each matrix's components
    frac = weight_spectrum(model, k=0.5)["layers"]["blocks.0.attn.qkv"]
    assert frac["n_components"] == 64 and frac["k"] == 32


def test_layer_kinds_on_a_cnn():
    import timm

    import craft_runner.models  # noqa: F401  (registers resnet20)

    model = timm.create_model("resnet20", num_classes=10)
    kinds = {n: layer_kind(n, m, model.get_classifier()) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert kinds["conv1"] == "conv3x3" and kinds["layer2.0.shortcut.0"] == "conv1x1" and kinds["fc"] == "head"
    dw = nn.Conv2d(8, 8, 3, groups=8)
    assert layer_kind("blocks.0.conv_dw", dw) == "conv.dw"


def manual_ranges(model, batches, module, channel_dim):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    x = torch.cat(seen, dim=0).movedim(channel_dim, -1)
    x = x.reshape(-1, x.shape[-1])
    return x.min(0).values, x.max(0).values


def test_activation_ranges_vit_channels_are_the_last_dim():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=5).train()
    batches = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    ar = activation_ranges(model, batches)
    assert list(ar["blocks"]) == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert model.training
    lo, hi = manual_ranges(model, batches, model.blocks[3], channel_dim=-1)
    r = ar["blocks"]["blocks.3"]
    assert r["channel_dim"] == 2 and r["channels"] == 64
    assert torch.allclose(torch.tensor(r["min"]), lo) and torch.allclose(torch.tensor(r["max"]), hi)
    assert r["absmax"] == pytest.approx(float(torch.maximum(lo.abs(), hi.abs()).max()))
    assert r["outlier_ratio"] >= 1


def test_activation_ranges_cnn_channels_are_dim_1_and_blocks_are_residual_blocks():
    import timm

    import craft_runner.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    names = [n for n, _ in block_modules(model)]
    assert names == [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    batches = [(torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last), torch.zeros(4, dtype=torch.long))]
    ar = activation_ranges(model, batches)
    lo, hi = manual_ranges(model, batches, model.layer2[0], channel_dim=1)
    r = ar["blocks"]["layer2.0"]
    assert r["channel_dim"] == 1 and r["channels"] == 16
    assert torch.allclose(torch.tensor(r["min"]), lo) and torch.allclose(torch.tensor(r["max"]), hi)


def test_run_diagnostics_every_switch_json_and_plots(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=3)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("blocks.5", "head")))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g))]
    cfg = SharpnessConfig(method="lanczos", max_iter=30, tol=1e-3, trace=True, trace_probes=5, spectrum=True,
                          spectrum_k=0.25, act_ranges=True, plots=True)
    out = run_diagnostics(model, batches, cfg, tmp_path, tag="after")
    json.dumps(out, allow_nan=False)  # strict JSON
    assert out["lambda_max"]["method"] == "lanczos" and out["lambda_max"]["iterations"] >= 1
    assert out["lambda_max"]["value"] > 0 and "value" not in out  # no legacy top-level copy
    assert out["trace"]["probes"] == 5
    assert set(out["spectrum"]["by_kind"]) >= {"attn.qkv", "mlp.fc1"}
    assert len(out["act_ranges"]["blocks"]) == 6
    for key in ("lambda_max", "lambda_max_iterations", "hessian_trace", "spectrum_share/attn.qkv",
                "act_absmax/blocks.0", "act_outlier_ratio/blocks.5"):
        assert isinstance(out["scalars"][key], float), key
    for name in ("spectrum", "act_ranges"):
        path = tmp_path / f"{name}-after.png"
        assert out["plots"][name] == str(path) and path.read_bytes()[:4] == b"\x89PNG"
    assert model.blocks[0].attn.fused_attn and model.training


def test_run_diagnostics_does_only_what_is_switched_on(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    out = run_diagnostics(model, batches, SharpnessConfig(max_iter=5), tmp_path)
    assert set(out) == {"lambda_max", "scalars"} and out["lambda_max"]["method"] == "lanczos"
    lam = out["lambda_max"]
    assert {"value", "lambda_min", "lambda_min_converged", "lambda_min_residual", "iterations", "converged",
            "method"} <= set(lam)
    # 5 products leave λmin uncertified: not recorded, its residual kept
    assert lam["lambda_min"] is None and not lam["lambda_min_converged"] and lam["lambda_min_residual"] >= 1e-3
    assert "lambda_min" not in out["scalars"]
    assert not lam["converged"]  # 5 products are too few for tol=1e-3 here
    full = run_diagnostics(model, batches, SharpnessConfig(max_iter=200, tol=1e-4), None)
    power = run_diagnostics(model, batches, SharpnessConfig(max_iter=200, tol=1e-4, method="power"), None)
    assert power["lambda_max"]["method"] == "power" and power["lambda_max"]["converged"]
    assert full["lambda_max"]["converged"]
    assert power["lambda_max"]["value"] == pytest.approx(full["lambda_max"]["value"], rel=1e-4)
    out = run_diagnostics(model, batches, SharpnessConfig(lambda_max=False, spectrum=True), None)
    assert set(out) == {"spectrum", "scalars"} and not list(tmp_path.iterdir())


def test_sharpness_config_checks():
    with pytest.raises(ConfigError, match="sharpness.method"):
        SharpnessConfig(method="arnoldi")
    with pytest.raises(ConfigError, match="sharpness.spectrum_k"):
        SharpnessConfig(spectrum_k=0)


def test_diagnostics_cached_before_certification_report_no_lambda_min():
    from craft_runner.cache import uncertified_lambda_min_dropped as _uncertified_lambda_min_dropped

    old = {"after": {"lambda_max": {"value": 10.0, "lambda_min": -3.0}, "scalars": {"lambda_max": 10.0,
                                                                                      "lambda_min": -3.0}}}
    new = {"after": {"lambda_max": {"value": 10.0, "lambda_min": -3.0, "lambda_min_converged": True,
                                    "lambda_min_residual": 1e-4}, "scalars": {"lambda_min": -3.0}}}
    got = _uncertified_lambda_min_dropped(old)["after"]
    assert got["lambda_max"]["lambda_min"] is None and not got["lambda_max"]["lambda_min_converged"]
    assert "lambda_min" not in got["scalars"] and got["scalars"]["lambda_max"] == 10.0
    assert _uncertified_lambda_min_dropped(new)["after"]["lambda_max"]["lambda_min"] == -3.0
