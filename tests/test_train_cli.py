"""Bad input to the training command: one clear line, exit code 2, nothing overwritten."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sphinx.train.__main__ import main
from tests.files import read_only_dir, snapshot

REPO = Path(__file__).resolve().parents[1]


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if "Warning" not in line and not line.startswith("  ")]  # library import warnings
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_recipe(capsys):
    assert "choose one of" in _err(capsys, ["--recipe", "sphinx-huge"])


@pytest.mark.parametrize("argv,needle", [
    (["--tp", "3"], "tp"),
    (["--recipe", "debug-moe", "--ep", "3"], "ep"),
    (["--pp", "3"], "pp"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "--micro-batch-size"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
])
def test_parallel_sizes_that_do_not_divide(capsys, argv, needle):
    # checked before any process group exists: the layout is compared with the launcher's
    # world size (1 here) and with the model's heads, layers and experts
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


@pytest.mark.parametrize("argv,needle", [
    (["--vpp", "2"], "vpp 2 needs pipeline parallelism"),
    (["--vpp", "0"], "vpp must be a positive integer"),
    (["--pp", "2", "--vpp", "3"], "pp*vpp = 2*3 does not divide the 4 layers"),
    (["--pp", "2", "--vpp", "2", "--global-batch-size", "3"], "a multiple of pp 2"),
])
def test_interleaved_layouts_that_cannot_run(capsys, monkeypatch, argv, needle):
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


@pytest.mark.parametrize("argv,needle", [
    (["--vision-batch", "12"], "--vision-batch 12: give a multiple of 8"),
    (["--vision-batch", "-8"], "--vision-batch -8: give a multiple of 8"),
    (["--cuda-graph-vision"], "add --vision-batch N"),
] + ([] if torch.cuda.is_available() else [
    (["--vision-batch", "8", "--cuda-graph-vision"], "needs a GPU, and this machine has none"),
    (["--overlap-vision"], "second CUDA stream, and this machine has no GPU: drop it"),
    (["--vision-cudnn-benchmark"], "times cuDNN's convolutions, and this machine has no GPU"),
]))
def test_vision_batch_settings_that_cannot_run(capsys, argv, needle):
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


def test_cuda_graph_vision_without_a_gpu_is_refused():
    """The encoders' CUDA graphs and their second stream need a GPU: on a CPU the model build
    says what to change."""
    import torch

    from megatron_sphinx.train.build import build_model

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for CPUs")
    from megatron_sphinx.train.run_config import VisionRun

    with pytest.raises(ValueError, match="--cuda-graph-vision needs a GPU"):
        build_model(None, None, None, backend="local", dtype=torch.float32, on_gpu=False,
                    vision=VisionRun(batch=8, cuda_graphs=True))
    with pytest.raises(ValueError, match="--overlap-vision .* no GPU"):
        build_model(None, None, None, backend="local", dtype=torch.float32, on_gpu=False,
                    vision=VisionRun(overlap=True))
    with pytest.raises(ValueError, match="--vision-dwconv triton runs a GPU kernel"):
        build_model(None, None, None, backend="local", dtype=torch.float32, on_gpu=False,
                    vision=VisionRun(dwconv="triton"))
    with pytest.raises(ValueError, match="--vision-cudnn-benchmark times cuDNN's"):
        build_model(None, None, None, backend="local", dtype=torch.float32, on_gpu=False,
                    vision=VisionRun(cudnn_benchmark=True))
    with pytest.raises(ValueError, match="--vision-gelu fast: choose exact or tanh"):
        VisionRun(gelu="fast")
    with pytest.raises(ValueError, match="--vision-dwconv cudnn: choose torch or triton"):
        VisionRun(dwconv="cudnn")


def test_a_layout_that_does_not_fit_the_launch_is_printed_once(capsys, monkeypatch):
    """Every rank of a launch meets the same layout error: rank 0 prints it, the others stay
    quiet with the same exit code (a 64-GPU job printed it 64 times before)."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    printed = {}
    for rank in ("0", "3"):
        monkeypatch.setenv("RANK", rank)
        assert main(["--recipe", "debug", "--tp", "3"]) == 2
        printed[rank] = [line for line in capsys.readouterr().err.strip().splitlines()
                         if line.startswith("error: ")]
    assert printed["3"] == [], printed
    assert len(printed["0"]) == 1 and "world size 4 is not divisible by tp*pp" in printed["0"][0]


def test_tensorboard_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "tb").write_text("not a folder")
    assert "--tensorboard-dir" in _err(capsys, ["--tensorboard-dir", str(tmp_path / "tb")])
    assert (tmp_path / "tb").read_text() == "not a folder"


def test_load_of_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "no complete checkpoint" in _err(capsys, ["--load", str(tmp_path)])


def _fake_checkpoint(root: Path, recipe: str) -> Path:
    ckpt = root / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({
        "step": 2, "recipe": recipe, "layout": {}, "code_version": "x", "consumed": {}}))
    return root


def test_load_of_another_recipe(capsys, tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "moe", "debug-moe")
    assert "recipe 'debug-moe'" in _err(capsys, ["--recipe", "debug", "--load", str(ckpt)])


def test_save_onto_a_foreign_directory_is_refused_and_untouched(capsys, tmp_path):
    (tmp_path / "precious.bin").write_bytes(b"x" * 10)
    assert "not empty" in _err(capsys, ["--save", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.bin"]


def test_save_onto_a_run_of_another_recipe(capsys, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "debug-moe"}))
    assert "belongs to a run" in _err(capsys, ["--save", str(tmp_path)])


def test_command_line_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_sphinx.train", "--recipe", "nope"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown recipe 'nope'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("argv,needle", [
    (["--fp8"], "drop --fp8"),
    (["--fp8", "--backend", "local"], "drop --backend local"),
    # the shapes are checked first, on any machine (H100 run 5 met TE's assertion instead)
    (["--fp8", "--seq-length", "1400"], "got 1 x 1400 = 1400: use --seq-length 1408"),
])
def test_fp8_where_it_cannot_run(capsys, argv, needle):
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


def test_kernel_choices_logged_and_no_final_save(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_sphinx.train", "--recipe", "debug",
                           "--steps", "1", "--global-batch-size", "1", "--no-final-save",
                           "--vision-gelu", "tanh", "--save", str(tmp_path / "run")],
                          capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # --no-final-save: the step's metrics, no checkpoint
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list((tmp_path / "run").glob("iter_*"))
    lines = [line for line in proc.stderr.splitlines() if " INFO kernels: " in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    if not torch.cuda.is_available():
        assert lines[0].endswith(
            "kernels: layers local | attention sdpa | rope Megatron's per-sample loop | swiglu "
            "torch ops | loss Megatron's | wgrad cpu tensors (MEGATRON_SPHINX_WGRAD_FUSION=addmm "
            "forces it) | pack_tokens torch | images DALI cpu | vision per micro-batch, GELU "
            "exact (the tanh form is for GPUs) | adam torch AdamW, fused (one kernel) | "
            "communication gloo")


# ------------------------------------------------------------------ the command line, as a user
# Each case runs ``python -m megatron_sphinx.train`` in a fresh process and fails in the checks
# that come before Megatron is imported (run_config.check_run_inputs), so each takes well under
# a few seconds: exit code 2, exactly one line on stderr, and nothing on disk changed.

PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable


def _train(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "megatron_sphinx.train", *map(str, argv)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]



def _store(path: Path, samples: int, image_size: int = 448, grid: int = 2,
           complete: bool = True, fingerprint: str = "") -> Path:
    """A text-only store of ``samples`` samples (``complete=False``: as a killed run leaves)."""
    from megatron_sphinx.data import store
    from megatron_sphinx.data.layout import Sample

    meta = store.StoreMeta(image_size=image_size, grid=grid, seq_length=4096,
                           source_names=["text"], fingerprint=fingerprint)
    store.create_store(path, meta)
    if complete:
        writer = store.ShardWriter(path, 0, image_size, grid)
        for k in range(samples):
            ids = np.arange(1, 30, dtype=np.int32)
            writer.add(Sample(ids, ids > 10), None, (0, k))
        writer.close()
        store.write_index(path, meta)
    return path


def _checkpoint(save: Path, recipe: str = "debug", step: int = 2, consumed: dict | None = None,
                latest: bool = True) -> Path:
    """A save directory with one small but real torch_dist checkpoint folder (``.metadata``
    naming its shard) and the meta.json the trainer writes."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = save / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(4096.0)}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (ckpt / "meta.json").write_text(json.dumps({
        "step": step, "recipe": recipe, "layout": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
        "code_version": "x", "consumed": consumed or {"step": step}, "has_optimizer": True}))
    if latest:
        (save / "latest").write_text(ckpt.name)
    return ckpt


@pytest.mark.parametrize("argv,needle", [
    (["--seq-length", "0"], "--seq-length must be at least 2"),
    (["--global-batch-size", "0"], "--global-batch-size must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: give 0 or a positive learning rate"),
    (["--lr", "nan"], "--lr nan"),
    (["--save-interval", "-1"], "--save-interval must be at least 0"),
    (["--keep-last", "-1"], "--keep-last must be at least 0"),
    (["--log-interval", "0"], "--log-interval must be at least 1"),
    (["--exit-interval", "0"], "--exit-interval must be at least 1"),
    (["--exit-after-minutes", "-1"], "--exit-after-minutes -1.0"),
    (["--timeout-minutes", "0"], "--timeout-minutes 0.0"),
    (["--seed", "-1"], "--seed must be at least 0"),
    # debug's image takes 5 views x 259 positions: a shorter row holds no image sample at all
    (["--seq-length", "512"], "use a --seq-length above 1295"),
    (["--sp"], "raise --tp to 2 or more, or drop --sp"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "not a multiple of micro-batch 2"),
    (["--min-lr", "-1"], "--min-lr -1.0: give 0 or a positive number"),
    (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--clip-grad", "-0.5"], "--clip-grad -0.5"),
    (["--warmup-fraction", "1"], "--warmup-fraction 1.0: give a fraction of the steps in [0, 1)"),
    (["--min-lr", "0.5"], "--min-lr 0.5 is above the peak learning rate 0.002"),
    (["--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["--eval-interval", "-1", "--eval-data", "synthetic"], "--eval-interval must be at least 0"),
    (["--eval-interval", "5"], "--eval-interval 5 needs --eval-data"),
    (["--eval-data", " "], "--eval-data is empty"),
    (["--eval-only"], "--eval-only needs --eval-data"),
])
def test_numbers_out_of_range_name_their_flag(argv, needle):
    # before: tracebacks (--log-interval 0), a silent run (--save-interval -1, --keep-last -1,
    # --exit-interval 0, --seq-length 512 trained on empty rows), immediate requeue exits
    # (--exit-after-minutes -1), or a message after the model build, often without the flag
    # (--lr, --seed, gbs 0, --sp, gbs % mbs)
    _one_line(_train("--steps", "1", *argv), needle)


def test_bad_data_store_is_refused_before_the_model_is_built(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    _store(tmp_path / "empty.zarr", 0)
    _store(tmp_path / "big_images.zarr", 3, image_size=672, grid=3)
    before = snapshot(tmp_path)
    cases = [("nope.zarr", "does not exist"), ("file.txt", "not a megatron_sphinx store"),
             ("empty_dir", "not a megatron_sphinx store"), ("empty.zarr", "holds no samples"),
             ("big_images.zarr", "--image-size 448 --grid 2")]
    # one case as a user runs it (a process: no import warning may add a line), the rest in
    # this process (~2 s less each)
    _one_line(_train("--data", tmp_path / "nope.zarr", "--steps", "1"),
              f"--data {tmp_path / 'nope.zarr'}", "does not exist")
    for name, needle in cases:
        for argv, flag in ((["--data", tmp_path / name], "--data"),
                           (["--data", "synthetic", "--eval-data", tmp_path / name],
                            "--eval-data")):
            err = _err(capsys, [*map(str, argv), "--steps", "1"])
            assert f"{flag} {tmp_path / name}" in err and needle in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag,damage,needle", [
    ("--load", "missing_shard", "is missing shard __0_0.distcp"),
    ("--save", "truncated_shard", "shard __0_0.distcp is truncated"),
    ("--load", "bad_meta", "meta.json is unreadable"),
    ("--save", "bad_meta", "meta.json is unreadable"),
])
def test_damaged_checkpoint_is_refused_untouched(tmp_path, flag, damage, needle):
    """Before: a Megatron traceback after the model was built (shards), or a JSON message
    naming no file (meta.json); for --save the run would resume from the damaged folder."""
    ckpt = _checkpoint(tmp_path / "run")
    shard = ckpt / "__0_0.distcp"
    if damage == "missing_shard":
        shard.unlink()
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (ckpt / "meta.json").write_text("{bad")
    before = snapshot(tmp_path)
    _one_line(_train(flag, tmp_path / "run", "--data", "synthetic", "--steps", "3"), needle,
              str(ckpt))
    assert snapshot(tmp_path) == before


def test_checkpoint_of_another_recipe_in_save_is_refused_untouched(tmp_path):
    _checkpoint(tmp_path / "run", recipe="debug-moe")
    before = snapshot(tmp_path)
    _one_line(_train("--save", tmp_path / "run", "--data", "synthetic"),
              "recipe 'debug-moe'", "pass --recipe debug-moe or a new --save directory")
    assert snapshot(tmp_path) == before


def test_resume_with_other_batch_settings_is_refused_before_loading(tmp_path):
    """Before: the loader refused it only after building the model and loading the weights."""
    data = _store(tmp_path / "data.zarr", 4)
    consumed = {"version": 1, "step": 2, "num_samples": 4, "fingerprint": "",
                "global_batch_size": 2, "micro_batch_size": 1, "seq_length": 2048,
                "packing": True, "skip_padded": True}
    _checkpoint(tmp_path / "run", consumed=consumed)
    before = snapshot(tmp_path)
    _one_line(_train("--save", tmp_path / "run", "--data", data, "--global-batch-size", "4"),
              "was trained with --global-batch-size 2", "pass --global-batch-size 2")
    assert snapshot(tmp_path) == before


def test_resume_on_another_store_of_the_same_size_is_refused_before_loading(tmp_path):
    """The sample count matches, the store's fingerprint does not (before: refused only by the
    loader, after the model was built and loaded)."""
    from megatron_sphinx.data import store

    data = _store(tmp_path / "data.zarr", 4, fingerprint="this-store")
    consumed = {"version": 1, "step": 2, "num_samples": 4, "fingerprint": "other-store",
                "global_batch_size": 2, "micro_batch_size": 1, "seq_length": 2048,
                "packing": True, "skip_padded": True}
    _checkpoint(tmp_path / "run", consumed=consumed)
    assert store.read_meta(data)[0].fingerprint == "this-store"
    before = snapshot(tmp_path)
    _one_line(_train("--save", tmp_path / "run", "--data", data, "--global-batch-size", "2",
                     "--seq-length", "2048"),
              "saved over other data", "resume with the same store and --eval-split")
    assert snapshot(tmp_path) == before


def test_save_and_load_paths_that_cannot_work(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{bad")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    _one_line(_train("--save", tmp_path / "file.txt" / "run"), "is a file, not a directory")
    _one_line(_train("--save", run), "its run.json is unreadable", "pass a new directory")
    _one_line(_train("--load", tmp_path / "nope"), "--load", "does not exist")
    _one_line(_train("--load", tmp_path / "file.txt"), "holds no complete checkpoint")
    assert snapshot(tmp_path) == before


def test_save_where_nothing_can_be_written():
    target = read_only_dir() / "megatron_sphinx_run"
    # before: a PermissionError traceback once the model was built
    _one_line(_train("--save", target), "cannot write in /sys", "choose a writable location")


def test_only_the_first_rank_reports_an_argument_error():
    """Before: every rank of a torchrun / srun launch printed the same line."""
    proc = _train("--steps", "0", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert proc.returncode == 2 and proc.stderr.strip() == "", proc.stderr[-2000:]
    _one_line(_train("--steps", "0", env={"RANK": "0", "WORLD_SIZE": "2"}), "--steps")


# ------------------------------------------ backend choice and the logged kernel choices (audit)

@pytest.mark.parametrize("te,requested,chosen", [
    (True, "auto", "te"), (False, "auto", "local"), (True, "te", "te"), (True, "local", "local"),
    (False, "local", "local"),
])
def test_backend_choice(monkeypatch, te, requested, chosen):
    from megatron_sphinx.model import specs

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: te)
    assert specs.choose_backend(requested) == chosen


@pytest.mark.parametrize("te,requested,needle", [
    (False, "te", "use --backend local"), (True, "tex", "choose auto, te or local"),
    (False, "tex", "choose auto, te or local"),
])
def test_backend_choice_refusals(monkeypatch, te, requested, needle):
    from megatron_sphinx.model import specs

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: te)
    with pytest.raises(ValueError, match=needle):
        specs.choose_backend(requested)


@pytest.mark.parametrize("capability,dtype,needle", [
    ((8, 0), torch.bfloat16, "A100 is 8.0: drop --fp8"),
    ((8, 6), torch.bfloat16, "A100 is 8.6: drop --fp8"),
    ((9, 0), torch.float16, "use --dtype bf16"),
    ((9, 0), torch.bfloat16, None),
    ((8, 9), torch.bfloat16, None),
])
def test_fp8_needs_compute_capability_8_9_and_bf16(monkeypatch, capability, dtype, needle):
    """The GPU side of the FP8 check, with a faked device (the CPU refusal is tested above)."""
    from megatron_sphinx.model import specs

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "A100")
    if needle is None:
        specs.check_fp8("auto", dtype)
    else:
        with pytest.raises(ValueError, match=needle):
            specs.check_fp8("te", dtype)


@pytest.mark.parametrize("seq,mbs,tp,sp,needle", [
    (1408, 1, 1, False, None),
    (1400, 2, 1, False, None),  # 2800 tokens
    (1400, 1, 1, False, "= 1400: use --seq-length 1408"),
    (1400, 1, 2, True, "1 x 1400 / 2 = 700: use --seq-length 1408"),
    (2056, 2, 4, True, "2 x 2056 / 4 = 1028: use --seq-length 2080"),
    (1408, 1, 2, False, "MLP width per tensor-parallel rank is 88 at --tp 2"),
])
def test_fp8_needs_aligned_gemms(seq, mbs, tp, sp, needle):
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.model.specs import check_fp8_shapes

    llm = get_recipe("debug").llm  # hidden 64, MLP 176, 4 heads of 16, 2 query groups
    if needle is None:
        check_fp8_shapes(llm, seq, mbs, tp, sp)
    else:
        with pytest.raises(ValueError, match=re.escape(needle)):
            check_fp8_shapes(llm, seq, mbs, tp, sp)
    for recipe in ("sphinx-tiny", "sphinx-intern2", "sphinx-plus", "sphinx-moe"):
        check_fp8_shapes(get_recipe(recipe).llm, 4096, 1, 8, True)  # every width at TP 8


@pytest.mark.parametrize("recipe,padded", [("debug-moe", True), ("debug", False)])
def test_fp8_pads_each_experts_tokens(monkeypatch, recipe, padded):
    """FP8 grouped GEMMs need each expert's token count aligned: Megatron's router pads them."""
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.model import llm as llm_lib

    monkeypatch.setattr(llm_lib, "TransformerConfig", lambda **kw: kw)
    kw = llm_lib.transformer_config(get_recipe(recipe).llm, llm_lib.ParallelSizes(),
                                    dtype=torch.bfloat16, on_gpu=True, backend="te", fp8=True)
    assert kw["fp8"] == "hybrid"
    assert kw.get("moe_router_padding_for_quantization", False) is padded


def test_kernel_choices_name_te_layers_and_fp8(monkeypatch):
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.build import kernel_choices

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    cpu = torch.device("cpu")
    te = kernel_choices(get_recipe("debug"), backend="te", dtype=torch.bfloat16, device=cpu,
                        fp8=True, images="gpu")
    assert (te["layers"], te["attention"], te["images"], te["communication"]) == (
        "te fp8", "Transformer Engine fused THD", "DALI gpu", "nccl")
    local = kernel_choices(get_recipe("debug"), backend="local", dtype=torch.float32, device=cpu)
    assert local["layers"] == "local" and local["attention"] != te["attention"]
    assert local["images"] == "none decoded (synthetic data)"
    assert (te["rope"], local["rope"]) == ("Transformer Engine fused", "Megatron's per-sample loop")


def test_fused_kernel_choices_are_checked_at_start_up(monkeypatch, rope_env, caplog):
    """On GPUs the RoPE and SwiGLU kernels run where their start-up check passes (``auto``);
    a failed check falls back to the torch ops with the reason, or fails the start-up when
    ``triton`` was asked for; ``torch`` skips the check; a bad value says what to choose."""
    from kernels import fused_layers
    from megatron_sphinx.train.build import rope_choice, swiglu_choice

    gpu, bf16 = torch.device("cuda"), torch.bfloat16  # the checks are faked: no GPU is touched
    checks = []
    monkeypatch.setattr(fused_layers, "self_check", lambda op, d, dt: checks.append(op) or "")
    rope_env("auto")
    assert rope_choice("local", gpu, bf16) == (
        "one gather, tables kept, triton fused (passed its start-up check)")
    assert swiglu_choice(gpu, bf16) == "triton fused (passed its start-up check)"
    assert checks == ["rope", "swiglu"]
    assert rope_choice("local", gpu, bf16).endswith("(passed its start-up check)")
    assert checks == ["rope", "swiglu"]  # kept: checked once per op and dtype
    monkeypatch.setattr(fused_layers, "self_check", lambda op, d, dt: "forward differs by 1")
    rope_env("auto")  # settings re-read: chosen anew
    with caplog.at_level("WARNING", logger="kernels.fused_layers"):
        assert rope_choice("local", gpu, bf16) == (
            "one gather, tables kept, torch ops (the kernel failed its start-up check: forward "
            "differs by 1)")
    assert "MEGATRON_SPHINX_ROPE=torch hides this warning" in caplog.text
    assert swiglu_choice(gpu, bf16).startswith("Megatron's, eager (the kernel failed")
    rope_env("triton")
    with pytest.raises(RuntimeError, match="failed its start-up check on cuda.*forward differs "
                       "by 1; unset MEGATRON_SPHINX_ROPE"):
        rope_choice("local", gpu, bf16)
    rope_env("torch")
    assert rope_choice("local", gpu, bf16) == (
        "one gather, tables kept, torch ops (MEGATRON_SPHINX_ROPE=torch)")
    assert rope_choice("local", torch.device("cpu"), bf16) == "Megatron's per-sample loop"
    assert rope_choice("te", gpu, bf16) == "Transformer Engine fused"
    rope_env("triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails
    with pytest.raises(ValueError, match="triton does not import here .*: unset it"):
        rope_choice("local", gpu, bf16)
    with pytest.raises(ValueError, match="choose auto, torch or triton"):
        rope_env("fast")
    with pytest.raises(ValueError, match="choose auto, torch or triton"):
        rope_choice("te", gpu, bf16)


# ------------------------------------------- evaluation and schedule checks (mutation audit)
# In-process calls of the checks themselves (a regression there must not start a run here).

def _check(**kw) -> None:
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.run_config import RunConfig, check_run_inputs

    rc = RunConfig(**{"recipe": "debug", **kw})
    check_run_inputs(rc, get_recipe(rc.recipe))


@pytest.mark.parametrize("kw,needle", [
    (dict(eval_data="synthetic", eval_split=0.1), "give --eval-data (another store) or "
                                                  "--eval-split (a part of --data), not both"),
    (dict(eval_split=1.5), "--eval-split 1.5: give a fraction between 0 and 1"),
    (dict(eval_split=0.0), "--eval-split 0.0: give a fraction"),
    (dict(eval_split=float("nan")), "--eval-split nan: give a fraction"),
    (dict(data="synthetic", eval_split=0.1), "with --data synthetic use --eval-data synthetic"),
    (dict(lr=1e-5, min_lr=1e-4), "--min-lr 0.0001 is above the peak learning rate 1e-05"),
])
def test_evaluation_and_schedule_combinations_that_cannot_work(kw, needle):
    with pytest.raises(ValueError) as info:
        _check(**kw)
    assert needle in str(info.value)


def test_min_lr_equal_to_lr_is_a_constant_rate():
    _check(lr=1e-4, min_lr=1e-4)  # "not above the peak": equal is allowed
    _check(min_lr=0.002)  # the recipe's peak


def test_a_split_must_leave_samples_on_both_sides_of_the_store(tmp_path):
    store = _store(tmp_path / "two.zarr", 2)
    for fraction, n_out in ((0.99, 2), (0.01, 0)):
        with pytest.raises(ValueError, match=f"--eval-split {fraction} holds out {n_out} of the "
                                             "2 samples: choose a fraction"):
            _check(data=str(store), eval_split=fraction)


def _split_run(tmp_path: Path) -> tuple[str, str]:
    """A 40-sample store and a run that trained 2 steps on its part outside --eval-split 0.2."""
    from megatron_sphinx.data.split import held_out

    store = str(_store(tmp_path / "data.zarr", 40))
    consumed = {"version": 1, "step": 2, "num_samples": 40 - int(held_out(40, 0.2).sum()),
                "fingerprint": "", "global_batch_size": 2, "micro_batch_size": 1,
                "seq_length": 2048, "packing": True, "skip_padded": True}
    _checkpoint(tmp_path / "run", consumed=consumed)
    return store, str(tmp_path / "run")


def test_a_split_run_passes_the_checks_with_its_split_and_eval_only_with_any_batch(tmp_path):
    """The up-front check counts the training part of a split store (a resume with the same
    split must pass it); --eval-only reads the weights only, so other batch settings do too."""
    store, save = _split_run(tmp_path)
    _check(data=store, save=save, eval_split=0.2)
    with pytest.raises(ValueError, match="resume with the same store and --eval-split"):
        _check(data=store, save=save)
    with pytest.raises(ValueError, match="was trained with --global-batch-size 2"):
        _check(data=store, save=save, eval_split=0.2, global_batch_size=4)
    _check(data=store, save=save, eval_split=0.2, global_batch_size=4, eval_only=True)


def test_command_line_defaults_are_the_run_config_defaults():
    import dataclasses

    from megatron_sphinx.train.__main__ import parse_args
    from megatron_sphinx.train.run_config import RunConfig

    assert dataclasses.asdict(parse_args([])) == dataclasses.asdict(RunConfig())
    off = parse_args(["--no-overlap-grad-reduce", "--no-overlap-param-gather", "--eval-data",
                      "synthetic", "--eval-only",
                      "--weight-decay", "0.1", "--clip-grad", "0.5", "--min-lr", "1e-5",
                      "--warmup-fraction", "0.1", "--eval-batches", "3"])
    assert (off.overlap_grad_reduce, off.overlap_param_gather, off.eval_only, off.weight_decay,
            off.clip_grad, off.min_lr, off.warmup_fraction,
            off.eval_batches) == (False, False, True, 0.1, 0.5, 1e-5, 0.1, 3)


def test_compile_fusions_is_opt_in(capsys, monkeypatch):
    """torch.compile'd fusions are off unless --compile-fusions: the variable torch reads at
    import is set before the heavy imports, also when the arguments are then refused."""
    from megatron_sphinx.train.__main__ import parse_args

    assert parse_args([]).compile_fusions is False
    assert parse_args(["--compile-fusions"]).compile_fusions is True
    vb = parse_args(["--vision-batch", "32", "--cuda-graph-vision"])
    assert (vb.vision_batch, vb.cuda_graph_vision, vb.overlap_vision) == (32, True, False)
    assert parse_args(["--overlap-vision"]).overlap_vision is True
    assert (parse_args([]).vision_gelu, parse_args(["--vision-gelu", "tanh"]).vision.gelu) == (
        "exact", "tanh")
    assert (parse_args([]).vision.dwconv,
            parse_args(["--vision-dwconv", "triton"]).vision.dwconv) == ("torch", "triton")
    assert (parse_args([]).vision.cudnn_benchmark,
            parse_args(["--vision-cudnn-benchmark"]).vision.cudnn_benchmark) == (False, True)
    assert (parse_args([]).adam, parse_args(["--adam", "foreach"]).adam) == ("fused", "foreach")
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    assert main(["--recipe", "nope"]) == 2
    assert os.environ["TORCH_COMPILE_DISABLE"] == "1"
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # e.g. exported by scripts/demo.sh
    assert main(["--recipe", "nope", "--compile-fusions"]) == 2
    assert os.environ["TORCH_COMPILE_DISABLE"] == "0"
    assert "unknown recipe" in capsys.readouterr().err


@pytest.mark.parametrize("disabled", ["1", "0"])
def test_torch_compile_skipped_where_compiling_is_off(disabled):
    """With TORCH_COMPILE_DISABLE=1 (the default) torch.compile hands back what it is given,
    so Megatron's import-time fusion decorations no longer import Inductor's compiler (~1.5 s
    of every start-up); with compiling on (--compile-fusions) torch.compile is untouched."""
    code = ("import sys, torch\n"
            "real = torch.compile\n"
            "from megatron_sphinx.cli import quiet_import_notices\n"
            "quiet_import_notices(); quiet_import_notices()\n"
            "import megatron.core.transformer.transformer_config\n"
            "g = lambda x: x + 1\n"
            "print(torch.compile is real, torch.compile(g) is g,\n"
            "      torch.compile(mode='max-autotune')(g) is g,\n"
            "      'torch._inductor.compile_fx' in sys.modules)\n")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "TORCH_COMPILE_DISABLE": disabled})
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = "False True True False" if disabled == "1" else "True False False True"
    assert proc.stdout.split()[-4:] == want.split(), proc.stdout


def test_vision_line_says_when_one_hardware_queue_serialises_the_streams(monkeypatch):
    """--overlap-vision's start-up line warns where CUDA_DEVICE_MAX_CONNECTIONS=1 (as Megatron
    wants for tensor parallelism, slurm/common.sh sets by default) keeps the streams apart;
    --vision-gelu tanh says where it takes effect."""
    from megatron_sphinx.train.run_config import VisionRun

    overlap = VisionRun(batch=32, cuda_graphs=True, overlap=True)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    assert "one hardware queue: unset it, or set 8" in overlap.describe(on_gpu=True)
    for value in ("8", None):
        if value is None:
            monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
        else:
            monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", value)
        assert overlap.describe(on_gpu=True) == ("step's views in calls of 32, CUDA graphs, one "
                                                 "micro-batch ahead on a second CUDA stream")
    assert VisionRun().describe(on_gpu=True) == "per micro-batch"
    assert VisionRun(gelu="tanh").describe(on_gpu=True) == (
        "per micro-batch, GELU in tanh form in the GEMM epilogue")
    assert VisionRun(gelu="tanh").describe(on_gpu=False) == (
        "per micro-batch, GELU exact (the tanh form is for GPUs)")
    assert VisionRun(batch=32, cudnn_benchmark=True).describe(on_gpu=True) == (
        "step's views in calls of 32, cuDNN convolutions timed per shape (benchmark)")
    assert VisionRun(dwconv="triton").describe(on_gpu=True) == (
        "per micro-batch, depthwise convolution + norm one Triton kernel")
