"""Every optimizer's first steps against its formula, computed by hand on a tiny model, through train_step."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from craft_runner.config import ConfigError, OptimizerConfig, TrainConfig
from craft_runner.optim import (
    SAM,
    LookSAM,
    RandomSAM,
    build_optimizer,
    expected_cost,
    is_two_pass,
    needs_second_pass,
    param_groups,
)
from craft_runner.train import frozen_bn_stats, train_step

CPU = torch.device("cpu")
CE = nn.functional.cross_entropy


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(n, bs=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def run_steps(model, opt, data, **train_kw):
    cfg = TrainConfig(channels_last=False, progress=False, **train_kw)
    for x, y in data:
        train_step(model, x, y, CE, opt, cfg, CPU)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Ref:
    """The formulas on a flat weight vector, independent of the package's code."""

    def __init__(self, model):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.w = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        self.sizes = [s.numel() for s in self.shapes]

    def grad(self, w, x, y):
        w = w.detach().requires_grad_(True)
        params = dict(zip(self.names, [t.view(s) for t, s in zip(torch.split(w, self.sizes), self.shapes)]))
        loss = CE(functional_call(self.model, params, (x,)), y)
        return torch.autograd.grad(loss, w)[0]

    def asam_t(self, w, variant, eta=0.01):
        """ASAM's T: kwon = |w| + eta on tensors named *weight*, 1 elsewhere (SamsungLabs/ASAM); davda54 = |w|."""
        if variant == "davda54":
            return w.abs()
        is_weight = torch.cat([torch.full((k,), "weight" in n) for n, k in zip(self.names, self.sizes)])
        return torch.where(is_weight, w.abs() + eta, torch.ones_like(w))

    def sam_grad(self, w, x, y, rho, adaptive=None):
        """adaptive: None (SAM) or an ASAM variant, "kwon" / "davda54"."""
        g = self.grad(w, x, y)
        if adaptive:
            t = self.asam_t(w, adaptive)
            e = rho * t ** 2 * g / torch.linalg.vector_norm(t * g)
        else:
            e = rho * g / torch.linalg.vector_norm(g)
        return g, self.grad(w + e, x, y)


class HandSGD:
    def __init__(self, lr, momentum=0.0):
        self.lr, self.mu, self.buf = lr, momentum, None

    def __call__(self, w, g):
        self.buf = g.clone() if self.buf is None else self.mu * self.buf + g
        return w - self.lr * self.buf


class HandAdam:
    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.b1, self.b2), self.eps, self.t, self.m, self.v = lr, betas, eps, 0, 0.0, 0.0

    def __call__(self, w, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g ** 2
        mhat, vhat = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
        return w - self.lr * mhat / (vhat.sqrt() + self.eps)


def test_no_weight_decay_on_biases_and_norms_with_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3))
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(model[0].weight), id(model[4].weight)}
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if p.ndim > 1 else 1.0  # decoupled decay on weights only
        assert torch.allclose(p, before[n] * factor), n


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_plain_optimizer_steps_are_the_formula(name):
    model, data = mlp(), batches(3)
    ref = Ref(model)
    # weight decay on matrices only (param_groups): a mask over the flat vector
    mask = torch.cat([torch.full((p.numel(),), float(p.ndim > 1), dtype=torch.float64) for p in model.parameters()])
    wd, lr = 0.1, 0.01
    hand = HandSGD(lr, 0.9) if name == "sgd" else HandAdam(lr)
    w = ref.w
    for x, y in data:
        g = ref.grad(w, x, y)
        if name == "adamw":
            w = w * (1 - lr * wd * mask)  # decoupled decay first, as torch.optim.AdamW
        elif name in ("adam", "sgd"):
            g = g + wd * mask * w  # L2 decay added to the gradient
        w = hand(w, g)
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=lr, weight_decay=wd, momentum=0.9))
    assert not is_two_pass(opt)
    assert torch.allclose(run_steps(model, opt, data), w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,base,adaptive", [("sam", "adam", None), ("asam", "sgd", "kwon"),
                                                ("sam", "sgd", "kwon"), ("asam", "adam", "davda54")])
def test_sam_and_asam_steps_are_the_formula(name, base, adaptive):
    model, data = mlp(), batches(4)
    rho = 0.05 if not adaptive else 0.5
    cfg = OptimizerConfig(name=name, base=base, lr=0.01, momentum=0.9, rho=rho, adaptive=adaptive is not None,
                          asam_variant=adaptive or "kwon")
    ref = Ref(model)
    hand = HandAdam(0.01) if base == "adam" else HandSGD(0.01, 0.9)
    w = ref.w
    for x, y in data:
        _, gs = ref.sam_grad(w, x, y, rho, adaptive)
        w = hand(w, gs)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, SAM) and needs_second_pass(opt)
    got = run_steps(model, opt, data)
    assert torch.allclose(got, w, atol=1e-12, rtol=0)
    assert opt.steps == 4 and opt.second_passes == 4


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_equals_pytorch_optimizer_sam(adaptive):
    """The library's SAM (reference-checked against davda54/sam) gives the same weights, step by step."""
    from pytorch_optimizer import SAM as LibSAM

    data = batches(3)
    m1, m2 = mlp(), mlp()
    ours = SAM(m1.parameters(), torch.optim.Adam, rho=0.3, adaptive=adaptive, asam_variant="davda54", lr=0.01)
    lib = LibSAM(m2.parameters(), torch.optim.Adam, rho=0.3, adaptive=adaptive, lr=0.01)
    for x, y in data:
        for model, opt in ((m1, ours), (m2, lib)):
            CE(model(x), y).backward()

            def closure(model=model, x=x, y=y):
                loss = CE(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
        for p, q in zip(m1.parameters(), m2.parameters()):  # the library sums ‖g‖² in float32
            assert torch.allclose(p, q, atol=1e-8, rtol=0), (p - q).abs().max()


@pytest.mark.parametrize("variant,eta", [("kwon", None), ("kwon", 0.2), ("davda54", None)])
def test_asam_perturbation_is_the_hand_computed_one(variant, eta):
    """One ASAM ascent on a net with a LayerNorm: e = rho T^2 g / ||T g|| with T from Kwon et al.'s code
    (|w| + eta on every tensor named *weight*, 1 on biases) or davda54's (|w| everywhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(-2, 2)  # LayerNorm weight: 1-D, named weight, so T = |w| + eta for kwon
        model[1].bias.uniform_(-1, 1)
    x, y = batches(1)[0]
    rho = 0.5
    kw = {} if eta is None else {"eta": eta}
    opt = build_optimizer(model, OptimizerConfig(name="asam", rho=rho, asam_variant=variant, **kw))
    CE(model(x), y).backward()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    eta_used = 0.01 if eta is None else eta
    t = {}
    for n in w:
        if variant == "davda54":
            t[n] = w[n].abs()
        else:
            t[n] = w[n].abs() + eta_used if n.endswith("weight") else torch.ones_like(w[n])
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w))
    opt.first_step(zero_grad=True)
    for n, p in model.named_parameters():
        expected = rho * t[n] ** 2 * g[n] / norm
        assert torch.allclose(p - w[n], expected, atol=1e-14, rtol=1e-10), n
    if variant == "kwon":  # biases moved by rho g/||T g||, not by a |b|-scaled step
        assert torch.allclose(model[0].bias - w["0.bias"], rho * g["0.bias"] / norm)
    CE(model(x), y).backward()
    opt.unperturb()
    for n, p in model.named_parameters():
        assert torch.equal(p, w[n])


def test_kwon_asam_needs_parameter_names():
    model = mlp()
    with pytest.raises(ValueError, match="named_parameters"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, lr=0.1)
    SAM(model.named_parameters(), torch.optim.SGD, adaptive=True, lr=0.1)  # torch keeps the names
    SAM(model.parameters(), torch.optim.SGD, adaptive=True, asam_variant="davda54", lr=0.1)
    with pytest.raises(ValueError, match="asam_variant"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, asam_variant="x", lr=0.1)
    with pytest.raises(ConfigError, match="optimizer.asam_variant"):
        OptimizerConfig(name="asam", asam_variant="kown")
    with pytest.raises(ConfigError, match="optimizer.eta"):
        OptimizerConfig(name="asam", eta=-1.0)


def looksam_reference(model, data, k, alpha, rho, hand):
    """LookSAM, Algorithm 1 of Liu et al. (2022), with global norms."""
    ref = Ref(model)
    w, gv, trace = ref.w, None, []
    for t, (x, y) in enumerate(data):
        if t % k == 0:
            g, gs = ref.sam_grad(w, x, y, rho)
            gv = gs - (g @ gs) / (g @ g) * g
            trace.append(True)
        else:
            g = ref.grad(w, x, y)
            gs = g + alpha * g.norm() / gv.norm() * gv
            trace.append(False)
        w = hand(w, gs)
    return w, trace


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_looksam_steps_are_the_formula_and_skip_the_second_pass(base):
    model, data = mlp(), batches(7)
    k, alpha, rho = 3, 0.7, 0.1
    hand = HandAdam(0.01) if base == "adam" else HandSGD(0.05, 0.9)
    expected, schedule = looksam_reference(model, data, k, alpha, rho, hand)
    opt = build_optimizer(model, OptimizerConfig(name="looksam", base=base, lr=0.05 if base == "sgd" else 0.01,
                                                 momentum=0.9, rho=rho, k=k, alpha=alpha))
    assert isinstance(opt, LookSAM)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    seen = []
    cfg = TrainConfig(channels_last=False, progress=False)
    for x, y in data:
        seen.append(needs_second_pass(opt))
        train_step(model, x, y, CE, opt, cfg, CPU)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert seen == schedule == [True, False, False, True, False, False, True]
    assert len(calls) == len(data) + sum(schedule)  # one forward per plain step, two per SAM step
    assert torch.allclose(got, expected, atol=1e-10, rtol=0), (got - expected).abs().max()
    assert expected_cost(opt) == pytest.approx(1 + 1 / k)


def test_pytorch_optimizer_looksam_decomposes_per_tensor():
    """Why LookSAM is ours: the library's g_v reuse normalises each parameter tensor on its own.

    Driven the fast way (no second pass on its non-SAM steps), its step-1 update equals the per-tensor
    formula and differs from the paper's global one.
    """
    from pytorch_optimizer import LookSAM as LibLookSAM

    model, data = mlp(), batches(2)
    ref = Ref(model)
    rho, alpha, lr = 0.1, 0.7, 0.1
    g0, gs0 = ref.sam_grad(ref.w, *data[0], rho)
    w1 = ref.w - lr * gs0
    g1 = ref.grad(w1, *data[1])
    split = lambda v: torch.split(v, ref.sizes)  # noqa: E731
    per_tensor = torch.cat([g + alpha * g.norm() / (gsi - (gi @ gsi) / (gi @ gi) * gi).norm()
                            * (gsi - (gi @ gsi) / (gi @ gi) * gi)
                            for g, gi, gsi in zip(split(g1), split(g0), split(gs0))])
    gv = gs0 - (g0 @ gs0) / (g0 @ g0) * g0
    global_ = g1 + alpha * g1.norm() / gv.norm() * gv

    opt = LibLookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=2, alpha=alpha, lr=lr)
    x, y = data[0]
    CE(model(x), y).backward()
    opt.first_step(zero_grad=True)
    CE(model(x), y).backward()
    opt.second_step(zero_grad=True)
    x, y = data[1]
    CE(model(x), y).backward()
    opt.second_step(zero_grad=True)  # no first_step, no second pass
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(got, w1 - lr * per_tensor, atol=1e-10)
    assert not torch.allclose(got, w1 - lr * global_, atol=1e-6)


def test_random_sam_is_seeded_and_follows_the_formula():
    model, data = mlp(), batches(8)
    p, seed, rho = 0.5, 3, 0.1
    draws = [RandomSAM.draw(seed, t) < p for t in range(len(data))]
    assert draws == [RandomSAM.draw(seed, t) < p for t in range(len(data))]
    assert 0 < sum(draws) < len(data)
    ref, hand = Ref(model), HandSGD(0.05, 0.9)
    w = ref.w
    for sam, (x, y) in zip(draws, data):
        w = hand(w, ref.sam_grad(w, x, y, rho)[1] if sam else ref.grad(w, x, y))
    opt = build_optimizer(model, OptimizerConfig(name="randsam", base="sgd", lr=0.05, momentum=0.9, rho=rho,
                                                 sam_prob=p, seed=seed))
    seen = []
    cfg = TrainConfig(channels_last=False, progress=False)
    for x, y in data:
        seen.append(needs_second_pass(opt))
        train_step(model, x, y, CE, opt, cfg, CPU)
    assert seen == draws
    got = torch.cat([q.detach().flatten() for q in model.parameters()])
    assert torch.allclose(got, w, atol=1e-12, rtol=0)
    freq = sum(RandomSAM.draw(0, t) < 0.25 for t in range(4000)) / 4000
    assert freq == pytest.approx(0.25, abs=0.03)


def test_capabilities():
    model = mlp()
    adam = build_optimizer(model, OptimizerConfig(name="adam"))
    assert not is_two_pass(adam) and not needs_second_pass(adam) and expected_cost(adam) == 1
    from pytorch_optimizer import SAM as LibSAM

    lib = LibSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert is_two_pass(lib) and needs_second_pass(lib)  # no per-step answer: always two passes
    assert expected_cost(build_optimizer(model, OptimizerConfig(name="randsam", sam_prob=0.2))) == 1.2


def test_grad_clip_acts_on_the_update_gradient_of_every_variant():
    data = batches(3)
    for name in ("sam", "looksam", "randsam"):
        model = mlp()
        ref = Ref(model)
        opt = build_optimizer(model, OptimizerConfig(name=name, base="sgd", lr=1.0, momentum=0.0, rho=0.1, k=2,
                                                     sam_prob=0.5))
        w_prev = ref.w
        cfg = TrainConfig(channels_last=False, progress=False, grad_clip=1e-3)
        for x, y in data:
            train_step(model, x, y, CE, opt, cfg, CPU)
            w = torch.cat([p.detach().flatten() for p in model.parameters()])
            assert (w - w_prev).norm() == pytest.approx(1e-3, rel=1e-4), name  # lr 1: the step is the gradient
            w_prev = w


def test_amp_auto_is_inert_on_cpu_and_bf16_runs_every_variant():
    data = [(x.float(), y) for x, y in batches(3)]
    for name in ("adam", "sam", "asam", "looksam", "randsam"):
        got = {}
        for amp in ("off", "auto", "bf16"):
            model = mlp().float()
            opt = build_optimizer(model, OptimizerConfig(name=name, k=2, sam_prob=0.5))
            got[amp] = run_steps(model, opt, data, amp=amp, grad_clip=1.0)
        assert torch.equal(got["off"], got["auto"]), name
        # bf16 autocast really ran (results differ) and stayed close to float32
        assert not torch.equal(got["off"], got["bf16"]), name
        assert torch.allclose(got["off"], got["bf16"], atol=5e-2), name


def test_second_pass_never_updates_bn_stats_and_plain_steps_update_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    data = batches(4, bs=8)
    opt = build_optimizer(model, OptimizerConfig(name="looksam", k=2))
    bn = model[1]
    ref = copy.deepcopy(bn)
    cfg = TrainConfig(channels_last=False, progress=False)
    for x, y in data:
        with torch.no_grad():  # what one forward in train mode does to the stats
            ref.train()(model[0](x))
        train_step(model, x, y, CE, opt, cfg, CPU)
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-12)
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-12)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
    with frozen_bn_stats(model):
        model(data[0][0])
    assert int(bn.num_batches_tracked) == len(data)


@pytest.mark.parametrize("name", ["sam", "looksam", "randsam"])
def test_state_dict_round_trip_resumes_exactly(name):
    data = batches(6)
    cfg = OptimizerConfig(name=name, k=2, sam_prob=0.5, lr=0.01)
    m1 = mlp()
    o1 = build_optimizer(m1, cfg)
    full = run_steps(m1, o1, data)
    m2 = mlp()
    o2 = build_optimizer(m2, cfg)
    run_steps(m2, o2, data[:3])
    state, weights = copy.deepcopy(o2.state_dict()), copy.deepcopy(m2.state_dict())
    m3 = mlp()
    m3.load_state_dict(weights)
    o3 = build_optimizer(m3, cfg)
    o3.load_state_dict(state)
    assert o3.steps == 3 and o3.param_groups is o3.base_optimizer.param_groups
    assert torch.equal(run_steps(m3, o3, data[3:]), full)


def test_optimizer_config_checks_and_yaml_files():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="optimizer.k"):
        OptimizerConfig(name="looksam", k=0)
    with pytest.raises(ConfigError, match="optimizer.sam_prob"):
        OptimizerConfig(name="randsam", sam_prob=1.5)
    conf = Path(__file__).resolve().parents[1] / "conf"
    for name in ("adam", "adamw", "sgd", "sam", "asam", "looksam", "randsam"):
        with initialize_config_dir(str(conf / "optimizer"), version_base="1.3"):
            node = compose(name)
        cfg = OptimizerConfig(**OmegaConf.to_container(node))
        assert cfg.name == name
        opt = build_optimizer(mlp(), cfg)
        assert is_two_pass(opt) == (name not in ("adam", "adamw", "sgd"))
