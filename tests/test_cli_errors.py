"""Bad input to the tools: one line naming what to change, exit code 2, nothing lost.

Each case runs a tool in a fresh process with the venv's python, as a user would, and fails in
the checks that come before any heavy import or model build (a few run one real but tiny
preprocessing). Where files exist beforehand, they are compared byte for byte afterwards.
The training command's own cases are in ``tests/test_train_cli.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.files import read_only_dir, snapshot, unreadable_mix

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable


def _tool(name: str, *argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(TOOLS / name), *map(str, argv)], capture_output=True,
                          text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one ``error:`` line on stderr (after the tool's own log
    lines, if it got as far as logging), holding every needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]





# ---------------------------------------------------------------------- preprocess_data.py

def _text_mix(folder: Path, records: int = 3) -> Path:
    """A one-source sharegpt mix of ``records`` short dialogs."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": k, "data": [f"What is {k} + {k}?", f"It is {2 * k}."]})
             for k in range(records)]
    (folder / "text.jsonl").write_text("".join(line + "\n" for line in lines))
    (folder / "mix.yaml").write_text(
        "sources:\n  - {name: text, format: sharegpt, path: text.jsonl}\n")
    return folder / "mix.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """The project's offline tokenizer, built once (each run would build it otherwise)."""
    from megatron_sphinx.data.tokenizer import build_project_tokenizer

    return Path(build_project_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))



@pytest.mark.parametrize("extra,needle", [
    (["--grid", "0"], "--grid 0 does not fit --image-size 448"),          # was a traceback
    (["--image-size", "-448"], "--image-size -448"),                      # was a store
    (["--image-size", "300"], "give a multiple of 224"),                  # was an unusable store
    (["--seq-length", "1000"], "use a --seq-length above 1295"),          # dropped every image
    (["--log-level", "LOUD"], "--log-level LOUD"),                        # was a traceback
])
def test_preprocess_settings(tmp_path, extra, needle):
    mix = _text_mix(tmp_path / "mix")
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", tmp_path / "s.zarr", *extra),
              needle)
    assert not (tmp_path / "s.zarr").exists()


def test_preprocess_paths(tmp_path):
    mix = _text_mix(tmp_path / "mix")
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "s.zarr"
    # --summary-json under a file: was a traceback after the whole store had been written
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", out, "--summary-json",
                    tmp_path / "file.txt" / "s.json"), "is a file, not a directory")
    _one_line(_tool("preprocess_data.py", "--mix", tmp_path / "mix", "--out", out),
              "--mix", "is a directory")
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", read_only_dir() / "s.zarr"),
              "cannot write in /sys")
    assert not out.exists() and (tmp_path / "file.txt").read_text() == "x"


def test_preprocess_yaml_error_is_one_line(tmp_path):
    mix = _text_mix(tmp_path / "mix")
    mix.write_text("sources:\n  - {name: t, format: sharegpt, path: text.jsonl\n")
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", tmp_path / "s.zarr"),
              "is not valid YAML", "fix the file")  # was several lines
    assert not (tmp_path / "s.zarr").exists()


def test_preprocess_failure_removes_only_what_it_began(tmp_path, tokenizer):
    """An unreadable annotation file: before, the run left an incomplete store behind."""
    mix = unreadable_mix(tmp_path / "mix")
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", tmp_path / "s.zarr",
                    "--tokenizer", tokenizer, "--no-progress"),
              "is not valid JSON", "was removed")
    assert not (tmp_path / "s.zarr").exists()
    (tmp_path / "mine").mkdir()  # an empty directory the user made stays, empty
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", tmp_path / "mine",
                    "--tokenizer", tokenizer, "--no-progress"), "is not valid JSON")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_preprocess_overwrite_keeps_the_old_store_when_the_new_one_fails(tmp_path, tokenizer):
    """Before: --overwrite deleted the old store first, so a failed rebuild lost it."""
    from megatron_sphinx.data import store

    out = tmp_path / "s.zarr"
    meta = store.StoreMeta(image_size=448, grid=2, seq_length=4096, source_names=["old"])
    store.create_store(out, meta)
    store.ShardWriter(out, 0, 448, 2).close()
    store.write_index(out, meta)
    before = snapshot(tmp_path)
    bad = unreadable_mix(tmp_path / "bad")
    _one_line(_tool("preprocess_data.py", "--mix", bad, "--out", out, "--overwrite",
                    "--tokenizer", tokenizer, "--no-progress"),
              "is not valid JSON", "previous store at --out was kept")
    empty = _text_mix(tmp_path / "empty", records=0)
    _one_line(_tool("preprocess_data.py", "--mix", empty, "--out", out, "--overwrite",
                    "--tokenizer", tokenizer, "--no-progress"),
              "no record", "previous store at --out was kept")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("s.zarr")} == \
        {k: v for k, v in before.items() if k.startswith("s.zarr")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing set aside


def test_preprocess_without_any_sample_keeps_no_store(tmp_path, tokenizer):
    """Before: exit 0 and a store of 0 samples (which a rerun then called up to date)."""
    mix = _text_mix(tmp_path / "mix", records=0)
    _one_line(_tool("preprocess_data.py", "--mix", mix, "--out", tmp_path / "s.zarr",
                    "--tokenizer", tokenizer, "--no-progress"), "no record of --mix",
              "fix the mix")
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------------- convert_to_hf.py

def _fake_run(save: Path, recipe: str = "debug") -> Path:
    """A save directory whose checkpoint folder has a meta.json (enough for the checks that
    come before any weight is read)."""
    ckpt = save / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "recipe": recipe, "layout": {},
                                                "code_version": "x", "consumed": {}}))
    (save / "latest").write_text(ckpt.name)
    (save / "metrics.jsonl").write_text('{"step": 1}\n')
    return save


def test_to_hf_never_replaces_its_source_or_foreign_files(tmp_path):
    """Before: --out RUN --overwrite replaced the training run it was exporting."""
    run = _fake_run(tmp_path / "run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    _one_line(_tool("convert_to_hf.py", "--load", run, "--out", run, "--overwrite"),
              "is or holds the --load source")
    _one_line(_tool("convert_to_hf.py", "--load", run / "iter_0000002", "--out", run,
                    "--overwrite"), "is or holds the --load source")
    _one_line(_tool("convert_to_hf.py", "--load", run, "--out", tmp_path / "notes",
                    "--overwrite"), "no conversion.json", "choose a new directory")
    assert snapshot(tmp_path) == before


def test_to_hf_arguments(tmp_path):
    run = _fake_run(tmp_path / "run")
    # was accepted: one safetensors file per tensor
    _one_line(_tool("convert_to_hf.py", "--load", run, "--out", tmp_path / "hf",
                    "--max-shard-gb", "0"), "--max-shard-gb 0.0")
    _one_line(_tool("convert_to_hf.py", "--load", tmp_path / "nope", "--out", tmp_path / "hf"),
              "--load", "does not exist")
    _one_line(_tool("convert_to_hf.py", "--load", run, "--out", tmp_path / "hf",
                    "--tokenizer", tmp_path / "nope"), "--tokenizer", "does not exist")
    assert not (tmp_path / "hf").exists()


# -------------------------------------------------------------------- convert_from_hf.py

def _debug_llama(folder: Path) -> Path:
    """A config.json of the debug recipe's LLM as a LLaMA checkpoint (no weights needed for the
    checks under test)."""
    from megatron_sphinx.config import get_recipe

    llm = get_recipe("debug").llm
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": llm.num_layers, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_query_groups, "vocab_size": llm.vocab_size,
        "rope_theta": llm.rope_base, "rms_norm_eps": llm.norm_eps, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings}))
    (folder / "model.safetensors").write_bytes(b"not read by these checks")
    (folder / "conversion.json").write_text("{}")  # even an earlier export is not replaced
    return folder


def test_from_hf_never_replaces_its_source(tmp_path):
    """Before: --out HF --overwrite replaced the Hugging Face directory being converted."""
    hf = _debug_llama(tmp_path / "hf")
    before = snapshot(tmp_path)
    _one_line(_tool("convert_from_hf.py", "--hf", hf, "--recipe", "debug", "--out", hf,
                    "--overwrite", "--random-encoders"), "is or holds the --hf source")
    # a directory given for a weights file: the message said it did not exist
    _one_line(_tool("convert_from_hf.py", "--hf", hf, "--recipe", "debug", "--out",
                    tmp_path / "ck", "--clip-convnext", tmp_path), "is a directory")
    assert snapshot(tmp_path) == before


def test_from_hf_unreadable_weights_are_one_line(tmp_path):
    """Before: safetensors / unpickling tracebacks. These files are read after the model is built
    (encoders) or after minutes of reading (LLM), so the library readers are called directly;
    the tool prints their ValueError as its one line."""
    import torch
    from safetensors.torch import save_file

    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.model.hf_io import CheckpointError, read_tensor_file
    from megatron_sphinx.model.vision import FrozenEncoder

    whole = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(256)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:60])
    junk = tmp_path / "clip.bin"
    junk.write_bytes(b"garbage")
    for bad in (cut, junk):
        with pytest.raises(CheckpointError, match=f"{bad} cannot be read as weights") as err:
            read_tensor_file(bad)
        assert "\n" not in str(err.value) and "copy it again" in str(err.value)
    encoder = FrozenEncoder(get_recipe("debug").vision.encoders[0])
    with pytest.raises(ValueError, match="cannot be read as weights"):
        encoder.load_pretrained(str(junk))


# ---------------------------------------------------------------- the other tools

def test_init_checkpoint(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    # was a NotADirectoryError traceback, after the heavy imports
    _one_line(_tool("init_checkpoint.py", "--out", tmp_path / "file.txt"), "is a file")
    _one_line(_tool("init_checkpoint.py", "--out", tmp_path / "ck", "--seed", "-1"), "--seed -1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("extra,needle", [
    (["--max-tp", "0"], "--max-tp 0"),   # said "no layout fits: add GPUs"
    (["--top", "-1"], "--top -1"),       # silently dropped the last row
])
def test_plan_layout_arguments(tmp_path, extra, needle):
    _one_line(_tool("plan_layout.py", "--recipe", "debug", "--gpus", "2", "--gpu-mem-gib", "1",
                    *extra), needle)


def test_plan_layout_json_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    # was a FileExistsError traceback after the whole plan had been computed
    _one_line(_tool("plan_layout.py", "--recipe", "debug", "--gpus", "2", "--gpu-mem-gib", "1",
                    "--json", tmp_path / "file.txt" / "plan.json"), "is a file, not a directory")
    assert (tmp_path / "file.txt").read_text() == "x"


@pytest.mark.parametrize("extra,needle", [
    (["--seq-length", "0"], "--seq-length must be at least 2"),   # was a reshape traceback
    (["--json", "{tmp}/file.txt/p.json"], "is a file, not a directory"),  # traceback at the end
])
def test_profile_throughput_arguments(tmp_path, extra, needle):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in extra]
    if "--json" not in argv:
        argv += ["--json", str(tmp_path / "p.json")]
    _one_line(_tool("profile_throughput.py", "--steps", "1", *argv), needle)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "1"], "--steps 1: give more than --warmup (1) steps"),  # statistics traceback
    (["--steps", "4", "--warmup", "-1"], "--warmup -1: give 0 or more steps"),
    (["--steps", "2", "--stepz", "3"], "unrecognized arguments: --stepz 3"),  # torchrun trace
    (["--steps", "2", "--seq-length", "100"], "use a --seq-length above 1295"),
])
def test_bench_train_checks_before_launching(extra, needle):
    _one_line(_tool("bench_train.py", "--layouts", "tp1", *extra), needle)


def test_bench_data_checks_before_measuring(tmp_path):
    # was a traceback, after the image benchmark had run for a minute
    _one_line(_tool("bench_data.py", "--store", tmp_path / "nope.zarr"), "--store",
              "does not exist")


def test_bench_preprocess_keeps_a_foreign_workdir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.json").write_text("precious")
    before = snapshot(tmp_path)
    # its data/ and store*.zarr used to be overwritten / deleted
    _one_line(_tool("bench_preprocess.py", "--workdir", tmp_path), "holds other files")
    assert snapshot(tmp_path) == before


# ------------------------------------------------ shared helpers of megatron_sphinx.cli (audit)

_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                   "SLURM_PROCID")


@pytest.mark.parametrize("environ,rank", [
    ({}, 0),
    ({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0"}, 3),
    ({"RANK": "3", "SLURM_PROCID": "0"}, 0),  # a stray RANK is not a torchrun launch
    ({"OMPI_COMM_WORLD_RANK": "2", "SLURM_PROCID": "0"}, 2),  # mpiexec inside sbatch
    ({"PMI_RANK": "5", "SLURM_PROCID": "0"}, 5),
    ({"PMIX_RANK": "4"}, 4),
    ({"SLURM_PROCID": "7"}, 7),
    ({"RANK": "", "SLURM_PROCID": "1"}, 1),
])
def test_launch_rank_follows_the_launcher_order(monkeypatch, environ, rank):
    from megatron_sphinx.cli import launch_rank

    for name in _RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert launch_rank() == rank


def test_output_file_that_is_a_directory_is_refused(tmp_path):
    from megatron_sphinx.cli import UsageError, check_output_file

    with pytest.raises(UsageError, match="is a directory: give a file path"):
        check_output_file(tmp_path, "--out")
    check_output_file(tmp_path / "new.json", "--out")  # a new file in a writable folder is fine
    assert list(tmp_path.iterdir()) == []


def test_one_line_folds_every_kind_of_whitespace():
    from megatron_sphinx.cli import one_line

    assert one_line("bad value\n\tat line 3:  key  \r\n") == "bad value at line 3: key"


# ---------------------------------------------------------------------- argument errors

ENTRY_POINTS = ["megatron_sphinx/train/__main__.py", "megatron_sphinx/data/sample_data.py",
                *sorted(f"tools/{p.name}" for p in TOOLS.glob("*.py")  # scripts, not helpers
                        if 'if __name__ == "__main__"' in p.read_text())]


def _run_main(path: str, monkeypatch, argv: list[str]) -> int:
    """Runs the entry point's ``main(argv)`` in this process; its exit code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"entry_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_argument_errors_are_one_line_on_rank_0(path, capsys, monkeypatch):
    """argparse's own errors (an unknown flag, a missing or mistyped value) take the project's
    one-line form, pointing at --help, instead of argparse's usage block; other ranks stay
    quiet."""
    for name in _RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    code = _run_main(path, monkeypatch, ["--no-such-flag"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    if path != "tools/bench_train.py":  # passes unknown flags on to the training command
        assert lines[0].endswith(" --help)"), lines
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _run_main(path, monkeypatch, ["--no-such-flag"]) == 2
        assert capsys.readouterr().err == ""
