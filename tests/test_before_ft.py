"""λmax "before fine-tuning" (CrAFT Table 5): a new head does not make the loss flat, and an estimate that stopped
early is marked as such.

The Hessians here are dense (torch.autograd.functional.hessian on the flat parameters) and the head block's top
eigenvalue is written from the softmax cross-entropy's second derivative, not with the project's code.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from craft_runner.compress.registry import CompressConfig
from craft_runner.optim import OptimizerConfig
from craft_runner.report.engine import UNCERTIFIED, build
from craft_runner.report.papers import layout_for
from craft_runner.report.records import collect
from craft_runner.schema import DatasetConfig, RunConfig
from craft_runner.sharpness import lanczos

K = 3  # classes


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (64,), generator=g)
    return x, y


def _model(head_init: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(123)  # the "pretrained" backbone: the same for every head
    backbone = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    torch.manual_seed(seed)
    head = nn.Linear(4, K)
    if head_init == "zero":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    else:  # timm's ViT init: truncated normal, std 0.02, zero bias
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return nn.Sequential(backbone, head).double()


def _dense_hessian(model: nn.Module, x, y) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def _head_size() -> int:
    return 4 * K + K


def test_a_zero_initialised_head_does_not_make_the_loss_flat():
    x, y = _data()
    model = _model("zero")
    H = _dense_hessian(model, x, y)
    lam = torch.linalg.eigvalsh(H)
    # the head block with a zero head: p = 1/K for every input, so ∂²L/∂(W,b)² = (1/K)(I − 11ᵀ/K) ⊗ E[φ̃φ̃ᵀ],
    # φ̃ = (φ, 1); its top eigenvalue is λmax(E[φ̃φ̃ᵀ]) / K
    with torch.no_grad():
        phi = torch.cat([model[0](x), torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    expected = torch.linalg.eigvalsh(phi.T @ phi / len(x))[-1] / K
    head = H[-_head_size():, -_head_size():]
    assert torch.linalg.eigvalsh(head)[-1] == pytest.approx(float(expected), rel=1e-9)
    # interlacing: λmax of the whole Hessian is at least the head block's, far from 0
    assert lam[-1] >= expected - 1e-12
    assert expected > 0.1
    # and the loss is not at a minimum: the head-backbone cross terms make H indefinite
    assert lam[0] < 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_fresh_head_bounds_lambda_max_whatever_its_seed(seed):
    """The head block's curvature barely depends on the head's init, so no seed can give a tiny λmax."""
    x, y = _data()
    zero_head = torch.linalg.eigvalsh(_dense_hessian(_model("zero"), x, y)[-_head_size():, -_head_size():])[-1]
    H = _dense_hessian(_model("timm", seed), x, y)
    head_top = torch.linalg.eigvalsh(H[-_head_size():, -_head_size():])[-1]
    assert head_top == pytest.approx(float(zero_head), rel=0.05)
    assert torch.linalg.eigvalsh(H)[-1] >= head_top - 1e-12


def test_an_early_stopped_estimate_is_tiny_and_says_so():
    """One Hessian-vector product gives the Rayleigh quotient of the random start, about tr(H)/n: far below λmax,
    and its certificate says it did not converge; the configured run reaches λmax and says it did."""
    x, y = _data()
    model = _model("timm", 3)
    H = _dense_hessian(model, x, y)
    top = float(torch.linalg.eigvalsh(H)[-1])
    batches = [(x, y)]
    full = lanczos(model, F.cross_entropy, batches, max_iter=20, tol=1e-2, seed=0)
    assert full.converged and full.value == pytest.approx(top, rel=1e-2)
    early = lanczos(model, F.cross_entropy, batches, max_iter=1, tol=1e-2, seed=0)
    q = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q /= q.norm()
    assert early.value == pytest.approx(float(q @ H @ q), rel=1e-6)  # the start's Rayleigh quotient
    assert early.value < 0.2 * top
    assert not early.converged


def _write(path, optimizer, seed, before, before_ok):
    rc = RunConfig(optimizer=OptimizerConfig(name=optimizer), dataset=DatasetConfig(classes=[5, 6, 7, 8, 9]),
                   compress=CompressConfig(), seed=seed, experiment="craft_table5_small")
    path.mkdir(parents=True)
    sharp = {"before": {"lambda_max": {"value": before, "converged": before_ok}},
             "after": {"lambda_max": {"value": 100.0 + seed, "converged": True}}}
    (path / "results.json").write_text(json.dumps({
        "config": dataclasses.asdict(rc), "status": "ok", "sharpness": sharp, "compression": {},
        "metrics": {"fp_acc": 90.0, "lambda_max_before": before, "lambda_max_after": 100.0 + seed}}))


def test_the_table_marks_an_uncertified_lambda_max(tmp_path):
    for opt in ("adam", "sam"):
        _write(tmp_path / f"{opt}-0", opt, 0, 0.05, False)
        _write(tmp_path / f"{opt}-1", opt, 1, 30.0, True)
    table = build(layout_for("craft_table5_small"), collect(tmp_path).records)
    (key,) = table.rows
    assert table.cell(key, "Before FT").flags == [UNCERTIFIED]
    assert table.cell(key, "Before FT").stat.uncertified == [0]
    assert UNCERTIFIED not in table.cell(key, "ADAM").flags
    (note,) = [n for n in table.notes if n.startswith(UNCERTIFIED)]
    assert "Before FT" in note and "seed 0 " in note
