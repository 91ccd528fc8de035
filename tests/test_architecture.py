"""The house rules: one registry per family, cache keys from what applies, a library that runs without Hydra."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_run
from torch import nn

from craft_runner import pipeline
from craft_runner.cache import cache_key, diagnostics_key, weights_key
from craft_runner.compress import CompressContext, apply_compression, compressors, get_compressor
from craft_runner.compress.registry import CompressConfig, register_compressor
from craft_runner.config import to_run_config
from craft_runner.optim import OptimizerConfig, build_optimizer, get_optimizer
from craft_runner.report.table import compression_label
from craft_runner.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_compressor_registry_refuses_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        get_compressor("zip")
    msg = str(e.value)
    assert "compress.name='zip'" in msg and "\n" not in msg
    for name in ("none", "ptq", "prune", "qat"):
        assert name in msg


def test_an_unknown_compress_name_fails_before_any_work(tmp_path):
    cfg = compose_run(*TINY, "compress=ptq", "compress.name=zip", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="compress.name='zip'.*ptq"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_optimizer_registry_refuses_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ConfigError) as e:
        get_optimizer("lion")
    for name in ("adam", "sgd", "sam", "looksam"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="optimizer.name='lion'.*adam"):
        OptimizerConfig(name="lion")
    with pytest.raises(ConfigError, match="optimizer.base='sam'"):
        OptimizerConfig(name="sam", base="sam")  # a sharpness-aware optimizer cannot be a base


def test_report_labels_an_unknown_compressor_by_its_name_not_none():
    assert compression_label({"name": "zip", "level": 9}) == "zip"
    assert compression_label({"name": "ptq", "method": "base", "w_bits": 4, "a_bits": 16}) == "W4A16"


def test_a_new_compressor_is_one_registration():
    class HalveConfig(CompressConfig):
        pass

    @register_compressor("halve_test", HalveConfig, label=lambda c: "halved")
    def halve(model, layers, cfg, ctx):
        with torch.no_grad():
            for _, m in layers:
                m.weight.mul_(0.5)
        return {"halved_layers": len(layers)}

    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        w = model[0].weight.detach().clone()
        info = apply_compression(model, HalveConfig(name="halve_test"), CompressContext(torch.device("cpu")))
        assert info == {"name": "halve_test", "halved_layers": 2}
        assert torch.equal(model[0].weight, w / 2)
        assert compression_label({"name": "halve_test"}) == "halved"
    finally:
        from craft_runner.compress import registry

        registry._REGISTRY.pop("halve_test")
    assert "halve_test" not in compressors()


def test_a_schema_of_another_compressor_is_refused():
    from craft_runner.compress import PruneConfig

    with pytest.raises(TypeError, match="PTQConfig"):
        apply_compression(nn.Linear(2, 2), PruneConfig(name="ptq"), CompressContext(torch.device("cpu")))


def test_registered_optimizers_build_with_their_fields():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.3, momentum=0.5, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["nesterov"] is True
    sam = build_optimizer(model, OptimizerConfig(name="looksam", base="sgd", lr=0.2, rho=0.1, k=3))
    assert isinstance(sam.base_optimizer, torch.optim.SGD) and sam.k == 3
    assert sam.param_groups[0]["lr"] == 0.2 and sam.defaults["rho"] == 0.1


def _key(*overrides):
    return cache_key(to_run_config(compose_run(*TINY, *overrides)))


def test_rho_does_not_change_adams_cache_key_but_changes_sams():
    assert _key("optimizer.rho=0.1") == _key()
    assert _key("optimizer.k=3", "optimizer.sam_prob=0.5", "optimizer.momentum=0.5") == _key()
    assert _key("optimizer=sam", "optimizer.rho=0.1") != _key("optimizer=sam")
    assert _key("optimizer=sam", "optimizer.k=3") == _key("optimizer=sam")  # k is LookSAM's
    assert _key("optimizer=looksam", "optimizer.k=3") != _key("optimizer=looksam")
    assert _key("optimizer.lr=0.01") != _key()


def test_diagnostics_key_ignores_when_and_how_results_are_shown():
    def dkey(*o):
        return diagnostics_key(to_run_config(compose_run(*TINY, *o)))

    assert dkey("sharpness.before=false", "sharpness.plots=false") == dkey()
    assert dkey("sharpness.max_iter=7") != dkey()


def test_every_cache_entry_writes_key_json(tmp_path):
    cfg = compose_run(*TINY, "train.epochs=1", tmp_path=tmp_path)
    pipeline.run(cfg)
    rc = to_run_config(cfg)
    entry = tmp_path / "cache" / cache_key(rc)
    key = json.loads((entry / "key.json").read_text())
    assert key == json.loads(json.dumps(weights_key(rc), default=str))
    assert key["optimizer"] == {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0}
    (diag,) = (entry / "diagnostics").iterdir()
    dkey = json.loads((diag / "key.json").read_text())
    assert dkey["max_iter"] == 5 and "before" not in dkey and (diag / "diagnostics.json").exists()


def test_optimized_metric_is_a_config_key():
    m = {"fp_acc": 90.0, "compressed_acc": 80.0, "lambda_max_after": 3.0}
    assert pipeline.optimized_value(None, m) == 80.0
    assert pipeline.optimized_value(None, {"fp_acc": 90.0}) == 90.0
    assert pipeline.optimized_value("lambda_max_after", m) == 3.0
    with pytest.raises(ConfigError, match="optimized_metric='loss'.*fp_acc"):
        pipeline.optimized_value("loss", m)


def test_the_library_imports_and_runs_without_hydra():
    code = textwrap.dedent("""
        import importlib.abc, sys

        class NoHydra(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("hydra", "omegaconf"):
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, NoHydra())
        import torch
        import craft_runner.schema, craft_runner.models, craft_runner.data, craft_runner.optim
        import craft_runner.compress, craft_runner.sharpness, craft_runner.diagnostics, craft_runner.report.table
        from craft_runner.compress import PTQConfig, CompressContext, apply_compression
        from craft_runner.models import create_model
        from craft_runner.optim import OptimizerConfig
        from craft_runner.schema import ModelConfig
        from craft_runner.optim import build_optimizer

        model = create_model(ModelConfig(name="resnet20"), num_classes=3)
        build_optimizer(model, OptimizerConfig(name="sam"))
        x = torch.randn(4, 3, 32, 32)
        ctx = CompressContext(torch.device("cpu"), [(x, None)])
        info = apply_compression(model, PTQConfig(w_bits=4, a_bits=16), ctx)
        assert info["name"] == "ptq" and model(x).shape == (4, 3)
        assert not any(m.split(".")[0] in ("hydra", "omegaconf") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_a_text_file_as_checkpoint_gives_one_clear_line(tmp_path):
    from craft_runner.models import read_state_dict

    path = tmp_path / "weights.pth"
    path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError) as e:
        read_state_dict(str(path))
    msg = str(e.value)
    assert "model.checkpoint_path" in msg and "not a readable checkpoint" in msg
    assert "KeyError" not in msg and "\n" not in msg


def test_a_compressor_that_does_not_fit_the_model_fails_before_training(tmp_path):
    cfg = compose_run(*TINY, "compress=tome", tmp_path=tmp_path)  # ToMe on ResNet-20
    with pytest.raises(ValueError, match="tome needs a timm VisionTransformer"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
