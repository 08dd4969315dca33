"""Measurements the benchmark scripts share: median wall time, kernel launches, GPU time."""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: CUDA runtime / driver calls that launch one kernel each (as the profiler names them).
LAUNCH_CALLS = {"cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"}
#: Aten ops that launch no kernel on a GPU (besides views).
NO_COMPUTE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "detach", "lift_fresh", "_to_copy_noop"}


#: ``--dtype`` of the model benchmarks; the default is bf16 on GPUs, fp32 on CPUs.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_dtype_arg(parser) -> None:
    """``--dtype`` (see :data:`DTYPES`)."""
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default bf16 on GPUs, fp32 on CPUs")


def recipe_and_dtype(parser, args) -> tuple[object, bool, torch.dtype]:
    """``(recipe config, on_gpu, dtype)`` of ``args.recipe`` and ``args.dtype``; an unknown
    recipe is a one-line usage error."""
    from megatron_sphinx.config import get_recipe

    try:
        cfg = get_recipe(args.recipe)
    except (KeyError, ValueError) as exc:
        parser.error(str(exc))
    on_gpu = torch.cuda.is_available()
    return cfg, on_gpu, DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]


def device_label() -> str:
    """What a benchmark ran on: the GPU's name, or the CPU's core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (the GPU
    synchronised around each call)."""
    for _ in range(warmup):
        fn()
    return statistics.median(1e3 * call_seconds(fn) for _ in range(repeats))


def call_seconds(fn) -> float:
    """Wall seconds of one call of ``fn()``, the GPU's work included (e.g. a first call, which
    plans, compiles or captures)."""
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class CountOps(TorchDispatchMode):
    """Counts the aten ops that compute something (views and allocations left out)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket.__name__ in NO_COMPUTE):
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches(fn) -> tuple[int, float]:
    """``(kernel launches, GPU kernel ms)`` of one ``fn()`` call on a GPU (the host's launch
    calls, Triton's included; the kernels' own time, from the profiler); on a CPU ``(aten ops
    that compute, 0.0)``, the backward's included (each one a launch or more on a GPU)."""
    if not torch.cuda.is_available():
        with CountOps() as counter:
            fn()
        return counter.count, 0.0
    # the runtime's launch calls are recorded only with CUDA activity on
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    gpu_us = sum(e.time_range.elapsed_us() for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name in LAUNCH_CALLS), gpu_us / 1e3
