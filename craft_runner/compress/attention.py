"""timm ViT attention as explicit matmuls, so that q·kᵀ and attn·v can be quantized.

timm's ``Attention`` calls the fused ``scaled_dot_product_attention`` by default, which hides both
matmuls. :func:`make_attention_explicit` rebinds the forward of every such module (on the model it
is given, i.e. the compression copy) to the same computation written out, with the two matmuls as
:class:`QuantMatMul` sub-modules ``matmul_qk`` and ``matmul_av`` whose operand quantizers start as
identities.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)


class QuantMatMul(nn.Module):
    """a @ b with a quantizer on each operand (``quant_a``, ``quant_b``; identity until set)."""

    def __init__(self):
        super().__init__()
        self.quant_a: nn.Module = nn.Identity()
        self.quant_b: nn.Module = nn.Identity()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quant_a(a) @ self.quant_b(b)


def _explicit_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    # The scale multiplies q·kᵀ after the matmul, as in the PTQ4ViT code: its operand is q itself.
    attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
    if attn_mask is not None or is_causal:
        from timm.layers import maybe_add_mask, resolve_self_attn_mask

        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
    attn = self.attn_drop(attn.softmax(dim=-1))
    x = self.matmul_av(attn, v)
    x = x.transpose(1, 2).reshape(B, N, attn_dim)
    x = self.norm(x) if hasattr(self, "norm") else x
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _is_vit_attention(m: nn.Module) -> bool:
    """timm's ``vision_transformer.Attention`` (or a subclass keeping its forward): the computation
    :func:`_explicit_forward` reproduces. Other attentions (EVA with RoPE, attention pooling, ...)
    have other forwards and are left alone."""
    from timm.models.vision_transformer import Attention

    return isinstance(m, Attention) and type(m).forward is Attention.forward


def make_attention_explicit(model: nn.Module) -> list[tuple[str, QuantMatMul]]:
    """Rebind every timm ViT ``Attention`` of ``model`` to explicit matmuls; returns the matmuls in
    module order (q·kᵀ then attn·v per attention). Idempotent."""
    out, other = [], []
    for name, m in model.named_modules():
        if not hasattr(m, "matmul_qk") and not _is_vit_attention(m):
            if hasattr(m, "fused_attn"):
                other.append(name)
            continue
        if not hasattr(m, "matmul_qk"):
            m.fused_attn = False
            m.matmul_qk, m.matmul_av = QuantMatMul(), QuantMatMul()
            m.forward = types.MethodType(_explicit_forward, m)
        out += [(f"{name}.matmul_qk", m.matmul_qk), (f"{name}.matmul_av", m.matmul_av)]
    if out:
        log.info("attention as explicit matmuls in %d modules", len(out) // 2)
    if other:
        log.warning("attention modules of other kinds keep float matmuls: %s", ", ".join(other))
    return out
