"""The language model: a Megatron-Core ``GPTModel`` (LLaMA-family, dense or MoE) from an LLMConfig.

Only maths-level choices live here (RMSNorm, SwiGLU, RoPE, GQA, no biases, untied embeddings);
which kernels back them comes from :mod:`megatron_sphinx.model.specs`, and the process groups are
passed in by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sphinx.config import LLMConfig
from megatron_sphinx.model import fused_loss
from megatron_sphinx.model.specs import layer_spec

#: Megatron pads the vocabulary to a multiple of this (x tp); LLaMA-family vocabularies already are.
VOCAB_DIVISOR = 128


@dataclass
class ParallelSizes:
    """The parallel sizes the LLM is built for (a view of the run's parallel layout)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence within the TP group."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank: 1 is plain 1F1B, more runs
    Megatron's interleaved schedule (a smaller pipeline bubble)."""


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of ``VOCAB_DIVISOR`` (which every tp must divide)."""
    if VOCAB_DIVISOR % tp:
        raise ValueError(f"--tp {tp} must divide {VOCAB_DIVISOR}: choose a power of two")
    return -(-vocab_size // VOCAB_DIVISOR) * VOCAB_DIVISOR


def transformer_config(llm: LLMConfig, par: ParallelSizes, *, dtype: torch.dtype,
                       on_gpu: bool, backend: str = "local",
                       recompute: str | None = None, fp8: bool = False,
                       wgrad_fusion: bool = False) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``llm`` at the given parallel sizes.

    Args:
        llm: The architecture.
        par: Parallel sizes.
        dtype: Parameter and activation dtype (float32 on CPU, bfloat16 on GPUs).
        on_gpu: Enables the CUDA-only fusions.
        backend: ``te`` enables the Transformer Engine-only options (grouped GEMM for experts).
        recompute: None, ``"selective"`` (core attention) or ``"full"`` activation recompute.
        fp8: FP8 GEMMs in the TE layers (hybrid: E4M3 forward, E5M2 gradients; delayed scaling
            over a 1024-step amax history). Needs ``backend="te"`` (see ``specs.check_fp8``).
        wgrad_fusion: Weight-gradient GEMMs accumulate into the fp32 ``main_grad`` (Megatron's
            gradient-accumulation fusion; :mod:`megatron_sphinx.model.wgrad_fusion` provides it
            without Apex, chosen by :func:`~megatron_sphinx.model.wgrad_fusion.choose`).
    """
    kwargs = {}
    if llm.is_moe:
        kwargs.update(
            num_moe_experts=llm.num_experts,
            moe_router_topk=llm.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=llm.moe_aux_loss_coeff,
            moe_grouped_gemm=backend == "te",
            moe_permute_fusion=False,
        )
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    if par.vpp > 1:
        # Megatron's defaults for the interleaved schedule. (Batched p2p is also wrong there at
        # pp 2, where the previous and the next stage are the same rank.)
        kwargs.update(virtual_pipeline_model_parallel_size=par.vpp, overlap_p2p_comm=True,
                      batch_p2p_comm=False)
    if wgrad_fusion:
        from megatron_sphinx.model import wgrad_fusion as fusion

        fusion.install()
    if fp8:
        if backend != "te":
            raise ValueError("FP8 needs the Transformer Engine layers: use --backend te")
        kwargs.update(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024,
                      fp8_amax_compute_algo="max")
        if llm.is_moe:  # each expert's token count, padded by the router to FP8's alignment
            kwargs.update(moe_router_padding_for_quantization=True)
    return TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        expert_model_parallel_size=par.ep,
        sequence_parallel=par.sequence_parallel and par.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        calculate_per_token_loss=True,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,  # packed attention does not use Megatron's fused softmax
        persist_layer_norm=False,  # needs apex
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=backend == "te",  # TE's fused (THD) RoPE; else upstream_fixes
        gradient_accumulation_fusion=wgrad_fusion,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=True,
        **kwargs,
    )


def build_gpt(llm: LLMConfig, config: TransformerConfig, backend: str, *, pre_process: bool,
              post_process: bool, pg_collection=None, vp_stage: int | None = None) -> GPTModel:
    """Builds the LLM (or this pipeline stage's part of it).

    Args:
        llm: The architecture.
        config: From :func:`transformer_config`.
        backend: ``te`` or ``local`` (see :mod:`megatron_sphinx.model.specs`).
        pre_process: This stage holds the embedding.
        post_process: This stage holds the final norm and output layer.
        pg_collection: Megatron ``ProcessGroupCollection``; None takes Megatron's defaults.
        vp_stage: This chunk's virtual pipeline stage (interleaved schedule), else None.
    """
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(llm, backend),
        vocab_size=padded_vocab_size(llm.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=llm.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=llm.rope_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    fused_loss.install(model)  # the kernel behind the loss, chosen when it runs
    return model
