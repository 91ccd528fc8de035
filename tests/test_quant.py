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
                        (dict(metric="l1"), "compress.metric"), (dict(finetune_epochs=-1), "finetune_epochs"),
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
    if option in ("ptq4vit", "tome", "token_prune"):  # methods for ViTs only
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


# --------------------------------------------------------------------------- BasePTQ = the reference code's


def _fp_io(model, x):
    """Input and output of every Conv2d/Linear of the full-precision model on x."""
    rec = {}
    hooks = [m.register_forward_hook(lambda m, a, o: rec.__setitem__(m, (a[0].detach(), o.detach())))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rec


def _quantized_copy(model, w_scales, a_scales, bits):
    """The model with each layer's weight quantized per block (w_scales[name]: one scale per block)
    and its input quantized (a_scales[name]; None: float)."""
    from ptq_reference import quant

    q = copy.deepcopy(model)
    for name, m in q.named_modules():
        if name in w_scales:
            s = w_scales[name]
            rows = m.weight.shape[0] // len(s)
            with torch.no_grad():
                m.weight.copy_(torch.cat([quant(m.weight[j * rows:(j + 1) * rows], s[j], bits[0])
                                          for j in range(len(s))]))
        if a_scales.get(name) is not None:
            m.register_forward_pre_hook(lambda mod, a, s=a_scales[name]: (quant(a[0], s, bits[1]),))
    return q


def _block_scales(s, n_blocks):
    """A layer's weight scale as base_ptq returns it (scalar, or one per row) → one per block."""
    s = s.reshape(-1)
    return s[::len(s) // n_blocks] if len(s) > 1 else s.expand(n_blocks)


def test_base_ptq_is_the_reference_search_on_a_tiny_vit():
    """W4A6 BasePTQ on timm's test_vit (2 blocks) against an independent run of the reference
    algorithm: every scale is the reference's choice (or ties with it), the weights are quantized
    with those scales per block, and the quantized model computes what the reference's would."""
    import ptq_reference as ref
    import timm
    from ptq_reference import conv_search, linear_search, matmul_search, quant

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, depth=2).eval()
    calib, test = torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32)
    q = copy.deepcopy(model)
    info, scales = base_ptq(q, target_layers(q, False), PTQConfig(bits="W4A6"), [(calib, None)])
    assert (info["quantized_weights"], info["quantized_inputs"], info["quantized_matmuls"]) == (10, 9, 4)

    import types

    def attention(self, x, **_):  # the reference code's attention_forward, operands quantized per head if given
        B, N, C = x.shape
        qq, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        (sa, sb), (sc, sd) = getattr(self, "ref_scales", ((None, None), (None, None)))
        h = (1, self.num_heads, 1, 1)

        def qh(t, s):
            return t if s is None else quant(t, s.reshape(h), 6)
        attn = (qh(qq, sa) @ qh(k.transpose(-2, -1), sb) * self.scale).softmax(-1)
        return self.proj((qh(attn, sc) @ qh(v, sd)).transpose(1, 2).reshape(B, N, C))

    for m in model.modules():
        if hasattr(m, "qkv"):
            m.forward = types.MethodType(attention, m)
    rec, qm = _fp_io(model, calib), dict(q.named_modules())
    w_ref, a_ref = {}, {}
    ref.STATS.update(exact=0, tie=0)
    for name, m in model.named_modules():
        got = qm[name]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n_v = 3 if name.endswith("qkv") else 1
            follow = (_block_scales(scales[got], n_v), getattr(got, "input_quantizer", None))
            follow = (follow[0], None if follow[1] is None else follow[1].scale)
        if isinstance(m, nn.Conv2d):  # the patch embedding: image input in float
            assert follow[1] is None
            w_ref[name], a_ref[name] = conv_search(m, *rec[m], 4, 6, quant_input=False, follow=(follow[0][0], None))
            w_ref[name] = w_ref[name].reshape(1)
        elif isinstance(m, nn.Linear):
            x, out = rec[m]
            x, out = (x, out) if x.dim() == 3 else (x[:, None], out[:, None])
            w_ref[name], a_ref[name] = linear_search(x, m.weight.detach(), m.bias.detach(), out, 4, 6, n_v=n_v,
                                                     follow=follow)
        elif hasattr(m, "qkv"):
            heads = m.num_heads
            qkv = rec[m.qkv][1]
            qq, k, v = qkv.reshape(*qkv.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)
            mq, mv = got.matmul_qk, got.matmul_av
            s_qk = matmul_search(qq, k.transpose(-2, -1), qq @ k.transpose(-2, -1), 6,
                                 follow=(mq.quant_a.scale.flatten(), mq.quant_b.scale.flatten()))
            attn = (qq @ k.transpose(-2, -1) * m.scale).softmax(-1)
            s_av = matmul_search(attn, v, attn @ v, 6, follow=(mv.quant_a.scale.flatten(), mv.quant_b.scale.flatten()))
            m.ref_scales = (s_qk, s_av)  # read by attention(); copied with the model
    # most choices are the reference's argmax itself; the rest tie with it to float rounding
    assert ref.STATS["exact"] >= 3 * ref.STATS["tie"], ref.STATS

    for name, s in w_ref.items():
        rows = qm[name].weight.shape[0] // len(s)
        w0 = dict(model.named_modules())[name].weight.detach()
        expected = torch.cat([quant(w0[j * rows:(j + 1) * rows], s[j], 4) for j in range(len(s))])
        assert torch.equal(qm[name].weight, expected), name

    with torch.no_grad():
        fp = model(test)
    ref_q = _quantized_copy(model, w_ref, a_ref, (4, 6))  # its attention modules keep the quantizing forward
    with torch.no_grad():
        got, want = q(test), ref_q(test)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, fp, atol=1e-3)  # it did quantize


def test_base_ptq_is_the_reference_search_on_a_tiny_cnn():
    """The same on ResNet-20 at 16x16: one scale per conv weight, cosine over output channels,
    stem input in float, classifier quantized."""
    import ptq_reference as ref
    import timm
    from ptq_reference import conv_search, linear_search

    import craft_runner.models.cifar  # noqa: F401  (registers resnet20)

    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=4).eval()
    calib, test = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    q = copy.deepcopy(model)
    info, scales = base_ptq(q, target_layers(q, False), PTQConfig(bits="W4A8"), [(calib, None)])
    assert (info["quantized_weights"], info["quantized_inputs"], info["quantized_matmuls"]) == (22, 21, 0)
    rec, qm = _fp_io(model, calib), dict(q.named_modules())
    w_ref, a_ref = {}, {}
    ref.STATS.update(exact=0, tie=0)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        got = qm[name]
        follow = (scales[got], got.input_quantizer.scale if hasattr(got, "input_quantizer") else None)
        if isinstance(m, nn.Conv2d):
            assert (follow[1] is None) == (name == "conv1")
            w_ref[name], a_ref[name] = conv_search(m, *rec[m], 4, 8, quant_input=name != "conv1", follow=follow)
        else:
            x, out = rec[m]
            w_ref[name], a_ref[name] = linear_search(x[:, None], m.weight.detach(), m.bias.detach(), out[:, None], 4,
                                                     8, follow=(follow[0].reshape(1), follow[1]))
        w_ref[name] = w_ref[name].reshape(1)
    assert ref.STATS["exact"] >= 3 * ref.STATS["tie"], ref.STATS
    ref_q = _quantized_copy(model, w_ref, a_ref, (4, 8))
    for name in w_ref:
        assert torch.equal(qm[name].weight, dict(ref_q.named_modules())[name].weight), name
    with torch.no_grad():
        got, want, fp = q(test), ref_q(test), model(test)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, fp, atol=1e-3)


def test_ptq_records_quantized_counts_and_reference_defaults():
    import timm

    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32), None)]
    cases = [(dict(bits="W4A16"), 16, 0), (dict(bits="W8A8"), 16, 15), (dict(bits="W8A8", search="none"), 16, 16),
             (dict(bits="W16A8"), 0, 15), (dict(bits="W8A8", quant_stem_input=True), 16, 16)]
    for kw, n_w, n_in in cases:
        model = timm.create_model("test_resnet", num_classes=4).eval()
        info = apply_compression(model, PTQConfig(**kw), CompressContext(torch.device("cpu"), data))
        assert (info["quantized_weights"], info["quantized_inputs"]) == (n_w, n_in), kw
        assert not hasattr(model.conv1[0], "input_quantizer") or n_in == 16  # conv1.0 takes the image
    vit = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, depth=1).eval()
    info = apply_compression(vit, PTQConfig(search="none", operand_granularity="head"),
                             CompressContext(torch.device("cpu"), data))
    mm = vit.blocks[0].attn.matmul_qk
    assert mm.quant_a.max_abs.shape == (1, vit.blocks[0].attn.num_heads, 1, 1) and info["quantized_matmuls"] == 2
    base, p4, old = PTQConfig(), PTQConfig(method="ptq4vit"), PTQConfig(search="none")
    assert (base.weight_granularity, base.operand_granularity, base.quant_stem_input, base.search_rounds,
            base.scale_min, base.scale_max, base.scale_steps) == ("tensor", "head", False, 1, 0.5, 1.2, 100)
    assert (p4.weight_granularity, p4.operand_granularity, p4.quant_stem_input, p4.search_rounds, p4.scale_min,
            p4.metric, p4.hessian_loss, p4.twin_softmax) == ("mixed", "head", False, 3, 0.01, "hessian", "kl",
                                                             "reference")
    assert (old.weight_granularity, old.operand_granularity, old.quant_stem_input) == ("channel", "tensor", True)
    for kwargs, key in [(dict(weight_granularity="channel"), "weight_granularity"),
                        (dict(method="ptq4vit", search="none"), "compress.search"),
                        (dict(hessian_loss="mse"), "hessian_loss"), (dict(twin_softmax="x"), "twin_softmax"),
                        (dict(operand_granularity="row"), "operand_granularity")]:
        with pytest.raises(ConfigError, match=key):
            PTQConfig(**kwargs)


def test_experiment_configs_use_the_reference_definitions():
    from helpers import compose_run

    from craft_runner.config import to_run_config

    for overrides, method, lo, rounds in [(["experiment=craft_table2", "compress.method=ptq4vit"], "ptq4vit", 0.01, 3),
                                          (["experiment=craft_table2", "compress.method=base"], "base", 0.5, 1),
                                          (["experiment=craft_table3"], "base", 0.5, 1),
                                          (["compress=ptq4vit"], "ptq4vit", 0.01, 3)]:
        c = to_run_config(compose_run(*overrides)).compress
        assert (c.method, c.scale_min, c.search_rounds, c.scale_steps, c.quant_stem_input) == (
            method, lo, rounds, 100, False), overrides
        assert c.weight_granularity == ("mixed" if method == "ptq4vit" else "tensor")


def test_snt_ptq_is_distillers_post_training_quantizer():
    """conf/compress/ptq_w4ft.yaml on a conv and a linear layer against distiller's symmetric linear
    quantization written out: n = (2^b - 1)/2, scale = n / max|w| per layer, q = clamp(round(w·scale),
    -2^(b-1), 2^(b-1) - 1), w' = q / scale."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from craft_runner.compress.quant import base_ptq as run_base

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "compress" / "ptq_w4ft.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("defaults", "name", "finetune_epochs")}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    w0 = [model[0].weight.detach().clone(), model[3].weight.detach().clone()]
    layers = target_layers(model, skip_first_last=False)
    run_base(model, layers, PTQConfig(**kwargs), [(torch.randn(8, 3, 6, 6), None)])
    for m, w in zip((model[0], model[3]), w0):
        n = (2 ** 4 - 1) / 2
        scale = n / w.abs().max()
        want = torch.clamp(torch.round(w * scale), -8, 7) / scale
        assert torch.allclose(m.weight, want, atol=1e-6), (m.weight - want).abs().max()
