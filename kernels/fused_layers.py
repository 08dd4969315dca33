"""Which path runs the LLM's fused Triton kernels (RoPE, SwiGLU, the loss), chosen once per dtype.

Each op has an environment variable (:mod:`kernels.settings`): ``MEGATRON_SPHINX_ROPE`` for the
rotary embedding of packed tokens (:mod:`kernels.triton_rope`), ``MEGATRON_SPHINX_SWIGLU`` for the
MLP's activation (:mod:`kernels.triton_swiglu`), ``MEGATRON_SPHINX_CE`` for the cross-entropy
loss (:mod:`kernels.triton_cross_entropy`). Their values:

* ``auto`` (default): the Triton kernel for CUDA tensors, if it passes a start-up check (forward
  and backward of a small random input against the torch ops it replaces, on this GPU, in this
  dtype); else the torch ops, with a warning saying why;
* ``torch``: the torch ops everywhere;
* ``triton``: the kernel, and an error at start-up if it fails its check or triton does not
  import (CPU tensors run it only under ``TRITON_INTERPRET=1``, as the tests do).

The choice is kept per ``(op, device type, dtype)`` until the settings are re-read, so the hot
path costs a dict lookup (:func:`use_triton`).
"""
from __future__ import annotations

import importlib
import logging

import torch

from kernels.settings import CE_ENV, ROPE_ENV, SWIGLU_ENV, Settings, settings

log = logging.getLogger(__name__)

#: The ops and their environment variables.
OPS = {"rope": ROPE_ENV, "swiglu": SWIGLU_ENV, "ce": CE_ENV}
_choices: dict[tuple[str, str, torch.dtype], tuple[bool, str]] = {}
_choices_for: Settings | None = None


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 2e-2)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str:
    tol = _tolerance(dtype)
    err = (got.float() - want.float()).abs()
    bad = err > tol + tol * want.float().abs()
    if bad.any():
        return f"{name} differs from torch by up to {float(err.max()):.3g} (tolerance {tol:g})"
    return ""


def _check_rope(device: torch.device, dtype: torch.dtype) -> str:
    """The fused rotation of a strided key-like view against the unfused maths; '' if equal."""
    from kernels import triton_rope

    g = torch.Generator().manual_seed(0)
    tokens, groups, d = 37, 3, 64
    qkv = torch.randn(tokens, groups, 3, d, generator=g).to(device, dtype).requires_grad_(True)
    x = qkv[:, :, 1]  # [t, groups, d], strided like Megatron's key view
    if not triton_rope.supported(x, d, False):
        return f"the kernel does not take {dtype} tensors on {device.type}"
    angle = torch.rand(tokens, 1, d, generator=g).mul(6.3).to(device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    w = torch.randn(tokens, groups, d, generator=g).to(device, dtype)
    got = triton_rope.fused_rope(x, cos, sin)
    (g_got,) = torch.autograd.grad(got, qkv, w)
    xf = x.detach().float().requires_grad_(True)
    want = xf * cos.float() + torch.cat((-xf[..., d // 2:], xf[..., :d // 2]), -1) * sin.float()
    (g_want,) = torch.autograd.grad(want, xf, w.float())
    outside = g_got[:, :, [0, 2]]
    return (_compare("forward", got, want, dtype)
            or _compare("backward", g_got[:, :, 1], g_want, dtype)
            or ("the backward wrote outside the key view" if bool(outside.any()) else ""))


def _check_swiglu(device: torch.device, dtype: torch.dtype) -> str:
    """The fused SwiGLU of row-strided input against torch's maths in fp32; '' if equal."""
    from kernels import triton_swiglu

    g = torch.Generator().manual_seed(0)
    rows, cols = 37, 1200  # two column blocks per half, the second one partial
    base = torch.randn(rows, 2 * cols + 8, generator=g).mul(3).to(device, dtype)
    base.requires_grad_(True)
    y = base[:, :2 * cols]  # rows strided by 2 * cols + 8
    if not triton_swiglu.supported(y):
        return f"the kernel does not take {dtype} tensors on {device.type}"
    w = torch.randn(rows, cols, generator=g).to(device, dtype)
    got = triton_swiglu.FusedSwiGLU.apply(y)
    (g_got,) = torch.autograd.grad(got, base, w)
    yf = y.detach().float().requires_grad_(True)
    want = triton_swiglu.reference_swiglu(yf)
    (g_want,) = torch.autograd.grad(want, yf, w.float())
    return (_compare("forward", got, want, dtype)
            or _compare("backward", g_got[:, :2 * cols], g_want, dtype)
            or ("the backward wrote past the rows" if bool(g_got[:, 2 * cols:].any()) else ""))


def _check_ce(device: torch.device, dtype: torch.dtype) -> str:
    """The fused cross-entropy of row-strided logits (two vocabulary blocks, the second partial;
    one label outside the vocabulary) against torch's maths in fp32; '' if equal."""
    from kernels import triton_cross_entropy

    g = torch.Generator().manual_seed(0)
    rows, words = 37, 3000
    base = torch.randn(rows, words + 8, generator=g).mul(4).to(device, dtype)
    base.requires_grad_(True)
    x = base[:, :words]  # rows strided by words + 8
    if not triton_cross_entropy.supported(x):
        return f"the kernel does not take {dtype} tensors on {device.type}"
    labels = torch.randint(0, words, (rows,), generator=g)
    labels[3] = words
    labels = labels.to(device)
    w = torch.randn(rows, generator=g).to(device)
    got = triton_cross_entropy.FusedCrossEntropy.apply(x, labels)
    (g_got,) = torch.autograd.grad(got, base, w)
    xf = x.detach().float().requires_grad_(True)
    want = triton_cross_entropy.reference_cross_entropy(xf, labels)
    (g_want,) = torch.autograd.grad(want, xf, w)
    return (_compare("forward", got, want, torch.float32)
            or _compare("backward", g_got[:, :words], g_want, dtype)
            or ("the backward wrote past the rows" if bool(g_got[:, words:].any()) else ""))


def _check_dwconv(device: torch.device, dtype: torch.dtype) -> str:
    """ConvNeXt's depthwise convolution + LayerNorm (forward only, frozen encoders) of a
    channels-last map (channels not a power of 2, a row cut into two pixel tiles, the second
    partial) against the torch ops in fp32; '' if equal."""
    from kernels import triton_dwconv_norm as dw

    g = torch.Generator().manual_seed(0)
    b, h, w, c = 1, 4, 40, 300
    x = torch.randn(b, h, w, c, generator=g).to(device, dtype)
    if not dw.supported(x, 7):
        return f"the kernel does not take {dtype} tensors on {device.type}"
    weight, bias = torch.randn(c, 1, 7, 7, generator=g) / 7, torch.randn(c, generator=g)
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    got = dw.dwconv_norm(x, *(t.to(device, dtype) for t in (weight, bias, gamma, beta)), 1e-6)
    want = dw.reference_dwconv_norm(x.float(), *(t.to(device).to(dtype).float()
                                                 for t in (weight, bias, gamma, beta)), 1e-6)
    return _compare("forward", got, want, dtype)


_CHECKS = {"rope": _check_rope, "swiglu": _check_swiglu, "ce": _check_ce,
           "dwconv": _check_dwconv}


def self_check(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """Runs ``op``'s kernel forward and backward (``dwconv``: forward only) on a small random
    input on ``device`` against the torch maths; returns '' when they agree, else what went
    wrong."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _CHECKS[op](device, dtype)
    except Exception as exc:  # a compile or launch failure: the reason, not a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def choose(op: str, device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``op`` runs its Triton kernel for ``dtype`` tensors on ``device``, and why.

    Raises:
        ValueError: A bad environment value, or ``triton`` asked for where triton does not
            import.
        RuntimeError: ``triton`` asked for and the kernel fails its check on this device.
    """
    device = torch.device(device)
    env = OPS[op]
    value = getattr(settings(), op)
    if value == "torch":
        return False, f"{env}=torch"
    forced = value == "triton"
    try:
        importlib.import_module("triton")  # the kernels need it
    except Exception as exc:
        if forced:
            raise ValueError(f"{env}=triton, but triton does not import here ({exc}): "
                             f"unset it") from exc
        return False, "triton does not import"
    if device.type != "cuda" and settings().triton_interpret != "1":
        return False, f"{device.type} tensors (the kernel needs a GPU)"
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    why = self_check(op, device, dtype)
    if why:
        if forced:
            raise RuntimeError(f"{env}=triton, but the {op} kernel failed its start-up check on "
                               f"{device} ({dtype}): {why}; unset {env}")
        log.warning("the fused %s kernel failed its start-up check on %s (%s): %s; using the "
                    "torch ops (%s=torch hides this warning)", op, device, dtype, why, env)
        return False, f"the kernel failed its start-up check: {why}"
    return True, "passed its start-up check" if not forced else f"{env}=triton, check passed"


def _kept(op: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    global _choices_for
    current = settings()
    if current is not _choices_for:
        _choices.clear()
        _choices_for = current
    key = (op, device.type, dtype)
    hit = _choices.get(key)
    if hit is None:
        hit = _choices[key] = choose(op, device, dtype)
    return hit


def use_triton(op: str, x: torch.Tensor) -> bool:
    """Hot path: whether ``op`` runs its Triton kernel for tensors like ``x`` (the choice of
    :func:`choose`, made at the first call per device type and dtype, then kept)."""
    return _kept(op, x.device, x.dtype)[0]


def choice(op: str, device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """:func:`choose` through the same cache as :func:`use_triton` (for the start-up log)."""
    return _kept(op, torch.device(device), dtype)
