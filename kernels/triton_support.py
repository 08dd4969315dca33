"""Triton for the fused kernels' modules, where it imports (it is optional: without it their
fused paths are unavailable and the torch ops run)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = tl = None
    IMPORT_ERROR = f"triton does not import: {exc}"

__all__ = ["IMPORT_ERROR", "runs_here", "tl", "triton"]


def runs_here(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: triton imports and ``t`` is on a GPU, or any
    tensor under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    return triton is not None and (t.is_cuda or bool(triton.knobs.runtime.interpret))
