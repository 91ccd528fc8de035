"""BatchNorm re-calibration after compression, against BatchNorm written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from craft_runner.compress.bn import recalibrate_bn
from craft_runner.compress.config import CompressConfig, PruneConfig
from craft_runner.config import ConfigError


def net():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5))


def _bn_train(h, gamma, beta, eps, dims):
    """Train-mode BatchNorm by hand: normalise with the batch mean and biased variance; also returns the
    batch mean and unbiased variance, what the running statistics accumulate."""
    mean, var = h.mean(dims), h.var(dims, unbiased=False)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    y = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * gamma.view(shape) + beta.view(shape)
    return y, mean, h.var(dims, unbiased=True)


def test_running_stats_are_the_batch_statistics_of_the_compressed_model():
    torch.manual_seed(0)
    model = net()
    # compressed: half of each conv pruned, masks still attached (the reparametrisation is kept)
    for i in (0, 4):
        tprune.l1_unstructured(model[i], "weight", amount=0.5)
    model.train()
    momenta = [m.momentum for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, None) for n in (8, 5, 11)]

    info = recalibrate_bn(model, batches)

    assert info == {"bn_layers": 3, "batches": 3, "samples": 24}
    c1, bn1, _, _, c2, bn2, _, _, _, fc, bn3 = model
    sums = {k: [0, 0] for k in ("bn1", "bn2", "bn3")}
    with torch.no_grad():
        for x, _ in batches:
            h = F.conv2d(x, c1.weight_orig * c1.weight_mask, padding=1)  # the pruned weight
            h, m, v = _bn_train(h, bn1.weight, bn1.bias, bn1.eps, (0, 2, 3))
            sums["bn1"][0] += m
            sums["bn1"][1] += v
            h = F.conv2d(torch.relu(h), c2.weight_orig * c2.weight_mask, c2.bias, padding=1)  # no dropout
            h, m, v = _bn_train(h, bn2.weight, bn2.bias, bn2.eps, (0, 2, 3))
            sums["bn2"][0] += m
            sums["bn2"][1] += v
            h = torch.relu(h).mean((2, 3)) @ fc.weight.T + fc.bias
            _, m, v = _bn_train(h, bn3.weight, bn3.bias, bn3.eps, (0,))
            sums["bn3"][0] += m
            sums["bn3"][1] += v
    for name, bn in (("bn1", bn1), ("bn2", bn2), ("bn3", bn3)):
        # momentum=None: the cumulative average, every batch weighted the same
        assert torch.allclose(bn.running_mean, sums[name][0] / 3, atol=1e-5), name
        assert torch.allclose(bn.running_var, sums[name][1] / 3, atol=1e-5), name
        assert bn.num_batches_tracked.item() == 3
    # modes, momenta, weights and masks as they were
    assert all(m.training for m in model.modules())
    assert momenta == [m.momentum for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert tprune.is_pruned(model[0])


def test_eval_mode_is_restored_and_no_batches_leave_the_model_untouched():
    model = net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    info = recalibrate_bn(model, [torch.randn(4, 3, 6, 6)])  # plain tensors work too
    assert info["batches"] == 1 and not any(m.training for m in model.modules())
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert recalibrate_bn(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])["bn_layers"] == 0


def test_bn_recalib_config():
    assert CompressConfig().bn_recalib == 0 and PruneConfig(bn_recalib=8).bn_recalib == 8
    with pytest.raises(ConfigError, match="compress.bn_recalib"):
        PruneConfig(bn_recalib=-1)
