"""Real artifacts of a compressed cell: ONNX files run by ONNX Runtime, with measured bytes, latency and accuracy.

:func:`export_cell` takes the simulated (compressed) model, writes its float ONNX file (``fp32_artifact``:
fake quantizers out, BatchNorm folded) and the format's artifact, and measures them against each other
on the cell's own data: the real model's accuracy on the test split beside the simulated one, the largest
logit difference to the simulated model, bytes (deflate-compressed for sparse cells) and latency ratios
at batch 1 and 64 (one process, interleaved, after warm-up). No Hydra here; formats: :mod:`.registry`.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from craft_runner.atomic import atomic_path
from craft_runner.compress.registry import capabilities
from craft_runner.device import full_fp32
from craft_runner.export.config import ExportConfig, check_export, simulated_only
from craft_runner.export.formats import NOTHING_TO_PACK
from craft_runner.export.onnx_io import deployable_copy, export_onnx, latency_ratio, op_counts, run, session
from craft_runner.export.registry import format_names, get_format, register_format

__all__ = ["ExportConfig", "ExportJob", "check_export", "export_cell", "format_names", "register_format",
           "simulated_only"]

log = logging.getLogger(__name__)

# The fp32 file must reproduce the torch model to this relative difference before anything is measured on it.
FP32_PARITY = 1e-3


@dataclass
class ExportJob:
    cfg: ExportConfig
    simulated: nn.Module
    out_dir: Path
    calib: list = field(default_factory=list)  # float32 NCHW arrays
    fp32_path: Optional[Path] = None
    artifact: Optional[Path] = None


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()


def _stored_bytes(path: Path, compressed: bool) -> tuple[int, Optional[Path]]:
    if not compressed:
        return path.stat().st_size, None
    zpath = path.with_suffix(".onnx.zip")
    with atomic_path(zpath) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                                                    compresslevel=9) as z:
        z.write(path, arcname=path.name)
    return zpath.stat().st_size, zpath


def _float_convs(optimized: Path) -> int:
    """Conv nodes ORT's optimised graph still runs in float (its NCHWc Conv included)."""
    return op_counts(optimized).get("Conv", 0)


@torch.no_grad()
def _evaluate(sess, simulated: nn.Module, test_batches, device) -> tuple[float, float]:
    """Accuracy (%) of the ONNX session and the largest |logit| difference to ``simulated``."""
    correct = total = 0
    diff = 0.0
    for x, y in test_batches:
        real = run(sess, _numpy(x))
        sim = simulated(x.to(device).float()).float().cpu().numpy()
        diff = max(diff, float(np.abs(real - sim).max()))
        correct += int((real.argmax(1) == y.cpu().numpy()).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1), diff


@full_fp32()  # the torch side of every comparison in float32, TF32 off, as ONNX Runtime's CPU
def export_cell(simulated: nn.Module, cfg: ExportConfig, compress, calib_batches, test_batches,
                simulated_accuracy: float, out_dir: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Export ``simulated`` as ``cfg.name`` says into ``out_dir``; returns results.json's ``export`` record.

    ``calib_batches``: the cell's calibration (x, y) batches; ``test_batches``: the test split's.
    A compression with no real kernel in that format is logged in one line and recorded as
    ``{"status": "simulated only", "reason": ...}`` with nothing written.
    """
    reason = simulated_only(cfg, compress)
    if reason is not None:
        log.warning("export=%s: simulated only: %s", cfg.name, reason)
        return {"format": cfg.name, "status": "simulated only", "reason": reason}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    simulated = simulated.eval()
    calib = [_numpy(x) for x, _ in calib_batches]
    sample = torch.from_numpy(calib[0][:1].copy())
    deploy, fold = deployable_copy(simulated, sample)
    job = ExportJob(cfg, simulated, out_dir, calib)
    job.fp32_path = export_onnx(deploy, out_dir / "model_fp32.onnx", sample, cfg.exporter, cfg.opset)
    fp32 = session(job.fp32_path, cfg.threads)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(calib[0]))
    got = torch.from_numpy(run(fp32, calib[0]))
    parity = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    if not parity <= FP32_PARITY:  # the float file already disagrees with torch: nothing it measures is trusted
        reason = (f"the fp32 ONNX file differs from the torch model by {parity:.2e} (relative, max |logit|), above "
                  f"{FP32_PARITY:g}")
        log.warning("export=%s: failed: %s", cfg.name, reason)
        return {"format": cfg.name, "status": "failed", "reason": reason, "fp32_parity_rel": parity,
                "fp32_artifact": str(job.fp32_path)}
    info = get_format(cfg.name)(job)
    if info.get("status") == NOTHING_TO_PACK:  # the artifact would be the fp32 file: nothing to measure
        log.warning("export=%s: %s", cfg.name, info["reason"])
        if job.artifact is not None and job.artifact != job.fp32_path:
            job.artifact.unlink(missing_ok=True)
        return {"format": cfg.name, **info, "fp32_parity_rel": parity, "fp32_artifact": str(job.fp32_path)}
    optimized = out_dir / (job.artifact.stem + ".optimized.onnx")
    real = session(job.artifact, cfg.threads, optimized)
    accuracy, max_diff = _evaluate(real, simulated, test_batches, device)
    compressed = cfg.compressed_storage == "true" or (cfg.compressed_storage == "auto"
                                                      and capabilities(getattr(compress, "name", "none")).sparse)
    nbytes, zpath = _stored_bytes(job.artifact, compressed)
    fp32_bytes, _ = _stored_bytes(job.fp32_path, False)
    x1 = calib[0][:1]
    x64 = np.concatenate([calib[0]] * (64 // len(calib[0]) + 1))[:64]
    lat1 = latency_ratio(real, fp32, x1, cfg.latency_warmup, cfg.latency_rounds)
    lat64 = latency_ratio(real, fp32, x64, cfg.latency_warmup, max(3, cfg.latency_rounds // 3))
    rec = {"format": cfg.name, "status": "ok", "artifact": str(zpath or job.artifact),
           "fp32_artifact": str(job.fp32_path), "bytes": nbytes, "fp32_bytes": fp32_bytes,
           "bytes_ratio": nbytes / fp32_bytes, "raw_bytes": job.artifact.stat().st_size,
           "compressed_storage": "zip deflate" if zpath else None,
           "accuracy": accuracy, "simulated_accuracy": simulated_accuracy,
           "accuracy_drop": accuracy - simulated_accuracy, "max_logit_diff": max_diff,
           "fp32_parity_rel": parity, "latency_ratio_b1": lat1["ratio"], "latency_ratio_b64": lat64["ratio"],
           "latency_ms": {"b1": lat1, "b64": lat64}, "threads": cfg.threads, "exporter": cfg.exporter,
           "opset": cfg.opset, "float_convs": _float_convs(optimized), "ops": op_counts(optimized),
           "optimized_artifact": str(optimized), **fold, **info}
    log.info("export %s: %.2f%% (simulated %.2f%%), %.2fx the fp32 bytes, latency x%.2f (b1) x%.2f (b64), "
             "%d float Conv left", cfg.name, accuracy, simulated_accuracy, rec["bytes_ratio"], lat1["ratio"],
             lat64["ratio"], rec["float_convs"])
    return rec
