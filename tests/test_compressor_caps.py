"""Capabilities, not names (issue 30 item 4): a compressor declares what the report and the export read, so a new
one is one module plus one YAML and shows up in the Table 2 columns and in export's checks."""

import dataclasses
import importlib.util
import json
import sys
import textwrap

import pytest
from helpers import compose_run

from craft_runner.compress import registry
from craft_runner.compress.gptq import GPTQConfig
from craft_runner.compress.quant import PTQConfig
from craft_runner.compress.sparsegpt import SparseGPTConfig
from craft_runner.config import register_configs, to_run_config
from craft_runner.export import ExportConfig, check_export, simulated_only
from craft_runner.optim import OptimizerConfig
from craft_runner.report.cli import main
from craft_runner.report.papers import LAYOUTS, bits, prune_shape, tagged_bits
from craft_runner.report.records import Record
from craft_runner.schema import ConfigError, DatasetConfig, RunConfig

MODULE = '''
from dataclasses import dataclass
from typing import Optional

from craft_runner.compress.registry import Capabilities, CompressConfig, parse_bits, register_compressor


@dataclass
class DummyConfig(CompressConfig):
    name: str = "dummyq"
    bits: Optional[str] = None
    w_bits: int = 7
    a_bits: int = 16

    def __post_init__(self):
        super().__post_init__()
        parse_bits(self)


@register_compressor("dummyq", DummyConfig, label=lambda c: f"dummy W{c['w_bits']}A{c['a_bits']}",
                     caps=Capabilities(quantizes=True, tag="DUMMY", exports=("onnx_fp32", "onnx_int4")))
def dummyq(model, layers, cfg, ctx):
    return {}
'''

YAML = '''
defaults:
  - dummyq_schema
  - _self_
name: dummyq
bits: W7A16
'''


@pytest.fixture
def dummy(tmp_path):
    path = tmp_path / "dummyq.py"
    path.write_text(textwrap.dedent(MODULE))
    spec = importlib.util.spec_from_file_location("dummyq_test_module", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    (tmp_path / "conf" / "compress").mkdir(parents=True)
    (tmp_path / "conf" / "compress" / "dummyq.yaml").write_text(YAML)
    register_configs()  # its schema, as craft-run registers every compressor's
    try:
        yield tmp_path
    finally:
        registry._REGISTRY.pop("dummyq", None)
        sys.modules.pop(spec.name, None)


def test_a_dummy_compressor_is_one_module_and_one_yaml(dummy, capsys):
    cfg = to_run_config(compose_run("compress=dummyq", f"hydra.searchpath=[file://{dummy / 'conf'}]"))
    assert cfg.compress.name == "dummyq" and (cfg.compress.w_bits, cfg.compress.a_bits) == (7, 16)
    # export's checks read its capabilities: the formats it declares, no injectable scales, no 7-bit kernel
    with pytest.raises(ConfigError, match="export=onnx_int8 is not allowed with compress=dummyq") as e:
        check_export(ExportConfig(name="onnx_int8"), cfg.compress)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="onnx_int8_searched"):
        check_export(ExportConfig(name="onnx_int8_searched"), dataclasses.replace(cfg.compress))
    check_export(ExportConfig(name="onnx_int4"), cfg.compress)
    assert "W7 weights" in simulated_only(ExportConfig(name="onnx_int4"), cfg.compress)
    # Table 2 gets its bit width as a column, its tag as the Method row
    out = dummy / "sweep"
    for opt, acc in (("adam", 80.0), ("sam", 85.0)):
        for comp, name in ((cfg.compress, "dummy"), (PTQConfig(bits="W8A8"), "ptq")):
            rc = RunConfig(optimizer=OptimizerConfig(name=opt), dataset=DatasetConfig(classes=[5, 6, 7, 8, 9]),
                           compress=comp, experiment="craft_table2_small")
            d = out / f"{opt}-{name}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps({
                "config": dataclasses.asdict(rc), "status": "ok", "compression": {}, "sharpness": {},
                "metrics": {"fp_acc": 90.0, "compressed_acc": acc, "drop": acc - 90.0}}))
    main([str(out), "--format", "md", "--no-figures"])
    text = capsys.readouterr().out
    header = next(ln for ln in text.splitlines() if ln.startswith("| Downstream Task"))
    assert "W7A16" in header and "W8A8" in header
    assert "| DUMMY " in text and "| BasePTQ " in text


def _rec(compress):
    return Record(path=None, status="ok", config={"compress": dataclasses.asdict(compress)})


def test_gptq_and_sparsegpt_columns_and_export_capabilities():
    g = _rec(GPTQConfig(bits="W3A16"))
    assert bits(g) == "W3A16" and tagged_bits(g) == "GPTQ W3A16"
    assert tagged_bits(_rec(PTQConfig(bits="W3A16"))) == "W3A16"
    assert prune_shape(_rec(SparseGPTConfig(pattern="nm", n=2, m=4))) == "2:4"
    assert prune_shape(_rec(SparseGPTConfig(sparsity=0.6))) == "60%"
    rows = {r.label: r for r in LAYOUTS["craft_table2"].rows}
    assert rows["Method"].fmt("gptq", None, None) == "GPTQ"
    assert rows["Method"].fmt("ptq", "base", 0.5) == "BasePTQ +SmoothQuant"
    assert {r.label: r for r in LAYOUTS["craft_fig4"].rows}["Criterion"].fmt("sparsegpt", None) == "SparseGPT"
    assert registry.capabilities("sparsegpt").sparse and not registry.capabilities("gptq").sparse
    assert registry.capabilities("tome").changes_tokens
    assert registry.capabilities("unknown_x") == registry.Capabilities()
    # GPTQ's grouped int4 goes to MatMulNBits only when its groups are the export's blocks
    assert simulated_only(ExportConfig(name="onnx_int4", block_size=32), GPTQConfig(group_size=32)) is None
    assert "compress.group_size=32" in simulated_only(ExportConfig(name="onnx_int4", block_size=32), GPTQConfig())
    assert "act-order" in simulated_only(ExportConfig(name="onnx_int4", block_size=32),
                                         GPTQConfig(group_size=32, act_order=True))
    with pytest.raises(ConfigError, match="onnx_int8_searched"):
        check_export(ExportConfig(name="onnx_int8_searched"), SparseGPTConfig())
    check_export(ExportConfig(name="onnx_int8_searched"), GPTQConfig(bits="W8A8"))
