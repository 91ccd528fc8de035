"""CUDA-only checks: the same run on CUDA and on the CPU, bf16 autocast with every SAM variant on CUDA,
curvature and PTQ4ViT on CUDA against the CPU, and the pinned-memory loader path.

Collected everywhere and skipped without a GPU; on a GPU machine: ``python -m pytest -m cuda``.
fp32 comparisons switch TF32 off (PyTorch lets cuDNN convolutions use TF32 by default), so that the two
devices differ only by summation order.
"""

import copy

import pytest
import torch
from helpers import TINY, compose_run
from torch import nn

from craft_runner import pipeline
from craft_runner.device import full_fp32
from craft_runner.optim import OptimizerConfig, build_optimizer
from craft_runner.schema import TrainConfig
from craft_runner.train import train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False"),
]

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
CE = nn.functional.cross_entropy
VARIANTS = ("adam", "sam", "asam", "looksam", "randsam")


def no_tf32():
    return full_fp32()


def run_on(device, tmp_path, *overrides, base=TINY):
    cfg = compose_run(*base, f"device={device}", *overrides, tmp_path=tmp_path / device)
    return pipeline.run(cfg)


# ----------------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("model", ["resnet20", "test_resnet"])
def test_pipeline_on_cuda_matches_cpu_in_float32(tmp_path, model):
    overrides = (f"model={model}", "optimizer=sam", "train.amp=off", "compress=ptq", "compress.bits=W8A8")
    with no_tf32():
        gpu = run_on("cuda", tmp_path, *overrides)
    cpu = run_on("cpu", tmp_path, *overrides)
    # Same initial weights and start vector: λmax before training differs by rounding only.
    assert gpu["lambda_max_before"] == pytest.approx(cpu["lambda_max_before"], rel=1e-4)
    # After 6 SAM steps the weights differ by accumulated rounding: λmax close, accuracies within one image.
    assert gpu["lambda_max_after"] == pytest.approx(cpu["lambda_max_after"], rel=2e-2)
    one_image = 100 / 48
    assert abs(gpu["fp_acc"] - cpu["fp_acc"]) <= one_image + 1e-9
    assert abs(gpu["compressed_acc"] - cpu["compressed_acc"]) <= one_image + 1e-9


def test_pipeline_bf16_autocast_on_cuda_stays_close_to_cpu(tmp_path):
    gpu = run_on("cuda", tmp_path, "optimizer=sam", "train.amp=auto", "train.epochs=4")
    cpu = run_on("cpu", tmp_path, "optimizer=sam", "train.amp=auto", "train.epochs=4")  # auto: float32 on CPU
    # measured in float32 with TF32 off whatever train.amp is: the same initial weights give the same λmax
    assert gpu["lambda_max_before"] == pytest.approx(cpu["lambda_max_before"], rel=1e-4)
    assert abs(gpu["fp_acc"] - cpu["fp_acc"]) <= 10.0
    assert gpu["fp_acc"] > 100 / 4 + 20  # learnt well above chance (4 classes) in bf16
    import json

    res = json.loads((tmp_path / "cuda" / "run" / "results.json").read_text())
    assert res["device"] == torch.cuda.get_device_name(0) and res["config"]["train"]["amp"] == "auto"


def test_pinned_memory_loader_path_trains_on_cuda(tmp_path):
    from test_data import make_cifar10

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    make_cifar10(root)
    base = [o for o in TINY if not o.startswith("dataset")]
    m = run_on("cuda", tmp_path, "dataset=cifar10", f"dataset.root={root}", "dataset.on_device=false",
               "dataset.num_workers=2", "dataset.pin_memory=true", "train.batch_size=4", "sharpness.enabled=false",
               base=base)
    assert 0 <= m["fp_acc"] <= 100 and m["trained"] is True


# ----------------------------------------------------------------------------------------- bf16 and SAM


def mlp(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)


def batches(n, device, bs=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 4, generator=g).to(device), torch.randint(0, 3, (bs,), generator=g).to(device))
            for _ in range(n)]


def run_steps(model, opt, data, device, amp, **kw):
    cfg = TrainConfig(channels_last=False, progress=False, amp=amp, **kw)
    for x, y in data:
        train_step(model, x, y, CE, opt, cfg, device)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


def test_bf16_autocast_runs_every_variant_on_cuda():
    """The CPU test's mirror: on CUDA ``auto`` is bf16 autocast, and float32 steps equal the CPU's."""
    for name in VARIANTS:
        cfg = OptimizerConfig(name=name, k=2, sam_prob=0.5)
        got = {}
        with no_tf32():
            for amp in ("off", "auto", "bf16"):
                model = mlp(CUDA)
                got[amp] = run_steps(model, build_optimizer(model, cfg), batches(3, CUDA), CUDA, amp, grad_clip=1.0)
        model = mlp(CPU)
        on_cpu = run_steps(model, build_optimizer(model, cfg), batches(3, CPU), CPU, "off", grad_clip=1.0)
        assert torch.allclose(got["off"], on_cpu, atol=1e-5), name
        assert torch.allclose(got["auto"], got["bf16"], atol=1e-7), name
        assert not torch.equal(got["off"], got["bf16"]), name  # bf16 really ran
        assert torch.allclose(got["off"], got["bf16"], atol=5e-2), name


@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_conv_bn_channels_last_step_on_cuda(name):
    """A conv/BN net in bf16, channels-last: finite, learning, BN stats updated once per step (never by pass 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).to(CUDA).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimizerConfig(name=name, k=2, sam_prob=0.5, lr=1e-2))
    cfg = TrainConfig(channels_last=True, progress=False, amp="auto")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g).to(CUDA).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (16,), generator=g).to(CUDA)
    losses = [float(train_step(model, x, y, CE, opt, cfg, CUDA)) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert int(model[1].num_batches_tracked) == 20
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------- curvature, PTQ


def test_hessian_vector_products_on_cuda_equal_cpu():
    """Measuring mode's own conv double backward and BN-as-affine, in float64 on both devices."""
    from craft_runner.sharpness import HessianOperator, measuring_mode, power_iteration

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    net(torch.randn(8, 3, 8, 8, dtype=torch.float64))  # non-trivial BN running stats
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(2)]
    out = {}
    for key, dev in (("cpu", CPU), ("cuda", CUDA)):
        model = copy.deepcopy(net).to(dev)
        batches = [(x.to(dev), y.to(dev)) for x, y in data]
        with measuring_mode(model):
            op = HessianOperator(model, CE, batches)
            v = [torch.ones_like(p) for p in op.params]
            out[key] = torch.cat([h.flatten() for h in op.matvec(v)]).cpu()
        out[key + "_lam"] = power_iteration(model, CE, batches, max_iter=10, tol=1e-12).value
    assert torch.allclose(out["cuda"], out["cpu"], rtol=1e-9, atol=1e-10)
    assert out["cuda_lam"] == pytest.approx(out["cpu_lam"], rel=1e-9)


def test_ptq4vit_on_cuda_agrees_with_cpu():
    import timm

    from craft_runner.compress import CompressContext, PTQConfig, apply_compression

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=5, img_size=32, patch_size=8, depth=2).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    cfg = PTQConfig(method="ptq4vit", bits="W6A6", calib_size=8, scale_steps=20, search_rounds=2,
                    hessian_loss="ce")  # the reference KL weight is rounding noise, device-dependent
    outs, infos = {}, {}
    with no_tf32():
        for key, dev in (("cpu", CPU), ("cuda", CUDA)):
            model = copy.deepcopy(vit).to(dev)
            infos[key] = apply_compression(model, cfg, CompressContext(dev, [(x.to(dev), y.to(dev))]))
            with torch.no_grad():
                outs[key] = model(x.to(dev)).cpu()
    with torch.no_grad():
        ref = vit(x)
    floats = {"softmax_shift"}
    assert {k: v for k, v in infos["cuda"].items() if k not in floats} == \
        {k: v for k, v in infos["cpu"].items() if k not in floats}
    # A near-tie in a scale search may fall the other way on another device; the two quantized models must
    # still be closer to each other than either is to the float model.
    assert (outs["cuda"] - outs["cpu"]).norm() < (outs["cpu"] - ref).norm()


# ----------------------------------------------------------------------------------------- issue 28, items 7-13


def test_spectrum_and_act_ranges_on_cuda_equal_cpu():
    from craft_runner.diagnostics import run_diagnostics
    from craft_runner.schema import SharpnessConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Linear(5, 3))
    nn.init.zeros_(net[4].weight)  # the all-zero path (all ones), padded beside the wider layer
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    cfg = SharpnessConfig(lambda_max=False, spectrum=True, act_ranges=True, spectrum_k=2)
    out = {}
    for key, dev in (("cpu", CPU), ("cuda", CUDA)):
        model = copy.deepcopy(net).to(dev)
        out[key] = run_diagnostics(model, [(x.to(dev), y.to(dev)) for x, y in data], cfg)["spectrum"]["curves"]
    assert out["cuda"].keys() == out["cpu"].keys()
    for kind in out["cpu"]:
        assert out["cuda"][kind] == pytest.approx(out["cpu"][kind], rel=1e-9)


def test_measuring_switches_tf32_off_on_cuda():
    """A convolution under full_fp32 matches float64 to float32 precision; with TF32 allowed it may not."""
    torch.manual_seed(0)
    x, w = torch.randn(8, 64, 16, 16, device=CUDA), torch.randn(64, 64, 3, 3, device=CUDA)
    ref = nn.functional.conv2d(x.double(), w.double())
    with full_fp32():
        got = nn.functional.conv2d(x, w)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4  # TF32: ~1e-3


def test_msam_steps_without_a_host_sync_on_cuda():
    from craft_runner.optim.msam import MomentumSAM

    torch.manual_seed(0)
    model = mlp(CUDA)
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    (x, y), = batches(1, CUDA)
    opt.begin_epoch(model, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the first step creates the momentum buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.scale.device.type == "cuda"


def test_qat_fine_tune_under_bf16_amp_keeps_weights_on_their_grid_on_cuda():
    from craft_runner.compress.quant import fine_tune_quantized
    from craft_runner.train import fit

    model = mlp(CUDA)
    data = batches(2, CUDA)

    def tune(m, epochs):
        cfg = TrainConfig(epochs=epochs, amp="bf16", progress=False, channels_last=False)
        return fit(m, data, torch.optim.SGD(m.parameters(), lr=0.1), cfg, CUDA)

    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cuda")))
    fine_tune_quantized(model, [("0", model[0]), ("2", model[2])], 8, 1, tune)
    assert seen and not any(seen)
    for layer in (model[0], model[2]):
        w = layer.weight.detach().double()
        steps = w / (w.abs().amax(1, keepdim=True) / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_rprelu_compiled_path_keeps_bf16_on_cuda():
    from craft_runner.models.snt import RPReLU

    act = RPReLU(4).to(CUDA).train()
    x = torch.randn(2, 4, 5, 5, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    out = act(x)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and act.gamma.grad.dtype == torch.float32


def test_available_memory_on_cuda_is_the_free_memory():
    from craft_runner.device import available_memory

    free, total = torch.cuda.mem_get_info()
    assert 0 < available_memory(CUDA) <= total and available_memory(CUDA) >= free
