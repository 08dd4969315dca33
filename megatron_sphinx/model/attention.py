"""Packed (THD) core attention for Megatron-Core's local layer spec.

Megatron's local ``DotProductAttention`` refuses packed sequences. :class:`PackedDotProductAttention`
accepts Megatron's ``PackedSeqParams`` (``qkv_format="thd"``) and runs causal attention inside each
segment of ``cu_seqlens`` only, so no token attends across a sample boundary. Megatron's attention
module has already applied RoPE per segment (positions restart at 0 for each sample) before this
runs. On GPUs the Transformer Engine spec does the same with fused THD kernels.

Two kernels back :func:`packed_causal_attention` (the choice is logged once per device type):

* ``varlen``: one FlashAttention call over all segments (``torch.nn.attention.varlen``, torch >=
  2.10), grouped-query attention without copying keys and values: with ``enable_gqa`` where
  ``varlen_attn`` takes it, else by passing the fewer key/value heads straight through where a
  probe at first use shows that FlashAttention's kernels compute grouped-query attention that
  way (forward and backward equal to keys and values repeated), else repeated. CUDA tensors in
  bf16/fp16, no attention dropout.
* ``sdpa``: one ``scaled_dot_product_attention`` per segment on 4-D ``[1, heads, len, dim]``
  views (CUDA's fused kernels refuse 3-D inputs and would fall back to the unfused maths, which
  materialises every ``len x len`` score matrix). Everywhere else, the CPU included.

``MEGATRON_SPHINX_ATTENTION`` forces one (``varlen``, ``sdpa``; ``auto`` or unset = ``varlen``
where it can run); a forced kernel that cannot run raises with the reason.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import os

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

log = logging.getLogger(__name__)

#: Environment variable that forces the packed-attention kernel.
ATTENTION_ENV = "MEGATRON_SPHINX_ATTENTION"
KERNELS = ("varlen", "sdpa")
_logged: set[tuple[str, str]] = set()
#: (device type, dtype) -> whether ``varlen_attn`` without ``enable_gqa`` takes fewer key/value
#: heads than query heads (:func:`_gqa_passes_through`).
_gqa_through: dict[tuple[str, torch.dtype], bool] = {}


@functools.cache
def _varlen_api() -> tuple[object | None, dict, bool, bool, str]:
    """``(varlen_attn, causal_kwargs, takes_enable_gqa, takes_scale, why_not)`` for this torch.

    torch 2.10 spells causality ``is_causal=True``; later versions ``window_size=(-1, 0)``.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}, False, False, (f"torch {torch.__version__} has no "
                                        "torch.nn.attention.varlen (needs >= 2.10)")
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None, {}, False, False, "varlen_attn takes neither window_size nor is_causal"
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params, ""


def varlen_status(query: torch.Tensor, dropout: float, scale: float) -> tuple[bool, str]:
    """Whether the one-call FlashAttention kernel can run on ``query`` (and why not)."""
    fn, _, _, takes_scale, why = _varlen_api()
    if fn is None:
        return False, why
    if query.device.type != "cuda":
        return False, f"tensors are on {query.device.type}; FlashAttention needs CUDA"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return False, f"{query.dtype} activations; FlashAttention needs bf16 or fp16"
    if query.shape[-1] % 8 or query.shape[-1] > 256:
        return False, f"head dim {query.shape[-1]}; FlashAttention takes multiples of 8 up to 256"
    if dropout > 0:
        return False, f"attention dropout {dropout}; varlen_attn has none"
    if not takes_scale and not math.isclose(scale, 1.0 / math.sqrt(query.shape[-1])):
        return False, "a custom softmax scale, which this torch's varlen_attn does not take"
    return True, "FlashAttention varlen, one call per layer"


def choose_kernel(query: torch.Tensor, dropout: float, scale: float) -> str:
    """The kernel :func:`packed_causal_attention` runs for ``query`` (see module docstring).

    Raises:
        ValueError: On an unknown :data:`ATTENTION_ENV` value.
        RuntimeError: If ``varlen`` is forced but cannot run here (with the reason).
    """
    name = os.environ.get(ATTENTION_ENV, "auto") or "auto"
    if name not in KERNELS + ("auto",):
        raise ValueError(f"{ATTENTION_ENV}={name!r}: use one of {', '.join(KERNELS)} or auto")
    ok, why = varlen_status(query, dropout, scale) if name != "sdpa" else (False, "forced")
    if name == "varlen" and not ok:
        raise RuntimeError(f"{ATTENTION_ENV}=varlen was forced but cannot run: {why}")
    chosen = "varlen" if ok else "sdpa"
    key = (chosen, query.device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("packed attention on %s: %s (%s)", query.device.type, chosen,
                 why if ok else f"per-segment SDPA: {why}")
    return chosen


def _repeat_kv(query, key, value):
    """Keys and values repeated to the query's heads (grouped-query attention spelled out)."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _segments_sdpa(query, key, value, cu_seqlens, scale, dropout):
    """Per-segment causal SDPA on 4-D views; GQA by repeating keys and values."""
    key, value = _repeat_kv(query, key, value)
    out = torch.empty_like(query)  # [t, np, d]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                           scale=scale)  # [1, np, l, d]
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _probe_gqa(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Runs ``varlen_attn`` on a small grouped-query input (two segments, 4 query heads on 2
    key/value heads) as it is and with keys and values repeated, forward and backward; returns
    whether the two agree, and why not."""
    fn, causal, _, _, _ = _varlen_api()
    g = torch.Generator().manual_seed(0)
    t, d, cu = 24, 64, torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
    q = torch.randn(t, 4, d, generator=g).to(device, dtype)
    k, v = (torch.randn(t, 2, d, generator=g).to(device, dtype) for _ in range(2))
    w = torch.randn(t, 4, d, generator=g).to(device)
    results = []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for repeat in (False, True):
                leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
                kk, vv = _repeat_kv(*leaves) if repeat else leaves[1:]
                out = fn(leaves[0], kk, vv, cu, cu, 14, 14, **causal)
                results.append((out, *torch.autograd.grad((out.float() * w).sum(), leaves)))
    except Exception as exc:  # e.g. a torch that checks the head counts
        return False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(("output", "dq", "dk", "dv"), *results):
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            return False, f"its {name} differs from keys and values repeated"
    return True, "equal to keys and values repeated"


def _gqa_passes_through(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's ``varlen_attn`` (one without ``enable_gqa``) computes grouped-query
    attention from fewer key/value heads than query heads, as FlashAttention's kernels do:
    probed once per device type and dtype (:func:`_probe_gqa`), the answer logged."""
    key = (device.type, dtype)
    if key not in _gqa_through:
        ok, why = _probe_gqa(device, dtype)
        _gqa_through[key] = ok
        log.info("packed attention on %s (%s): grouped-query heads %s (%s)", device.type, dtype,
                 "passed to varlen_attn as they are" if ok else "repeated", why)
    return _gqa_through[key]


def _varlen(query, key, value, cu_seqlens, max_seqlen, scale):
    fn, causal, takes_gqa, takes_scale, _ = _varlen_api()
    kwargs = dict(causal)
    if takes_scale:
        kwargs["scale"] = scale
    if query.shape[1] != key.shape[1]:
        if takes_gqa:
            kwargs["enable_gqa"] = True
        elif not _gqa_passes_through(query.device, query.dtype):
            key, value = _repeat_kv(query, key, value)
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    return fn(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, *, scale: float,
                            dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each segment of packed tokens.

    Args:
        query: ``[t, heads, d]``.
        key: ``[t, groups, d]`` (``heads`` a multiple of ``groups``: grouped-query attention).
        value: ``[t, groups, d]``.
        cu_seqlens: int ``[n + 1]`` segment boundaries (``cu_seqlens[-1] == t``).
        max_seqlen: Longest segment.
        scale: Softmax scale.
        dropout: Attention dropout probability (training only).

    Returns:
        ``[t, heads, d]``.
    """
    if choose_kernel(query, dropout, scale) == "varlen":
        return _varlen(query, key, value, cu_seqlens, max_seqlen, scale)
    return _segments_sdpa(query, key, value, cu_seqlens, scale, dropout)


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
        scale = self.softmax_scale if self.softmax_scale is not None else (
            1.0 / math.sqrt(query.shape[-1]))
        dropout = self.config.attention_dropout if self.training else 0.0
        cu = packed_seq_params.cu_seqlens_q
        max_seqlen = packed_seq_params.max_seqlen_q
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())  # a host sync; the model passes it
        out = packed_causal_attention(query, key, value, cu, int(max_seqlen), scale=scale,
                                      dropout=dropout)
        return out.reshape(out.shape[0], -1)  # [t, np * d]
