import pytest
import torch
from torch import nn
from torch.func import functional_call

from craft_runner.sharpness import HessianOperator, power_iteration, top_eigenvalue


def dense_hessian(model, loss_fn, batches):
    """The Hessian of the mean loss over all samples, by torch.autograd.functional.hessian."""
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = flat[i:i + k].view(s)
            i += k
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_batches(n_batches=3, bs=8, d=4, k=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, d, generator=g, dtype=torch.float64), torch.randint(0, k, (bs,), generator=g))
            for _ in range(n_batches)]


def dominant(eigs):
    return eigs[eigs.abs().argmax()].item()


def test_top_eigenvalue_matches_dense_hessian():
    model, batches = tiny_mlp(), tiny_batches()
    loss_fn = nn.functional.cross_entropy
    H = dense_hessian(model, loss_fn, batches)
    expected = dominant(torch.linalg.eigvalsh(H))
    got = top_eigenvalue(model, loss_fn, batches, max_iter=1000, tol=1e-7)
    assert got == pytest.approx(expected, rel=1e-2)
    assert expected > 0


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
    res = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=2000, tol=1e-8)
    assert model.training
    assert res.value == pytest.approx(dominant(torch.linalg.eigvalsh(H)), rel=1e-2)
    assert res.converged and res.iterations > 1


def test_power_iteration_reports_iterations_and_stops_at_max_iter():
    model, batches = tiny_mlp(), tiny_batches()
    res = power_iteration(model, nn.functional.cross_entropy, batches, max_iter=3, tol=1e-12)
    assert res.iterations == 3 and not res.converged
