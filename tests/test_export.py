import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import craft_runner.models.cifar  # noqa: F401  (registers resnet20)
from craft_runner.compress.quant import PTQConfig
from craft_runner.export import ExportConfig, check_export, export_cell
from craft_runner.schema import ConfigError


def _model():
    torch.manual_seed(0)
    m = timm.create_model("resnet20", num_classes=4)
    m.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        for _ in range(3):
            m(torch.randn(16, 3, 16, 16))
    return m.eval()


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g))]


def test_int8_export_parity_bytes_and_no_float_conv(tmp_path):
    m = _model()
    calib, test = _batches(16, 1), _batches(16, 2)
    cfg = ExportConfig(name="onnx_int8", latency_warmup=0, latency_rounds=1)
    rec = export_cell(m, cfg, None, calib, test, 50.0, tmp_path)
    assert rec["status"] == "ok" and rec["bn_folded"] == 21
    # fp32 file against torch's own forward of the unfolded model
    sess = ort.InferenceSession(rec["fp32_artifact"], providers=["CPUExecutionProvider"])
    x = test[0][0]
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    assert os.path.getsize(rec["artifact"]) <= 0.35 * os.path.getsize(rec["fp32_artifact"])
    ops = [n.op_type for n in onnx.load(rec["optimized_artifact"]).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == 21


def test_combinations_without_a_real_kernel_are_recorded_not_faked(tmp_path):
    rec = export_cell(_model(), ExportConfig(name="onnx_int8"), PTQConfig(bits="W6A6"), _batches(4, 1),
                      _batches(4, 2), 50.0, tmp_path / "x")
    assert rec["status"] == "simulated only" and "6-bit activations" in rec["reason"]
    assert not (tmp_path / "x").exists()


def test_int4_with_quantized_activations_is_simulated_only_and_a_float_file_off_torch_is_failed(tmp_path,
                                                                                                  monkeypatch):
    from craft_runner.export import simulated_only

    # MatMulNBits runs float activations: an A8 cell is not what it would deploy
    assert "A8" in simulated_only(ExportConfig(name="onnx_int4"), PTQConfig(bits="W4A8"))
    assert simulated_only(ExportConfig(name="onnx_int4"), PTQConfig(bits="W4A16")) is None
    # a parity bound no file can meet: the export is failed before anything is measured on it
    import craft_runner.export as export

    monkeypatch.setattr(export, "FP32_PARITY", -1.0)
    rec = export_cell(_model(), ExportConfig(name="onnx_int8"), None, _batches(4, 1), _batches(4, 2), 50.0,
                      tmp_path / "x")
    assert rec["status"] == "failed" and "differs from the torch model" in rec["reason"]
    assert "accuracy" not in rec and not list((tmp_path / "x").glob("*int8*"))


def test_bad_export_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="export.block_size=24"):
        ExportConfig(name="onnx_int4", block_size=24)
    with pytest.raises(ConfigError, match="export.name='onnx_int3'"):
        ExportConfig(name="onnx_int3")
    from craft_runner.compress.registry import CompressConfig

    with pytest.raises(ConfigError, match="onnx_int8_searched"):
        check_export(ExportConfig(name="onnx_int8_searched"), CompressConfig())


def test_an_untrained_model_with_equal_biases_still_gets_int8_convs(tmp_path):
    """torch.onnx merges equal initializers (a fresh model's zero biases); each Conv must keep its own."""
    torch.manual_seed(0)
    m = timm.create_model("resnet20", num_classes=4).eval()  # BatchNorm as initialised: every bias 0
    rec = export_cell(m, ExportConfig(name="onnx_int8", latency_warmup=0, latency_rounds=1), None, _batches(8, 1),
                      _batches(8, 2), 50.0, tmp_path)
    ops = [n.op_type for n in onnx.load(rec["optimized_artifact"]).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == 21
    sess = ort.InferenceSession(rec["fp32_artifact"], providers=["CPUExecutionProvider"])
    x = _batches(8, 3)[0][0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max() <= 1e-5 * np.abs(ref).max()
