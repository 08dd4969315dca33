"""Packed (THD) core attention for Megatron-Core's local layer spec.

Megatron's local ``DotProductAttention`` refuses packed sequences. :class:`PackedDotProductAttention`
accepts Megatron's ``PackedSeqParams`` (``qkv_format="thd"``) and runs causal attention inside each
segment of ``cu_seqlens`` only, so no token attends across a sample boundary. Megatron's attention
module has already applied RoPE per segment (positions restart at 0 for each sample) before this
runs. On GPUs the Transformer Engine spec does the same with fused THD kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` plus the packed ``thd`` path (segment-wise causal attention)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """Attention over ``[t, n, d]`` packed tokens, or the parent's ``[s, b, n, d]`` path."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, None)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedDotProductAttention supports qkv_format='thd' only")
        # query [t, np, d], key/value [t, ng, d] (batch dim squeezed by the attention module)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scale = self.softmax_scale if self.softmax_scale is not None else (
            1.0 / math.sqrt(query.shape[-1]))
        dropout = self.config.attention_dropout if self.training else 0.0
        cu = packed_seq_params.cu_seqlens_q.tolist()
        out = torch.empty_like(query)  # [t, np, d]
        for start, end in zip(cu[:-1], cu[1:]):
            if end == start:
                continue
            q = query[start:end].transpose(0, 1)  # [np, l, d]
            k = key[start:end].transpose(0, 1)
            v = value[start:end].transpose(0, 1)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                               scale=scale)
            out[start:end] = o.transpose(0, 1)
        return out.reshape(out.shape[0], -1)  # [t, np * d]
