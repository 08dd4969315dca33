"""Fused kernels of megatron_sphinx: the pack op that builds a packed micro-batch's LLM input.

``pack_tokens(text, visual, special, index)`` writes ``[text; visual; special][index]`` (zeros for
index -1) in one pass, with autograd. Implementations: CUDA C++ extension, Triton, torch reference
(:mod:`kernels.select` chooses; ``MEGATRON_SPHINX_PACK_IMPL`` forces).
"""
from kernels.reference import DEBUG_ENV, PackPlan, PackTokensFunction, build_plan
from kernels.select import IMPL_ENV, IMPLS, impl_status, pack_tokens, resolve_impl

__all__ = ["DEBUG_ENV", "IMPL_ENV", "IMPLS", "PackPlan", "PackTokensFunction", "build_plan",
           "impl_status", "pack_tokens", "resolve_impl"]
