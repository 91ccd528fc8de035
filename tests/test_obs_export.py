"""Real artifacts of the OBS compressors: GPTQ's grouped int4 Linears as ONNX Runtime MatMulNBits with GPTQ's own
codes, scales and zero points; SparseGPT's model stored deflate-compressed with its bytes measured."""

import numpy as np
import pytest
import timm
import torch
from onnx import load, numpy_helper

from craft_runner.compress import CompressContext, apply_compression
from craft_runner.compress.gptq import GPTQConfig
from craft_runner.compress.sparsegpt import SparseGPTConfig
from craft_runner.export import ExportConfig, export_cell

pytest.importorskip("onnxruntime")


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=5).eval()


def _data():
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    test = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    return calib, test


@pytest.mark.slow
def test_gptq_grouped_int4_goes_to_matmulnbits_with_its_own_grid(tmp_path):
    model, (calib, test) = _vit(), _data()
    apply_compression(model, GPTQConfig(bits="W4A16", group_size=32),
                      CompressContext(torch.device("cpu"), calib, progress=False))
    with torch.no_grad():  # labels: the simulated model's own predictions, so its accuracy is 100 %
        test_batches = [(x, model(x).argmax(1)) for x in test]
    rec = export_cell(model, ExportConfig(name="onnx_int4", block_size=32), GPTQConfig(bits="W4A16", group_size=32),
                      calib, test_batches, 100.0, tmp_path)
    assert rec["status"] == "ok", rec
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert rec["given_grids"] == n_linear == rec["matmul_nbits"] and rec["not_carried"] == []
    assert rec["accuracy"] >= 99.5 and rec["max_logit_diff"] < 1e-3
    # the artifact's codes are GPTQ's: dequantized they give the simulated weight, asymmetric zero points included
    g = load(rec["artifact"]).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    fc = model.blocks[0].mlp.fc1
    packed = inits["blocks.0.mlp.fc1.nbits.B"]
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(fc.out_features, -1).astype(np.float32)
    zp = inits["blocks.0.mlp.fc1.nbits.zp"].reshape(fc.out_features, -1)
    zp = np.stack([zp & 15, zp >> 4], -1).reshape(fc.out_features, -1)[:, :fc.in_features // 32].astype(np.float32)
    s = inits["blocks.0.mlp.fc1.nbits.scales"].reshape(fc.out_features, -1)
    w = (codes.reshape(fc.out_features, -1, 32) - zp[..., None]) * s[..., None]
    assert np.allclose(w.reshape(fc.out_features, -1), fc.weight.detach().numpy(), atol=1e-5)
    assert len(np.unique(zp)) > 1  # not a symmetric grid in disguise


@pytest.mark.slow
def test_sparsegpt_is_stored_compressed_with_its_bytes(tmp_path):
    model, (calib, test) = _vit(), _data()
    cfg = SparseGPTConfig(sparsity=0.7)
    apply_compression(model, cfg, CompressContext(torch.device("cpu"), calib, progress=False))
    with torch.no_grad():
        test_batches = [(x, model(x).argmax(1)) for x in test]
    rec = export_cell(model, ExportConfig(name="onnx_fp32"), cfg, calib, test_batches, 100.0, tmp_path)
    assert rec["status"] == "ok" and rec["compressed_storage"] == "zip deflate"
    assert rec["artifact"].endswith(".zip") and rec["bytes"] < 0.75 * rec["raw_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("compress=gptq", "compress.bits=W3A16"),
                                       ("compress=sparsegpt", "compress.pattern=nm")])
def test_a_cell_runs_end_to_end(tmp_path, overrides):
    import json

    from helpers import TINY, compose_run

    from craft_runner import pipeline

    pipeline.run(compose_run(*TINY, *overrides, tmp_path=tmp_path))
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["status"] == "ok" and r["compression"]["name"] == overrides[0].split("=")[1]
    assert r["metrics"]["compressed_acc"] is not None
