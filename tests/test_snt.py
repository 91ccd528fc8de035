"""SNT transforms: RPReLU, pre-activation reorder, identity when off, unsupported models."""

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from craft_runner.config import ArchConfig, ConfigError
from craft_runner.models import RPReLU, apply_snt
from craft_runner.models.snt import PreActBasicBlock, PreActDepthwiseSeparable

SUPPORTED = ["resnet20", "resnet18", "mobilenetv1_cifar", "mixer_s_cifar"]
CONF_ARCH = Path(__file__).resolve().parent.parent / "conf" / "arch"



def build(name, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10)


def randomise_bn(model, seed=1):
    """Non-trivial BN statistics and affine terms, so eval-mode outputs depend on every BN."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def call_order(model, x, root=""):
    """Names (relative to ``root``) of the modules under ``root`` in the order their forward ran."""
    order, handles = [], []
    prefix = root + "." if root else ""
    for name, m in model.named_modules():
        rel = name[len(prefix):]
        if name.startswith(prefix) and name != root and "." not in rel:
            handles.append(m.register_forward_hook(lambda mod, i, o, n=rel: order.append(n)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


# ------------------------------------------------------------------------------------------------ RPReLU


def rprelu_reference(x, gamma, zeta, beta):
    """Eq. (1) of the SNT paper, element by element in plain Python."""
    return x - gamma + zeta if x > gamma else beta * (x - gamma) + zeta


def test_rprelu_matches_the_formula_on_nchw():
    act = RPReLU(2, fused=False)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.5, -1.0]))
        act.zeta.copy_(torch.tensor([0.25, 2.0]))
        act.beta.copy_(torch.tensor([0.1, -0.5]))
    # Values on both sides of each channel's gamma, and exactly at it.
    x = torch.tensor([[[[-2.0, 0.4]], [[-1.5, 3.0]]], [[[0.5, 0.6]], [[-1.0, -0.9]]]])  # (2, 2, 1, 2)
    y = act(x)
    g, z, b = act.gamma.tolist(), act.zeta.tolist(), act.beta.tolist()
    for n in range(2):
        for c in range(2):
            for w in range(2):
                expected = rprelu_reference(x[n, c, 0, w].item(), g[c], z[c], b[c])
                assert y[n, c, 0, w].item() == pytest.approx(expected, abs=1e-6)
    # Spot values by hand: channel 0, x=-2: 0.1*(-2.5)+0.25 = 0; channel 1, x=3: 3+1+2 = 6.
    assert y[0, 0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert y[0, 1, 0, 1].item() == pytest.approx(6.0)


def test_rprelu_uses_last_dim_for_tokens():
    act = RPReLU(3, fused=False)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.0, 1.0, -1.0]))
        act.zeta.copy_(torch.tensor([1.0, 0.0, -2.0]))
        act.beta.copy_(torch.tensor([0.5, 2.0, 0.0]))
    x = torch.randn(2, 5, 3) * 2  # (B, N, C)
    y = act(x)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(5), torch.arange(3)).tolist():
        c = idx[2]
        expected = rprelu_reference(x[tuple(idx)].item(), act.gamma[c].item(), act.zeta[c].item(), act.beta[c].item())
        assert y[tuple(idx)].item() == pytest.approx(expected, abs=1e-5)


def test_fresh_rprelu_is_prelu_with_1d_parameters():
    act = RPReLU(4, fused=False)
    x = torch.randn(3, 4, 5, 5)
    assert torch.allclose(act(x), nn.PReLU(4, init=0.25)(x))
    params = dict(act.named_parameters())
    assert set(params) == {"gamma", "zeta", "beta"}
    assert all(p.ndim == 1 and p.numel() == 4 for p in params.values())  # ndim <= 1: no weight decay
    assert torch.all(act.gamma == 0) and torch.all(act.zeta == 0) and torch.all(act.beta == 0.25)


def test_rprelu_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="RPReLU"):
        RPReLU(4)(torch.randn(2, 3, 5, 5))


def test_rprelu_parameters_get_gradients():
    act = RPReLU(3, fused=False)
    act(torch.randn(4, 3, 2, 2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in act.parameters())


def unfused(model):
    """The plain formula in every RPReLU (no torch.compile: fast tests)."""
    for m in model.modules():
        if isinstance(m, RPReLU):
            m.fused = False
    return model


def rprelu_tensor_reference(x, gamma, beta, zeta, dim):
    """Eq. (1) elementwise on tensors, written from the paper: x - gamma + zeta above gamma, else
    beta (x - gamma) + zeta; per-channel parameters broadcast along ``dim``."""
    shape = [1] * x.ndim
    shape[dim] = -1
    g, b, z = (t.reshape(shape) for t in (gamma, beta, zeta))
    return torch.where(x > g, x - g + z, b * (x - g) + z)


def away_from_kinks(shape, gamma, dim, seed):
    """Inputs at least 0.05 from each channel's gamma (finite differences must not straddle the kink)."""
    gen = torch.Generator().manual_seed(seed)
    view = [1] * len(shape)
    view[dim] = -1
    side = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    return gamma.detach().reshape(view) + side * (0.05 + torch.rand(shape, generator=gen, dtype=torch.float64))


def fused_cases():
    return [("nchw", (2, 3, 4, 5), 1, torch.contiguous_format), ("channels_last", (2, 3, 4, 5), 1, torch.channels_last),
            ("tokens", (2, 6, 3), -1, torch.contiguous_format)]


@pytest.mark.slow
@pytest.mark.parametrize("case", fused_cases(), ids=lambda c: c[0])
def test_fused_rprelu_equals_the_formula_with_gradients(case):
    """The compiled kernels against eq. (1): values, gradients w.r.t. x, gamma, beta, zeta (gradcheck in
    float64 and against autograd through the unfused reference), in both memory layouts and on tokens."""
    from craft_runner.models.snt import _compiled, _FusedRPReLU

    _, shape, dim, fmt = case
    gen = torch.Generator().manual_seed(0)
    c = shape[dim]
    gamma, zeta = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(2))
    beta = torch.randn(c, generator=gen, dtype=torch.float64)  # slopes of either sign
    x = away_from_kinks(shape, gamma, dim, seed=1).contiguous(memory_format=fmt)
    leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta, zeta)]
    out = _FusedRPReLU.apply(*leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta, zeta)]
    ref = rprelu_tensor_reference(ref_leaves[0], *ref_leaves[1:], dim=dim)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert out.is_contiguous(memory_format=fmt)  # the layout is kept (channels_last stays channels_last)
    go = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, go)
    want = torch.autograd.grad(ref, ref_leaves, go)
    for name, a, b in zip(("x", "gamma", "beta", "zeta"), got, want):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12), name
    assert {"forward", "backward"} <= set(_compiled) and not _compiled.get("off"), "torch.compile is not working"
    assert torch.autograd.gradcheck(_FusedRPReLU.apply, tuple(leaves), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", [("channels_last", (4, 16, 6, 5), 1), ("tokens", (3, 7, 12), -1),
                                  ("rows", (70, 9), -1), ("many_rows", (3, 8, 40, 40), 1)], ids=lambda c: c[0])
def test_c_kernels_equal_the_formula_with_gradients(case):
    """The CPU C kernels (float32, channel-last memory) against eq. (1) in float64: output, and the gradients
    w.r.t. x, gamma, beta, zeta from autograd through the reference (sums over up to 38,400 rows, several
    blocks and threads). The path must really be taken: a machine with a C compiler builds it."""
    from craft_runner.models import rprelu_cpu
    from craft_runner.models.snt import _FusedRPReLU

    if rprelu_cpu.library() is None:
        pytest.skip("no C compiler here: the torch.compile path is tested instead")
    _, shape, dim = case
    gen = torch.Generator().manual_seed(0)
    c = shape[dim]
    gamma, zeta = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(2))
    beta = torch.randn(c, generator=gen, dtype=torch.float64)  # slopes of either sign
    x64 = away_from_kinks(shape, gamma, dim, seed=1)
    x = x64.float().contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)
    assert rprelu_cpu.usable(x)
    leaves = [t.float().clone().requires_grad_(True) for t in (x, gamma, beta, zeta)]
    out = _FusedRPReLU.apply(*leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x64, gamma, beta, zeta)]
    ref = rprelu_tensor_reference(ref_leaves[0], *ref_leaves[1:], dim=dim)
    assert out.dtype == torch.float32 and out.stride() == x.stride()
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-6)
    go = torch.randn(shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, go.float())
    want = torch.autograd.grad(ref, ref_leaves, go)
    n = x.numel() // c
    for name, a, b in zip(("x", "gamma", "beta", "zeta"), got, want):
        tol = 1e-5 if name == "x" else 1e-5 * n  # per-channel sums of n float32 terms
        assert torch.allclose(a.double(), b, atol=tol, rtol=1e-5), (name, (a.double() - b).abs().max())


def test_c_kernels_take_an_output_gradient_in_another_layout():
    """A gradient arriving NCHW for a channels-last input (as from an average pool) is brought to x's layout."""
    from craft_runner.models import rprelu_cpu
    from craft_runner.models.snt import _FusedRPReLU

    if rprelu_cpu.library() is None:
        pytest.skip("no C compiler here")
    x = torch.randn(2, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    p = [torch.randn(5, requires_grad=True) for _ in range(3)]
    xs = [x.clone().requires_grad_(True), x.double().contiguous().requires_grad_(True)]
    g = torch.randn(2, 5, 3, 3)  # NCHW-contiguous
    a = torch.autograd.grad(_FusedRPReLU.apply(xs[0], *p), [xs[0], *p], g)
    ref = rprelu_tensor_reference(xs[1], *(t.double() for t in p), dim=1)
    b = torch.autograd.grad(ref, [xs[1]], g.double())[0]
    assert torch.allclose(a[0].double(), b, atol=1e-6)


@pytest.mark.slow
def test_fused_snt_resnet20_trains_like_the_unfused_one():
    """Three Adam steps of an SNT ResNet-20, channels_last: the fused kernels change nothing but speed."""
    x, y = torch.randn(8, 3, 16, 16).to(memory_format=torch.channels_last), torch.randint(0, 10, (8,))
    models = [apply_snt(build("resnet20"), preact=True, rprelu=True).to(memory_format=torch.channels_last)
              for _ in range(2)]
    unfused(models[1])
    for m in models:
        m.train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for (n, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), n


def test_rprelu_falls_back_to_the_formula_when_compiling_fails(monkeypatch, caplog):
    from craft_runner.models import snt

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler")

    monkeypatch.setattr(snt, "_compiled", {"forward": broken, "backward": broken})
    act = RPReLU(3)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(2, 3, 4, 4)
    out = act(x)
    assert torch.allclose(out, rprelu_tensor_reference(x, act.gamma, act.beta, act.zeta, 1))
    assert snt._compiled["off"] and "torch.compile failed" in caplog.text
    xr = x.clone().requires_grad_(True)
    act(xr).sum().backward()  # the same autograd function, its kernels run eagerly
    slope = torch.where(x > act.gamma.view(1, -1, 1, 1), 1.0, act.beta.detach().view(1, -1, 1, 1))
    assert torch.allclose(xr.grad, slope) and torch.allclose(act.zeta.grad, torch.full((3,), 32.0))


def test_rprelu_state_dict_keys_and_eval_mode_double_backward():
    """fused is not saved (checkpoints keep gamma/zeta/beta); eval mode takes the formula, which has the
    double backward that Hessian-vector products need (no compilation here)."""
    act = RPReLU(3)
    assert act.fused and set(act.state_dict()) == {"gamma", "zeta", "beta"}
    act.eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    act.double()
    (g,) = torch.autograd.grad(act(x).square().sum(), [act.beta], create_graph=True)
    (hb,) = torch.autograd.grad(g.sum(), [act.beta])
    y = x - act.gamma.view(1, -1, 1, 1)
    # d/dbeta of sum((beta y + zeta)^2 [y<=0]) = sum(2 y (beta y + zeta)), again: sum(2 y^2) per channel
    assert torch.allclose(hb, (2 * y ** 2 * (y <= 0)).sum(dim=(0, 2, 3)))


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("name", SUPPORTED + ["test_vit"])
def test_both_switches_off_is_identity(name):
    model = build(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32) if name != "test_vit" else torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        y0 = model(x)
    assert apply_snt(model, preact=False, rprelu=False) is model
    with torch.no_grad():
        y1 = model(x)
    assert torch.equal(y0, y1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before


# ------------------------------------------------------------------------------------------------ preact


def test_resnet20_preact_block_order_and_linear_addition():
    model = apply_snt(build("resnet20"), preact=True, rprelu=False).eval()
    block = model.layer2[0]  # a block with a projection shortcut
    assert isinstance(block, PreActBasicBlock) and not hasattr(block, "act2")
    x = torch.randn(2, 3, 32, 32)
    order = [n for n in call_order(model, x, "layer2.0") if n not in ("drop_block", "aa", "drop_path")]
    branch = [n for n in order if n != "shortcut"]
    assert branch == ["act_pre", "conv1", "bn1", "act1", "conv2", "bn2"]
    assert "shortcut" in order
    # The block output is bn2's output plus the shortcut's: no activation after the addition.
    outs = {}
    hooks = [getattr(block, n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for n in ("bn2", "shortcut")]
    hooks.append(block.register_forward_hook(lambda m, i, o: outs.__setitem__("block", o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(outs["block"], outs["bn2"] + outs["shortcut"])
    assert (outs["block"] < 0).any()  # would be impossible after a ReLU
    # Model level: stem, stages, then the new final activation before pooling and the head.
    top = call_order(model, x)
    assert top == ["conv1", "bn1", "act1", "layer1", "layer2", "layer3", "final_act", "global_pool", "head_drop", "fc"]
    assert isinstance(model.final_act, nn.ReLU)


def test_resnet20_preact_block_equals_independent_computation():
    base = randomise_bn(build("resnet20")).eval()
    block = base.layer3[0]
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        sc = block.shortcut(x)
        expected = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(F.relu(x)))))) + sc
        base_out = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + sc)
        pre = PreActBasicBlock(block, nn.ReLU()).eval()
        got = pre(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(block(x), base_out, atol=1e-6)  # the base block is the post-activation one
    assert not torch.allclose(got, base_out, atol=1e-3)


def test_resnet18_preact_keeps_weights_and_keys():
    base = randomise_bn(build("resnet18")).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_snt(base, preact=True, rprelu=False)
    new_sd = model.state_dict()
    assert set(sd) == set(new_sd)  # ReLUs carry no parameters: same keys
    assert all(torch.equal(sd[k], new_sd[k]) for k in sd)
    blocks = [b for s in (model.layer1, model.layer2, model.layer3, model.layer4) for b in s if
              not isinstance(b, nn.ReLU)]
    assert len(blocks) == 8 and all(isinstance(b, PreActBasicBlock) for b in blocks)
    assert isinstance(model.layer4[-1], nn.ReLU)  # the final activation before pooling
    order = [n for n in call_order(model, torch.randn(1, 3, 32, 32), "layer2.0")
             if n not in ("drop_block", "aa", "drop_path", "downsample")]
    assert order == ["act_pre", "conv1", "bn1", "act1", "conv2", "bn2"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preact_does_not_corrupt_shortcut_with_inplace_activations():
    """timm's ReLUs are in place; a pre-activation on the shared input must not modify it."""
    model = apply_snt(build("resnet18"), preact=True, rprelu=False).eval()
    block = model.layer1[0]
    x = torch.randn(1, 64, 8, 8)
    x_copy = x.clone()
    with torch.no_grad():
        out = block(x)
        expected = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(F.relu(x_copy)))))) + x_copy
    assert torch.equal(x, x_copy)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("rprelu", [False, True])
def test_mobilenetv1_preact_is_a_function_preserving_reorder(rprelu):
    base = randomise_bn(build("mobilenetv1_cifar")).eval()
    if rprelu:
        apply_snt(base, preact=False, rprelu=True)
        g = torch.Generator().manual_seed(3)
        for m in base.modules():  # non-trivial RPReLU parameters
            if isinstance(m, RPReLU):
                for p in m.parameters():
                    p.data.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = base(x)
    model = apply_snt(base, preact=True, rprelu=False)
    assert all(isinstance(b, PreActDepthwiseSeparable) for b in model.blocks)
    with torch.no_grad():
        y1 = model(x)
    assert torch.allclose(y0, y1, atol=1e-5)
    order = call_order(model, x, "blocks.3")
    assert order == ["act_pre", "conv_dw", "bn1", "act1", "conv_pw", "bn2"]
    assert isinstance(model.blocks[0].act_pre, nn.Identity)


def test_mixer_preact_adds_activation_at_branch_starts():
    model = apply_snt(build("mixer_s_cifar"), preact=True, rprelu=False).eval()
    x = torch.randn(2, 3, 32, 32)
    order = call_order(model, x, "blocks.0")
    assert order == ["norm1", "act_pre1", "mlp_tokens", "norm2", "act_pre2", "mlp_channels"]
    assert call_order(model, x, "blocks.0.mlp_tokens") == ["fc1", "act", "drop1", "fc2", "drop2"]
    blk = model.blocks[0]
    assert isinstance(blk.act_pre1, nn.GELU) and isinstance(blk.act_pre2, nn.GELU)
    # Independent computation of one block.
    t = torch.randn(2, 64, 128)
    with torch.no_grad():
        u = t + blk.mlp_tokens.fc2(F.gelu(blk.mlp_tokens.fc1(F.gelu(blk.norm1(t)).transpose(1, 2)))).transpose(1, 2)
        expected = u + blk.mlp_channels.fc2(F.gelu(blk.mlp_channels.fc1(F.gelu(blk.norm2(u)))))
        assert torch.allclose(blk(t), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ rprelu


def test_rprelu_replaces_every_activation_with_the_right_channels():
    model = apply_snt(build("resnet20"), preact=False, rprelu=True)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    acts = [m for m in model.modules() if isinstance(m, RPReLU)]
    assert len(acts) == 1 + 9 * 2
    assert model.layer3[0].act1.num_channels == 64 and model.layer2[2].act2.num_channels == 32

    model = apply_snt(build("resnet20"), preact=True, rprelu=True)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, RPReLU) for m in model.modules()) == 1 + 9 * 2 + 1
    assert model.layer2[0].act_pre.num_channels == 16  # the block's input width
    assert model.final_act.num_channels == 64


def test_rprelu_on_mixer_replaces_gelu():
    model = apply_snt(build("mixer_s_cifar"), preact=True, rprelu=True)
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    blk = model.blocks[3]
    assert blk.act_pre1.num_channels == 128 and blk.act_pre2.num_channels == 128
    assert blk.mlp_tokens.act.num_channels == 64 and blk.mlp_channels.act.num_channels == 512


def test_rprelu_on_resnet18_and_mobilenet():
    r18 = apply_snt(build("resnet18"), preact=False, rprelu=True)
    assert not any(isinstance(m, nn.ReLU) for m in r18.modules())
    assert r18.act1.num_channels == 64 and r18.layer4[1].act2.num_channels == 512
    mb = apply_snt(build("mobilenetv1_cifar"), preact=True, rprelu=True)
    assert not any(isinstance(m, nn.ReLU) for m in mb.modules())
    assert mb.blocks[5].act_pre.num_channels == 256 and mb.final_act.num_channels == 1024


# -------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", SUPPORTED)
def test_transformed_model_trains(name):
    model = unfused(apply_snt(build(name), preact=True, rprelu=True).train())  # the fused path: slow tests below
    torch.manual_seed(0)
    size = 32 if name == "mixer_s_cifar" else 16  # the Mixer takes 32x32 only; CNNs run faster at 16
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    # RPReLU shifts are learned.
    act = next(m for m in model.modules() if isinstance(m, RPReLU))
    assert act.gamma.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "resnet26"])
def test_unsupported_model_is_a_config_error(name):
    with pytest.raises(ConfigError) as e:
        apply_snt(timm.create_model(name, num_classes=10), preact=True, rprelu=True)
    assert "resnet20" in str(e.value) and "mixer_s_cifar" in str(e.value) and "\n" not in str(e.value)


def test_applying_twice_is_refused():
    model = apply_snt(build("resnet20"), preact=True, rprelu=False)
    with pytest.raises(ConfigError, match="already"):
        apply_snt(model, preact=True, rprelu=False)


# ------------------------------------------------------------------------------------------- conf/arch


@pytest.mark.parametrize(
    "option, expected",
    [("base", ("base", False, False)), ("snt", ("snt", True, True)),
     ("snt_preact", ("snt", True, False)), ("snt_rprelu", ("snt", False, True))],
)
def test_conf_arch_options(option, expected):
    text = (CONF_ARCH / f"{option}.yaml").read_text()
    assert text.startswith("# ") and "@package" not in text
    merged = OmegaConf.merge(OmegaConf.structured(ArchConfig), OmegaConf.load(CONF_ARCH / f"{option}.yaml"))
    cfg = OmegaConf.to_object(merged)
    assert (cfg.name, cfg.preact, cfg.rprelu) == expected
