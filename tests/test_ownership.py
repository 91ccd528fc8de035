"""Each concern of a run has one owner (issue 30 items 1, 2): results.json one writer, the key computed and
the config converted once per run, no callback from the pipeline into craft-run, no dead stage."""

import ast
import inspect
from pathlib import Path

from helpers import TINY, compose_run

import craft_runner
from craft_runner import pipeline
from craft_runner.schema import RunConfig

PKG = Path(craft_runner.__file__).parent


def _imports(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_only_results_py_writes_results_json():
    writers = []
    for f in PKG.rglob("*.py"):
        text = f.read_text()
        if f.name != "results.py" and "results.json" in text and "atomic_write" in text and \
                "report" not in f.parts:
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and "atomic_write" in ast.unparse(node.func) and \
                        "results.json" in ast.unparse(node):
                    writers.append(f"{f.relative_to(PKG)}:{node.lineno}")
    assert writers == []


def test_the_sweep_callback_and_the_pipeline_do_not_import_craft_run():
    for name in ("callbacks.py", "pipeline.py", "plan.py", "validate.py", "cache.py", "results.py"):
        # craft_runner.run itself (craft_runner.runtime, the process settings, is another module)
        run = {m for m in _imports(PKG / name) if m == "craft_runner.run" or m.startswith("craft_runner.run.")}
        assert not run, name


def test_the_pipeline_calls_no_one_back_and_has_no_dead_stage():
    assert "on_start" not in inspect.signature(pipeline.run).parameters
    assert not hasattr(pipeline, "compress_and_evaluate")


def test_a_run_converts_its_config_and_computes_its_key_once(tmp_path, monkeypatch):
    keys, conversions = [], []
    real_key, real_convert = pipeline.weights_key, pipeline.to_run_config

    def counted_key(rc):
        keys.append(rc)
        return real_key(rc)

    def counted_convert(cfg):
        if not isinstance(cfg, RunConfig):
            conversions.append(cfg)
        return real_convert(cfg)

    monkeypatch.setattr(pipeline, "weights_key", counted_key)
    monkeypatch.setattr(pipeline, "to_run_config", counted_convert)
    pipeline.run(compose_run(*TINY, "train.epochs=1", "sharpness.enabled=false", tmp_path=tmp_path))
    assert len(keys) == 1 and len(conversions) == 1
