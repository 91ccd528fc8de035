import pytest
import torch
from torch import nn
from torch.func import functional_call

from craft_runner.sharpness import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    measuring_mode,
    power_iteration,
    top_eigenvalue,
)


def dense_hessian(model, loss_fn, batches):
    """The Hessian of the mean loss over all samples w.r.t. the trainable parameters (autograd.functional)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().flatten() for _, p in named])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = flat[i:i + k].view(s)
            i += k
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_batches(n_batches=3, bs=8, d=4, k=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, d, generator=g, dtype=torch.float64), torch.randint(0, k, (bs,), generator=g))
            for _ in range(n_batches)]


def test_top_eigenvalue_matches_dense_hessian():
    model, batches = tiny_mlp(), tiny_batches()
    loss_fn = nn.functional.cross_entropy
    H = dense_hessian(model, loss_fn, batches)
    expected = torch.linalg.eigvalsh(H)[-1].item()
    for method in ("lanczos", "power"):
        got = top_eigenvalue(model, loss_fn, batches, max_iter=1000, tol=1e-7, method=method)
        assert got == pytest.approx(expected, rel=1e-5), method
    assert expected > 0


class Quadratic(nn.Module):
    """Loss 0.5 wᵀAw of the single parameter w (the input is ignored): its Hessian is A."""

    def __init__(self, eigs, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(eigs)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T)
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w


def quad_loss(out, y):
    return out


QUAD_BATCH = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long))]


def quad_case(eigs, seed=0):
    model = Quadratic(eigs, seed)
    eig = torch.linalg.eigvalsh(dense_hessian(model, quad_loss, QUAD_BATCH))
    assert torch.allclose(eig, torch.tensor(sorted(eigs), dtype=torch.float64), atol=1e-10)
    return model, eig[-1].item(), eig[0].item()


def test_the_default_returns_the_largest_eigenvalue_not_the_largest_in_magnitude():
    model, lam_max, lam_min = quad_case([3.0, -5.0, 1.0, 0.5])
    assert (lam_max, lam_min) == pytest.approx((3.0, -5.0))
    assert top_eigenvalue(model, quad_loss, QUAD_BATCH, max_iter=100, tol=1e-6) == pytest.approx(lam_max, rel=1e-6)
    lz = lanczos(model, quad_loss, QUAD_BATCH, max_iter=100, tol=1e-6)
    assert lz.converged and lz.iterations <= 4  # the Krylov space of a 4x4 matrix is exhausted after 4 products
    assert (lz.value, lz.lambda_min) == pytest.approx((lam_max, lam_min), rel=1e-6)
    pw = power_iteration(model, quad_loss, QUAD_BATCH, max_iter=1000, tol=1e-6)
    assert pw.converged and pw.value == pytest.approx(lam_max, rel=1e-5)
    assert pw.lambda_min == pytest.approx(lam_min, rel=1e-5)  # the dominant one, found first


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_largest_eigenvalue_of_a_larger_indefinite_quadratic(method):
    g = torch.Generator().manual_seed(5)
    eigs = [-10.0, 6.0] + (torch.rand(38, generator=g, dtype=torch.float64) * 8 - 4).tolist()
    model, lam_max, lam_min = quad_case(eigs, seed=1)
    fn = lanczos if method == "lanczos" else power_iteration
    res = fn(model, quad_loss, QUAD_BATCH, max_iter=500, tol=1e-4)
    assert res.converged and res.method == method and res.rel_residual <= 1e-4
    assert abs(res.value - lam_max) <= 1e-4 * abs(res.value)  # what converged promises
    assert res.lambda_min == pytest.approx(lam_min, rel=1e-3)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_not_converged_when_max_iter_is_too_small(method):
    g = torch.Generator().manual_seed(5)
    eigs = [-10.0, 6.0] + (torch.rand(38, generator=g, dtype=torch.float64) * 8 - 4).tolist()
    model, lam_max, _ = quad_case(eigs, seed=1)
    fn = lanczos if method == "lanczos" else power_iteration
    res = fn(model, quad_loss, QUAD_BATCH, max_iter=3, tol=1e-6)
    assert not res.converged and res.rel_residual > 1e-6
    # power: 3 products find the dominant (negative) eigenvalue, 3 more the shifted one
    assert res.iterations == (3 if method == "lanczos" else 6)


def test_power_iteration_is_not_fooled_by_a_slow_change_near_a_tie():
    """Two top eigenvalues 1% apart: the Rayleigh quotient barely moves long before it is accurate, so a
    relative-change rule (PyHessian's) would stop and call it converged; the residual bound does not."""
    g = torch.Generator().manual_seed(7)
    eigs = [1.0, 0.99] + (torch.rand(38, generator=g, dtype=torch.float64) - 0.5).tolist()
    model, lam_max, _ = quad_case(eigs, seed=2)
    pw = power_iteration(model, quad_loss, QUAD_BATCH, max_iter=100, tol=1e-3)
    assert pw.rel_change < 1e-3 and not pw.converged and pw.iterations == 100
    lz = lanczos(model, quad_loss, QUAD_BATCH, max_iter=100, tol=1e-3)
    assert lz.converged and abs(lz.value - lam_max) <= 1e-3 * lz.value and lz.iterations < 40


def test_hvp_matches_dense_product_with_and_without_graph_reuse():
    model, batches = tiny_mlp(), tiny_batches(n_batches=2)
    loss_fn = nn.functional.cross_entropy
    H = dense_hessian(model, loss_fn, batches)
    v = [torch.randn_like(p) for p in model.parameters()]
    flat_v = torch.cat([t.flatten() for t in v])
    for reuse in (True, False):
        hv = HessianOperator(model, loss_fn, batches, reuse_graph=reuse).matvec(v)
        assert torch.allclose(torch.cat([t.flatten() for t in hv]), H @ flat_v, atol=1e-10)


def test_batchnorm_net_in_eval_mode_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    batches = tiny_batches(n_batches=1, bs=16)
    model.train()
    with torch.no_grad():  # non-trivial running stats
        model(batches[0][0] * 2 + 1)
    model.eval()
    H = dense_hessian(model, nn.functional.cross_entropy, batches)
    model.train()
    res = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=2000, tol=1e-6)
    assert model.training
    assert res.value == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-5)
    assert res.converged and res.iterations > 1


def test_power_iteration_reports_iterations_and_stops_at_max_iter():
    model, batches = tiny_mlp(), tiny_batches()
    res = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=3, tol=1e-12)
    assert res.iterations == 3 and not res.converged


def bn_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():  # non-trivial running stats
        model(tiny_batches(n_batches=1, bs=16)[0][0] * 2 + 1)
    return model


def tiny_vit():
    """timm's test_vit, 8x8 images, one block; the Hessian is over the attention qkv and the head (243)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                              mlp_ratio=1, num_classes=3).double()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("blocks.0.attn.qkv", "head")))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
               for _ in range(2)]
    return model, batches


def dense_top(model, batches):
    """Dense Hessian in plain eval mode (no measuring-mode substitutions), fused attention off."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    was = model.training
    model.eval()
    for m in fused:
        m.fused_attn = False
    try:
        H = dense_hessian(model, nn.functional.cross_entropy, batches)
    finally:
        for m in fused:
            m.fused_attn = True
        model.train(was)
    return H, torch.linalg.eigvalsh(H)


class ConvNet(nn.Module):
    """Every convolution flavour measuring_mode substitutes: stride, padding, dilation, groups, bias, 1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=True)
        self.c3 = nn.Conv1d(4, 3, 2, bias=True)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        x = torch.tanh(self.bn(self.c1(x)))
        x = torch.relu(self.dw(x)) + x
        x = torch.tanh(self.c3(x.flatten(2)))
        return self.fc(x.mean(-1))


def conv_net():
    torch.manual_seed(0)
    model = ConvNet().double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial running stats
        model(torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1)
    batches = [(torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
               for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("frozen", [(), ("c1.weight", "dw.bias", "c3.weight")])
def test_measuring_mode_substitutions_give_the_same_hessian_vector_products(frozen):
    model, batches = conv_net()
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    v = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]
    plain = HessianOperator(model, nn.functional.cross_entropy, batches).matvec(v)
    out = model(batches[0][0])
    with measuring_mode(model):
        assert "forward" in model.c1.__dict__ and "forward" in model.bn.__dict__
        assert torch.allclose(model(batches[0][0]), out, atol=1e-12)
        fast = HessianOperator(model, nn.functional.cross_entropy, batches).matvec(v)
    assert not any("forward" in m.__dict__ for m in model.modules())
    for a, b in zip(plain, fast):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("make", ["mlp", "bn", "conv", "vit"])
def test_power_iteration_and_lanczos_match_the_dense_top_eigenvalue(make):
    if make == "mlp":
        model, batches = tiny_mlp(), tiny_batches()
    elif make == "bn":
        model, batches = bn_net(), tiny_batches(n_batches=2, bs=8)
    elif make == "conv":
        model, batches = conv_net()
    else:
        model, batches = tiny_vit()
    _, eigs = dense_top(model, batches)
    expected = eigs[-1].item()
    assert expected > 0 and expected >= abs(eigs[0].item())  # the top eigenvalue is the dominant one here
    model.train()
    lz = lanczos(model, nn.functional.cross_entropy, batches, max_iter=200, tol=1e-6)
    assert lz.value == pytest.approx(expected, rel=1e-2) and lz.converged
    # λmin: test_lambda_min_is_reported_only_when_its_own_residual_certifies_it
    assert lz.iterations <= 200 and lz.method == "lanczos" and lz.rel_residual < 1e-6
    pw = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=2000, tol=1e-6)
    assert pw.value == pytest.approx(expected, rel=1e-5) and pw.converged
    assert model.training


def test_lanczos_converges_in_fewer_products_than_power_iteration():
    model, batches = bn_net(), tiny_batches(n_batches=2, bs=8)
    lz = lanczos(model, nn.functional.cross_entropy, batches, max_iter=100, tol=1e-4)
    pw = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=1000, tol=1e-4)
    assert lz.converged and pw.converged
    assert lz.value == pytest.approx(pw.value, rel=1e-3)
    assert lz.iterations < pw.iterations
    assert top_eigenvalue(model, nn.functional.cross_entropy, batches, tol=1e-4) == lz.value
    with pytest.raises(ValueError, match="method"):
        top_eigenvalue(model, nn.functional.cross_entropy, batches, method="arnoldi")


def test_vit_double_backward_needs_the_unfused_path_and_the_flag_is_restored():
    model, batches = tiny_vit()
    attn = model.blocks[0].attn
    assert attn.fused_attn  # timm's default on this torch: fused SDPA, which has no double backward on CPU
    with pytest.raises(RuntimeError):
        HessianOperator(model.eval(), nn.functional.cross_entropy, batches).matvec(
            [torch.ones_like(p) for p in model.parameters() if p.requires_grad])
    model.train()
    with measuring_mode(model):
        assert not attn.fused_attn and not model.training
    assert attn.fused_attn and model.training
    try:
        with measuring_mode(model):
            raise KeyError
    except KeyError:
        pass
    assert attn.fused_attn and model.training


def test_hutchinson_trace_matches_the_dense_trace():
    batches = tiny_batches()
    torch.manual_seed(0)
    convex = nn.Sequential(nn.Linear(4, 3)).double()  # softmax regression: a PSD Hessian, a stable relative error
    res = hutchinson_trace(convex, nn.functional.cross_entropy, batches, probes=1000, seed=0)
    dense = torch.trace(dense_hessian(convex, nn.functional.cross_entropy, batches)).item()
    assert res.value == pytest.approx(dense, rel=0.05)
    assert res.probes == 1000 and 0 < res.stderr < 0.02 * abs(res.value)
    assert hutchinson_trace(convex, nn.functional.cross_entropy, batches, probes=1000, seed=0).value == res.value
    # an indefinite Hessian: consistent with its own standard error
    model = tiny_mlp()
    res = hutchinson_trace(model, nn.functional.cross_entropy, batches, probes=400, seed=1)
    dense = torch.trace(dense_hessian(model, nn.functional.cross_entropy, batches)).item()
    assert abs(res.value - dense) < 4 * res.stderr


def test_lambda_min_is_reported_only_when_its_own_residual_certifies_it():
    model, batches = tiny_mlp(), tiny_batches()
    _, eigs = dense_top(model, batches)
    model.train()
    # Lanczos stops when λmax converges; λmin's Ritz pair converges more slowly
    strict = lanczos(model, nn.functional.cross_entropy, batches, max_iter=51, tol=1e-2)
    assert strict.converged and not strict.lambda_min_converged and strict.lambda_min is None
    assert strict.lambda_min_residual >= 1e-2
    loose = lanczos(model, nn.functional.cross_entropy, batches, max_iter=51, tol=3e-2)
    assert loose.lambda_min_converged and loose.lambda_min_residual < 3e-2
    # certified: an eigenvalue of the dense Hessian (here the smallest) lies within tol·|θ|
    assert abs(loose.lambda_min - eigs[0].item()) <= 3e-2 * abs(loose.lambda_min)
