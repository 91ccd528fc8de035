import copy

import pytest
import torch
from torch import nn

from craft_runner.config import OptimizerConfig, TrainConfig
from craft_runner.optim import build_optimizer, needs_second_pass, param_groups
from craft_runner.train import build_scheduler, fit, frozen_bn_stats, train_step


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_no_weight_decay_on_biases_and_norms():
    groups = param_groups(bn_net(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert len(decayed) == 2  # conv and linear weights


def test_frozen_bn_stats_keeps_running_stats_and_restores_momentum():
    model = bn_net().train()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with frozen_bn_stats(model):
        model(torch.randn(8, 3, 6, 6) * 3 + 1)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.momentum == 0.1
    model(torch.randn(8, 3, 6, 6) * 3 + 1)
    assert not torch.equal(bn.running_mean, before[0])


def test_sam_step_is_the_formula_and_second_pass_leaves_bn_stats():
    """One SAM step with an SGD base equals w − lr·∇L(w + ρ g/‖g‖), BN stats updated once."""
    model = bn_net().train()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    cfg = OptimizerConfig(name="sam", base="sgd", lr=0.1, momentum=0.0, rho=0.05)
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    # by hand: gradient at w (train mode, updates BN once), perturb, gradient at w+e without BN update
    loss = nn.functional.cross_entropy(ref(x), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    stats_after_first = ref[1].running_mean.clone()
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(0.05 * gi / norm)
    ref[1].momentum = 0.0
    g2 = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), params)
    with torch.no_grad():
        for p, gi, g2i in zip(params, g, g2):
            p.sub_(0.05 * gi / norm).sub_(0.1 * g2i)

    opt = build_optimizer(model, cfg)
    assert needs_second_pass(opt)
    train_step(model, x, y, nn.functional.cross_entropy, opt, TrainConfig(), torch.device("cpu"))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert torch.equal(model[1].running_mean, stats_after_first)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(epochs=4, warmup_epochs=1), steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_fit_resumes_to_the_same_weights(tmp_path):
    from craft_runner.data import TensorLoader

    def make():
        torch.manual_seed(0)
        model = bn_net()
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader(torch.randn(40, 3, 6, 6, generator=g), torch.randint(0, 3, (40,), generator=g), 8,
                              shuffle=True, seed=3)
        return model, loader, build_optimizer(model, OptimizerConfig(name="sam", lr=1e-2))

    cfg = TrainConfig(epochs=3, progress=False, channels_last=False)
    m1, l1, o1 = make()
    fit(m1, l1, o1, cfg, torch.device("cpu"))
    m2, l2, o2 = make()
    state = tmp_path / "state.pt"
    fit(m2, l2, o2, TrainConfig(epochs=3, progress=False, channels_last=False), torch.device("cpu"),
        state_path=state)
    # interrupted after one epoch: train a fresh model for 1 epoch of a 3-epoch schedule by stopping early
    m3, l3, o3 = make()
    state3 = tmp_path / "state3.pt"

    class Stop(Exception):
        pass

    import craft_runner.train as tr

    real = tr.atomic_save

    def crash_after_first(obj, path):
        real(obj, path)
        raise Stop

    tr.atomic_save = crash_after_first
    try:
        with pytest.raises(Stop):
            fit(m3, l3, o3, cfg, torch.device("cpu"), state_path=state3)
    finally:
        tr.atomic_save = real
    m4, l4, o4 = make()
    info = fit(m4, l4, o4, cfg, torch.device("cpu"), state_path=state3)
    assert info["resumed_from"] == 1
    for a, b, c in zip(m1.state_dict().values(), m2.state_dict().values(), m4.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name,fraction", [("adam", 0.0), ("sam", 1.0), ("looksam", 0.5)])
def test_fit_reports_steps_second_pass_fraction_and_time(name, fraction):
    from craft_runner.data import TensorLoader

    torch.manual_seed(0)
    model = bn_net()
    g = torch.Generator().manual_seed(0)
    loader = TensorLoader(torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g), 8,
                          shuffle=True, seed=1)
    opt = build_optimizer(model, OptimizerConfig(name=name, k=2))
    info = fit(model, loader, opt, TrainConfig(epochs=2, progress=False, channels_last=False), torch.device("cpu"))
    assert info["steps"] == 8 and info["second_pass_fraction"] == fraction
    assert [h["second_passes"] for h in info["history"]] == [int(4 * fraction)] * 2
    assert info["train_seconds"] > 0


def test_keep_freed_memory_serves_large_tensors_from_the_heap(tmp_path):
    """After keep_freed_memory, a 4 MB tensor is not a fresh mmap (glibc's mallinfo2 counts mapped bytes);
    without it, it is. In a child process: the setting is process-wide."""
    import ctypes.util
    import subprocess
    import sys

    if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    code = """
import ctypes, ctypes.util, sys, torch
from craft_runner.runtime import keep_freed_memory
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = M
changed = keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd
x = torch.empty(1 << 20)
print(changed, libc.mallinfo2().hblkhd - before)
"""
    out = {}
    for mode in ("tuned", "default"):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        changed, mapped = p.stdout.split()[-2:]
        out[mode] = (changed, int(mapped))
    assert out["tuned"] == ("True", 0)
    assert out["default"][1] >= 4 << 20


@pytest.mark.parametrize("capability, expected", [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_amp_auto_uses_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, expected):
    import functools

    from craft_runner import train
    from craft_runner.train import amp_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(train, "_native_bf16", functools.cache(train._native_bf16.__wrapped__))  # a fresh cache
    assert amp_dtype(torch.device("cuda"), "auto") is expected
    assert amp_dtype(torch.device("cuda"), "bf16") is torch.bfloat16  # forced: the user asked for it
    assert amp_dtype(torch.device("cuda"), "off") is None
    assert amp_dtype(torch.device("cpu"), "auto") is None
