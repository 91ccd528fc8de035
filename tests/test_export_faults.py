"""Export artifacts are written whole or not at all, and an int4 export with nothing to pack says so
(issue 28, items 2 and 6)."""

import pytest
import torch
from torch import nn

import craft_runner.export.onnx_io as onnx_io
from craft_runner.export import ExportConfig, export_cell


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g))]


def _conv_only():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_a_failed_export_leaves_no_truncated_onnx_file(tmp_path, monkeypatch):
    real = torch.onnx.export

    def dies_half_way(model, args, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"\x08\x07half a protobuf")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", dies_half_way)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_cell(_conv_only(), ExportConfig(name="onnx_fp32"), None, _batches(4, 1), _batches(4, 2), 50.0,
                    tmp_path / "export")
    assert list((tmp_path / "export").iterdir()) == []
    monkeypatch.setattr(torch.onnx, "export", real)
    rec = export_cell(_conv_only(), ExportConfig(name="onnx_fp32", latency_warmup=0, latency_rounds=1), None,
                      _batches(4, 1), _batches(4, 2), 50.0, tmp_path / "export")
    assert rec["status"] == "ok"
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["model_fp32.onnx", "model_fp32.optimized.onnx"]  # no temporary left beside them


def test_int4_with_nothing_to_pack_is_recorded_as_such(tmp_path):
    rec = export_cell(_conv_only(), ExportConfig(name="onnx_int4", latency_warmup=0, latency_rounds=1), None,
                      _batches(4, 1), _batches(4, 2), 50.0, tmp_path / "export")
    assert rec["status"] == "nothing to pack"
    assert rec["reason"].startswith("nothing to pack: every layer stayed fp32")
    assert "bytes_ratio" not in rec and not (tmp_path / "export" / "model_int4.onnx").exists()


def test_the_optimised_graph_is_written_through_a_temporary(tmp_path, monkeypatch):
    seen = []
    real = onnx_io.atomic_path

    def spy(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(onnx_io, "atomic_path", spy)
    export_cell(_conv_only(), ExportConfig(name="onnx_fp32", latency_warmup=0, latency_rounds=1), None,
                _batches(4, 1), _batches(4, 2), 50.0, tmp_path)
    assert seen == ["model_fp32.onnx", "model_fp32.optimized.onnx"]
