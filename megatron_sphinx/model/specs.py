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


#: cuBLASLt's FP8 GEMMs need every leading dimension divisible by this; TE asserts it at the
#: first backward ("ret.lda % 16 == 0 ... Caller must pad", H100 run 5 at --seq-length 1400).
FP8_ALIGN = 16


def check_fp8_shapes(llm: LLMConfig, seq_length: int, micro_batch_size: int, tp: int,
                     sequence_parallel: bool) -> None:
    """Raises ValueError (saying what to change) unless every FP8 GEMM of the layers is aligned.

    The weight-gradient GEMMs run over the micro-batch's tokens (its rows, packed or not, are
    one sequence of ``micro_batch_size * seq_length`` tokens, split over the TP ranks with
    sequence parallelism); the others over the hidden, attention and MLP widths per TP rank.
    """
    split = tp if sequence_parallel else 1
    tokens = micro_batch_size * seq_length // split
    if tokens % FP8_ALIGN:
        seq = seq_length + 1
        while (micro_batch_size * seq // split) % FP8_ALIGN or seq % split:
            seq += 1
        raise ValueError(f"--fp8 needs the tokens of a micro-batch per rank divisible by "
                         f"{FP8_ALIGN} (FP8 GEMMs), got {micro_batch_size} x {seq_length}"
                         f"{f' / {split}' if split > 1 else ''} = {tokens}: use --seq-length {seq}")
    head = llm.hidden_size // llm.num_attention_heads
    widths = {"hidden size": llm.hidden_size, "MLP width": llm.ffn_hidden_size // tp,
              "attention width": llm.num_attention_heads * head // tp,
              "key/value width": llm.num_query_groups * head // tp}
    for name, width in widths.items():
        if width % FP8_ALIGN:
            raise ValueError(f"--fp8 needs GEMM widths divisible by {FP8_ALIGN}, and {llm.name}'s "
                             f"{name} per tensor-parallel rank is {width} at --tp {tp}: drop --fp8 "
                             "or change --tp")


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
