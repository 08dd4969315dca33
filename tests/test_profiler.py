"""The throughput profiler: its step breakdown arithmetic and a real 2-step CPU run of ``debug``."""
from __future__ import annotations

import gzip
import importlib.util
import json
import time
from pathlib import Path

import pytest

from megatron_sphinx.config import get_recipe
from megatron_sphinx.train.flops import encoder_flops_per_view, llm_linear_params
from megatron_sphinx.train.profiler import PARTS, StepRecorder
from tests.dist_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("profile_throughput",
                                                  ROOT / "tools" / "profile_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recorder_parts_are_exclusive_and_nested_comm_counts_once():
    rec = StepRecorder(on_gpu=False)
    rec.begin_step()
    with rec.in_phase("data"):
        time.sleep(0.01)
    with rec.in_phase("schedule"):
        with rec.span("vision"):
            time.sleep(0.01)
        with rec.comm("all_reduce"):
            with rec.comm("all_gather_into_tensor"):  # nested inside another call
                time.sleep(0.005)
        time.sleep(0.01)
    with rec.in_phase("optimizer"):
        with rec.comm("reduce_scatter_tensor"):
            time.sleep(0.002)
        time.sleep(0.005)
    with rec.span("other"):
        time.sleep(0.002)
    spans = list(rec._spans)
    b = rec.end_step()
    assert sum(s.kind == "comm" for s in spans) == 2  # the nested call is not a second span
    assert rec.comm_calls == {"all_reduce": 1, "all_gather_into_tensor": 1,
                              "reduce_scatter_tensor": 1}
    dur = {}
    for s in spans:
        dur.setdefault((s.kind, s.phase), 0.0)
        dur[(s.kind, s.phase)] += s.end - s.start
    sched = dur[("phase:schedule", "schedule")]
    assert b["llm_fwd_bwd"] == pytest.approx(
        sched - dur[("vision", "schedule")] - dur[("comm", "schedule")])
    assert b["optimizer"] == pytest.approx(dur[("phase:optimizer", "optimizer")]
                                           - dur[("comm", "optimizer")])
    assert b["communication"] == pytest.approx(dur[("comm", "schedule")]
                                               + dur[("comm", "optimizer")])
    assert all(b[p] >= 0 for p in PARTS)
    assert sum(b[p] for p in PARTS) + b["unaccounted"] == pytest.approx(b["step_time"])
    assert 0 <= b["unaccounted"] < 0.1 * b["step_time"]


def _profile(rank, world_size, argv):
    return _tool().main(argv)


VARIANT_KEYS = {"name", "packing", "skip_padded_views", "steps", "step_time_s", "tokens_per_step",
                "allocator", "peak_reserved_bytes",
                "samples_per_step", "tokens_per_s", "tokens_per_s_per_gpu", "samples_per_s",
                "tflops_per_gpu", "mfu", "flops_per_step", "packing_efficiency",
                "views_per_step", "skipped_sub_images_per_step", "visual_tokens_saved_per_step",
                "llm_positions_saved_per_step", "peak_memory_bytes", "breakdown_s",
                "breakdown_fraction", "breakdown_by_rank_s", "breakdown_steps_s", "losses"}


def test_two_step_compare_run_of_debug(tmp_path):
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    argv = ["--recipe", "debug", "--steps", "2", "--warmup", "0", "--global-batch-size", "2",
            "--compare", "--peak-tflops", "0.5", "--json", str(out), "--plot", str(png)]
    assert run_ranks(_profile, 1, argv, timeout=240) == [0]
    report = json.loads(out.read_text())
    assert {"recipe", "machine", "layout", "settings", "parts", "variants", "comm_calls",
            "notes"} <= set(report)
    assert report["machine"]["cpu"] and report["machine"]["cpu_count"] >= 1
    assert report["settings"]["data"] == "stream" and report["layout"]["world_size"] == 1
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["baseline", "no-packing", "no-skip", "no-packing+no-skip"]
    cfg = get_recipe("debug")
    enc = sum(encoder_flops_per_view(e) for e in cfg.vision.encoders)
    for v in variants.values():
        assert VARIANT_KEYS <= set(v), VARIANT_KEYS - set(v)
        assert v["steps"] == 2 and len(v["breakdown_steps_s"]) == 2
        for step in v["breakdown_steps_s"]:  # the parts cover the measured step time
            parts = sum(step[p] for p in PARTS)
            assert abs(parts - step["step_time"]) <= 0.1 * step["step_time"], step
        b = v["breakdown_s"]
        assert b["llm_fwd_bwd"] > 0 and b["vision_encode"] > 0 and b["pack_kernel"] > 0
        assert b["optimizer"] > 0 and b["communication"] > 0
        assert v["tokens_per_s"] > 0 and v["tflops_per_gpu"] > 0
        assert v["mfu"] == pytest.approx(v["tflops_per_gpu"] / 0.5)
        # FLOPs are flops.py's: 6 N tokens for the LLM, frozen encoders forward only.
        f = v["flops_per_step"]
        assert f["llm"] == pytest.approx(6 * llm_linear_params(cfg.llm) * v["tokens_per_step"])
        assert f["encoders"] == pytest.approx(enc * v["views_per_step"])
        assert v["peak_memory_bytes"] > 0 and all(loss > 1.0 for loss in v["losses"])
    base = variants["baseline"]
    # One padded sample per sequence: the rows hold one sample each and more padding.
    assert variants["no-packing"]["samples_per_step"] == 2
    assert variants["no-packing"]["packing_efficiency"] < base["packing_efficiency"]
    # Skip tokens: with skipping on, padded sub-images were skipped (in these first steps the
    # packer places the long, unskipped image samples first, so check the unpacked rows too);
    # --no-skip encoded them all.
    skipped = variants["no-packing"]["skipped_sub_images_per_step"]
    assert skipped > 0
    assert variants["no-packing"]["visual_tokens_saved_per_step"] == 257 * skipped
    for name in ("no-skip", "no-packing+no-skip"):
        assert variants[name]["skipped_sub_images_per_step"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _tool().format_table(report).splitlines()
    assert sum(line.split()[0] in variants for line in table[2:]) == 4


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope", "--steps", "1"], "unknown recipe"),
    (["--steps", "0"], "--steps"),
    (["--compare", "--no-skip"], "--compare"),
    (["--data", "/nonexistent/store.zarr"], "--data"),
    (["--trace", "/tmp/step.json.gz"], "give --kernels FILE too"),
    (["--kernels", "/tmp/k.txt", "--trace", "/tmp/step.txt"], "name a .json or .json.gz"),
])
def test_bad_input_one_line_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert _tool().main(argv + ["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


def _profile_then_train(rank, world_size, out, kernels):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    rc = _tool().main(["--recipe", "debug", "--data", "synthetic", "--steps", "2", "--warmup", "0",
                       "--global-batch-size", "2", "--json", out, "--kernels", kernels,
                       "--trace", kernels + ".json.gz"])
    results = run(RunConfig(recipe="debug", data="synthetic", steps=2, global_batch_size=2))
    return rc, [r.loss for r in results]


def test_profiled_steps_are_the_training_commands_steps(tmp_path):
    """Same seed, data and schedule: the instrumented steps give the training command's losses
    (the ``--kernels`` step under torch.profiler comes after them and is not counted)."""
    out, kernels = tmp_path / "p.json", tmp_path / "kernels.txt"
    rc, train_losses = run_ranks(_profile_then_train, 1, str(out), str(kernels), timeout=240)[0]
    assert rc == 0
    report = json.loads(out.read_text())
    variant = report["variants"][0]
    assert variant["name"] == "baseline" and report["settings"]["data"] == "synthetic"
    assert variant["losses"] == pytest.approx(train_losses, rel=1e-6, abs=0)
    assert len(variant["step_times_s"]) == 2
    # The kernel profile: per category, then the top operators; the shares add up to the total.
    text = kernels.read_text().splitlines()
    assert text[0].startswith("one profiled step, CPU operators (self time):")
    total = float(text[0].split(":")[1].split()[0])
    rows = text[3:text.index("", 3)]
    cats = {r.split()[0]: float(r.split()[1]) for r in rows}
    assert {"matmul", "attention", "convolution", "other"} <= set(cats), cats
    assert sum(cats.values()) == pytest.approx(total, rel=1e-3, abs=0.3)
    top = text[text.index("", 3) + 2:]
    assert len(top) >= 10 and any("aten::mm" in r or "aten::addmm" in r for r in top)
    # The same step's timeline, a gzip-compressed Chrome trace.
    trace = json.loads(gzip.decompress((tmp_path / "kernels.txt.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>",
     "other"),
])
def test_kernel_categories_of_real_kernel_names(name, category):
    from megatron_sphinx.train.profiler import kernel_category

    assert kernel_category(name) == category


def _tiny_store(path):
    from tests.stores import write_source_store
    from tests.test_loader_switches import make_source

    src = make_source(n=16, seed=5)
    write_source_store(path, src, ["0", "1"])
    return src


def test_store_variants_use_the_loaders_own_switches(tmp_path):
    """--data STORE with --no-packing / --no-skip: the training command's store loader, switched."""
    from megatron_sphinx.data.loader import PackedLoader
    from megatron_sphinx.train.loop import resolve_recipe

    path = tmp_path / "s.zarr"
    _tiny_store(path)
    tool = _tool()
    args = tool.parse_args(["--data", str(path), "--global-batch-size", "2", "--json",
                            str(tmp_path / "p.json")])
    tool._check_args(args)
    cfg = resolve_recipe(tool._run_config(args))
    got = {}
    for name, (packing, skip) in tool.VARIANTS.items():
        loader = tool._build_loader(args, cfg, packing, skip, 0, 1)
        try:
            assert isinstance(loader, PackedLoader)
            assert (loader.cfg.packing, loader.cfg.skip_padded) == (packing, skip)
            micro = [pb for _ in range(2) for pb in loader.next_step()]
        finally:
            loader.close()
        images = sum(len(pb.view_counts) for pb in micro)
        assert images > 0
        got[name] = (sum(pb.num_samples for pb in micro), sum(pb.num_skipped for pb in micro))
        if not packing:
            assert all(pb.num_samples == 1 for pb in micro)
        for pb in micro:
            assert pb.views.shape[0] == int(pb.view_counts.sum())
            if not skip:  # every sub-image encoded (the store's images are all wide)
                assert pb.num_skipped == 0 and pb.view_counts.tolist() == [5] * len(pb.view_counts)
            else:
                assert pb.num_skipped == 2 * len(pb.view_counts)
    assert got["baseline"][0] > got["no-packing"][0] == 4


def test_coalescing_context_handle_wait_is_timed_and_placeholders_pass_through():
    """DDP keeps the handle of an overlapped reduce-scatter's coalescing context and waits on
    it after the backward: that wait is communication. torch's placeholder (_IllegalWork,
    every attribute raises) is passed through unwrapped."""
    import contextlib

    from megatron_sphinx.train.profiler import _timed_context

    class Handle:
        waited = 0

        def wait(self):
            Handle.waited += 1
            return True

    class _IllegalWork:
        def __getattr__(self, name):
            raise RuntimeError("illegal")

    def manager(handle):
        @contextlib.contextmanager
        def coalescing(*a, **k):
            yield handle
        return coalescing

    rec = StepRecorder(on_gpu=False)
    rec.begin_step()
    with _timed_context(manager(Handle()), rec, "coalesced")() as cm:
        pass
    assert cm.wait() is True and Handle.waited == 1
    assert rec.comm_calls == {"coalesced": 1, "coalesced.wait": 1}
    placeholder = _IllegalWork()
    with _timed_context(manager(placeholder), rec, "coalesced")() as cm:
        pass
    assert cm is placeholder
    rec.end_step()


def test_kernel_report_on_a_gpu_profile():
    """The GPU form of the report, from events shaped as torch.profiler's key averages are:
    device kernels per category, the busy share of the step, the host's CUDA runtime calls."""
    from types import SimpleNamespace

    import torch

    from megatron_sphinx.train.profiler import kernel_report

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(key, device, self_us=0.0, cpu_us=0.0, count=1, annotation=False):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=self_us,
                               cpu_time_total=cpu_us, self_cpu_time_total=cpu_us, count=count,
                               is_user_annotation=annotation)

    events = [ev("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", cuda, 600e3, count=400),
              ev("void pytorch_flash::flash_fwd_kernel<...>", cuda, 100e3, count=20),
              ev("void at::native::vectorized_elementwise_kernel<8, GeluCUDAKernelImpl>", cuda,
                 300e3, count=900),
              ev("aten::mm", cpu, cpu_us=50e3, count=400),  # host op: not a kernel
              # a record_function range on the GPU: its kernels are counted themselves
              ev("Optimizer.step#AdamW.step", cuda, 30e3, annotation=True),
              ev("cudaLaunchKernel", cpu, cpu_us=80e3, count=20000),
              ev("cudaStreamSynchronize", cpu, cpu_us=250e3, count=3)]
    text = kernel_report(SimpleNamespace(key_averages=lambda: events), on_gpu=True,
                         wall_s=2.0).splitlines()
    assert text[0] == ("one profiled step, device kernels: 1000.0 ms in all (step wall time "
                       "2000.0 ms; the GPU was busy 50% of it)")
    cats = {r.split()[0]: float(r.split()[1]) for r in text[3:text.index("", 3)]}
    assert cats == {"matmul": 600.0, "other": 300.0, "attention": 100.0}
    i = text.index("host CUDA runtime calls (CPU time):")
    j = text.index("host operators (self CPU time: where the host itself spends the step):")
    runtime, ops = text[i + 2:j - 1], text[j + 2:]
    assert [r.split()[-1] for r in runtime] == ["cudaStreamSynchronize", "cudaLaunchKernel"]
    assert runtime[0].split()[:2] == ["250.00", "3"]
    assert [r.split() for r in ops] == [["50.00", "400", "aten::mm"]]
