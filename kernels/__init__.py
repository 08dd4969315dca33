"""Fused kernels of megatron_sphinx: the pack op that builds a packed micro-batch's LLM input.

``pack_tokens(text, visual, special, index)`` writes ``[text; visual; special][index]`` (zeros for
index -1) in one pass, with autograd. Implementations: CUDA C++ extension, Triton, torch reference
(:mod:`kernels.select` chooses; ``MEGATRON_SPHINX_PACK_IMPL`` forces). The environment is read
once per process: call :func:`refresh_settings` after changing it in-process.

:mod:`kernels.triton_rope`, :mod:`kernels.triton_swiglu` and :mod:`kernels.triton_cross_entropy`
hold the fused rotary embedding of packed tokens, the fused SwiGLU of the LLM's MLP and its fused
cross-entropy loss; :mod:`kernels.fused_layers` chooses them (on GPUs where their start-up check
passes; ``MEGATRON_SPHINX_ROPE`` / ``MEGATRON_SPHINX_SWIGLU`` / ``MEGATRON_SPHINX_CE``).
:mod:`kernels.triton_dwconv_norm` holds ConvNeXt's depthwise convolution + LayerNorm in one
kernel (the frozen encoders; ``--vision-dwconv triton``, checked by the same start-up check).
"""
from kernels.reference import PackPlan, PackTokensFunction, build_plan
from kernels.select import IMPLS, impl_status, pack_tokens, resolve_impl
from kernels.settings import DEBUG_ENV, IMPL_ENV
from kernels.settings import refresh as refresh_settings

__all__ = ["DEBUG_ENV", "IMPL_ENV", "IMPLS", "PackPlan", "PackTokensFunction", "build_plan",
           "impl_status", "pack_tokens", "refresh_settings", "resolve_impl"]
