"""Where the time of a training step goes, measured on the real step (no model changes).

:func:`instrument` hooks a built model and optimizer for as long as it is active:

* **vision encoding**: forward pre/post hooks on every first-stage ``SphinxModel.vision``;
* **pack kernel**: ``megatron_sphinx.model.sphinx.pack_tokens`` is wrapped; its forward is timed
  directly and its backward between two identity autograd nodes placed on its output and inputs
  (the autograd engine runs the pack op's backward right between them);
* **schedule** (LLM forward/backward and everything Megatron's schedule does):
  ``megatron_sphinx.train.step.get_forward_backward_func`` returns a timed wrapper, so the
  training command's own :func:`~megatron_sphinx.train.step.train_step` runs unchanged;
* **optimizer**: ``optimizer.step`` (gradient finalisation is in the schedule, the distributed
  optimizer's parameter all-gather in the step);
* **communication**: time spent inside ``torch.distributed`` collectives and point-to-point calls
  (also Megatron's module-level aliases of them and its coalescing context), measured on the
  calling side: synchronous calls and, for asynchronous ones, the ``wait()`` on their handle.
  Overlapped communication that nobody waits for is not visible: DDP's gradient
  reduce-scatter runs during the backward pass and shows as the wait for its last buckets;
  nested calls count once;
* **image decoding**: ``ImageProcessor.__call__`` of the real loader, split into the main
  thread's (inside "waiting for data") and background workers' (overlapped, reported apart);
* **other**: ``zero_grad`` of the optimizer and the DDP buffers, and the LR scheduler step.

Every span is stamped with ``torch.cuda.Event`` on GPU (read after one synchronize per step) and
``time.perf_counter`` on CPU. Exclusive parts of a step: ``data_wait``, ``image_decode``,
``vision_encode``, ``pack_kernel``, ``llm_fwd_bwd`` (schedule minus vision, pack and the
communication inside it), ``optimizer`` (minus its communication), ``communication``, ``other``;
``unaccounted`` is what the spans miss of the separately measured step time.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

#: The exclusive parts of a step, in display order.
PARTS = ("data_wait", "image_decode", "vision_encode", "pack_kernel", "llm_fwd_bwd", "optimizer",
         "communication", "other")

#: ``torch.distributed`` functions timed as communication.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single",
               "all_to_all", "broadcast", "reduce", "barrier", "send", "recv", "isend", "irecv",
               "batch_isend_irecv", "all_gather_object", "broadcast_object_list")


class _Clock:
    """Stamps on the current CUDA stream (GPU) or host wall time (CPU)."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu

    def stamp(self) -> Any:
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.on_gpu:
            return start.elapsed_time(end) / 1e3
        return end - start

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()


@dataclass
class _Span:
    kind: str
    phase: str
    start: Any
    end: Any = None


class StepRecorder:
    """Collects the timed spans of one step at a time and turns them into a breakdown.

    Args:
        on_gpu: Stamp with CUDA events (else ``perf_counter``).
    """

    def __init__(self, on_gpu: bool):
        self.clock = _Clock(on_gpu)
        self.phase = "other"
        """Which part of the step runs now: data, schedule, optimizer or other."""
        self.comm_calls: dict[str, int] = defaultdict(int)
        """Calls per communication function (all steps)."""
        self._spans: list[_Span] = []
        self._comm_depth = 0
        self._lock = threading.Lock()
        self._decode = {"main": 0.0, "background": 0.0}
        self._step_start = None
        self._pack_bwd: list[_Span] = []  # open pack-backward spans (see instrument)

    def open(self, kind: str) -> _Span:
        """Starts a span of ``kind`` in the current phase."""
        return _Span(kind, self.phase, self.clock.stamp())

    def close(self, span: _Span) -> None:
        """Ends ``span`` and keeps it."""
        span.end = self.clock.stamp()
        with self._lock:
            self._spans.append(span)

    @contextlib.contextmanager
    def span(self, kind: str) -> Iterator[None]:
        """Times the body as one span of ``kind``."""
        s = self.open(kind)
        try:
            yield
        finally:
            self.close(s)

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Sets the phase for the body and times the body as a ``phase:<phase>`` span."""
        before, self.phase = self.phase, phase
        s = self.open(f"phase:{phase}")
        try:
            yield
        finally:
            self.close(s)
            self.phase = before

    @contextlib.contextmanager
    def comm(self, name: str) -> Iterator[None]:
        """Times a communication call (nested calls inside one count once)."""
        with self._lock:
            self._comm_depth += 1
            outer = self._comm_depth == 1
            self.comm_calls[name] += 1
        s = self.open("comm") if outer else None
        try:
            yield
        finally:
            if s is not None:
                self.close(s)
            with self._lock:
                self._comm_depth -= 1

    def add_decode(self, seconds: float, main_thread: bool) -> None:
        """Adds image-decoding time measured in a loader thread."""
        with self._lock:
            self._decode["main" if main_thread else "background"] += seconds

    def begin_step(self) -> None:
        """Starts a step: clears the spans and stamps the start."""
        self.clock.sync()
        with self._lock:
            self._spans = []
            self._decode = {"main": 0.0, "background": 0.0}
        self._pack_bwd = []
        self.phase = "other"
        self._step_start = self.clock.stamp()

    def end_step(self) -> dict[str, float]:
        """Ends the step (synchronises the GPU) and returns its breakdown in seconds.

        Returns:
            Every part of :data:`PARTS`, plus ``step_time``, ``unaccounted``,
            ``image_decode_background`` (overlapped worker time, not a part of the step) and
            ``schedule`` (the whole forward-backward schedule).
        """
        end = self.clock.stamp()
        self.clock.sync()
        step = self.clock.seconds(self._step_start, end)
        with self._lock:
            spans, decode = list(self._spans), dict(self._decode)
        phase = defaultdict(float)
        kind = defaultdict(float)
        comm_in = defaultdict(float)
        for s in spans:
            dt = self.clock.seconds(s.start, s.end)
            if s.kind.startswith("phase:"):
                phase[s.kind[6:]] += dt
            elif s.kind == "comm":
                comm_in[s.phase] += dt
            else:
                kind[s.kind] += dt
        decode_main = min(decode["main"], phase["data"])
        parts = {
            "data_wait": phase["data"] - decode_main,
            "image_decode": decode_main,
            "vision_encode": kind["vision"],
            "pack_kernel": kind["pack"],
            "llm_fwd_bwd": phase["schedule"] - kind["vision"] - kind["pack"] - comm_in["schedule"],
            "optimizer": phase["optimizer"] - comm_in["optimizer"],
            "communication": sum(comm_in.values()),
            "other": kind["other"],
        }
        out = dict(parts)
        out["step_time"] = step
        out["unaccounted"] = step - sum(parts.values())
        out["image_decode_background"] = decode["background"]
        out["schedule"] = phase["schedule"]
        return out


# ------------------------------------------------------------------------------ patching

class _Patches:
    """Attribute replacements undone in reverse order."""

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        had = name in getattr(obj, "__dict__", {})
        old = getattr(obj, name, None)
        setattr(obj, name, value)
        if had:
            self._undo.append(lambda: setattr(obj, name, old))
        else:
            self._undo.append(lambda: delattr(obj, name))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class _TimedWork:
    """A ``Work`` handle whose ``wait()`` is timed as communication."""

    def __init__(self, work: Any, recorder: StepRecorder, name: str):
        self._work, self._recorder, self._name = work, recorder, name

    def wait(self, *args, **kwargs):
        with self._recorder.comm(self._name + ".wait"):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _is_work(out: Any) -> bool:
    """A handle one can wait on (inside a coalescing context torch returns a placeholder whose
    every attribute raises: the context's own handle is the one waited on)."""
    return out is not None and type(out).__name__ != "_IllegalWork" and hasattr(out, "wait")


def _timed_collective(fn: Callable, recorder: StepRecorder, name: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with recorder.comm(name):
            out = fn(*args, **kwargs)
        if kwargs.get("async_op") and _is_work(out):
            return _TimedWork(out, recorder, name)
        if name == "batch_isend_irecv" and isinstance(out, list):
            return [_TimedWork(w, recorder, name) for w in out]
        if name in ("isend", "irecv") and out is not None:
            return _TimedWork(out, recorder, name)
        return out
    return wrapper


def _timed_context(fn: Callable, recorder: StepRecorder, name: str) -> Callable:
    """A coalescing context timed as communication; its handle's ``wait()`` too (DDP keeps the
    handle of an overlapped gradient reduce-scatter and waits on it after the backward)."""
    @functools.wraps(fn)
    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        with recorder.comm(name), fn(*args, **kwargs) as cm:
            yield _TimedWork(cm, recorder, name) if _is_work(cm) else cm
    return wrapper


def _patch_communication(patches: _Patches, recorder: StepRecorder) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        timed = _timed_collective(fn, recorder, name)
        patches.set(dist, name, timed)
        if getattr(c10d, name, None) is fn:
            patches.set(c10d, name, timed)
    # Megatron binds some collectives to module names at import time.
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from megatron.core.tensor_parallel import mappings

    for mod in (pgb, mappings):
        for alias in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            fn = getattr(mod, alias, None)
            if fn is not None:
                patches.set(mod, alias, _timed_collective(fn, recorder, alias))
    if hasattr(pgb, "_coalescing_manager"):
        patches.set(pgb, "_coalescing_manager",
                    _timed_context(pgb._coalescing_manager, recorder, "coalesced"))


class _MarkBackwardStart(torch.autograd.Function):
    """Identity; its backward (the first pack-op backward event) opens the pack span."""

    @staticmethod
    def forward(ctx, x, recorder):
        ctx.recorder = recorder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder._pack_bwd.append(ctx.recorder.open("pack"))
        return grad, None


class _MarkBackwardEnd(torch.autograd.Function):
    """Identity on the pack op's inputs; its backward closes the pack span."""

    @staticmethod
    def forward(ctx, recorder, *xs):
        ctx.recorder = recorder
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        rec = ctx.recorder
        if rec._pack_bwd:
            rec.close(rec._pack_bwd.pop())
        return (None, *grads)


def _timed_pack(original: Callable, recorder: StepRecorder) -> Callable:
    @functools.wraps(original)
    def pack_tokens(text, visual, special, index):
        if torch.is_grad_enabled():
            text, visual, special = _MarkBackwardEnd.apply(recorder, text, visual, special)
        with recorder.span("pack"):
            out = original(text, visual, special, index)
        if torch.is_grad_enabled() and out.requires_grad:
            out = _MarkBackwardStart.apply(out, recorder)
        return out
    return pack_tokens


def _timed_phase(fn: Callable, recorder: StepRecorder, phase: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with recorder.in_phase(phase):
            return fn(*args, **kwargs)
    return wrapper


def _timed_other(fn: Callable, recorder: StepRecorder) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with recorder.span("other"):
            return fn(*args, **kwargs)
    return wrapper


def _timed_decode(fn: Callable, recorder: StepRecorder) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            recorder.add_decode(time.perf_counter() - t0,
                                threading.current_thread() is threading.main_thread())
    return wrapper


@contextlib.contextmanager
def instrument(model_chunks: list, optimizer, recorder: StepRecorder,
               scheduler=None) -> Iterator[StepRecorder]:
    """Installs every timing hook of the module docstring; removes them on exit.

    Args:
        model_chunks: This rank's DDP-wrapped model chunks (from ``build_model``).
        optimizer: The Megatron optimizer (from ``build_optimizer``).
        recorder: Receives the spans.
        scheduler: The LR scheduler; its ``step`` is counted as "other".
    """
    from megatron_sphinx.model import sphinx as sphinx_mod
    from megatron_sphinx.train import step as step_mod
    from megatron_sphinx.train.build import unwrap

    patches = _Patches()
    handles = []
    try:
        for chunk in model_chunks:
            model = unwrap(chunk)
            if getattr(model, "pre_process", False):
                pending: list = []
                handles.append(model.vision.register_forward_pre_hook(
                    lambda mod, args, pending=pending: pending.append(recorder.open("vision"))))
                handles.append(model.vision.register_forward_hook(
                    lambda mod, args, out, pending=pending: recorder.close(pending.pop())))
            patches.set(chunk, "zero_grad_buffer", _timed_other(chunk.zero_grad_buffer, recorder))
        patches.set(sphinx_mod, "pack_tokens", _timed_pack(sphinx_mod.pack_tokens, recorder))
        real_get = step_mod.get_forward_backward_func
        patches.set(step_mod, "get_forward_backward_func",
                    lambda *a, **k: _timed_phase(real_get(*a, **k), recorder, "schedule"))
        patches.set(optimizer, "step", _timed_phase(optimizer.step, recorder, "optimizer"))
        patches.set(optimizer, "zero_grad", _timed_other(optimizer.zero_grad, recorder))
        if scheduler is not None:
            patches.set(scheduler, "step", _timed_other(scheduler.step, recorder))
        try:
            from megatron_sphinx.data.images import ImageProcessor

            patches.set(ImageProcessor, "__call__",
                        _timed_decode(ImageProcessor.__call__, recorder))
        except ImportError as exc:  # DALI-free installs: no image decoding to time
            log.debug("image decoding not timed: %s", exc)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _patch_communication(patches, recorder)
        yield recorder
    finally:
        for h in handles:
            h.remove()
        patches.undo()


# ------------------------------------------------------------------------------ memory, machine

class RssSampler:
    """Peak resident memory of this process, sampled every ``interval_s`` in a thread (CPU)."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def machine_info() -> dict:
    """The machine a profile ran on: CPU model and count, GPU name, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": None, "gpu_count": 0}
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - informative only
        info["megatron_core"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


@dataclass
class VariantStats:
    """Accumulated figures of one profiled variant (one rank's view plus global counts)."""

    steps: list[dict] = field(default_factory=list)
    """Per-step breakdown (seconds) from :meth:`StepRecorder.end_step`."""
    summaries: list[dict] = field(default_factory=list)
    """Per-step global data counts (``loader_summary``) and FLOPs."""

    def mean_breakdown(self) -> dict[str, float]:
        """Mean seconds per step of every part and total."""
        if not self.steps:
            return {}
        keys = self.steps[0].keys()
        return {k: float(np.mean([s[k] for s in self.steps])) for k in keys}


#: kernel / operator name fragments -> category, first match wins (lower-case).
KERNEL_CATEGORIES = (
    ("communication", ("nccl", "gloo", "all_reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "_efficient_attention")),
    ("convolution", ("conv", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::matmul", "aten::linear", "matmul")),
    ("copy", ("memcpy", "memset", "copy_", "aten::copy", "aten::to", "aten::cat",
              "aten::index", "aten::gather", "aten::scatter")),
)


def kernel_category(name: str) -> str:
    """The category of a profiled kernel or operator name (``KERNEL_CATEGORIES``), or "other"
    (elementwise maths, norms, reductions, optimizer kernels ...)."""
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def kernel_report(prof, on_gpu: bool, rows: int = 40, wall_s: float | None = None) -> str:
    """Where one profiled step's time went, from a finished ``torch.profiler.profile``.

    On a GPU: the device kernels' own time, summed per :func:`kernel_category`, then the
    ``rows`` kernels with the most time, then the host's CUDA runtime calls (launches, copies,
    synchronisations: a host that waits on the GPU, or the reverse, shows there) and the host
    operators with the most self CPU time (e.g. a library planning per new shape). With
    ``wall_s`` (the step's wall time) it also gives the share of the step the GPU was busy. On
    a CPU: the operators' self CPU time likewise (self time, so nested operators count once).
    Milliseconds.
    """
    # User annotations (``record_function`` ranges such as the optimizer's step) span kernels
    # that are counted themselves.
    events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)]
    if on_gpu:
        timed = [(e.key, e.self_device_time_total / 1e3, e.count) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        timed = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events
                 if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in timed)
    by_cat: dict[str, float] = {}
    for key, ms, _ in timed:
        cat = kernel_category(key)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    what = "device kernels" if on_gpu else "CPU operators (self time)"
    lines = [f"one profiled step, {what}: {total:.1f} ms in all", "",
             f"{'category':15} {'ms':>10} {'share':>7}"]
    if wall_s:
        busy = f"; the GPU was busy {total / 1e3 / wall_s:.0%} of it" if on_gpu else ""
        lines[0] += f" (step wall time {wall_s * 1e3:.1f} ms{busy})"
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:15} {ms:10.1f} {ms / total if total else 0:7.1%}")
    lines += ["", f"{'ms':>10} {'share':>7} {'calls':>6}  {'category':13} name"]
    for key, ms, count in sorted(timed, key=lambda t: -t[1])[:rows]:
        lines.append(f"{ms:10.2f} {ms / total if total else 0:7.1%} {count:6d}  "
                     f"{kernel_category(key):13} {key[:110]}")
    if on_gpu:
        runtime = sorted(((e.key, e.cpu_time_total / 1e3, e.count) for e in events
                          if e.device_type == torch.autograd.DeviceType.CPU
                          and e.key.startswith("cuda") and e.cpu_time_total > 0),
                         key=lambda t: -t[1])
        lines += ["", "host CUDA runtime calls (CPU time):", f"{'ms':>10} {'calls':>7}  name"]
        lines += [f"{ms:10.2f} {count:7d}  {key}" for key, ms, count in runtime[:12]]
        host = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in events
                       if e.device_type == torch.autograd.DeviceType.CPU
                       and not e.key.startswith("cuda") and e.self_cpu_time_total > 0),
                      key=lambda t: -t[1])
        lines += ["", "host operators (self CPU time: where the host itself spends the step):",
                  f"{'ms':>10} {'calls':>7}  name"]
        lines += [f"{ms:10.2f} {count:7d}  {key[:110]}" for key, ms, count in host[:15]]
    return "\n".join(lines) + "\n"
