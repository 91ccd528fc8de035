"""The runner's GPTQ against an independent implementation: brevitas's ``gptq_mode`` (pip install
'craft-runner[brevitas]'; skipped without it) on a small MLP, layer by layer, W4 per-channel asymmetric min-max.

brevitas's stock ``ShiftedUint8WeightPerChannelFloat`` recomputes its min-max grid from the weights as GPTQ
updates them, where the reference takes the grid once before (``find_params``); with the grid frozen from the
weights before GPTQ (scale and zero point "parameter from stats") brevitas is the reference's algorithm, and the
two give the same weights."""

import pytest
import torch
from torch import nn

from craft_runner.compress import CompressContext, apply_compression
from craft_runner.compress.gptq import GPTQConfig

qnn = pytest.importorskip("brevitas.nn")


def _float():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_gptq_equals_brevitas_with_the_reference_grid():
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.graph.gptq import gptq_mode
    from brevitas.quant import ShiftedUint8WeightPerChannelFloat

    class W4Frozen(ShiftedUint8WeightPerChannelFloat):
        bit_width = 4
        scaling_impl_type = "parameter_from_stats"
        zero_point_impl = ParameterFromStatsFromParameterZeroPoint

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(48, 48, generator=g) / 7 + torch.eye(48)
    calib = [torch.randn(64, 48, generator=g) @ mix for _ in range(4)]
    ours = _float()
    apply_compression(ours, GPTQConfig(bits="W4A16", sequential="layer"),
                      CompressContext(torch.device("cpu"), [(x, None) for x in calib], progress=False))
    theirs = nn.Sequential(*[qnn.QuantLinear(m.in_features, m.out_features, weight_quant=W4Frozen, bias=True)
                             if isinstance(m, nn.Linear) else m for m in _float()])
    theirs.load_state_dict(_float().state_dict(), strict=False)
    theirs.eval()
    with torch.no_grad():
        theirs(calib[0])  # the grid, from the weights before GPTQ
        with gptq_mode(theirs, use_quant_activations=False, act_order=False) as gptq:
            for _ in range(gptq.num_layers):
                for x in calib:
                    gptq.model(x)
                gptq.update()
    for a, b in zip([m for m in theirs if isinstance(m, nn.Linear)], [m for m in ours if isinstance(m, nn.Linear)]):
        assert torch.allclose(a.quant_weight().value, b.weight, rtol=0, atol=1e-6)
