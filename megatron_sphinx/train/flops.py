"""FLOPs of a training step, counted from what the step actually computes.

* LLM matmuls: ``6 x (active linear parameters) x tokens`` (forward 2, backward 4); for MoE the
  active parameters are the router plus ``top-k`` experts per token.
* Attention scores and values: from the packed sample lengths, causal, i.e.
  ``4 x h x sum(l_i (l_i + 1) / 2)`` per layer forward, times 3 for forward + backward (not the
  padded ``s^2``).
* Projector: ``4 x C x h`` per visual token (forward 2, weight gradient 2: its input comes from
  the frozen encoders, so no input gradient is computed).
* Frozen encoders: forward only (they get no gradient), measured once per encoder config with
  ``torch.utils.flop_counter`` on the meta device.
"""
from __future__ import annotations

import functools

import torch

from megatron_sphinx.config import EncoderConfig, LLMConfig, SphinxConfig

#: Dense bf16 peak TFLOP/s by device-name fragment (used for MFU when no --peak-tflops is given).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def llm_linear_params(llm: LLMConfig, active: bool = True) -> int:
    """Linear-layer parameters of the LLM (per token if ``active``: top-k experts only)."""
    h, f = llm.hidden_size, llm.ffn_hidden_size
    kv = llm.num_query_groups * (h // llm.num_attention_heads)
    attn = h * (h + 2 * kv) + h * h
    mlp = 3 * h * f
    if llm.is_moe:
        experts = llm.moe_router_topk if active else llm.num_experts
        mlp = experts * mlp + h * llm.num_experts
    return llm.num_layers * (attn + mlp) + h * llm.vocab_size


@functools.cache
def _encoder_flops_cached(timm_name: str, kwargs: tuple, input_size: int) -> int:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(kwargs))
        x = torch.empty(1, 3, input_size, input_size)
        with FlopCounterMode(display=False) as counter:
            model.forward_features(x)
    return int(counter.get_total_flops())


def encoder_flops_per_view(enc: EncoderConfig) -> int:
    """Forward FLOPs of one encoder on one view."""
    kwargs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                          for k, v in enc.timm_kwargs.items()))
    return _encoder_flops_cached(enc.timm_name, kwargs, enc.input_size)


def causal_pairs(sample_lengths) -> float:
    """Attended (query, key) pairs of causal attention over packed samples: sum l (l + 1) / 2."""
    return float(sum(l * (l + 1) / 2 for l in sample_lengths))


def step_flops(cfg: SphinxConfig, num_tokens: int, attention_pairs: float,
               num_views: int) -> dict[str, float]:
    """FLOPs of one training step, by part.

    Args:
        cfg: The recipe.
        num_tokens: Real (non-padding) LLM positions processed.
        attention_pairs: :func:`causal_pairs` of the packed sample lengths.
        num_views: Views the encoders ran on.

    Returns:
        ``{"llm": ..., "attention": ..., "projector": ..., "encoders": ..., "total": ...}``.
    """
    llm = cfg.llm
    out = {
        "llm": 6.0 * llm_linear_params(llm) * num_tokens,
        "attention": 3.0 * 4.0 * llm.hidden_size * llm.num_layers
        * attention_pairs,
        "projector": 4.0 * cfg.vision.channels * llm.hidden_size * num_views
        * cfg.vision.tokens_per_view,
        "encoders": float(num_views * sum(encoder_flops_per_view(e)
                                          for e in cfg.vision.encoders)),
    }
    out["total"] = sum(out.values())
    return out


def device_peak_tflops(override: float | None = None) -> float | None:
    """Dense bf16 peak of this device (None on CPUs unless ``override`` is given)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
