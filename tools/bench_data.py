"""Benchmark of the data path: image decode + transform, the loader, and packing efficiency.

Prints three tables:

1. **images/s** and **CPU ms per image**: DALI (``ImageProcessor``, CPU here, ``mixed`` on a GPU)
   against Pillow at the same thread count, in the same run, on the test photos (rounds
   interleaved, so other load hits every pipeline alike): the exact Pillow reference
   (``reference_views``, float resampling) and a plain uint8 Pillow pipeline doing the same work
   (decode, EXIF, bicubic resize, pad, global view, tiles, float CHW) -- the fair speed baseline.
2. **loader**: steps/s, micro-batches/s, samples/s and images/s of ``PackedLoader`` on one rank,
   against what a training step consumes (``--step-seconds``: the model's step time; the loader
   keeps up when its time per step is below it).
3. **packing efficiency** (real tokens / all positions): ours (fixed rows of ``seq_length``),
   best-fit decreasing alone, ours with trimmed micro-batches (``pad_to_multiple=64``,
   micro-batch 1), offline best-fit decreasing over the same samples at once, and the reference
   approach (each sample padded
   to the longest of its length-bucketed batch, batch 4 and 16; and every sample padded to
   ``seq_length``), for the synthetic paper-like mix and, with ``--store``, a preprocessed store
   drawn through its mix weights.

Examples::

    python tools/bench_data.py --quick
    python tools/bench_data.py --store STORE.zarr --threads 2 --step-seconds 0.5
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import queue
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from megatron_sphinx.config import CLIP_MEAN  # noqa: E402
from megatron_sphinx.data.geometry import image_geometry  # noqa: E402
from megatron_sphinx.data.images import (ImageConfig, ImageProcessor, probe_image,  # noqa: E402
                                         reference_views)
from megatron_sphinx.data.layout import Sample  # noqa: E402
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader  # noqa: E402
from megatron_sphinx.data.mix import BlendedMix  # noqa: E402
from megatron_sphinx.data.sample_source import InMemorySource  # noqa: E402
from megatron_sphinx.data.packing import (PackingConfig, offline_efficiency,  # noqa: E402
                                          padded_efficiency,
                                          simulate_packing, synthetic_paper_lengths,
                                          trimmed_efficiency)

IMAGES = Path(os.environ.get("MEGATRON_SPHINX_TESTDATA", "")
              or Path(__file__).resolve().parents[2] / "shared" / "testdata" / "images")


def pillow_plain_views(data: bytes, image_size: int = 448, grid: int = 2,
                       interp: str = "cubic") -> np.ndarray:
    """The usual uint8 Pillow pipeline for the same views (speed baseline, not pixel-exact)."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    geo = image_geometry(im.height, im.width, image_size, grid)
    flt = Image.BICUBIC if interp == "cubic" else Image.BILINEAR
    resized = im.resize((geo.resized_width, geo.resized_height), flt)
    pad = tuple(int(round(c * 255)) for c in CLIP_MEAN)
    square = Image.new("RGB", (image_size, image_size), pad)
    square.paste(resized, (0, 0))
    v = image_size // grid
    glob = np.asarray(square.resize((v, v), flt), dtype=np.float32) / 255.0
    sq = np.asarray(square, dtype=np.float32) / 255.0
    views = [glob.transpose(2, 0, 1)]
    for t, ok in enumerate(geo.view_valid()[1:]):
        if ok:
            r, c = divmod(t, grid)
            views.append(sq[r * v:(r + 1) * v, c * v:(c + 1) * v].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(views))


def bench_images(datas: list[bytes], threads: int, batch: int, seconds: float,
                 interp: str = "cubic", workers: int = 2,
                 settings: bool | None = None) -> list[tuple]:
    """images/s per pipeline: rounds of one pass over ``datas`` each, in batches of ``batch``,
    interleaved so that load from other processes hits all pipelines alike; reports the best and
    the median round. ``settings``: also the rows of the pipeline with one setting changed each
    (None: where DALI decodes on the GPU)."""
    def config(**kw) -> ImageConfig:
        return ImageConfig(**{"num_threads": threads, "max_batch_size": batch, "interp": interp,
                              **kw})

    def batches(xs, size=batch):
        return [xs[a:a + size] for a in range(0, len(xs), size)]

    proc, ahead = ImageProcessor(config()), ImageProcessor(config())
    pool = ThreadPoolExecutor(threads)
    # As the loader runs it: a batch (a step) per worker thread, each with its own processor
    # and its share of the DALI threads, so one's views are cut while another decodes.
    workers = max(1, min(workers, threads))
    per_worker = threads // workers  # DALI threads of each worker's processor
    free: queue.Queue = queue.Queue()
    procs = [ImageProcessor(config(num_threads=per_worker)) for _ in range(workers)]
    for p in procs:
        free.put(p)

    def on_a_worker(xs):
        p = free.get()
        try:
            return p(xs)
        finally:
            free.put(p)

    dev = proc.device
    wpool = ThreadPoolExecutor(workers)
    fns = {f"DALI {dev} {workers}x{per_worker} workers": lambda xs: list(
               wpool.map(on_a_worker, batches(xs))),
           f"DALI {dev} 1x{threads} threads": lambda xs: [proc(b) for b in batches(xs)],
           # the same processor with the next batch decoded while this one's views are cut
           f"DALI {dev} 1x{threads} ahead": lambda xs: list(ahead.map(batches(xs)))}
    dali_procs = dict(zip(fns, (procs, [proc], [ahead])))
    # DALI's part of a call: the header probes and DALI's runs, no views cut (not a pipeline:
    # left out of the goal, tools/gpu_summary.py)
    alone = ImageProcessor(config())
    fns[f"DALI {dev} 1x{threads} runs only"] = lambda xs: [
        list(alone._decode(alone._start(b), keep=False)) for b in batches(xs)]
    settings = dev == "gpu" if settings is None else settings
    if settings:  # the pipeline with one setting changed each
        for label, setting in (
                ("nvJPEG upsample", {"fancy_upsampling": False}),  # nvJPEG's own chroma
                ("hw decoder 1.0", {"hw_decoder_load": 1.0}),  # every JPEG to the JPEG engines
                ("uint8 resize", {"float_resize": False}),  # rounded as on the CPU
                (f"batch {2 * batch}", {"max_batch_size": 2 * batch})):  # half the runs
            other = ImageProcessor(config(**setting))
            name = f"DALI {dev} 1x{threads} {label}"
            size = other.cfg.max_batch_size
            fns[name] = lambda xs, other=other, size=size: [other(b) for b in batches(xs, size)]
            dali_procs[name] = [other]
    fns.update({"Pillow plain uint8": lambda xs: list(pool.map(
                    lambda d: pillow_plain_views(d, interp=interp), xs)),
                "Pillow reference (exact)": lambda xs: list(pool.map(
                    lambda d: reference_views(d, interp=interp), xs))})
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rates: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(datas[:2 * batch])  # warm up (DALI builds its pipeline)
    t_end = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < t_end or min(len(r) for r in rates.values()) < 3:
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn(datas)
            sync()  # the GPU's views are made asynchronously
            rates[name].append(len(datas) / (time.perf_counter() - t0))
            cpu[name].append((time.process_time() - c0) / len(datas) * 1e3)
    pool.shutdown()
    wpool.shutdown()
    first = next(iter(rates))
    ref = np.asarray(rates["Pillow reference (exact)"])
    # vs ref: median over rounds of (this pipeline's rate / the reference's rate in the same
    # round): robust to load that comes and goes between rounds.
    return [(name, max(r), float(np.median(r)), max(rates[first]) / max(r),
             float(np.median(np.asarray(r) / ref)), float(np.median(cpu[name])),
             dali_share(dali_procs.get(name, [])))
            for name, r in rates.items()]


def probe_us(datas: list[bytes], repeat: int = 20) -> tuple[float, float]:
    """Microseconds per image of the header probe every batch runs first, on the calling
    thread: as the loader runs it (JPEG headers read directly), and through Pillow."""
    from megatron_sphinx.data.images import _probe_with_pillow, probe_image

    out = []
    for probe in (probe_image, _probe_with_pillow):
        t0 = time.perf_counter()
        for _ in range(repeat):
            for d in datas:
                probe(d)
        out.append((time.perf_counter() - t0) / (repeat * len(datas)) * 1e6)
    return out[0], out[1]


def dali_share(procs: list[ImageProcessor]) -> str:
    """The share of images that DALI decoded (the rest took the Pillow path: DALI failing, or
    a GPU pipeline that fell back to the CPU), e.g. ``100%`` or ``0% (dali_error 96)``."""
    if not procs:
        return "-"
    stats = sum((p.stats for p in procs), Counter())
    total = sum(v for k, v in stats.items() if k == "dali" or k.startswith("pillow:"))
    other = ", ".join(f"{k} {v}" for k, v in sorted(stats.items())
                      if k != "dali" and not k.startswith("pillow:alpha") and v)
    share = f"{100.0 * stats['dali'] / max(total, 1):.0f}%"
    return f"{share} ({other})" if other else share


def photo_source(datas: list[bytes], n: int, seed: int = 0) -> InMemorySource:
    """``n`` dialogs (60% with one of ``datas``) with text lengths like the paper mix's."""
    rng = np.random.default_rng(seed)
    hws = [probe_image(d).hw for d in datas]
    samples, images = [], []
    for i in range(n):
        has = rng.random() < 0.9
        t = int(rng.integers(40, 300)) if has else int(rng.lognormal(np.log(700), 0.9)) + 40
        ids = rng.integers(3, 32000, min(t, 6000)).astype(np.int32)
        ids[0] = 1
        mask = np.zeros(len(ids), bool)
        mask[len(ids) // 2:] = True
        k = int(rng.integers(len(datas)))
        samples.append(Sample(ids, mask, hws[k] if has else None, 1, i % 3))
        images.append(datas[k] if has else None)
    return InMemorySource(samples, images, 448, 2)


def bench_loader(source, cfg: LoaderConfig, seconds: float) -> dict:
    ld = PackedLoader(source, cfg)
    ld.next_step()  # start threads, build DALI
    steps, t0 = 0, time.perf_counter()
    first = dict(ld.stats)
    while time.perf_counter() - t0 < seconds:
        ld.next_step()
        steps += 1
    dt = time.perf_counter() - t0
    ld.close()
    d = {k: ld.stats.get(k, 0) - first.get(k, 0) for k in ("samples", "micro_batches")}
    imgs = sum(v for k, v in ld.stats.items() if k.startswith("decode:")) - sum(
        v for k, v in first.items() if k.startswith("decode:"))
    return {"steps_s": steps / dt, "mb_s": d["micro_batches"] / dt, "samples_s": d["samples"] / dt,
            "images_s": imgs / dt, "s_per_step": dt / steps, "efficiency": ld.packing_efficiency()}


def mix_lengths(lengths, source_ids, weights, names, n, seed=0) -> np.ndarray:
    """Lengths of the first ``n`` samples of the blended order (the samples training sees)."""
    mix = BlendedMix(source_ids, weights, seed, names=names)
    return np.asarray(lengths)[mix.take(n)]


def packing_rows(name: str, stream: np.ndarray, seq: int, rows: int, steps: int) -> dict:
    cfg = PackingConfig(seq, rows, 1, lookahead=2.0)
    res = simulate_packing(stream, cfg, steps)
    bfd = simulate_packing(stream, PackingConfig(seq, rows, 1, lookahead=2.0, algorithm="bfd"),
                           steps)
    return {"mix": name, "seq": seq, "ours": res["efficiency"], "bfd": bfd["efficiency"],
            "trim64": trimmed_efficiency(res["row_tokens"], 1, 64, seq),
            "ceiling": offline_efficiency(stream[:20000], seq),
            "pad_b4": padded_efficiency(stream, 4, seq),
            "pad_b16": padded_efficiency(stream, 16, seq),
            "pad_seq": float(np.minimum(stream, seq).sum()) / (len(stream) * seq)}


def check_args(args: argparse.Namespace) -> None:
    """Every setting and path, before the first (long) measurement.

    Raises:
        ValueError: One line saying what to change.
    """
    from megatron_sphinx.cli import check_input_file, check_output_file, check_store

    if args.json:
        check_output_file(args.json, "--json")
    for name in ("threads", "batch", "global_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (load in the calling thread) or more")
    if args.seq_length < 2:
        raise ValueError(f"--seq-length {args.seq_length}: give at least 2")
    for name in ("seconds", "step_seconds"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive number")
    if args.mix and not args.store:
        raise ValueError("--mix gives the weights of --store's sources: pass --store too")
    if args.store:
        check_store(args.store, "--store")
    if args.mix:
        check_input_file(args.mix, "--mix", "mix YAML file")


def main(argv=None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="decode threads (DALI and Pillow)")
    p.add_argument("--batch", type=int, default=32, help="images per DALI run")
    p.add_argument("--interp", nargs="+", default=["cubic", "linear"],
                   choices=["cubic", "linear"], help="resampling kernels to measure")
    p.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    p.add_argument("--store", help="a preprocessed store: loader and packing on its samples")
    p.add_argument("--mix", help="its mix YAML (weights); default: the one recorded in the store")
    p.add_argument("--global-batch-size", type=int, default=8, help="loader rows per step")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2, help="loader worker threads")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="training step time to compare the loader with")
    p.add_argument("--quick", action="store_true", help="short measurements")
    p.add_argument("--images-only", action="store_true",
                   help="only the images table (no loader, no packing)")
    p.add_argument("--json", default=None,
                   help="also write the images table's rows here (when it is done)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from megatron_sphinx.cli import fail

    try:
        check_args(args)
    except ValueError as exc:
        return fail(exc)
    secs = 1.5 if args.quick else args.seconds
    photos = sorted(IMAGES.glob("*.jpg"))
    if not photos:
        return fail(f"no test photos under {IMAGES}: run from the project checkout or set "
                    "MEGATRON_SPHINX_TESTDATA")
    # whole batches per round (H100 run 5's rounds of 258 ended with a call of 2 images, which
    # paid a pipeline run's fixed cost for them), four at least (the rows that overlap batches
    # need some to overlap), the photos in turn
    count = -(-max(8 * len(photos), 4 * args.batch) // args.batch) * args.batch
    encoded = [f.read_bytes() for f in photos]
    datas = [encoded[i % len(encoded)] for i in range(count)]

    print(f"## images: decode + resize 448 + pad + views, {args.threads} threads, "
          f"{len(photos)} photos, {count} per round in batches of {args.batch} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'pipeline':30s} {'interp':>6s} {'best/s':>8s} {'median/s':>8s} {'DALI x':>7s} "
          f"{'vs ref':>6s} {'CPU ms/img':>10s} by DALI")
    rows = []
    for interp in args.interp:
        for name, best, med, ratio, vs_ref, cpu_ms, share in bench_images(
                datas, args.threads, args.batch, secs, interp, max(1, args.workers)):
            print(f"{name:30s} {interp:>6s} {best:8.1f} {med:8.1f} {ratio:7.2f} {vs_ref:6.2f} "
                  f"{cpu_ms:10.2f} {share}")
            rows.append({"pipeline": name, "interp": interp, "best_per_s": best,
                         "median_per_s": med, "cpu_ms_per_image": cpu_ms, "by_dali": share})
    direct_us, pillow_us = probe_us(encoded)
    if args.json:
        from tools.bench_common import device_label

        Path(args.json).write_text(json.dumps({"device": device_label(), "threads": args.threads,
                                               "batch": args.batch, "rows": rows,
                                               "probe_us": direct_us,
                                               "probe_pillow_us": pillow_us}, indent=1))
    print("(images/s: best and median of interleaved rounds; DALI x: the first row's best over "
          "this row's best;\n vs ref: median over rounds of this row's rate over the exact "
          "reference's in the same round;\n CPU ms/img: process CPU time per image, all threads,"
          " median round: robust to other load;\n by DALI: share of the images DALI decoded, the "
          "rest by the Pillow path (the RGBA-free photos: all, if DALI works); runs only: the "
          "header probes and DALI's runs of the same batches, no views cut)")
    print(f"header probe per image (every batch's first step, on one thread): {direct_us:.1f} us "
          f"(JPEG headers read directly; through Pillow {pillow_us:.1f} us)")
    if args.images_only:
        return 0

    reader = None
    if args.store:
        from megatron_sphinx.data.store import StoreReader

        reader = StoreReader(args.store)
    src = reader if reader is not None else photo_source([f.read_bytes() for f in photos], 400)
    weights = None
    if reader is not None:
        mix_path = args.mix or reader.meta.extra.get("mix")
        if mix_path and Path(mix_path).is_file():
            from megatron_sphinx.data.mixfile import load_mix

            m = load_mix(mix_path, check_files=False)
            weights = dict(zip(m.names, m.weights))
    cfg = LoaderConfig(seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                       num_workers=args.workers, image_threads=args.threads, weights=weights)
    r = bench_loader(src, cfg, secs * 2)
    print(f"\n## loader: one rank, global batch {cfg.global_batch_size} x {cfg.seq_length}, "
          f"{args.workers} workers, source {'store ' + args.store if reader else 'test photos'}")
    print(f"{'steps/s':>8s} {'s/step':>7s} {'mb/s':>7s} {'samples/s':>9s} {'images/s':>8s} "
          f"{'pack eff':>8s}")
    print(f"{r['steps_s']:8.2f} {r['s_per_step']:7.3f} {r['mb_s']:7.2f} {r['samples_s']:9.1f} "
          f"{r['images_s']:8.1f} {r['efficiency']:8.4f}")
    if args.step_seconds:
        verdict = "keeps up" if r["s_per_step"] <= args.step_seconds else "is the bottleneck"
        print(f"training step {args.step_seconds:.3f} s: loader needs {r['s_per_step']:.3f} s per "
              f"step ({args.step_seconds / r['s_per_step']:.1f}x headroom): the loader {verdict}")

    print("\n## packing efficiency (real tokens / all positions)")
    table = []
    paper, _ = synthetic_paper_lengths(40000 if not args.quick else 15000, seed=0)
    steps = 20 if args.quick else 60
    for seq in (2048, 4096, 8192):
        table.append(packing_rows("synthetic paper", paper, seq, 64, steps))
    if reader is not None:
        stream = mix_lengths(reader.lengths, reader.source_ids, weights, reader.source_names,
                             40000)
        for seq in (2048, 4096, 8192):
            table.append(packing_rows("store " + Path(args.store).name, stream, seq, 64, steps))
    print(f"{'mix':22s} {'seq':>5s} {'ours':>7s} {'bfd':>7s} {'trim64':>7s} {'BFD all':>7s} "
          f"{'pad b4':>7s} {'pad b16':>7s} {'pad seq':>7s}")
    for t in table:
        print(f"{t['mix']:22s} {t['seq']:5d} {t['ours']:7.4f} {t['bfd']:7.4f} {t['trim64']:7.4f} "
              f"{t['ceiling']:7.4f} {t['pad_b4']:7.4f} {t['pad_b16']:7.4f} {t['pad_seq']:7.4f}")
    print("ours: the loader's packer (algorithm best); bfd: best-fit decreasing alone; trim64: ours "
          "with each micro-batch\n(1 row) padded only to a multiple of 64; BFD all: best-fit "
          "decreasing over the first 20k samples at once;\npad b4/b16: reference approach, each "
          "sample padded to the longest of its length-bucketed batch of 4/16;\npad seq: every "
          "sample padded to seq_length")
    return 0


if __name__ == "__main__":
    sys.exit(main())
