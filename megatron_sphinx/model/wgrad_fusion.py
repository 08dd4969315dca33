"""Gradient-accumulation fusion without Apex: weight-gradient GEMMs accumulate into ``main_grad``.

Megatron's DDP keeps an fp32 ``main_grad`` per parameter. Without fusion every linear layer's
backward computes its weight gradient in the activation dtype (a GEMM), and a hook then adds it
to ``main_grad`` (one more kernel, and a pass over the fp32 gradient, per weight and
micro-batch: ~1,100 launches and ~36 ms of an H100's time per sphinx-tiny step, H100 run 2).
With ``TransformerConfig.gradient_accumulation_fusion`` Megatron's linear layers call
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)`` instead,
which computes ``main_grad += grad_output^T @ input`` in the GEMM itself. That module is an Apex
extension (never installed here: the PyPI package named ``apex`` is another project), so this
module provides the two functions from torch:

* same dtypes (fp32 training): ``main_grad.addmm_(grad_output^T, input)``;
* bf16 / fp16 activations into an fp32 ``main_grad``: ``torch.addmm(..., out_dtype=float32)``
  written into ``main_grad`` (cuBLAS with beta = 1, fp32 accumulation and output; CUDA only).

Where it runs is decided once at start-up by :func:`choose`, after a check of the function
against a float64 reference on this device (``MEGATRON_SPHINX_WGRAD_FUSION``: ``auto``
(default) uses it on GPUs where the check passes, ``torch`` never, ``addmm`` wherever the check
passes, CPUs in fp32 included, and fails the start-up where it does not). As with Apex, the
linear layers' backward then returns a placeholder weight gradient (the real one is in
``main_grad``): right for Megatron's schedules, wrong for ``torch.autograd.grad`` on the
parameters. Transformer Engine's layers fuse natively with the same config flag.
"""
from __future__ import annotations

import logging
import os
import types

import torch

log = logging.getLogger(__name__)

#: ``auto`` (default), ``torch`` (no fusion) or ``addmm`` (fusion, or an error at start-up).
WGRAD_ENV = "MEGATRON_SPHINX_WGRAD_FUSION"
_CHOICES = ("auto", "torch", "addmm")
_chosen: dict[tuple, tuple[bool, str]] = {}


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (``[n, in]``, ``[n, out]``, fp32
    ``[out, in]``), in one GEMM."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype,
                    out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """The same with a ``main_grad`` in the activations' 16-bit dtype."""
    main_grad.addmm_(grad_output.t(), total_input)


#: Stands in for Apex's ``fused_weight_gradient_mlp_cuda`` extension module.
TORCH_WGRAD = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
                                    wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16)


def self_check(device: torch.device, dtype: torch.dtype) -> str:
    """Accumulates two weight gradients of ``dtype`` activations into an fp32 ``main_grad`` on
    ``device`` and compares with float64 maths; '' when they agree, else what went wrong."""
    g = torch.Generator().manual_seed(0)
    rows, n_in, n_out = 67, 48, 40
    try:
        main = torch.randn(n_out, n_in, generator=g).to(device)
        want = main.double()
        for _ in range(2):
            x = torch.randn(rows, n_in, generator=g).to(device, dtype)
            dy = torch.randn(rows, n_out, generator=g).to(device, dtype)
            wgrad_gemm_accum_fp32(x, dy, main)
            want = want + dy.double().t() @ x.double()
        err = float((main.double() - want).abs().max())
    except Exception as exc:  # an unsupported op here: the reason, not a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    tol = 1e-3 * float(want.abs().max())
    return "" if err <= tol else f"differs from float64 by {err:.3g} (tolerance {tol:.3g})"


def _apex_extension() -> bool:
    """Whether Apex's ``fused_weight_gradient_mlp_cuda`` imports (Megatron's layers then use it,
    and :func:`install` leaves it in place)."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def choose(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the layers fuse their weight-gradient accumulation on ``device`` for ``dtype``
    activations, and why (see the module docstring).

    Raises:
        ValueError: A bad ``MEGATRON_SPHINX_WGRAD_FUSION``.
        RuntimeError: ``addmm`` asked for and the check fails on this device.
    """
    value = os.environ.get(WGRAD_ENV, "") or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{WGRAD_ENV}={value!r}: choose auto, torch or addmm")
    if value == "torch":
        return False, f"{WGRAD_ENV}=torch"
    if device.type != "cuda" and dtype != torch.float32:
        return False, f"{dtype} on {device.type} (mixed-dtype GEMMs are CUDA-only)"
    if device.type != "cuda" and value == "auto":
        # Megatron's fused backward returns a placeholder weight gradient: fine for its own
        # schedules, wrong for torch.autograd.grad on the parameters (tests take references so).
        return False, f"{device.type} tensors ({WGRAD_ENV}=addmm forces it)"
    key = (device.type, dtype, value)
    if key not in _chosen:  # checked once per process (a rank drives one GPU)
        _chosen[key] = _choose(device, dtype, value)
    return _chosen[key]


def _choose(device: torch.device, dtype: torch.dtype, value: str) -> tuple[bool, str]:
    if _apex_extension():  # Apex's own fused GEMM, as Megatron uses it wherever Apex is
        return True, "Apex's fused_weight_gradient_mlp_cuda"
    why = self_check(device, dtype)
    if why:
        if value == "addmm":
            raise RuntimeError(f"{WGRAD_ENV}=addmm, but the fused accumulation failed its "
                               f"start-up check on {device} ({dtype}): {why}; unset {WGRAD_ENV}")
        log.warning("weight gradients are not fused into main_grad on %s (%s): %s (%s=torch "
                    "hides this warning)", device, dtype, why, WGRAD_ENV)
        return False, f"failed its start-up check: {why}"
    return True, "addmm into main_grad, start-up check passed"


def install() -> None:
    """Gives Megatron's linear layers the functions above as ``fused_weight_gradient_mlp_cuda``
    unless Apex's extension is there."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = TORCH_WGRAD
        layers._grad_accum_fusion_available = True
