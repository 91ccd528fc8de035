"""The cheap flatness methods (msam, saf, mesa, swa, rwp): one step against a hand computation of the papers'
equations, and every option through fit with a resume."""

import math

import pytest
import torch
from torch import nn

from craft_runner.config import ConfigError, OptimizerConfig, TrainConfig
from craft_runner.data import TensorLoader
from craft_runner.optim import build_optimizer
from craft_runner.optim.rwp import RWP
from craft_runner.optim.trajectory import MESA, SAF, trajectory_kl
from craft_runner.train import fit, train_step

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=1, progress=False, channels_last=False, amp="off")


def _adam_by_hand(w, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    w = [wi - lr * (mi / (1 - b1 ** t)) / (math.sqrt(vi / (1 - b2 ** t)) + eps) for wi, mi, vi in zip(w, m, v)]
    return w, m, v


def test_msam_adam_two_steps_by_hand():
    # L(w) = 0.5 * sum(c_i w_i^2): gradient c_i w_i, taken at the perturbed weights
    c = [1.0, 3.0, -2.0]
    w0 = [0.5, -1.0, 2.0]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    lr, rho = 0.1, 0.3
    opt = build_optimizer(nn.ParameterList([p]), OptimizerConfig(name="msam", base="adam", lr=lr, rho=rho))

    def grad_step():
        p.grad = torch.tensor(c, dtype=torch.float64) * p.detach()
        opt.step()

    opt.begin_epoch(None, 0)
    grad_step()
    w1, m1, v1 = _adam_by_hand(w0, [ci * wi for ci, wi in zip(c, w0)], [0.0] * 3, [0.0] * 3, 1, lr)
    n1 = math.sqrt(sum(mi * mi for mi in m1))
    wt1 = [wi - rho * mi / n1 for wi, mi in zip(w1, m1)]  # perturbed: w - rho m/||m||
    assert p.detach().tolist() == pytest.approx(wt1, rel=1e-10)
    grad_step()  # gradient at wt1, update from w1
    w2, m2, _ = _adam_by_hand(w1, [ci * wi for ci, wi in zip(c, wt1)], m1, v1, 2, lr)
    n2 = math.sqrt(sum(mi * mi for mi in m2))
    assert p.detach().tolist() == pytest.approx([wi - rho * mi / n2 for wi, mi in zip(w2, m2)], rel=1e-10)
    opt.end_epoch(None, 0)  # the epoch ends at w
    assert p.detach().tolist() == pytest.approx(w2, rel=1e-10)


def test_msam_sgd_uses_the_momentum_buffer():
    p = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = build_optimizer(nn.ParameterList([p]), OptimizerConfig(name="msam", base="sgd", lr=0.1, rho=0.5,
                                                                 momentum=0.9))
    opt.begin_epoch(None, 0)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    # buf = g = (3, 4), ||buf|| = 5; w1 = w0 - 0.1 g; perturbed w1 - 0.5 * g / 5
    assert p.detach().tolist() == pytest.approx([1 - 0.3 - 0.3, 2 - 0.4 - 0.4])


def test_trajectory_kl_by_hand():
    z = torch.tensor([[1.0, 0.0, -1.0]])
    r = torch.tensor([[0.0, 2.0, 0.5]])
    T = 2.0
    q = [math.exp(v / T) for v in z[0].tolist()]
    q = [v / sum(q) for v in q]
    p = [math.exp(v / T) for v in r[0].tolist()]
    p = [v / sum(p) for v in p]
    want = T * T * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert float(trajectory_kl(z, r, T)) == pytest.approx(want, rel=1e-6)


def test_saf_compares_with_the_logits_of_e_epochs_ago():
    p = nn.Parameter(torch.zeros(1))
    opt = SAF([p], torch.optim.SGD, epochs_ago=2, coef=0.5, temperature=1.0, start_epoch=0, lr=0.1)

    class Loader:
        y = torch.zeros(4)

    opt.prepare(nn.Linear(1, 1), Loader(), 10)
    idx = torch.tensor([1, 3])
    seen = {}
    for epoch in range(3):
        opt.begin_epoch(None, epoch)
        z = torch.randn(2, 5)
        seen[epoch] = z
        term = opt.extra_loss(z, None, idx)
        if epoch < 2:  # not active at epoch 0 (start 0 < epoch), epoch 1 compares with slot of epoch -1 (zeros)
            assert (term is None) == (epoch == 0)
    want = 0.5 * trajectory_kl(seen[2], seen[0], 1.0)
    assert float(term) == pytest.approx(float(want), rel=1e-6)
    assert opt.extra_bytes() == 4 * 3 * 5 * 4


def test_mesa_ema_update_by_hand():
    model = nn.Linear(2, 1)
    opt = MESA(list(model.parameters()), torch.optim.SGD, ema_decay=0.9, lr=0.1)
    opt.prepare(model, None, 1)
    e0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    opt.after_step(model)
    assert torch.allclose(opt.ema.weight, 0.9 * e0 + 0.1 * (e0 + 1.0))


def test_rwp_step_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    w0 = [p.detach().clone() for p in model.parameters()]
    gamma, alpha, lr = 0.05, 0.3, 0.1
    opt = build_optimizer(model, OptimizerConfig(name="rwp", base="sgd", lr=lr, momentum=0.0,
                                                 rwp_gamma=gamma, rwp_alpha=alpha))
    assert isinstance(opt, RWP)
    torch.manual_seed(7)
    train_step(model, x, y, nn.functional.cross_entropy, opt, CFG, CPU)
    # by hand: the same noise draws (weight, then bias), filter-wise std gamma * ||w_f||
    torch.manual_seed(7)
    W, b = w0
    eW = torch.randn(W.shape) * gamma * W.norm(dim=1, keepdim=True)
    eb = torch.randn(b.shape) * gamma * (b.norm() + 1e-16)

    def grads(Wv, bv, xs, ys):
        Wv, bv = Wv.clone().requires_grad_(), bv.clone().requires_grad_()
        nn.functional.cross_entropy(xs @ Wv.T + bv, ys).backward()
        return Wv.grad, bv.grad

    g1 = grads(W, b, x[:3], y[:3])
    g2 = grads(W + eW, b + eb, x[3:], y[3:])
    want = [w - lr * ((1 - alpha) * a + alpha * c) for w, a, c in zip(w0, g1, g2)]
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p.detach(), w, atol=1e-6)


def test_swa_averages_epoch_weights_and_swaps_them_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(0)
    loader = TensorLoader(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g), 8, shuffle=True)
    opt = build_optimizer(model, OptimizerConfig(name="swa", lr=1e-2, swa_start=0.5))
    ends = []
    fit(model, loader, opt, TrainConfig(epochs=4, progress=False, channels_last=False, amp="off"), CPU,
        on_epoch=lambda r: ends.append([p.detach().clone() for p in model.parameters()]))
    # epochs 2 and 3 (0-based) of 4 are averaged: start = ceil(0.5 * 4)
    for i, p in enumerate(model.parameters()):
        assert torch.allclose(p.detach(), (ends[2][i] + ends[3][i]) / 2, atol=1e-6)
    bn = model[1]
    with torch.no_grad():  # update_bn: BN statistics are the training set's (cumulative average over batches)
        h = model[0](loader.x)
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-5)


@pytest.mark.parametrize("name", ["msam", "saf", "mesa", "swa", "rwp"])
def test_every_option_fits_and_resumes(tmp_path, name):
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader(torch.randn(24, 3, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g), 8,
                              shuffle=True, seed=3)
        over = {"traj_start_epoch": 0, "saf_epochs_ago": 1, "swa_start": 0.3, "ema_decay": 0.5}
        return model, loader, build_optimizer(model, OptimizerConfig(name=name, lr=1e-2, **over))

    cfg = TrainConfig(epochs=3, progress=False, channels_last=False, amp="off")
    m1, l1, o1 = make()
    info = fit(m1, l1, o1, cfg, CPU)
    assert info["steps"] == 9 and info["optimizer_extra_bytes"] >= 0
    m4, l4, o4 = make()
    state4 = tmp_path / "state4.pt"

    import craft_runner.train as tr

    class Stop(Exception):
        pass

    real, calls = tr.atomic_save, []

    def crash_after_two(obj, path):
        real(obj, path)
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    tr.atomic_save = crash_after_two
    try:
        with pytest.raises(Stop):
            fit(m4, l4, o4, cfg, CPU, state_path=state4)
    finally:
        tr.atomic_save = real
    m5, l5, o5 = make()
    fit(m5, l5, o5, cfg, CPU, state_path=state4)
    for a, b in zip(m1.state_dict().values(), m5.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_bad_values_raise_one_line():
    with pytest.raises(ConfigError, match="optimizer.rho"):
        OptimizerConfig(name="msam", rho=0.0)
    with pytest.raises(ConfigError, match=r"optimizer.ema_decay=1.0 is not allowed: expected a value in \(0, 1\)"):
        OptimizerConfig(name="mesa", ema_decay=1.0)
    with pytest.raises(ConfigError, match="optimizer.swa_start"):
        OptimizerConfig(name="swa", swa_start=1.5)
    with pytest.raises(ConfigError, match="optimizer.rwp_gamma"):
        OptimizerConfig(name="rwp", rwp_gamma=-1.0)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_a_trajectory_window_past_the_run_is_refused(name):
    from craft_runner.schema import RunConfig

    # on from epoch start + 1 (0-based): with 4 epochs, start 2 is the last that ever switches the term on
    RunConfig(optimizer=OptimizerConfig(name=name, traj_start_epoch=2), train=TrainConfig(epochs=4))
    with pytest.raises(ConfigError, match=rf"^optimizer.traj_start_epoch=3 is not allowed: .*below train.epochs - 1 "
                                          rf"= 3 \(the {name} term"):
        RunConfig(optimizer=OptimizerConfig(name=name, traj_start_epoch=3), train=TrainConfig(epochs=4))
    RunConfig(optimizer=OptimizerConfig(name="adam", traj_start_epoch=3), train=TrainConfig(epochs=4))
    # an end that leaves no epoch strictly between start and end
    with pytest.raises(ConfigError, match=r"^optimizer.traj_end_epoch=2 is not allowed: expected null or above "):
        RunConfig(optimizer=OptimizerConfig(name=name, traj_start_epoch=1, traj_end_epoch=2),
                  train=TrainConfig(epochs=6))


def test_saf_needs_the_logits_its_first_active_epoch_compares_with():
    from craft_runner.schema import RunConfig

    # first active epoch 1 reads the logits of epoch 1 - 3 < 0: never written
    with pytest.raises(ConfigError, match=r"^optimizer.traj_start_epoch=0 is not allowed: expected at least "
                                          r"saf_epochs_ago - 1 = 2"):
        RunConfig(optimizer=OptimizerConfig(name="saf", traj_start_epoch=0, saf_epochs_ago=3),
                  train=TrainConfig(epochs=8))
    RunConfig(optimizer=OptimizerConfig(name="saf", traj_start_epoch=2, saf_epochs_ago=3), train=TrainConfig(epochs=8))
    RunConfig(optimizer=OptimizerConfig(name="mesa", traj_start_epoch=0, saf_epochs_ago=3), train=TrainConfig(epochs=8))


def test_saf_refuses_a_loader_without_indices():
    model = nn.Linear(3, 2)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    opt = build_optimizer(model, OptimizerConfig(name="saf"))
    with pytest.raises(ConfigError, match="dataset.on_device=true"):
        fit(model, loader, opt, CFG, CPU)
