"""The claims' primaries compare arms that differ only in the treatment: the QAT accuracy primaries' arms, built
from the real configs, quantize the same layer inputs (counted by one forward after QAT's surgery); CrAFT Table
4's time arms run back to back per seed; every primary's overrides compose with its experiment."""

import pytest
import torch
from helpers import compose_run

from craft_runner.compress.qat import distiller_relus, insert_pact, quantize_layer_inputs, quantized_input_layers
from craft_runner.compress.registry import target_layers
from craft_runner.config import to_run_config
from craft_runner.models.factory import create_model
from craft_runner.report import claims, papers


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
    # the row it reads is the one the QAT table labels for that coverage
    assert dict(claim.primary.row)["Act. quant"] == papers.ACT_QUANT.fmt(None if act[0] == "distiller" else act[0])


def test_distiller_coverage_leaves_arch_weight_only():
    """Why ARCH's accuracy primary is not distiller's: its RPReLUs are no nn.ReLU, so no activation is quantized."""
    assert _covered("mobilenetv1_arch", "distiller")[0] == 0
    assert _covered("mobilenetv1_adam", "distiller")[0] > 0


@pytest.mark.parametrize("claim", claims.CLAIMS, ids=lambda c: c.text[:30])
def test_every_primarys_overrides_compose_with_its_experiment(claim):
    """The confirmatory sweep's restriction and fixed overrides are valid for the real configs (a misspelled key
    or a value the schema refuses fails here, not hours into make claims)."""
    p = claim.primary
    overrides = [f"{k}={v[0]}" for k, v in p.sweep] + list(p.fixed)
    rc = to_run_config(compose_run(f"experiment={p.experiment}_small", *overrides))
    if "compress.alpha_init=null" in p.fixed:
        assert rc.compress.alpha_init is None


def test_the_timing_claims_arms_run_back_to_back_per_seed():
    """Hydra's basic sweeper varies the last key fastest: with seed outermost each seed's Adam and SAM trainings
    follow each other, so a load that drifts over the run does not fall on one arm."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parent.parent / "conf" / "experiment" / "craft_table4_small.yaml"
    keys = list(yaml.safe_load(conf.read_text())["hydra"]["sweeper"]["params"])
    assert keys.index("seed") < keys.index("optimizer")
