"""Environment settings of the fused kernels (the pack op, RoPE, SwiGLU, the loss), read once per
process.

``pack_tokens`` runs on the model's hot path at every micro-batch, where each ``os.environ`` read
costs ~0.7 us of host time. The variables below are therefore read at first use and kept in a
:class:`Settings` snapshot. A process that changes them after its first ``pack_tokens`` call must
call :func:`refresh` (the tests do, and so does ``tools/bench_pack_kernel.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

#: Env flag: fill outputs and gradients with NaN before the kernels write them, and validate the
#: index even on GPU (a host sync). Tests set it so that an unwritten position fails.
DEBUG_ENV = "MEGATRON_SPHINX_PACK_DEBUG"
#: Environment variable that forces an implementation (``torch``, ``triton``, ``cuda``, ``auto``).
IMPL_ENV = "MEGATRON_SPHINX_PACK_IMPL"
#: Env override of the GPU Triton row-copy tile, ``"ELEMENTS,WARPS"`` (see ``kernels.triton_pack``).
TILE_ENV = "MEGATRON_SPHINX_TRITON_TILE"
#: Where the CUDA implementation's autograd node lives: ``cpp`` (default: the extension's own
#: C++ autograd function, no Python per call) or ``python`` (the shared ``PackTokensFunction``).
CUDA_AUTOGRAD_ENV = "MEGATRON_SPHINX_PACK_CUDA_AUTOGRAD"
#: RoPE of packed tokens: ``auto`` (default: the fused Triton kernel on GPUs where its start-up
#: check passes, ``kernels.fused_layers``), ``torch`` (the unfused rotation) or ``triton``.
ROPE_ENV = "MEGATRON_SPHINX_ROPE"
#: SwiGLU of the local spec's MLP: ``auto`` (default, as for RoPE), ``torch`` (Megatron's) or
#: ``triton`` (one fused kernel each way, ``kernels.triton_swiglu``).
SWIGLU_ENV = "MEGATRON_SPHINX_SWIGLU"
#: The LLM's cross-entropy loss: ``auto`` (default, as for RoPE), ``torch`` (Megatron's) or
#: ``triton`` (one fused kernel each way, ``kernels.triton_cross_entropy``).
CE_ENV = "MEGATRON_SPHINX_CE"
#: Values of :data:`ROPE_ENV`, :data:`SWIGLU_ENV` and :data:`CE_ENV`.
FUSED_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Settings:
    """One snapshot of the environment variables the pack op reads."""

    impl: str
    """``MEGATRON_SPHINX_PACK_IMPL`` (``auto`` when unset or empty)."""
    debug: bool
    """``MEGATRON_SPHINX_PACK_DEBUG`` is set to a true value."""
    triton_tile: str
    """``MEGATRON_SPHINX_TRITON_TILE`` as written (empty when unset)."""
    triton_interpret: str | None
    """``TRITON_INTERPRET`` as written (part of the implementation choice's cache key)."""
    cuda_autograd: str = "cpp"
    """``MEGATRON_SPHINX_PACK_CUDA_AUTOGRAD``: ``cpp`` or ``python``."""
    rope: str = "auto"
    """``MEGATRON_SPHINX_ROPE``: ``auto``, ``torch`` or ``triton``."""
    swiglu: str = "auto"
    """``MEGATRON_SPHINX_SWIGLU``: ``auto``, ``torch`` or ``triton``."""
    ce: str = "auto"
    """``MEGATRON_SPHINX_CE``: ``auto``, ``torch`` or ``triton``."""


_current: Settings | None = None


def refresh() -> Settings:
    """Re-reads the environment; later ``pack_tokens`` calls and choices use the new values."""
    global _current
    env = os.environ
    _current = Settings(
        impl=env.get(IMPL_ENV, "") or "auto",
        debug=env.get(DEBUG_ENV, "0") not in ("", "0", "false", "False"),
        triton_tile=env.get(TILE_ENV, ""),
        triton_interpret=env.get("TRITON_INTERPRET"),
        cuda_autograd=env.get(CUDA_AUTOGRAD_ENV, "") or "cpp",
        rope=env.get(ROPE_ENV, "") or "auto",
        swiglu=env.get(SWIGLU_ENV, "") or "auto",
        ce=env.get(CE_ENV, "") or "auto")
    if _current.cuda_autograd not in ("cpp", "python"):
        bad, _current = _current.cuda_autograd, None
        raise ValueError(f"{CUDA_AUTOGRAD_ENV}={bad!r}: use cpp or python")
    for name, value in ((ROPE_ENV, _current.rope), (SWIGLU_ENV, _current.swiglu),
                        (CE_ENV, _current.ce)):
        if value not in FUSED_CHOICES:
            _current = None
            raise ValueError(f"{name}={value!r}: choose auto, torch or triton")
    return _current


def settings() -> Settings:
    """The current snapshot (read from the environment at the first call)."""
    return _current if _current is not None else refresh()
