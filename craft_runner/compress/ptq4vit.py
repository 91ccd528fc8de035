"""PTQ4ViT (Yuan et al., ECCV 2022) as its reference code (hahnyuan/PTQ4ViT, ``configs/PTQ4ViT.py``)
runs it: twin uniform quantization and Hessian-guided scale search.

What is quantized (W = w_bits, A = a_bits; 16 or more bits: left in float):

- every target Conv2d/Linear: weights symmetric uniform — one scale per layer for a Linear (q, k
  and v apart in a fused qkv), one per output channel for a Conv2d (``weight_granularity=mixed``);
  input symmetric uniform with one scale per tensor — except the stem's image input, left in float,
  and the input of an MLP's ``fc2`` that follows a GELU, which gets post-GELU twin uniform
  quantization (:func:`~craft_runner.compress.quantizers.twin_uniform_gelu`);
- with ``quant_attention``, both matmuls of every timm ViT attention: q·kᵀ with one scale per
  head for q and for kᵀ, attn·v with post-softmax twin uniform quantization of attn
  (:func:`~craft_runner.compress.quantizers.twin_softmax_reference`, split 2^−m searched for m in
  0..max_softmax_shift with v in float) and one scale per head for v.

Every scale is searched on the full-precision model's calibration data (see
:mod:`craft_runner.compress.search`: candidates r·s₀ with r = 0.01 + i·(1.2 − 0.01)/100, i = 0..99,
three rounds of weight-then-input search), minimising the Hessian-guided distance of the op output O,

    mean[ (∂L/∂O)² ⊙ (Ô − O)² ]

(the diagonal Gauss-Newton approximation of the Hessian w.r.t. O), or plain mean[(Ô − O)²] with
``metric=mse``. Which L: ``hessian_loss=kl`` (default) is the reference code's
(``HessianQuantCalibrator``): KL(p ‖ softmax(z)) with p the full-precision prediction of the
calibration batch and z the logits of the same full-precision model on mini-batches of 4 images —
exactly zero in theory (z gives p), so the gradient the search weighs with is the floating-point
residue of computing p and z in different batches; that is what produced the published numbers.
``hessian_loss=ce`` is the paper's task loss: cross-entropy with the calibration labels.
"""

from __future__ import annotations

from torch import nn

from craft_runner.compress.quantizers import GeluTwinQuantizer, SoftmaxTwinQuantizer, UniformQuantizer
from craft_runner.compress.search import capture, post_gelu_linears, run_ptq, search_layer, search_matmul
from craft_runner.compress.search import frozen as _frozen

__all__ = ["GeluTwinQuantizer", "SoftmaxTwinQuantizer", "UniformQuantizer", "_frozen", "capture",
           "post_gelu_linears", "ptq4vit", "search_layer", "search_matmul"]


def ptq4vit(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg, calib_batches,
            progress: bool | None = None) -> tuple[dict, dict]:
    """PTQ4ViT in place on ``layers`` (and the attention matmuls); returns (record, {layer: weight scale}).
    ``progress``: the search's per-op report (see :class:`craft_runner.compress.search.SearchProgress`)."""
    return run_ptq(model, layers, cfg, calib_batches, "ptq4vit", progress)
