"""Fixes for megatron-core 0.19.2 bugs that are not CPU-specific (applied on every device).

They show where Megatron's distributed optimizer runs on plain ``torch.optim.AdamW`` (no Apex, no
Transformer Engine): always on CPUs, and on GPU installs without TE. CPU-only patches live in
:mod:`megatron_sphinx.cpu_compat`.
"""
from __future__ import annotations

import collections
import functools

_applied = False


def _fix_fully_reshardable_load_with_torch_adam() -> None:
    """Loading a ``fully_reshardable`` distributed-optimizer checkpoint into torch AdamW.

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every tensor of the
    parameter's optimizer state from the loaded tensors, but torch AdamW keeps ``step`` as a
    tensor in that state while the checkpoint stores it separately: ``KeyError: 'step'``. The
    function already skips non-tensor sources, so missing keys are presented as None.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def patched(self, model_param, tensors):
        return original(self, model_param, collections.defaultdict(lambda: None, tensors))

    DistributedOptimizer._set_main_param_and_optimizer_states = patched


def apply() -> None:
    """Installs the fixes once."""
    global _applied
    if not _applied:
        _fix_fully_reshardable_load_with_torch_adam()
        _applied = True
