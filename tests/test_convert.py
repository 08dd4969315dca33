"""Checkpoint conversion tools: HF -> Megatron (sharded layouts) -> HF, logits parity, bad input.

CPU, fp32, tiny random ``transformers`` models shaped like the ``debug`` / ``debug-moe`` recipes'
LLMs. The pipeline per architecture (module fixtures):

1. ``tools/convert_from_hf.py`` (one forked process) writes a weights-only checkpoint;
2. four forked ranks load it at TP2 x PP2 (dense) or EP2 x PP2 (MoE) with the trainer's own
   ``build_model`` / ``load_checkpoint``, compute logits of a text and an image sample, and save
   the model again from that layout;
3. ``tools/convert_to_hf.py`` (one forked process) exports the re-saved checkpoint.

The export must be bit-exact to the HF input, plain ``transformers`` must load it, and both the
HF LLM and the exported SPHINX-X model must reproduce the Megatron logits.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_sphinx.config import get_recipe
from megatron_sphinx.data.images import reference_views
from megatron_sphinx.data.layout import Sample, build_packed_batch
from megatron_sphinx.model import hf_mapping as hm
from megatron_sphinx.model.hf_sphinx import (MULTIMODAL_WEIGHTS, SphinxXConfig,
                                             SphinxXForConditionalGeneration)
from megatron_sphinx.model.sphinx import SphinxModel  # noqa: F401  (imported here once:
from megatron_sphinx.train import build, loop  # noqa: F401  forked ranks inherit the imports)
from tests.dist_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import convert_from_hf as from_hf  # noqa: E402
import convert_to_hf as to_hf  # noqa: E402

LAYOUTS = {"debug": {"tp": 2, "pp": 2, "ep": 1}, "debug-moe": {"tp": 1, "pp": 2, "ep": 2}}
TEXT_IDS = [1, 17, 230, 45, 9, 301, 77, 4, 120, 33, 2, 88]  # BOS first
IMAGE_HW = (120, 360)  # wide: the lower row of sub-images is padding -> two skip tokens
TOL = 1e-4


def _image_bytes() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> tuple[Sample, Sample, torch.Tensor]:
    ids = np.asarray(TEXT_IDS, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    views, hw = reference_views(_image_bytes())
    assert hw == IMAGE_HW and views.shape[0] == 3  # global + 2 valid sub-images (2 skipped)
    return Sample(ids, mask), Sample(ids, mask, image_hw=hw), torch.from_numpy(views)


def _make_hf_dir(recipe: str, out: Path) -> None:
    """A tiny random HF LLM of the recipe's LLM shape, with a small BPE tokenizer."""
    from megatron_sphinx.data.tokenizer import train_bpe

    llm = get_recipe(recipe).llm
    torch.manual_seed(0)
    config = hm.hf_config_from_llm(llm, bos_token_id=1, eos_token_id=2)
    cls = transformers.MixtralForCausalLM if llm.is_moe else transformers.LlamaForCausalLM
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1 in HF: perturb them so a swapped norm shows
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):  # well-separated router logits, no top-k ties
                p.normal_(0.0, 0.5, generator=gen)
    model.save_pretrained(out)
    tok = train_bpe(["A chat between a curious human and an assistant. ### Human: what is "
                     "in the image? ### Assistant: a cat on a mat."] * 4, 512)
    tok.save_pretrained(out)


# ------------------------------------------------------------------------- forked workers


def _cpu_only() -> None:
    """These tests check the CPU path (also on GPU machines): tell the rank CUDA is absent."""
    torch.cuda.is_available = lambda: False


def _from_hf_worker(rank, world_size, argv):
    _cpu_only()
    from_hf.convert(from_hf.parse_args(argv))


def _to_hf_worker(rank, world_size, load, out, tokenizer):
    _cpu_only()
    to_hf.convert(load, out, tokenizer=tokenizer)


def _logits(chunks, pgs, batches, seq):
    """Full-vocabulary logits ``[1, s, V]`` per batch on the last stage (None elsewhere)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sphinx.train.build import unwrap

    def step(data_iterator, chunk):
        batch = next(data_iterator)
        m = unwrap(chunk)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens,
                                 cu_seqlens_kv=batch.cu_seqlens, max_seqlen_q=batch.max_seqlen,
                                 max_seqlen_kv=batch.max_seqlen)
        out = m.language_model(input_ids=None, position_ids=None, attention_mask=None,
                               decoder_input=m.embed(batch) if m.pre_process else None,
                               labels=None, packed_seq_params=packed)

        def gather(output):  # [1, s, V / tp] -> [1, s, V]
            parts = [torch.empty_like(output) for _ in range(pgs.tp.size())]
            torch.distributed.all_gather(parts, output.contiguous(), group=pgs.tp)
            return output.sum() * 0, torch.tensor(1), {"logits": torch.cat(parts, -1).clone()}
        return out, gather

    fwd = get_forward_backward_func(pp_size=pgs.pp.size())
    out = fwd(forward_step_func=step, data_iterator=iter(batches), model=chunks,
              num_microbatches=len(batches), seq_length=seq, micro_batch_size=1,
              forward_only=True)
    last = pgs.pp.rank() == pgs.pp.size() - 1
    return [o["logits"] for o in out] if last else None


def _layout_worker(rank, world_size, recipe, dims, ckpt_in, ckpt_out):
    """Loads ``ckpt_in`` at ``dims`` like the trainer, returns logits + multimodal, re-saves."""
    _cpu_only()
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.distributed import init_distributed
    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.parallel_dims import ParallelDims
    from megatron_sphinx.train import checkpoint as ckpt_lib
    from megatron_sphinx.train.build import build_model, unwrap

    groups = init_distributed(ParallelDims(world_size=world_size, **dims), timeout_s=120)
    pgs = groups.collection
    cfg = get_recipe(recipe)
    text, image, views = _samples()
    seq = image.length(cfg.vision.image_size, cfg.vision.grid)
    batches = [build_packed_batch([[s]], seq, cfg.vision.image_size, cfg.vision.grid, v)
               for s, v in ((text, None), (image, views))]
    with cpu_compat.cpu_device_mode():
        chunks = build_model(cfg, ParallelSizes(dims["tp"], dims["pp"], dims["ep"]), pgs,
                             backend="local", dtype=torch.float32, on_gpu=False)
    with cpu_compat.cpu_device_mode(), torch.no_grad():
        ckpt_lib.load_checkpoint(ckpt_lib.resolve_load(ckpt_in), chunks, None, None, pgs)
        logits = _logits(chunks, pgs, batches, seq)
        model = unwrap(chunks[0])
        multimodal = None
        if model.pre_process and pgs.tp.rank() == 0:
            multimodal = {k: v.clone() for k, v in model.state_dict().items()
                          if not k.startswith("language_model.") and torch.is_tensor(v)}
        meta = ckpt_lib.CheckpointMeta(step=0, recipe=cfg.name,
                                       layout=dict(dims, dp=groups.dims.dp),
                                       code_version="test", consumed={}, has_optimizer=False)
        ckpt_lib.save_checkpoint(ckpt_out, 0, chunks, None, None, pgs, meta=meta, common={})
    return logits, multimodal


# ----------------------------------------------------------------------------------- fixtures


def _pipeline(recipe: str, root: Path) -> dict:
    hf_dir, ckpt_a, ckpt_b, out = (root / n for n in ("hf", "ckpt_tp1", "ckpt_layout", "export"))
    _make_hf_dir(recipe, hf_dir)
    dims = LAYOUTS[recipe]
    argv = ["--hf", str(hf_dir), "--recipe", recipe, "--out", str(ckpt_a), "--random-encoders",
            *[a for k, v in dims.items() for a in (f"--{k}", str(v))]]
    run_ranks(_from_hf_worker, 1, argv, timeout=180)
    results = run_ranks(_layout_worker, 4, recipe, dims, str(ckpt_a), str(ckpt_b), timeout=300)
    run_ranks(_to_hf_worker, 1, str(ckpt_b), str(out), str(hf_dir), timeout=180)
    logits = [r[0] for r in results if r[0] is not None]
    multimodal = [r[1] for r in results if r[1] is not None]
    assert logits and multimodal, "no rank returned logits / multimodal weights"
    return {"recipe": recipe, "hf": hf_dir, "ckpt_a": ckpt_a, "ckpt_b": ckpt_b, "out": out,
            "logits": logits, "multimodal": multimodal}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return _pipeline("debug", tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _pipeline("debug-moe", tmp_path_factory.mktemp("moe"))


@pytest.fixture(params=["dense", "moe"])
def run(request):
    return request.getfixturevalue(request.param)


# -------------------------------------------------------------------------------------- tests


def test_hf_megatron_hf_is_bit_exact(run):
    """HF -> checkpoint -> loaded at TP2xPP2 / EP2xPP2 -> re-saved -> HF: identical tensors."""
    src = load_file(str(run["hf"] / "model.safetensors"))
    lm_dir = run["out"] / "language_model"
    out = load_file(str(lm_dir / "model.safetensors"))
    assert sorted(out) == sorted(src)
    for key in src:
        assert out[key].dtype == src[key].dtype and torch.equal(out[key], src[key]), key
    # The multimodal weights come back bit-exact from the sharded layout too.
    mm = load_file(str(run["out"] / MULTIMODAL_WEIGHTS))
    for ref in run["multimodal"]:
        assert sorted(mm) == sorted(ref)
        for key in ref:
            assert torch.equal(mm[key], ref[key]), key
    # Plain transformers, no custom code: the standard class from config.json.
    config = json.loads((lm_dir / "config.json").read_text())
    assert "auto_map" not in config
    llm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True)
    expected = get_recipe(run["recipe"]).llm.hf_architecture
    assert type(llm).__name__ == expected == config["architectures"][0]
    assert transformers.AutoTokenizer.from_pretrained(lm_dir).bos_token_id == 1
    meta = json.loads((run["ckpt_a"] / "iter_0000000" / "meta.json").read_text())
    assert meta["has_optimizer"] is False and meta["recipe"] == run["recipe"]
    assert not [p for p in run["out"].parent.iterdir() if p.name.startswith(".")]


def test_llm_logits_match_megatron(run):
    """The exported HF LLM and the sharded Megatron model agree on the same text."""
    llm = transformers.AutoModelForCausalLM.from_pretrained(
        run["out"] / "language_model", local_files_only=True).eval()
    n = len(TEXT_IDS)
    with torch.no_grad():
        ref = llm(torch.tensor([TEXT_IDS])).logits  # [1, n, V]
    for text_logits, _ in run["logits"]:
        diff = (text_logits[:, :n, : ref.shape[-1]] - ref).abs().max().item()
        assert diff < TOL, diff


def test_multimodal_logits_match_megatron(run):
    """The exported SPHINX-X model builds the training sequence and gives the Megatron logits."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(run["out"]).eval()
    assert isinstance(model, SphinxXForConditionalGeneration)
    assert isinstance(model.config, SphinxXConfig) and model.config.recipe == run["recipe"]
    _, image, views = _samples()
    n = image.length(448, 2)
    with torch.no_grad():
        out = model(torch.tensor([TEXT_IDS]), views, [IMAGE_HW])
    assert out.logits.shape[1] == n and int(out.attention_mask.sum()) == n
    for _, image_logits in run["logits"]:
        diff = (image_logits[:, :n, : out.logits.shape[-1]] - out.logits).abs().max().item()
        assert diff < TOL, diff
    # Negative control: swapping the end_img and skip embeddings is visible at this tolerance.
    with torch.no_grad():
        model.image_embeddings.weight.copy_(model.image_embeddings.weight[[0, 2, 1]])
        wrong = model(torch.tensor([TEXT_IDS]), views, [IMAGE_HW]).logits
    assert (wrong - out.logits).abs().max().item() > 1e-3


def test_generate_is_greedy_decoding_of_forward(dense):
    """``generate(image, prompt)`` == greedy argmax over full forward passes of the same input."""
    model = SphinxXForConditionalGeneration.from_pretrained(dense["out"]).eval()
    model.config.stop_strings = []  # compare raw text (a random model may emit "###")
    tok = model.load_tokenizer()
    ids = model.prompt_ids("What is in the image?", tok)
    assert ids[0] == tok.bos_token_id
    _, _, views = _samples()
    steps = 4
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), views, [IMAGE_HW]).logits
            ids.append(int(logits[0, -1].argmax()))
    expected = tok.decode(ids[-steps:], skip_special_tokens=True).strip()
    eos = tok.eos_token_id
    if eos in ids[-steps:]:  # generation stops at EOS
        expected = tok.decode(ids[-steps:][: ids[-steps:].index(eos)],
                              skip_special_tokens=True).strip()
    assert model.generate(_image_bytes(), "What is in the image?", max_new_tokens=steps) \
        == expected


def test_sphinx_x_directory_round_trip(dense, tmp_path):
    """An exported SPHINX-X directory imports back (with its encoders) and re-exports bit-exact."""
    ckpt, again = tmp_path / "ckpt", tmp_path / "again"
    run_ranks(_from_hf_worker, 1, ["--hf", str(dense["out"]), "--recipe", "debug",
                                   "--out", str(ckpt)], timeout=180)
    run_ranks(_to_hf_worker, 1, str(ckpt), str(again), None, timeout=180)
    for rel in ("language_model/model.safetensors", MULTIMODAL_WEIGHTS):
        a, b = load_file(str(dense["out"] / rel)), load_file(str(again / rel))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), rel
    assert json.loads((ckpt / "conversion.json").read_text())["source_kind"] == "sphinx_x"


def _tool(name: str, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / name), *argv], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_input_one_line_nothing_written(dense, tmp_path):
    """Unknown recipe, missing shard, unsupported architecture: exit 2, one line, no output."""
    bad_recipe = tmp_path / "bad_recipe"
    shutil.copytree(dense["ckpt_a"], bad_recipe)
    meta_file = bad_recipe / "iter_0000000" / "meta.json"
    meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), recipe="sphinx-xl")))
    no_shard = tmp_path / "no_shard"
    shutil.copytree(dense["ckpt_b"], no_shard)
    shards = sorted((no_shard / "iter_0000000").glob("*.distcp"))
    assert len(shards) > 1
    shards[-1].unlink()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"not used")
    cases = [
        (_tool("convert_to_hf.py", "--load", str(bad_recipe), "--out", str(tmp_path / "o1")),
         "unknown recipe 'sphinx-xl'", tmp_path / "o1"),
        (_tool("convert_to_hf.py", "--load", str(no_shard), "--out", str(tmp_path / "o2")),
         f"missing shard {shards[-1].name}", tmp_path / "o2"),
        (_tool("convert_from_hf.py", "--hf", str(gpt2), "--recipe", "debug", "--out",
               str(tmp_path / "o3"), "--random-encoders"),
         "unsupported architecture GPT2LMHeadModel", tmp_path / "o3"),
    ]
    for proc, message, out in cases:
        _, err = proc.communicate(timeout=180)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, err[-2000:]
        assert lines and lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
        assert sum(ln.startswith("error") for ln in lines) == 1
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


def _args(**changes) -> object:
    argv = ["--hf", "H", "--recipe", "debug", "--out", "O"]
    args = from_hf.parse_args(argv)
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_from_hf_refusals_before_any_work(moe, dense, tmp_path):
    """Mismatched LLM, layout, missing encoder weights, occupied output: clear ConversionError."""
    cases = [
        (_args(hf=str(moe["hf"]), random_encoders=True, out=str(tmp_path / "a")),
         r"does not match recipe debug .*num_experts 4 \(HF\) != None \(recipe\).*"
         r"use --recipe debug-moe"),
        (_args(hf=str(dense["hf"]), ep=2, random_encoders=True, out=str(tmp_path / "b")),
         "dense"),
        (_args(hf=str(dense["hf"]), out=str(tmp_path / "c")), "--clip-convnext PATH"),
        (_args(hf=str(dense["hf"]), random_encoders=True, out=str(dense["ckpt_a"])),
         "is not empty"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            from_hf.convert(args)
        assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------- GPU: a Transformer Engine checkpoint


def _te_gpu_main(tmp: str) -> None:
    """Runs in a fresh interpreter on a GPU machine; prints one ``TE_CHECK`` JSON line.

    Per recipe (dense and MoE): builds SPHINX-X with the TE spec on the GPU in fp32 (fused
    norm+linear, grouped-GEMM experts: the checkpoint keys of GPU training), loads the tiny HF
    LLM with ``hf_to_megatron(spec="te")``, computes the logits of the image sample, saves a
    weights-only checkpoint, exports it with ``tools/convert_to_hf.py`` (CPU, local spec) and
    compares: exported LLM tensors bit-exact, exported SPHINX-X logits vs the TE logits.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_sphinx.distributed import free_port, init_distributed, shutdown
    from megatron_sphinx.model.llm import ParallelSizes, transformer_config
    from megatron_sphinx.model.specs import transformer_engine_available
    from megatron_sphinx.parallel_dims import ParallelDims
    from megatron_sphinx.train import checkpoint as ckpt_lib

    if not transformer_engine_available():
        print("TE_CHECK_SKIP")
        return
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    groups = init_distributed(ParallelDims(world_size=1), timeout_s=300, environ=env)
    report = {}
    for recipe in ("debug", "debug-moe"):
        root = Path(tmp) / recipe
        _make_hf_dir(recipe, root / "hf")
        cfg = get_recipe(recipe)
        tcfg = transformer_config(cfg.llm, ParallelSizes(), dtype=torch.float32, on_gpu=True)
        torch.manual_seed(0)
        model = SphinxModel(cfg, tcfg, "te", pg_collection=groups.collection).cuda().eval()
        hf_state = load_file(str(root / "hf" / "model.safetensors"))
        hm.load_megatron_state(model.language_model, hm.hf_to_megatron(hf_state, cfg.llm, "te"))
        _, image, views = _samples()
        n = image.length(cfg.vision.image_size, cfg.vision.grid)
        batch = build_packed_batch([[image]], n, cfg.vision.image_size, cfg.vision.grid,
                                   views).to("cuda")
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens,
                                 cu_seqlens_kv=batch.cu_seqlens, max_seqlen_q=batch.max_seqlen,
                                 max_seqlen_kv=batch.max_seqlen)
        with torch.no_grad():
            te_logits = model.language_model(
                input_ids=None, position_ids=None, attention_mask=None,
                decoder_input=model.embed(batch), labels=None,
                packed_seq_params=packed)[..., : cfg.llm.vocab_size].float().cpu()
        meta = ckpt_lib.CheckpointMeta(step=0, recipe=recipe, layout={"tp": 1, "pp": 1, "ep": 1},
                                       code_version="test", consumed={}, has_optimizer=False)
        ckpt_lib.save_checkpoint(root / "ckpt", 0, [model], None, None, groups.collection,
                                 meta=meta, common={})
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_hf.py"),
                               "--load", str(root / "ckpt"), "--out", str(root / "out"),
                               "--tokenizer", str(root / "hf")], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        entry = {"rc": proc.returncode, "stderr": proc.stderr[-1500:]}
        if proc.returncode == 0:
            exported = load_file(str(root / "out" / "language_model" / "model.safetensors"))
            entry["bit_exact"] = sorted(exported) == sorted(hf_state) and all(
                torch.equal(exported[k], hf_state[k]) for k in hf_state)
            sx = SphinxXForConditionalGeneration.from_pretrained(root / "out").eval()
            with torch.no_grad():
                hf_logits = sx(torch.tensor([TEXT_IDS]), views, [IMAGE_HW]).logits
            entry["max_abs_diff"] = (hf_logits - te_logits).abs().max().item()
        report[recipe] = entry
    shutdown()
    print("TE_CHECK " + json.dumps(report))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with Transformer Engine")
def test_te_gpu_checkpoint_exports(tmp_path):
    """A checkpoint of the TE-spec model (GPU training's keys) exports bit-exact on the CPU."""
    proc = subprocess.run(
        [sys.executable, "-c",
         f"from tests.test_convert import _te_gpu_main; _te_gpu_main({str(tmp_path)!r})"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"GPU check failed:\n{proc.stderr[-3000:]}")
    if "TE_CHECK_SKIP" in proc.stdout:
        pytest.skip("Transformer Engine is not importable on this GPU machine")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TE_CHECK ")]
    assert lines, f"no report from the GPU check:\n{proc.stderr[-3000:]}"
    for recipe, r in json.loads(lines[-1][len("TE_CHECK "):]).items():
        assert r["rc"] == 0, (recipe, r["stderr"])
        assert r["bit_exact"], recipe
        # fp32 on the GPU (TE kernels, TF32 off by default) vs CPU: far below a layout error.
        assert r["max_abs_diff"] < 1e-3, (recipe, r)


def test_every_architecture_field_must_match_the_recipe():
    """A checkpoint differing from the recipe's LLM in any field that changes the maths is named
    (RoPE base and norm epsilon included: the weights would load and silently compute wrong)."""
    recipe = get_recipe("debug").llm
    assert from_hf.llm_mismatches(recipe, recipe) == []
    for field, value in [("rope_base", recipe.rope_base * 2), ("norm_eps", recipe.norm_eps * 10),
                         ("num_query_groups", 1), ("vocab_size", recipe.vocab_size + 1)]:
        other = dataclasses.replace(recipe, **{field: value})
        assert [m.split()[0] for m in from_hf.llm_mismatches(recipe, other)] == [field]
