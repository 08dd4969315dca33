"""Layer specs: which implementation backs each part of a transformer layer.

The model never names Transformer Engine or the local modules; this module picks:

* ``te``: Transformer Engine layers (fused norm+linear, THD packed attention, FP8 capable,
  grouped GEMM for MoE experts), used when TE is importable and CUDA is available;
* ``local``: Megatron-Core's own modules with :class:`PackedDotProductAttention` for packed
  sequences, used on CPUs and wherever TE is absent.
"""
from __future__ import annotations

import functools
import logging

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_sphinx.config import LLMConfig
from megatron_sphinx.model.attention import PackedDotProductAttention

log = logging.getLogger(__name__)


@functools.cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a missing libcuda
        log.info("Transformer Engine unavailable (%s): using the local layer spec", exc)
        return False
    return True


def choose_backend(requested: str = "auto") -> str:
    """Resolves ``auto`` to ``te`` or ``local``; validates an explicit request."""
    if requested == "auto":
        return "te" if transformer_engine_available() else "local"
    if requested == "te" and not transformer_engine_available():
        raise ValueError("--backend te needs Transformer Engine and a GPU: use --backend local")
    if requested not in ("te", "local"):
        raise ValueError(f"unknown backend {requested!r}: choose auto, te or local")
    return requested


def check_fp8(requested_backend: str, dtype: torch.dtype) -> None:
    """Raises ValueError (saying what to change) unless FP8 training can run on this machine."""
    if requested_backend == "local":
        raise ValueError("--fp8 needs the Transformer Engine layers: drop --backend local")
    if not transformer_engine_available():
        raise ValueError("--fp8 needs Transformer Engine on a CUDA GPU, and this machine has "
                         "none: drop --fp8")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ValueError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                         f"{torch.cuda.get_device_name()} is {major}.{minor}: drop --fp8")
    if dtype != torch.bfloat16:
        raise ValueError(f"--fp8 keeps the other maths in bf16, not {dtype}: use --dtype bf16")


def layer_spec(llm: LLMConfig, backend: str) -> ModuleSpec:
    """The transformer-layer spec of ``llm`` for ``backend`` (``te`` or ``local``)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if backend == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=llm.num_experts, moe_grouped_gemm=llm.is_moe)
    spec = specs.get_gpt_layer_local_spec(
        num_experts=llm.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    if llm.is_moe:
        # The local spec maps pre_mlp_layernorm to TE's fused fc1 norm name in checkpoints, but
        # TE's MoE layers keep a separate pre_mlp_layernorm: keep MoE checkpoints interchangeable.
        spec.submodules.sharded_state_dict_keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return spec
