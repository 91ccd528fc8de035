"""The QAT claims' primaries compare two arms quantized alike: built from the real configs, each arm's layer inputs
that the primary's activation coverage quantizes are counted by one forward, after the surgery QAT does."""

import pytest
import torch
from helpers import compose_run

from craft_runner.compress.qat import distiller_relus, insert_pact, quantize_layer_inputs, quantized_input_layers
from craft_runner.compress.registry import target_layers
from craft_runner.config import to_run_config
from craft_runner.models.factory import create_model
from craft_runner.report import claims


def _covered(arm: str, act: str) -> tuple[int, int]:
    rc = to_run_config(compose_run("experiment=snt_table3_qat_small", f"+shared/snt_qat={arm}"))
    torch.manual_seed(0)
    model = create_model(rc.model, num_classes=10, in_chans=3, arch=rc.arch).eval()
    layers = target_layers(model, skip_first_last=True)
    batches = [(torch.randn(4, 3, rc.dataset.img_size or 32, rc.dataset.img_size or 32), None)]
    if act == "distiller":
        names = distiller_relus(model, batches, skip_first_last=True)
        if names:
            insert_pact(model, 4, batches, 8.0, 0.0, names=set(names))
    else:
        quantize_layer_inputs(model, layers, 4, batches, 8.0, 0.0)
    return len(quantized_input_layers(model, layers, batches)), len(layers)


QAT_TOP1 = [c for c in claims.CLAIMS if c.primary.experiment == "snt_table3_qat" and c.primary.column.startswith("Top")]


@pytest.mark.parametrize("claim", QAT_TOP1, ids=lambda c: c.text[:30])
def test_both_arms_of_a_qat_accuracy_primary_quantize_the_same_layer_inputs(claim):
    act = dict(claim.primary.sweep)["compress.act_quant"]
    assert len(act) == 1
    arms = {dict(claim.primary.row)["Approach"], dict(claim.primary.base)["Approach"]}
    covered = {a: _covered(f"mobilenetv1_{a.lower()}", act[0]) for a in arms}
    assert len(set(covered.values())) == 1, covered  # e.g. distiller on ARCH: 0 of 26, on ADAM 25 of 26
    assert next(iter(covered.values()))[0] > 0


def test_distiller_coverage_leaves_arch_weight_only():
    """Why ARCH's accuracy primary is not distiller's: its RPReLUs are no nn.ReLU, so no activation is quantized."""
    assert _covered("mobilenetv1_arch", "distiller")[0] == 0
    assert _covered("mobilenetv1_adam", "distiller")[0] > 0
