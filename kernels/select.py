"""The pack op's entry point and the choice of implementation.

Order of preference: ``cuda`` (the torch extension, when CUDA tensors and the extension builds),
then ``triton`` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``), then ``torch`` (the
reference). Force one with ``impl=`` or the environment variable ``MEGATRON_SPHINX_PACK_IMPL``
(``torch``, ``triton``, ``cuda``; ``auto`` or unset = the order above). A forced implementation that
cannot run raises with the reason. The choice is logged once per (implementation, device type).

The environment is read once (:mod:`kernels.settings`; call :func:`kernels.settings.refresh` after
changing it in-process) and the implementation chosen for an ``(impl, device type, dtype)`` is kept,
so that a call on the hot path costs a few dict lookups besides the kernels and the autograd node.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from kernels.reference import PackTokensFunction, ReferenceBackend, check_index, pack_forward
from kernels.settings import IMPL_ENV, Settings, settings

logger = logging.getLogger(__name__)

IMPLS = ("cuda", "triton", "torch")
#: Dtypes of the CUDA and Triton kernels (float64 runs on the reference only).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_logged: set[tuple[str, str]] = set()
_resolved: dict[tuple, str] = {}
_backends: dict[str, object] = {"torch": ReferenceBackend()}
#: ``(impl, device type, dtype) -> backend`` of :func:`pack_tokens`, valid for ``_fast_for``.
_fast: dict[tuple, object] = {}
_fast_for: Settings | None = None


def _dtype_reason(dtype: torch.dtype | None) -> str:
    if dtype is None or dtype in KERNEL_DTYPES:
        return ""
    return f"{dtype} is not supported by the kernels (bf16, fp16, fp32); the reference handles it"


def _triton_status(device: torch.device, dtype: torch.dtype | None) -> tuple[bool, str]:
    if why := _dtype_reason(dtype):
        return False, why
    from kernels import triton_pack
    return triton_pack.available(device)


def _cuda_status(device: torch.device, dtype: torch.dtype | None) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"tensors are on {device.type}, the CUDA extension needs CUDA tensors"
    if why := _dtype_reason(dtype):
        return False, why
    from kernels import cuda_pack
    return cuda_pack.available()


def impl_status(device: torch.device | str, dtype: torch.dtype | None = None
                ) -> dict[str, tuple[bool, str]]:
    """``{impl: (usable, reason)}`` for tensors on ``device`` (may build the CUDA extension)."""
    device = torch.device(device)
    return {"cuda": _cuda_status(device, dtype), "triton": _triton_status(device, dtype),
            "torch": (True, "always available")}


def resolve_impl(impl: str | None, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> str:
    """The implementation that runs for tensors on ``device``.

    Args:
        impl: ``"cuda"``, ``"triton"``, ``"torch"``, ``"auto"`` or None (None: the value of
            :data:`IMPL_ENV` in :func:`kernels.settings.settings`, default ``auto``).
        device: Device of the op's tensors.
        dtype: Their dtype (float64 runs on the reference only); None = do not check.

    Raises:
        ValueError: On an unknown name.
        RuntimeError: If a forced implementation cannot run here (with the reason).
    """
    device = torch.device(device)
    env = settings()
    name = impl if impl is not None else env.impl
    # Availability is fixed for a process (the extension builds once; TRITON_INTERPRET counts at
    # import), so a choice is cached per request; failures are not cached and raise every time.
    cache_key = (name, device.type, dtype, env.triton_interpret)
    if (hit := _resolved.get(cache_key)) is not None:
        return hit
    if name not in IMPLS + ("auto",):
        raise ValueError(f"unknown pack implementation {name!r} (from "
                         f"{'impl=' if impl is not None else IMPL_ENV}): use one of "
                         f"{', '.join(IMPLS)} or auto")
    if name == "auto":
        chosen, why = "torch", "fallback"
        for cand, status in (("cuda", _cuda_status), ("triton", _triton_status)):
            ok, reason = status(device, dtype)
            if ok:
                chosen, why = cand, reason
                break
    elif name == "torch":
        chosen, why = "torch", "forced"
    else:
        ok, reason = (_cuda_status if name == "cuda" else _triton_status)(device, dtype)
        if not ok:
            raise RuntimeError(f"pack implementation {name!r} was forced but cannot run: {reason}")
        chosen, why = name, "forced"
    key = (chosen, device.type)
    if key not in _logged:
        _logged.add(key)
        logger.info("pack_tokens: using the %s implementation on %s (%s)", chosen, device.type, why)
    _resolved[cache_key] = chosen
    return chosen


def backend_for(name: str):
    """The kernel object of implementation ``name`` (``forward`` into a given output and
    ``backward`` from a :class:`~kernels.reference.PackPlan`; see ``PackTokensFunction``)."""
    backend = _backends.get(name)
    if backend is None:
        if name == "cuda":
            from kernels.cuda_pack import CudaBackend
            backend = CudaBackend()
        elif name == "triton":
            from kernels.triton_pack import TritonBackend
            backend = TritonBackend()
        else:
            raise ValueError(f"unknown pack implementation {name!r}: use one of {IMPLS}")
        _backends[name] = backend
    return backend


def pack_tokens(text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                index: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """Builds the packed LLM input ``out[i] = [text; visual; special][index[i]]`` in one pass.

    Args:
        text: ``[T, h]`` text-token embeddings in packed order.
        visual: ``[R, h]`` visual tokens of the encoded views (``[V, 257, h]`` is flattened).
        special: ``[K, h]`` learned embeddings (K = 3: start_img, end_img, skip).
        index: int64 ``[N]`` source row per output position in the virtual table
            ``[text; visual; special]``; -1 writes zeros (padding). Any length, order and subset
            of rows (e.g. a sequence-parallel slice); a row may appear several times.
        impl: Force an implementation (see module docstring); None = ``MEGATRON_SPHINX_PACK_IMPL``
            or automatic.

    Returns:
        ``[N, h]`` in the sources' dtype and device. Backward gives ``[T, h]``, ``[R, h]``,
        ``[K, h]`` gradients (summed over repeated rows, fp32 accumulation; zero for unused rows).

    Raises:
        ValueError: On mismatched shapes, dtypes or devices, or (when the index is on the CPU or
            ``MEGATRON_SPHINX_PACK_DEBUG=1``) an index value outside ``[-1, T + R + K)``.
    """
    if visual.dim() > 2:
        visual = visual.reshape(-1, visual.shape[-1])
    # One short-circuit test on the hot path; the messages come from _check_inputs on failure.
    device, dtype = text.device, text.dtype
    if not (text.dim() == 2 and visual.dim() == 2 and special.dim() == 2 and index.dim() == 1
            and visual.dtype == dtype and special.dtype == dtype and dtype.is_floating_point
            and index.dtype == torch.int64 and visual.device == device
            and special.device == device and index.device == device
            and visual.shape[1] == text.shape[1] and special.shape[1] == text.shape[1]):
        _check_inputs(text, visual, special, index)
    if device.type == "cpu" or settings().debug:
        check_index(index, text.shape[0] + visual.shape[0] + special.shape[0])
    backend = _backend(impl, device, dtype)
    text, visual, special, index = (text.contiguous(), visual.contiguous(), special.contiguous(),
                                    index.contiguous())
    if torch.is_grad_enabled() and (text.requires_grad or visual.requires_grad
                                    or special.requires_grad):
        native = getattr(backend, "autograd_apply", None)  # a backend's own autograd node
        if native is not None:
            return native(text, visual, special, index)
        return PackTokensFunction.apply(text, visual, special, index, backend)
    return pack_forward(text, visual, special, index, backend)[0]  # no autograd node needed


def _check_inputs(text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                  index: torch.Tensor) -> None:
    """Raises ValueError naming the first problem of :func:`pack_tokens`' inputs."""
    for name, t in (("text", text), ("visual", visual), ("special", special)):
        if t.dim() != 2:
            raise ValueError(f"pack_tokens: {name} must be [rows, hidden], got {tuple(t.shape)}")
        if t.dtype != text.dtype or t.device != text.device or t.shape[1] != text.shape[1]:
            raise ValueError(f"pack_tokens: {name} is {t.dtype} {tuple(t.shape)} on {t.device} but "
                             f"text is {text.dtype} {tuple(text.shape)} on {text.device}: cast the "
                             "sources to one dtype, device and hidden size")
    if not text.dtype.is_floating_point:
        raise ValueError(f"pack_tokens: sources must be floating point, got {text.dtype}")
    if index.dim() != 1 or index.dtype != torch.int64 or index.device != text.device:
        raise ValueError(f"pack_tokens: index must be int64 [N] on {text.device}, got "
                         f"{index.dtype} {tuple(index.shape)} on {index.device}")


def _backend(impl: str | None, device: torch.device, dtype: torch.dtype):
    """The backend :func:`pack_tokens` runs (cached per request and settings snapshot)."""
    global _fast_for
    env = settings()
    if _fast_for is not env:  # the environment was re-read: choose again
        _fast.clear()
        _fast_for = env
    key = (impl, device.type, dtype)
    backend = _fast.get(key)
    if backend is None:
        backend = _fast[key] = backend_for(resolve_impl(impl, device, dtype))
    return backend


@contextlib.contextmanager
def override_backend(name: str, backend) -> Iterator[None]:
    """Runs ``backend`` wherever implementation ``name`` is chosen, for the block (benchmarks and
    tests: e.g. a do-nothing backend shows the host cost of everything around the kernels)."""
    if name not in IMPLS:
        raise ValueError(f"unknown pack implementation {name!r}: use one of {IMPLS}")
    old = _backends.get(name)
    _backends[name] = backend
    _fast.clear()
    try:
        yield
    finally:
        if old is None:
            _backends.pop(name, None)
        else:
            _backends[name] = old
        _fast.clear()
