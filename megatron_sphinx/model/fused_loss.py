"""The LLM's per-token cross-entropy on the fused Triton kernel, where it is chosen.

Megatron's ``GPTModel.compute_language_model_loss`` without Transformer Engine runs
``vocab_parallel_cross_entropy``: an fp32 copy of the logits and about eight passes over them
(:mod:`kernels.triton_cross_entropy` counts them). :func:`install` binds a loss to a model
instance that runs one kernel each way instead (with the vocabulary split over tensor-parallel
ranks, two all-reduces of one value per token), where :mod:`kernels.fused_layers` chooses it for
the logits' device and dtype (``MEGATRON_SPHINX_CE``: on GPUs where its start-up check passes);
otherwise Megatron's. The losses are the same up to fp32 rounding.
"""
from __future__ import annotations

import types

import torch
from megatron.core.models.gpt import GPTModel


def _language_model_loss(self: GPTModel, labels: torch.Tensor, logits: torch.Tensor
                         ) -> torch.Tensor:
    """``GPTModel.compute_language_model_loss``: ``labels`` ``[b, s]``, ``logits``
    ``[s, b, V]`` -> fp32 per-token losses ``[b, s]``."""
    from kernels import fused_layers, triton_cross_entropy

    flat = logits.view(-1, logits.shape[-1]) if logits.is_contiguous() else None
    if (flat is None or not triton_cross_entropy.supported(flat)
            or not fused_layers.use_triton("ce", flat)):
        return GPTModel.compute_language_model_loss(self, labels, logits)
    group = self.tp_group if self.config.tensor_model_parallel_size > 1 else None
    loss = triton_cross_entropy.cross_entropy(flat, labels.t().reshape(-1), group)
    return loss.view(logits.shape[0], logits.shape[1]).t().contiguous()  # [s, b] -> [b, s]


def install(model: GPTModel) -> bool:
    """Makes ``model`` compute its loss as above (on the last pipeline stage, which holds the
    output layer); returns whether it was installed."""
    if not model.post_process:
        return False
    model.compute_language_model_loss = types.MethodType(_language_model_loss, model)
    return True
