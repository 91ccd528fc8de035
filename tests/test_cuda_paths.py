"""The CUDA paths checked on the CPU (issue 28, items 7-13): tensors made on the input's device (meta tensors),
TF32 off wherever something is measured, quantized fine-tuning without autocast, no host sync in MSAM's step,
λmax's memory check, device=auto's one line, RPReLU in bf16, the PTQ capture's peak, BN stats in SAM's second
pass. What only a GPU can show is in tests/test_cuda.py."""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
from torch import nn

from craft_runner import device as device_mod
from craft_runner import diagnostics, sharpness, train
from craft_runner.schema import TrainConfig

CPU = torch.device("cpu")
CE = nn.functional.cross_entropy


def flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """The flags as a GPU user may have them (TF32 allowed), restored after the test."""
    saved = flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------ 7: spectrum device


def test_spectrum_curves_stay_on_the_weights_device():
    """A CPU tensor mixed into a meta (or CUDA) one fails: every tensor must be made on the input's device."""
    zero = diagnostics.explained_variance(torch.zeros(4, 6, device="meta"))
    assert zero.device.type == "meta" and zero.shape == (4,)
    curves = [torch.rand(3, dtype=torch.float64, device="meta"), torch.rand(5, dtype=torch.float64, device="meta")]
    mean = diagnostics._mean_curve(curves)
    assert mean.device.type == "meta" and mean.shape == (5,)


def test_spectrum_values_unchanged_by_the_device_fix():
    """The all-zero weight is all ones; a padded layer counts as 1 beyond its components (by hand)."""
    assert torch.equal(diagnostics.explained_variance(torch.zeros(3, 5)), torch.ones(3, dtype=torch.float64))
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # centred: variances 2 and 8
    assert torch.allclose(diagnostics.explained_variance(w), torch.tensor([0.8, 1.0], dtype=torch.float64))
    mean = diagnostics._mean_curve([torch.tensor([0.5, 1.0], dtype=torch.float64),
                                    torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)])
    assert torch.allclose(mean, torch.tensor([0.35, 0.8, 1.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------ 8: TF32


def test_full_fp32_sets_and_restores_the_flags(tf32_on):
    with device_mod.full_fp32():
        assert flags() == (False, False)
        with device_mod.tf32(True):
            assert flags() == (True, True)
        assert flags() == (False, False)
    assert flags() == (True, True)
    with pytest.raises(KeyError), device_mod.full_fp32():
        raise KeyError("restored on error too")
    assert flags() == (True, True)

    @device_mod.full_fp32()
    def inside():
        return flags()

    assert inside() == (False, False) and inside() == (False, False) and flags() == (True, True)


def test_bn_recalibration_runs_with_tf32_off(tf32_on):
    from craft_runner.compress.bn import recalibrate_bn

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(flags())
            return x

    model = nn.Sequential(nn.BatchNorm1d(3), Probe())
    info = recalibrate_bn(model, [torch.randn(4, 3), torch.randn(4, 3)])
    assert info["batches"] == 2 and seen == [(False, False)] * 2 and flags() == (True, True)


def test_measuring_entry_points_run_with_tf32_off(tf32_on, monkeypatch, tmp_path):
    from craft_runner import compress, export
    from craft_runner.compress import CompressContext, PTQConfig
    from craft_runner.schema import SharpnessConfig

    seen = {}

    def record(key):
        seen[key] = flags()

    # λmax through run_diagnostics, and measuring_mode for a direct caller
    def fake_lanczos(*args, **kwargs):
        record("lanczos")
        return sharpness.EigResult(1.0, 1, 0.0, True)

    monkeypatch.setattr(diagnostics, "lanczos", fake_lanczos)
    model = nn.Sequential(nn.Linear(3, 2))
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    diagnostics.run_diagnostics(model, batches, SharpnessConfig(spectrum=False, act_ranges=False))
    with sharpness.measuring_mode(model):
        record("measuring_mode")

    # evaluation
    class Loader:
        def __iter__(self):
            record("evaluate")
            yield batches[0]

    train.evaluate(model, Loader(), 2, CPU)

    # every compressor (PTQ searches, Wanda scores, ...) behind apply_compression
    class Info:
        @staticmethod
        def fn(*args):
            record("compress")
            return {}

    monkeypatch.setattr(compress, "_resolve", lambda cfg: Info)
    compress.apply_compression(model, PTQConfig(), CompressContext(CPU, batches))

    # the export check
    def fake_simulated_only(cfg, comp):
        record("export")
        return "stop here"

    monkeypatch.setattr(export, "simulated_only", fake_simulated_only)
    export.export_cell(model, export.ExportConfig(name="onnx_fp32"), None, batches, batches, 0.0, tmp_path)

    assert seen == {k: (False, False) for k in ("lanczos", "measuring_mode", "evaluate", "compress", "export")}
    assert flags() == (True, True)


@pytest.mark.parametrize("enabled", [False, True])
def test_training_sets_tf32_as_train_tf32_says(monkeypatch, enabled):
    seen = []
    model = nn.Sequential(nn.Linear(3, 2))
    model.register_forward_pre_hook(lambda m, a: seen.append(flags()))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = flags()
    train.fit(model, data, opt, TrainConfig(epochs=1, tf32=enabled, progress=False, channels_last=False), CPU)
    assert seen and set(seen) == {(enabled, enabled)}
    assert flags() == before


def test_train_tf32_is_an_option_outside_the_cache_key(tmp_path):
    from helpers import TINY, compose_run

    from craft_runner.cache import cache_key
    from craft_runner.config import to_run_config

    default = to_run_config(compose_run(*TINY, tmp_path=tmp_path))
    on = to_run_config(compose_run(*TINY, "train.tf32=true", tmp_path=tmp_path))
    assert default.train.tf32 is False and on.train.tf32 is True
    assert cache_key(default) == cache_key(on)  # as the device: rounding, not what is computed


# ------------------------------------------------------------------------------------------ 9: no autocast


def _autocast_seen(model: nn.Module) -> list:
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def _fine_tune(amp: str):
    def run(m, epochs):
        data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        return train.fit(m, data, opt, TrainConfig(epochs=epochs, amp=amp, progress=False, channels_last=False), CPU)

    return run


def test_fine_tuning_after_quantization_runs_without_autocast():
    from craft_runner.compress.qat import train_with_quantized_weights
    from craft_runner.compress.quant import fine_tune_quantized

    control = nn.Sequential(nn.Linear(3, 2))
    seen = _autocast_seen(control)
    _fine_tune("bf16")(control, 1)
    assert seen == [True]  # bf16 autocast really is on for a plain training

    qat = nn.Sequential(nn.Linear(3, 2))
    seen_qat = _autocast_seen(qat)
    train_with_quantized_weights(qat, [("0", qat[0])], 4, "symmetric", 1, _fine_tune("bf16"))
    ptq = nn.Sequential(nn.Linear(3, 2))
    seen_ptq = _autocast_seen(ptq)
    fine_tune_quantized(ptq, [("0", ptq[0])], 4, 1, _fine_tune("bf16"))
    assert seen_qat == [False] and seen_ptq == [False]
    # the weights kept are on the 4-bit grid of their per-channel scale (max |w| / 7), computed by hand
    w = ptq[0].weight.detach()
    steps = w / (w.abs().amax(1, keepdim=True) / 7)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert train.amp_dtype(CPU, "bf16") == torch.bfloat16  # outside, train.amp applies again


# ------------------------------------------------------------------------------------------ 10: MSAM, no sync


class HostReads:
    """Counts reads of a tensor's value on the host (each one a device sync on a GPU)."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def test_msam_step_reads_nothing_on_the_host(monkeypatch):
    from craft_runner.optim.msam import MomentumSAM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    reads = HostReads(monkeypatch)
    opt.begin_epoch(model, 0)
    for _ in range(3):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    opt.end_epoch(model, 0)
    assert reads.count == 0
    monkeypatch.undo()
    # the scale is ρ/‖m‖ of the momentum, kept as a tensor
    buffers = [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    norm = torch.sqrt(sum((b.double() ** 2).sum() for b in buffers))
    assert torch.is_tensor(opt.scale) and float(opt.scale) == pytest.approx(0.5 / float(norm), rel=1e-5)


def test_msam_perturbs_along_the_momentum():
    """w̃ = w − ρ·m/‖m‖ while perturbed, w after end_epoch (by hand from the momentum buffers)."""
    from craft_runner.optim.msam import MomentumSAM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt.begin_epoch(model, 0)
    for _ in range(2):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    perturbed = [p.detach().clone() for p in model.parameters()]
    opt.end_epoch(model, 0)
    m = [opt.base_optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    norm = torch.sqrt(sum((b ** 2).sum() for b in m))
    for w_t, w, b in zip(perturbed, model.parameters(), m):
        assert torch.allclose(w_t, w.detach() - 0.5 * b / norm, atol=1e-6)
    # a checkpoint round trip keeps the scale (and accepts an older float one)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert torch.is_tensor(opt.scale) and opt.perturbed is False
    sd["extra"]["scale"] = 0.25
    opt.load_state_dict(sd)
    assert float(opt.scale) == 0.25


# ------------------------------------------------------------------------------------------ 11: λmax memory


def _curvature_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
               for _ in range(3)]
    return model, batches


def test_lanczos_switches_off_reuse_graph_when_the_graphs_do_not_fit(caplog):
    model, batches = _curvature_setup()
    with sharpness.measuring_mode(model):
        graph = sharpness.HessianOperator(model, CE, batches, max_bytes=2 ** 40).graph_bytes
    n = sum(p.numel() for p in model.parameters())
    basis = (sharpness._basis_peak(20) + 4) * n * 8
    assert graph > 0
    big = lambda **kw: sharpness.lanczos(model, CE, batches, max_iter=20, tol=1e-8, **kw)  # noqa: E731
    kept = big(max_bytes=2 ** 40)
    assert kept.reuse_graph is True
    with caplog.at_level(logging.WARNING, logger="craft_runner.sharpness"):
        switched = big(max_bytes=basis + 2 * graph)  # one batch's graph fits, three do not
    assert switched.reuse_graph is False
    lines = [r.getMessage() for r in caplog.records if "reuse_graph=false" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert switched.value == pytest.approx(kept.value, rel=1e-10)  # same Hessian, rebuilt per product
    # independent: the largest eigenvalue of the dense Hessian of the mean loss
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat):
        ws, i = [], 0
        for s in shapes:
            k = int(torch.tensor(s).prod())
            ws.append(flat[i:i + k].view(s))
            i += k
        total = sum(len(y) for _, y in batches)
        return sum(CE(nn.functional.linear(torch.tanh(nn.functional.linear(x, ws[0], ws[1])), ws[2], ws[3]), y)
                   * len(y) / total for x, y in batches)

    flat = torch.cat([p.detach().flatten() for p in params])
    dense = torch.autograd.functional.hessian(loss_of, flat)
    assert switched.value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-6)


def test_lanczos_refuses_in_one_line_when_nothing_fits():
    model, batches = _curvature_setup()
    with pytest.raises(sharpness.MemoryBudgetError, match=r"^λmax \(Lanczos.*GiB are free: lower sharpness.max_iter"):
        sharpness.lanczos(model, CE, batches, max_iter=20, max_bytes=1000)
    with pytest.raises(train.RunError):
        sharpness.power_iteration(model, CE, batches, max_bytes=10)


def test_the_measured_graph_dies_with_the_operator():
    """Measuring the graph must not keep it: saved-tensor hooks that returned the tensor itself tied each saved
    output to its own node in a cycle no collector frees (1.3 GB a λmax of MobileNet-V1, until a multirun ran
    out of memory)."""
    import gc
    import weakref

    model, batches = _curvature_setup()
    refs = []
    model[1].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    op = sharpness.HessianOperator(model, CE, batches, max_bytes=2 ** 40)
    assert op.reuse_graph and len(refs) == len(batches)
    del op
    gc.collect()
    assert all(r() is None for r in refs)


def test_graph_estimate_counts_what_the_double_backward_keeps():
    """The estimate grows with the batch: saved activations scale with the number of samples."""
    model, batches = _curvature_setup()
    small = sharpness.HessianOperator(model, CE, [(batches[0][0][:2], batches[0][1][:2])], max_bytes=2 ** 40)
    large = sharpness.HessianOperator(model, CE, [(batches[0][0], batches[0][1])], max_bytes=2 ** 40)
    params = sum(p.numel() * 8 for p in model.parameters())
    # at least the hidden activations (8 x 16 doubles) beyond the parameter-sized gradients
    assert large.graph_bytes - params >= 8 * 16 * 8
    assert large.graph_bytes > small.graph_bytes


# ------------------------------------------------------------------------------------------ 12: device=auto


@pytest.fixture
def fresh_device_checks():
    device_mod._cuda_usable.cache_clear()
    device_mod._say_cpu_fallback.cache_clear()
    yield
    device_mod._cuda_usable.cache_clear()
    device_mod._say_cpu_fallback.cache_clear()


def test_device_auto_on_a_cuda_build_without_a_usable_gpu_says_so_once(monkeypatch, caplog, fresh_device_checks):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(device_mod, "_gpu_present", lambda: True)
    with caplog.at_level(logging.INFO, logger="craft_runner.device"):
        assert device_mod.resolve_device("auto") == CPU
        assert device_mod.resolve_device("auto") == CPU
    lines = [r for r in caplog.records if r.name == "craft_runner.device"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "CUDA 13.0 build" in msg and "no GPU is usable" in msg and "running on the CPU" in msg and "\n" not in msg


def test_device_auto_without_any_gpu_is_one_info_line(monkeypatch, caplog, fresh_device_checks):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(device_mod, "_gpu_present", lambda: False)
    with caplog.at_level(logging.INFO, logger="craft_runner.device"):
        device_mod.resolve_device("auto")
    lines = [r for r in caplog.records if r.name == "craft_runner.device"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "running on the CPU" in lines[0].getMessage()


def test_device_auto_on_a_cpu_build_says_nothing(monkeypatch, caplog, fresh_device_checks):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.INFO, logger="craft_runner.device"):
        assert device_mod.resolve_device("auto") == CPU
    assert not [r for r in caplog.records if r.name == "craft_runner.device"]


def test_pipeline_resolves_through_the_device_module(monkeypatch, fresh_device_checks):
    from craft_runner import pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.resolve_device("auto") == torch.device("cuda")
    assert pipeline.resolve_device("cpu") == CPU


# ------------------------------------------------------------------------------------------ 13: RPReLU bf16


def _rprelu_reference(x, gamma, beta, zeta):
    """SNT eq. (1) in float64, channel = dim 1 of NCHW."""
    shape = (1, -1, 1, 1)
    y = x - gamma.view(shape)
    return torch.where(y > 0, y, beta.view(shape) * y) + zeta.view(shape)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rprelu_fused_path_keeps_bf16_activations(monkeypatch, compiled):
    from craft_runner.models import snt

    monkeypatch.setattr(snt, "_compiled", {} if compiled else {"off": True})
    torch.manual_seed(0)
    act = snt.RPReLU(4).train()
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        act.zeta.copy_(torch.tensor([0.05, 0.0, -0.1, 0.2]))
        act.beta.copy_(torch.tensor([0.25, 0.5, 0.1, 0.0]))
    x = torch.randn(3, 4, 5, 5).to(torch.bfloat16).requires_grad_(True)
    out = act(x)
    assert out.dtype == torch.bfloat16
    g = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in (act.gamma, act.beta, act.zeta))
    # against float64 autograd on the same bf16 inputs and parameters rounded to bf16
    x64 = x.detach().double().requires_grad_(True)
    ps = [p.detach().to(torch.bfloat16).double().requires_grad_(True) for p in (act.gamma, act.beta, act.zeta)]
    ref = _rprelu_reference(x64, *ps)
    ref.backward(g.double())
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-2)
    for p, r in zip((act.gamma, act.beta, act.zeta), ps):
        assert torch.allclose(p.grad.double(), r.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ 13: PTQ capture


class LiveBytes:
    """Bytes of the capture's tensors (its copies and what it concatenates) still alive, at every torch.cat."""

    def __init__(self, monkeypatch, search):
        self.refs: list = []
        self.peak = 0
        original_copy, original_cat = search._copy, torch.cat

        def copy_(t):
            out = original_copy(t)
            self.refs.append((weakref.ref(out), out.nbytes))
            return out

        def cat(tensors, *a, **k):
            self.measure()
            out = original_cat(tensors, *a, **k)
            self.refs.append((weakref.ref(out), out.nbytes))
            self.measure()
            return out

        monkeypatch.setattr(search, "_copy", copy_)
        monkeypatch.setattr(torch, "cat", cat)

    def measure(self):
        self.peak = max(self.peak, sum(n for r, n in self.refs if r() is not None))


def test_capture_holds_its_bytes_once_plus_one_tensor(monkeypatch):
    from craft_runner.compress import search

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [(torch.randn(6, 8), torch.randint(0, 3, (6,))) for _ in range(4)]
    specs = [(m, 1) for m in model]
    live = LiveBytes(monkeypatch, search)
    data = search.capture(model, specs, batches, need_grad=True, loss="ce")
    monkeypatch.undo()
    tensors = [t for ins, out, grad in data.values() for t in (*ins, out, grad)]
    total, largest = sum(t.nbytes for t in tensors), max(t.nbytes for t in tensors)
    assert live.peak <= total + largest  # the former capture held every list and every result: 2x
    # and what was captured is what the layers saw: the first layer's input is the calibration images
    assert torch.equal(data[model[0]][0][0], torch.cat([x for x, _ in batches]))
    assert torch.equal(data[model[3]][1], model(torch.cat([x for x, _ in batches])))


def test_capture_passes_budget_the_joined_tensor(monkeypatch):
    from craft_runner.compress import search

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)]).eval()
    batches = [(torch.randn(8, 16), torch.randint(0, 16, (8,)))]
    ops = [(f"{i}", m, 1) for i, m in enumerate(model)]
    per_op = 4 * 8 * (16 + 2 * 16)  # fp32 bytes per op over 8 images: input, output, gradient
    monkeypatch.setitem(search.CAPTURE_BYTES, "cpu", 3 * per_op)
    passes = search._passes(model, ops, batches, need_grad=True)
    # two ops captured (2 x per_op) plus one being joined (per_op) fill the budget: a pass holds two ops
    assert [len(p) for p in passes] == [2, 2, 2]
    for p in passes:
        assert len(p) * per_op + per_op <= 3 * per_op


# ------------------------------------------------------------------------------------------ 13: BN in SAM's 2nd pass


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _bn_state(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def test_second_pass_leaves_bn_running_stats_as_davda54_does_for_a_finite_batch():
    x = torch.randn(16, 4)
    ours, ref = _bn_net().train(), _bn_net().train()
    ours(x)
    ref(x)
    x2 = torch.randn(16, 4) * 3 + 1
    with train.frozen_bn_stats(ours):
        ours(x2)
    # davda54/sam (example/utility/bypass_bn.py): momentum 0 during the second pass, then restored
    bn = ref[1]
    backup, bn.momentum = bn.momentum, 0
    ref(x2)
    bn.momentum = backup
    mean, var, count = _bn_state(ours)
    assert torch.equal(mean, ref[1].running_mean) and torch.equal(var, ref[1].running_var)
    assert count == 1 and int(ref[1].num_batches_tracked) == 2  # the count is kept here, davda54's grows
    assert ours[1].momentum == 0.1


def test_non_finite_second_pass_leaves_bn_running_stats_untouched():
    from craft_runner.optim import OptimizerConfig, build_optimizer

    model = _bn_net()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    first_only = copy.deepcopy(model).train()
    first_only(x)  # torch's BatchNorm after the first pass alone
    expected = _bn_state(first_only)
    # a radius that sends the perturbed weights to inf: the second pass's batch statistics are not finite
    opt = build_optimizer(model, OptimizerConfig(name="sam", rho=1e38, lr=1e-3))
    cfg = TrainConfig(channels_last=False, progress=False, amp="off")
    train.train_step(model, x, y, CE, opt, cfg, CPU)
    mean, var, count = _bn_state(model)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert torch.equal(mean, expected[0]) and torch.equal(var, expected[1]) and count == expected[2]
    # the momentum-0 way would have let NaN in: check that this batch really was non-finite there
    probe = copy.deepcopy(first_only)
    with torch.no_grad():
        for p in probe.parameters():
            p.mul_(1e38)
    probe[1].momentum = 0
    probe(x)
    assert not torch.isfinite(probe[1].running_var).all()


def test_sam_step_bn_stats_equal_davda54s_training_loop():
    """One SAM step of train_step against davda54/sam's loop (example/train.py: enable_running_stats, first
    pass, first_step, disable_running_stats, second pass, second_step), written out here by hand."""
    from craft_runner.optim import OptimizerConfig, build_optimizer

    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ours, ref = _bn_net(), _bn_net()
    opt = build_optimizer(ours, OptimizerConfig(name="sam", base="sgd", rho=0.5, lr=0.1, momentum=0.0))
    train.train_step(ours, x, y, CE, opt, TrainConfig(channels_last=False, progress=False, amp="off"), CPU)
    CE(ref(x), y).backward()
    with torch.no_grad():
        grads = [p.grad.clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        for p, g in zip(ref.parameters(), grads):
            p.add_(0.5 * g / (norm + 1e-12))
    bn = ref[1]
    backup, bn.momentum = bn.momentum, 0
    ref.zero_grad()
    CE(ref(x), y).backward()
    bn.momentum = backup
    assert torch.equal(ours[1].running_mean, bn.running_mean) and torch.equal(ours[1].running_var, bn.running_var)


def test_freed_heap_memory_goes_back_after_a_measurement():
    """glibc keeps freed memory (craft-run's mallopt); malloc_trim hands it back, so a multirun's resident size
    is what is live, not the fragmented sum of its cells' peaks."""
    from craft_runner import runtime

    if runtime._libc() is None or not hasattr(runtime._libc(), "malloc_trim"):
        pytest.skip("not glibc")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    libc = runtime._libc()
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD as craft-run sets them: nothing trimmed
    libc.mallopt(-3, 1 << 30)
    try:
        before = resident()
        blocks = [torch.ones(16 << 20, dtype=torch.uint8) for _ in range(8)]  # 128 MiB touched on the heap
        keep = torch.ones(1)  # a live allocation above them keeps the heap's top in place
        del blocks
        kept = resident()
        assert runtime.release_freed_memory()
        assert kept - before > 100 << 20 and resident() < kept - (100 << 20)
        del keep
    finally:
        libc.mallopt(-1, 128 * 1024)
        libc.mallopt(-3, 128 * 1024)
