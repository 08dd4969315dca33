"""Megatron-Core 0.19.2 on a machine without CUDA: one compatibility layer, applied by mechanism.

Megatron-Core hard-codes CUDA in ~90 files (``device="cuda"``, ``torch.cuda.current_device()``,
CUDA streams and events, the CUDA RNG, ``'torch.cuda.FloatTensor'`` type checks, NCCL-only
collective forms). This module makes the same Megatron code run on CPU processes with gloo, so
that every parallel layout can be tested on a laptop-sized machine. It is written for, and pinned
to, megatron-core 0.19.2 (:data:`SUPPORTED_MEGATRON_CORE_VERSION`); :func:`apply` refuses any
other version. When ``torch.cuda.is_available()`` is True, everything here is a no-op.

Two parts:

* :func:`apply` installs process-wide patches (idempotent). Each patch is a small named function
  below whose docstring names the megatron-core file it covers and why.
* :func:`cpu_device_mode` is a ``TorchFunctionMode`` context that rewrites CUDA device requests
  (``device="cuda"``, ``device=torch.cuda.current_device()``, ``.cuda()``, ``pin_memory=True``,
  ``.to("cuda")``) to CPU, makes ``Tensor.type()`` answer ``'torch.cuda.*'`` names for the
  optimizer's type checks, and stays active during ``backward()`` (torch pops a mode while it
  dispatches ``Tensor.backward``; the mode runs the autograd engine itself with the mode pushed).
  Wrap everything that runs Megatron code in it: model construction, DDP and optimizer creation,
  the training step, checkpoint save and load::

      cpu_compat.apply()
      with cpu_compat.cpu_device_mode():
          model = build_model(...)
          loss = train_step(...)

Known limits: ``torch.autograd.grad`` is not re-entered (Megatron's training path only uses
``backward``); ``is_cuda`` stays False (Megatron's D2H copies are then skipped, which is right on
CPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE_VERSION = "0.19.2"
"""The only megatron-core version whose source these patches were checked against."""

_CPU = torch.device("cpu")
_lock = threading.Lock()
_applied: list[str] = []


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device (the compat layer is then needed)."""
    return not torch.cuda.is_available()


def _check_megatron_version() -> None:
    try:
        found = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "megatron-core is not installed: run `bash scripts/setup.sh` to install "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE_VERSION}"
        ) from exc
    if found != SUPPORTED_MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron_sphinx.cpu_compat was written for megatron-core=="
            f"{SUPPORTED_MEGATRON_CORE_VERSION} but {found} is installed: install "
            f"{SUPPORTED_MEGATRON_CORE_VERSION} or re-check every patch site in cpu_compat.py"
        )


# --------------------------------------------------------------------------------------------
# CPU stand-ins for CUDA runtime objects
# --------------------------------------------------------------------------------------------


class CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is synchronous, so it is always complete."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess=False):
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        """Remember the wall time (for :meth:`elapsed_time`)."""
        self._time = time.perf_counter()

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        """Milliseconds between two recorded events."""
        if self._time is None or end_event._time is None:
            raise RuntimeError("elapsed_time needs both events recorded: call record() first")
        return (end_event._time - self._time) * 1000.0

    def wait(self, stream: Any = None) -> None:  # noqa: D102 - nothing is pending on CPU
        pass

    def synchronize(self) -> None:  # noqa: D102
        pass

    def query(self) -> bool:  # noqa: D102
        return True


class CpuStream:
    """Stand-in for ``torch.cuda.Stream``: one in-order CPU 'stream', all waits are no-ops."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        self.device = _CPU
        self.priority = priority

    @staticmethod
    def priority_range() -> tuple[int, int]:
        """CUDA's (least, greatest) priority pair; both 0 here."""
        return (0, 0)

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        """Record (and return) an always-complete event."""
        event = event if event is not None else CpuEvent()
        event.record(self)
        return event

    def wait_stream(self, stream: Any) -> None:  # noqa: D102 - CPU work is already ordered
        pass

    def wait_event(self, event: Any) -> None:  # noqa: D102
        pass

    def synchronize(self) -> None:  # noqa: D102
        pass

    def query(self) -> bool:  # noqa: D102
        return True


_DEFAULT_STREAM = CpuStream()


def _current_stream(device: Any = None) -> CpuStream:
    return _DEFAULT_STREAM


def _stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(stream)


# --------------------------------------------------------------------------------------------
# The device-redirect TorchFunctionMode
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare int means a CUDA ordinal (torch.cuda.current_device())
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


_TENSOR_TYPE_PREFIX = "torch."
_CUDA_TYPE_PREFIX = "torch.cuda."


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU; see :func:`cpu_device_mode`."""

    _passthrough_self = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BACKWARD_FUNCS:
            return self._backward_with_mode(func, args, kwargs)
        if func in self._passthrough_self:
            return args[0]  # .cuda() / .pin_memory(): the tensor already lives on CPU
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type:
            return self._tensor_type(args, kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1:
            args = tuple(_CPU if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)

    @staticmethod
    def _tensor_type(args: tuple, kwargs: dict) -> Any:
        """``t.type()`` answers the CUDA name so Megatron's 'torch.cuda.FloatTensor' checks pass."""
        tensor, rest = args[0], args[1:]
        dtype = rest[0] if rest else kwargs.get("dtype")
        if dtype is None:
            name = torch.Tensor.type(tensor)
            if tensor.device.type == "cpu" and not name.startswith(_CUDA_TYPE_PREFIX):
                return _CUDA_TYPE_PREFIX + name[len(_TENSOR_TYPE_PREFIX) :]
            return name
        if isinstance(dtype, str) and dtype.startswith(_CUDA_TYPE_PREFIX):
            dtype = _TENSOR_TYPE_PREFIX + dtype[len(_CUDA_TYPE_PREFIX) :]
        other = {k: v for k, v in kwargs.items() if k != "dtype"}
        return torch.Tensor.type(tensor, dtype, **other)

    def _backward_with_mode(self, func: Callable, args: tuple, kwargs: dict) -> None:
        """Run the autograd engine with this mode pushed again.

        ``handle_torch_function`` pops the mode while ``Tensor.backward`` / ``autograd.backward``
        is dispatched, so custom ``autograd.Function.backward`` methods (tensor-parallel mappings,
        pipeline p2p, DDP grad hooks) would otherwise run without the redirect. Calling the
        public function again would re-dispatch to this mode forever, so this replicates
        ``torch.autograd.backward``'s argument handling (torch 2.14) and calls the engine.
        """
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        if func is torch.Tensor.backward:
            tensors: Any = (params["self"],)
            grad_tensors = params["gradient"]
        else:
            tensors = params["tensors"]
            grad_tensors = params["grad_tensors"]
            if grad_tensors is None:
                grad_tensors = params.get("grad_variables")
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        inputs = params["inputs"]
        if isinstance(inputs, dict):
            inputs = tuple(inputs.values())
        inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) \
            else tuple(inputs)
        create_graph = params["create_graph"]
        retain_graph = create_graph if params["retain_graph"] is None else params["retain_graph"]
        with self:
            grads = _tensor_or_tensors_to_tuple(grad_tensors, len(tensors))
            grads = _make_grads(tensors, grads, is_grads_batched=False)
            _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                                 allow_unreachable=True, accumulate_grad=True)
        return None


_BACKWARD_FUNCS = frozenset({torch.Tensor.backward, torch.autograd.backward})


def _mode_active() -> bool:
    stack = torch.overrides._get_current_function_mode_stack()
    return any(isinstance(mode, _CpuDeviceMode) for mode in stack)


def cpu_device_mode() -> contextlib.AbstractContextManager:
    """Context in which Megatron's CUDA device requests land on CPU (no-op with CUDA).

    Also calls :func:`apply`. Re-entrant: inside an active mode it returns a null context.
    Enter it once around everything that runs Megatron code (model build, DDP, optimizer,
    forward-backward, optimizer step, checkpoint save/load); backward inside it is covered.

    Returns:
        A context manager.
    """
    if not cuda_absent():
        return contextlib.nullcontext()
    apply()
    if _mode_active():
        return contextlib.nullcontext()
    return _CpuDeviceMode()


# --------------------------------------------------------------------------------------------
# Patches (each installed once by apply())
# --------------------------------------------------------------------------------------------


def _patch_cuda_runtime_stand_ins() -> None:
    """``torch.cuda`` stream/event/device/sync calls -> CPU stand-ins.

    Covers ``pipeline_parallel/p2p_communication.py`` (``torch.cuda.synchronize``,
    ``current_device``), ``transformer/moe/token_dispatcher.py`` (a class-level
    ``torch.cuda.Stream()``, ``torch.cuda.stream``, ``current_stream``, events),
    ``distributed/param_and_grad_buffer.py`` and ``distributed_data_parallel.py``
    (communication streams), ``utils.py`` timers. Without a driver each of these raises
    "Found no NVIDIA driver". ``current_device`` answers 0; the device mode maps 0 to CPU.
    """
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.Stream = CpuStream
    cuda.Event = CpuEvent
    cuda.current_stream = _current_stream
    cuda.default_stream = _current_stream
    cuda.stream = _stream_context
    cuda.set_stream = lambda stream: None
    cuda.is_current_stream_capturing = lambda: False


def _patch_cuda_rng() -> None:
    """The tensor-parallel RNG tracker drives the CPU generator.

    ``tensor_parallel/random.py``: ``CudaRNGStatesTracker.add``/``fork``,
    ``model_parallel_cuda_manual_seed``, ``CheckpointFunction`` and ``_get/_set_all_rng_states``
    read and write the CUDA generator (``torch.cuda.get_rng_state``, ``manual_seed``,
    ``_get_cuda_rng_state``, ``_set_cuda_rng_state``). On CPU the ops draw from the CPU default
    generator, so the tracker must swap *its* state. ``torch.cuda.manual_seed_all`` is left
    alone: ``torch.manual_seed`` calls it. The tracker's "CPU RNG state changed within GPU RNG
    context" warning is then always true and is filtered.
    """
    from megatron.core.tensor_parallel import random as mc_random

    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mc_random._get_cuda_rng_state = get_rng_state
    mc_random._set_cuda_rng_state = set_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    class _DropSharedGeneratorWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mc_random.__name__).addFilter(_DropSharedGeneratorWarning())


def _patch_gloo_all_to_all_split_sizes() -> None:
    """``all_to_all_single`` accepts tensor split sizes.

    ``tensor_parallel/mappings.py::_AllToAll`` passes the MoE alltoall dispatcher's
    ``input_splits``/``output_splits``; on GPU ``moe_utils.maybe_move_tensor_to_cpu`` turns them
    into numpy arrays, on CPU (``is_cuda`` False) they stay tensors, which gloo's binding
    rejects ("incompatible function arguments"). Split sizes become Python int lists.
    """
    original = torch.distributed.all_to_all_single

    def as_list(splits: Any) -> Any:
        if splits is None or isinstance(splits, list):
            return splits
        if isinstance(splits, torch.Tensor):
            return [int(x) for x in splits.tolist()]
        return [int(x) for x in splits]

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        return original(output, input, output_split_sizes=as_list(output_split_sizes),
                        input_split_sizes=as_list(input_split_sizes), group=group,
                        async_op=async_op)

    torch.distributed.all_to_all_single = all_to_all_single
    torch.distributed.distributed_c10d.all_to_all_single = all_to_all_single


class _DoneWork:
    """A finished ``Work`` handle for collectives that were run synchronously."""

    def wait(self, timeout: Any = None) -> bool:  # noqa: D102
        return True


def _patch_gloo_all_gather_uneven() -> None:
    """List-form ``all_gather`` with unequal sizes works on gloo.

    ``tensor_parallel/mappings.py::_gather_along_first_dim`` with ``output_split_sizes`` (MoE
    alltoall dispatcher with TP>1 + sequence parallel gathers routing data of unequal length)
    calls ``torch.distributed.all_gather`` with differently sized outputs; gloo raises "invalid
    tensor size". Unequal gathers are done as a padded ``all_gather_into_tensor``.
    """
    original = torch.distributed.all_gather

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(t.shape == tensor.shape for t in tensor_list):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rank = torch.distributed.get_rank(group)
        if tensor_list[rank].numel() != tensor.numel():
            raise ValueError(
                f"all_gather: this rank's input has {tensor.numel()} elements but its output "
                f"slot has {tensor_list[rank].numel()}: pass matching output sizes"
            )
        width = max(t.numel() for t in tensor_list)
        padded = torch.zeros(width, dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.numel()] = tensor.reshape(-1)
        gathered = torch.empty(width * len(tensor_list), dtype=tensor.dtype, device=tensor.device)
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        for i, out in enumerate(tensor_list):
            out.copy_(gathered[i * width : i * width + out.numel()].view(out.shape))
        return _DoneWork() if async_op else None

    torch.distributed.all_gather = all_gather
    torch.distributed.distributed_c10d.all_gather = all_gather


def _patch_torch_norm_sequence_parallel() -> None:
    """Torch LayerNorm/RMSNorm accept sequence parallel and mark their weights for it.

    ``transformer/torch_norm.py::WrappedTorchNorm`` (the local spec's norm when apex is absent)
    asserts ``not config.sequence_parallel``. Apex's ``FusedLayerNorm`` instead tags its weights
    with ``sequence_parallel=True`` so ``finalize_model_grads`` all-reduces their gradients over
    TP (each TP rank saw a different slice of the sequence). This builds the torch norm and
    sets the same tag. ``WrappedTorchNorm`` is imported by name in several spec files, so its
    ``__new__`` is replaced in place.
    """
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        plain = copy.copy(config)
        plain.sequence_parallel = False  # plain attribute copy: no __post_init__ re-run
        norm = original_new(cls, plain, hidden_size, eps, persist_layer_norm,
                            zero_centered_gamma, normalization)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)


def _patch_checkpoint_without_output() -> None:
    """Selective recompute (``CheckpointWithoutOutput``) works without Transformer Engine.

    ``tensor_parallel/random.py``: ``CheckpointWithoutOutput.__init__`` sets
    ``self.fp8 = fp8 is not None`` (True for the default ``fp8=False``) and then calls the
    TE-only ``FP8GlobalStateManager``; and ``_recompute`` compiles a C++ extension
    (``load_inline``) to alias storages. The flag is corrected and the aliasing is done by
    resizing the released storage and copying the recomputed bytes into it.
    """
    from megatron.core.tensor_parallel import random as mc_random

    cls = mc_random.CheckpointWithoutOutput
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = fp8 is not None and fp8 is not False

    def share_storage(dst: torch.Tensor, src: torch.Tensor) -> None:
        src_storage = src.untyped_storage()
        dst_storage = dst.untyped_storage()
        dst_storage.resize_(src_storage.nbytes())
        dst_storage.copy_(src_storage)

    cls.__init__ = __init__
    mc_random._get_share_storage = lambda: share_storage


_PATCHES: tuple[Callable[[], None], ...] = (
    _patch_cuda_runtime_stand_ins,
    _patch_cuda_rng,
    _patch_gloo_all_to_all_split_sizes,
    _patch_gloo_all_gather_uneven,
    _patch_torch_norm_sequence_parallel,
    _patch_checkpoint_without_output,
)


def apply() -> list[str]:
    """Install every CPU patch once (no-op when CUDA is available).

    Returns:
        The names of the installed patches (empty with CUDA).

    Raises:
        RuntimeError: megatron-core is missing or not version 0.19.2.
    """
    if not cuda_absent():
        return []
    with _lock:
        if _applied:
            return list(_applied)
        _check_megatron_version()
        import torch.autograd.graph

        for owner, name in ((torch.autograd, "_make_grads"), (torch.autograd.graph,
                            "_engine_run_backward"), (torch.overrides,
                            "_get_current_function_mode_stack")):
            if not hasattr(owner, name):
                raise RuntimeError(f"cpu_compat needs {owner.__name__}.{name} (torch 2.14): "
                                   "install the torch pinned in requirements.txt")
        try:
            import megatron.core  # noqa: F401  (imports triton-based MoE ops at import time)
        except ModuleNotFoundError as exc:
            raise RuntimeError(
                f"importing megatron.core failed ({exc}): megatron-core 0.19.2 imports "
                "triton unconditionally; install the triton that matches torch"
            ) from exc
        for patch in _PATCHES:
            patch()
            _applied.append(patch.__name__)
        logger.info("cpu_compat: applied %d megatron-core patches", len(_applied))
        return list(_applied)


def applied_patches() -> list[str]:
    """Names of the patches installed so far (empty before :func:`apply` or with CUDA)."""
    return list(_applied)

