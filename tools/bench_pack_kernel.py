"""Benchmark of the pack op against a plain copy and the unfused torch sequence.

For realistic packed layouts (built with ``build_packed_batch``: rows of text-only and image
samples, 448 px images cut 2x2, a given fraction of sub-images skipped), prints per implementation:

* ``op ms``: ``pack_tokens`` forward as the model calls it (sources requiring grad, so with the
  autograd node; allocates its output);
* ``kern ms``: the implementation's forward into a preallocated output (plan included);
* ``GB/s``: effective bandwidth of ``kern``: bytes read (non-padding source rows + index) plus
  bytes written (the output), divided by time;
* ``%copy``: that bandwidth over a plain ``dst.copy_(src)`` of an ``[N, h]`` tensor into a
  preallocated ``dst``, measured in the same run (same bytes moved per second);
* ``op %clone``: the op's bandwidth over ``src.clone()``, a copy that allocates its output too
  (on CPU a fresh output above glibc's mmap threshold pays page faults, on GPU it does not);
* ``unfused ms``: ``torch.cat([text, visual, special, zero])[index]`` (what a plain
  implementation does; sources without grad, as before), and the op's speedup over it;
* ``bwd ms``: the backward (all three gradients) from a prebuilt plan;
* ``f+b ms``: what training pays: the op's forward and backward through autograd
  (``torch.autograd.grad`` of all three sources; the backward builds its plan), and
  ``vs unf f+b``: the speedup over the same for the unfused ``cat + index`` with autograd.

``--triton-tiles 4096,4 8192,8`` adds, per layout, the Triton forward (into a preallocated
output) for each ``ELEMENTS,WARPS`` tile, so one GPU run gives the tile sweep.

``--overhead`` instead times the host cost per call with tiny tensors (N=64, h=8), in
microseconds: ``pack_tokens`` per implementation, the same call with kernels that do nothing (the
validation, implementation choice, autograd node and allocation remain), the autograd Function
alone with those kernels, and ``cat + index`` with autograd; forward and forward+backward.

Examples::

    python tools/bench_pack_kernel.py --quick
    python tools/bench_pack_kernel.py --overhead
    python tools/bench_pack_kernel.py --hidden 4096 --batch 1 4 --impl torch cuda
    python tools/bench_pack_kernel.py --hidden 2048 4096 --batch 1 4 --triton-tiles 4096,4 8192,8
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import impl_status, resolve_impl  # noqa: E402
from kernels.reference import PackTokensFunction, build_plan  # noqa: E402
from kernels.select import backend_for, override_backend, pack_tokens  # noqa: E402
from megatron_sphinx.data.geometry import TOKENS_PER_VIEW  # noqa: E402
from megatron_sphinx.data.layout import NUM_SPECIAL, Sample, build_packed_batch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_layout(b: int, s: int, skip_frac: float, seed: int):
    """A packed batch of ``b`` rows of ``s`` positions with ``skip_frac`` of sub-images skipped.

    Image samples (60%) are 448x448 (no skip) or 200x448 / 448x200 (2 of 4 sub-images skipped);
    thin images are spread evenly so that their share is ``2 * skip_frac``. Text lengths are
    uniform in [32, 512). Rows are filled until the next sample does not fit, then topped up.
    """
    rng = np.random.default_rng(seed)
    per_mille = round(2000 * skip_frac)  # thin images per 1000 images
    rows, n_images = [], 0
    for _ in range(b):
        row, used = [], 0
        while True:
            n = int(rng.integers(32, 512))
            hw = None
            if rng.random() < 0.6:
                thin = -(-(n_images + 1) * per_mille // 1000) > -(-n_images * per_mille // 1000)
                hw = ((200, 448) if n_images % 2 else (448, 200)) if thin else (448, 448)
            smp = Sample(np.arange(n, dtype=np.int32) % 1000, np.ones(n, dtype=bool), hw)
            need = smp.length(448, 2)
            if used + need > s:
                if s - used > 8:  # top up with a short text sample, leave a little padding
                    k = s - used - int(rng.integers(0, 8))
                    row.append(Sample(np.arange(k, dtype=np.int32), np.ones(k, dtype=bool)))
                break
            n_images += hw is not None
            row.append(smp)
            used += need
        rows.append(row)
    return build_packed_batch(rows, s, 448, 2)


def _once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_all(fns: dict, device: torch.device, repeat: int) -> dict[str, float]:
    """Seconds per call of each ``fns`` entry, measured round-robin (every round runs each once,
    so all see the same background load): median of ``repeat`` rounds on GPU, minimum on CPU (the
    development machine is shared: the minimum is the least disturbed run)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (Triton JIT, extension load, allocator)
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(_once(fn, device))
    pick = statistics.median if device.type == "cuda" else min
    return {k: pick(v) for k, v in times.items()}


def _sources_grad(text, visual, special):
    """Copies of the sources that require grad (the op as training calls it)."""
    return tuple(x.detach().requires_grad_() for x in (text, visual, special))


def bench_case(args, device, impls, h, b, skip, dtype, tiles):
    batch = make_layout(b, args.seq, skip, seed=1000 * b + int(100 * skip))
    index = batch.pack_index.to(device)  # [s * b]
    t_rows, v_rows = batch.text_ids.numel(), int(batch.view_counts.sum()) * TOKENS_PER_VIEW
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(t_rows, h, generator=g).to(device, dtype)
    visual = torch.randn(v_rows, h, generator=g).to(device, dtype)
    special = torch.randn(NUM_SPECIAL, h, generator=g).to(device, dtype)
    n = index.numel()
    es = text.element_size()
    nonpad = int((batch.pack_index >= 0).sum())
    moved = (nonpad + n) * h * es + n * 8  # read source rows + index, write output
    src = torch.randn(n, h, generator=g).to(device, dtype)
    dst = torch.empty_like(src)
    grad = torch.randn(n, h, generator=g).to(device, dtype)
    zero = torch.zeros(1, h, device=device, dtype=dtype)
    m = t_rows + v_rows + NUM_SPECIAL
    idx_unfused = torch.where(index < 0, torch.full_like(index, m), index)
    # The op as training calls it: sources that need gradients (autograd node, saved index).
    leaves = _sources_grad(text, visual, special)

    def unfused_autograd():
        return torch.cat([*leaves, zero])[idx_unfused]

    fns = {"copy": lambda: dst.copy_(src), "clone": lambda: src.clone(),
           "unfused": lambda: torch.cat([text, visual, special, zero])[idx_unfused],
           "unfused.ag": unfused_autograd,
           "unfused.fb": lambda: torch.autograd.grad(unfused_autograd(), leaves, grad)}
    plan = build_plan(index, t_rows, v_rows, NUM_SPECIAL)
    for name in impls:
        backend = backend_for(name)
        out = torch.empty(n, h, device=device, dtype=dtype)

        def kern(backend=backend, out=out):
            p = build_plan(index, t_rows, v_rows, NUM_SPECIAL) if backend.needs_plan_forward \
                else None
            backend.forward(out, text, visual, special, index, p)

        def op(name=name):
            return pack_tokens(*leaves, index, impl=name)

        fns[f"{name}.kern"] = kern
        fns[f"{name}.op"] = op
        fns[f"{name}.bwd"] = lambda backend=backend: backend.backward(grad, plan, (True,) * 3)
        fns[f"{name}.fb"] = lambda op=op: torch.autograd.grad(op(), leaves, grad)
    if tiles:
        from kernels.triton_pack import TritonBackend
        out = torch.empty(n, h, device=device, dtype=dtype)
        for tile in tiles:
            fns[f"tile.{tile}"] = lambda be=TritonBackend(tile): be.forward(
                out, text, visual, special, index, None)
    t = time_all(fns, device, args.repeat)
    bw_copy = 2 * n * h * es / t["copy"]
    bw_clone = 2 * n * h * es / t["clone"]
    skipped = batch.num_skipped / max(1, 4 * batch.view_counts.numel())
    print(f"\nseq {args.seq} x batch {b}, hidden {h}, {str(dtype).replace('torch.', '')}, "
          f"skipped sub-images {100 * skipped:.0f}% (N={n}, T={t_rows}, R={v_rows}, "
          f"padding {n - nonpad}); copy_ {1e3 * t['copy']:.2f} ms = {bw_copy / 1e9:.1f} GB/s, "
          f"clone {1e3 * t['clone']:.2f} ms, unfused cat+index {1e3 * t['unfused']:.2f} ms "
          f"(with autograd {1e3 * t['unfused.ag']:.2f} ms, fwd+bwd {1e3 * t['unfused.fb']:.2f} ms)")
    print(f"  {'impl':<7}{'op ms':>9}{'kern ms':>9}{'GB/s':>8}{'%copy':>7}{'op %clone':>10}"
          f"{'vs unfused':>11}{'bwd ms':>9}{'f+b ms':>9}{'vs unf f+b':>11}")
    for name in impls:
        t_op, t_k, t_bwd = t[f"{name}.op"], t[f"{name}.kern"], t[f"{name}.bwd"]
        t_fb = t[f"{name}.fb"]
        print(f"  {name:<7}{1e3 * t_op:>9.2f}{1e3 * t_k:>9.2f}{moved / t_k / 1e9:>8.1f}"
              f"{100 * moved / t_k / bw_copy:>6.0f}%{100 * moved / t_op / bw_clone:>9.0f}%"
              f"{t['unfused'] / t_op:>10.2f}x{1e3 * t_bwd:>9.2f}{1e3 * t_fb:>9.2f}"
              f"{t['unfused.fb'] / t_fb:>10.2f}x")
    if tiles:
        cells = [f"{e},{w} {1e3 * t[f'tile.{(e, w)}']:.3f} ms "
                 f"{100 * moved / t[f'tile.{(e, w)}'] / bw_copy:.0f}%" for e, w in tiles]
        print("  triton fwd by tile (ELEMENTS,WARPS: kern ms, %copy): " + " | ".join(cells))
    return {"seq": args.seq, "batch": b, "hidden": h, "skipped": skipped,
            "dtype": str(dtype).replace("torch.", ""), "copy_gbs": bw_copy / 1e9,
            "impls": {name: {"kern_ms": 1e3 * t[f"{name}.kern"], "op_ms": 1e3 * t[f"{name}.op"],
                             "gbs": moved / t[f"{name}.kern"] / 1e9,
                             "pct_copy": 100 * moved / t[f"{name}.kern"] / bw_copy,
                             "vs_unfused": t["unfused"] / t[f"{name}.op"],
                             "vs_unfused_fb": t["unfused.fb"] / t[f"{name}.fb"]}
                      for name in impls},
            "tiles": {f"{e},{w}": 100 * moved / t[f"tile.{(e, w)}"] / bw_copy
                      for e, w in tiles}}


class NullBackend:
    """Kernels that do nothing (outputs stay uninitialised): what remains of a call is host cost,
    plus the plan the autograd node builds for the backward."""

    name = "null"
    needs_plan_forward = False

    def forward(self, out, text, visual, special, index, plan) -> None:
        pass

    def backward(self, grad_out, plan, needs):
        sizes = (plan.num_text, plan.num_visual, plan.num_special)
        return tuple(grad_out.new_empty(k, grad_out.shape[1]) if need else None
                     for need, k in zip(needs, sizes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_times(rows: dict, device: torch.device, calls: int, repeat: int) -> dict[str, float]:
    """Host seconds per call of each ``rows`` entry ``(context factory, fn)``: the best of
    ``repeat`` loops of ``calls`` calls (GPU work is not waited for inside a loop; each loop is
    synchronised before and after), rounds run round-robin after one warm-up round."""
    best = {k: math.inf for k in rows}
    for rnd in range(repeat + 1):
        for k, (context, fn) in rows.items():
            with context():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                dt = time.perf_counter() - t0
                _sync(device)
            if rnd:
                best[k] = min(best[k], dt / calls)
    return best


def overhead(args, device: torch.device, impls: list[str], dtype: torch.dtype) -> None:
    """Prints the host cost per call of the op and its parts with tiny tensors (microseconds)."""
    n, h, t_rows, v_rows = 64, 8, 20, 40
    g = torch.Generator(device="cpu").manual_seed(0)
    text, visual, special = (torch.randn(k, h, generator=g).to(device, dtype)
                             for k in (t_rows, v_rows, NUM_SPECIAL))
    m = t_rows + v_rows + NUM_SPECIAL
    index = torch.randint(-1, m, (n,), generator=g).to(device)
    idx_unfused = torch.where(index < 0, torch.full_like(index, m), index)
    zero = torch.zeros(1, h, device=device, dtype=dtype)
    grad = torch.randn(n, h, generator=g).to(device, dtype)
    leaves = _sources_grad(text, visual, special)
    auto = resolve_impl(None, device, dtype)
    null = NullBackend()
    plain = contextlib.nullcontext

    def nulled():
        return override_backend(auto, null)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), leaves, grad)

    calls = {f"pack_tokens impl={k}": (plain, lambda k=k: pack_tokens(*leaves, index, impl=k))
             for k in impls}
    if "cuda" in impls:  # its C++ autograd node (the default) against the Python Function
        calls["cuda kernels, Python autograd node"] = (
            plain, lambda: PackTokensFunction.apply(*leaves, index, backend_for("cuda")))
    calls[f"pack_tokens, no-op kernels ({auto})"] = (nulled, lambda: pack_tokens(*leaves, index))
    calls["Function.apply, no-op kernels"] = (
        plain, lambda: PackTokensFunction.apply(*leaves, index, null))
    calls["cat+index, autograd"] = (plain, lambda: torch.cat([*leaves, zero])[idx_unfused])
    rows = {}
    for k, (context, fn) in calls.items():
        rows[(k, "fwd")] = (context, fn)
        rows[(k, "f+b")] = (context, fwd_bwd(fn))
    rows[("cat+index, no grad", "fwd")] = (
        plain, lambda: torch.cat([text, visual, special, zero])[idx_unfused])
    t = host_times(rows, device, args.calls, args.repeat)
    print(f"\nhost cost per call, N={n}, h={h}, {str(dtype).replace('torch.', '')} on "
          f"{device.type} (best of {args.repeat} loops of {args.calls} calls), microseconds:")
    print(f"  {'call':<42}{'fwd us':>9}{'f+b us':>9}")
    for k in list(calls) + ["cat+index, no grad"]:
        fb = t.get((k, "f+b"))
        print(f"  {k:<42}{1e6 * t[(k, 'fwd')]:>9.1f}"
              + (f"{1e6 * fb:>9.1f}" if fb is not None else f"{'-':>9}"))
    wrapper = t[(f"pack_tokens, no-op kernels ({auto})", "fwd")] - \
        t[("Function.apply, no-op kernels", "fwd")]
    print(f"  wrapper around the autograd Function (validation, index check on CPU, choice, "
          f"contiguous): {1e6 * wrapper:.1f} us")


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser, fail

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096, help="positions per row")
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 3, 4], help="micro-batch rows")
    p.add_argument("--skip", type=float, nargs="+", default=[0.0, 0.4],
                   help="fraction of sub-images skipped")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--impl", nargs="+", choices=["torch", "triton", "cuda"], default=None,
                   help="implementations (default: every one available here)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--quick", action="store_true", help="small CPU run: hidden 2048, batch 1 2")
    p.add_argument("--overhead", action="store_true",
                   help="only the host cost per call with tiny tensors (microseconds)")
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop of --overhead")
    p.add_argument("--triton-tiles", nargs="+", default=None, metavar="ELEMENTS,WARPS",
                   help="also time the Triton forward for each tile, e.g. 4096,4 8192,8 16384,8 "
                        "(CUDA, or CPU under TRITON_INTERPRET=1)")
    p.add_argument("--json", default=None, help="also write each case's figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda asked for but CUDA is not available")
    if any(not 0.0 <= x <= 0.5 for x in args.skip):
        return fail("--skip fractions must lie in [0, 0.5] (a 2x2 grid skips at most half of the "
                    "sub-images)")
    if args.seq < 1300:
        return fail("--seq must be at least 1300 (one image sample takes up to 1295 positions)")
    if args.repeat is not None and args.repeat < 1 or args.calls < 1:
        return fail("--repeat and --calls must be at least 1")
    if args.json:
        from megatron_sphinx.cli import check_output_file
        try:
            check_output_file(args.json, "--json")
        except ValueError as exc:
            return fail(exc)
    if args.quick:
        args.hidden, args.batch = [2048], [1, 2]
    args.repeat = args.repeat or (20 if args.overhead else 10 if device.type == "cpu" else 50)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    status = impl_status(device)
    tiles = []
    if args.triton_tiles:
        if not status["triton"][0]:
            return fail(f"--triton-tiles: Triton cannot run on {device.type} here: "
                        f"{status['triton'][1]}")
        from kernels.triton_pack import parse_tile
        try:
            tiles = [parse_tile(x, "--triton-tiles") for x in args.triton_tiles]
        except ValueError as exc:
            return fail(exc)
    impls = args.impl or [k for k in ("torch", "triton", "cuda") if status[k][0]
                          and not (k == "triton" and device.type == "cpu")]
    for k in ("torch", "triton", "cuda"):
        print(f"{k:<7}: {'available' if status[k][0] else 'unavailable'} ({status[k][1]})")
    for k in impls:
        if not status[k][0]:
            return fail(f"--impl {k}: cannot run here: {status[k][1]}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    how = "median" if device.type == "cuda" else "minimum"
    if args.overhead:
        print(f"device: {dev_name}; torch {torch.__version__}")
        overhead(args, device, impls, dtype)
        return 0
    print(f"device: {dev_name}; torch {torch.__version__}; timing: {how} of {args.repeat} "
          "round-robin rounds")
    cases = [bench_case(args, device, impls, h, b, skip, dtype, tiles)
             for h in args.hidden for b in args.batch for skip in args.skip]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "cases": cases}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
