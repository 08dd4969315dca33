"""HF <-> Megatron-Core weight mapping: round trips, logits parity, sharded layouts, HF file I/O.

Tiny random ``transformers`` models in fp32 on CPU. Megatron runs in forked ranks
(:mod:`tests.dist_harness`), built by the project's own LLM builder
(:mod:`megatron_sphinx.model.llm`, local spec).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_sphinx.config import LLMConfig, get_recipe
from megatron_sphinx.model import hf_io
from megatron_sphinx.model import hf_mapping as hm
from tests.dist_harness import run_ranks

SEQ, BATCH = 16, 2


def _perturb_norms(model: torch.nn.Module) -> None:
    """HF initialises norms to 1; random values make a swapped norm visible."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def _llama(vocab: int = 200, layers: int = 2) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    _perturb_norms(model)
    return model


def _mixtral(vocab: int = 200, layers: int = 2) -> transformers.MixtralForCausalLM:
    torch.manual_seed(1)
    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-5,
        max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.02, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    _perturb_norms(model)
    with torch.no_grad():  # well-separated router logits: no near-ties in the top-2 choice
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hm.canonical_hf_state(model.state_dict()).items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def llama():
    model = _llama()
    return model, hm.llm_config_from_hf(model.config, name="tiny-llama")


@pytest.fixture(scope="module")
def mixtral():
    model = _mixtral()
    return model, hm.llm_config_from_hf(model.config, name="tiny-mixtral")


# --------------------------------------------------------------------------- pure mapping


@pytest.mark.parametrize("spec", ["local", "te"])
def test_roundtrip_llama_bit_exact(llama, spec):
    model, cfg = llama
    hf_state = _hf_state(model)
    mc = hm.hf_to_megatron(hf_state, cfg, spec)
    assert mc["embedding.word_embeddings.weight"].shape == (256, 64)  # padded to 128s
    if spec == "te":
        assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in mc
        assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in mc
        assert not any("layernorm" in k for k in mc if k.startswith("decoder.layers"))
    assert hm.detect_spec(mc) == spec
    _assert_same_state(hm.megatron_to_hf(mc, cfg), hf_state)


@pytest.mark.parametrize("spec,grouped", [("local", None), ("te", None), ("te", False)])
def test_roundtrip_mixtral_bit_exact(mixtral, spec, grouped):
    model, cfg = mixtral
    hf_state = _hf_state(model)
    mc = hm.hf_to_megatron(model.state_dict(), cfg, spec, moe_grouped_gemm=grouped)
    e3 = ("decoder.layers.1.mlp.experts.linear_fc1.weight3" if spec == "te" and grouped is None
          else "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight")
    assert mc[e3].shape == (96, 64)
    assert "decoder.layers.1.mlp.router.weight" in mc
    # TE keeps a separate pre-MLP norm for MoE layers; the attention norm is fused.
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in mc
    _assert_same_state(hm.megatron_to_hf(mc, cfg, spec), hf_state)
    # The on-disk (Hub) layout maps to the same Megatron tensors as transformers' in-memory one.
    mc_disk = hm.hf_to_megatron(hf_state, cfg, spec, moe_grouped_gemm=grouped)
    _assert_same_state(mc_disk, mc)


def test_fc1_is_gate_then_up_and_router_copied(mixtral):
    model, cfg = mixtral
    hf_state = _hf_state(model)
    mc = hm.hf_to_megatron(hf_state, cfg)
    fc1 = mc["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"]
    p = "model.layers.0.block_sparse_moe."
    assert torch.equal(fc1[:48], hf_state[p + "experts.2.w1.weight"])  # gate
    assert torch.equal(fc1[48:], hf_state[p + "experts.2.w3.weight"])  # up
    assert torch.equal(mc["decoder.layers.0.mlp.router.weight"], hf_state[p + "gate.weight"])


def _internlm2_state(llama_model: torch.nn.Module, cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """An InternLM2-named state whose ``wqkv`` follows InternLM2's modelling code.

    ``modeling_internlm2.py`` reads ``wqkv`` output as ``(h gs d)`` with ``gs = q_per_kv + 2``:
    per KV head, its query heads, then the key, then the value. Built here from Llama's q/k/v
    independently of the mapping code.
    """
    sd = llama_model.state_dict()
    d = cfg.hidden_size // cfg.num_attention_heads
    ng, per = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(ng, per, d, -1)
        k = sd[p + "self_attn.k_proj.weight"].view(ng, 1, d, -1)
        v = sd[p + "self_attn.v_proj.weight"].view(ng, 1, d, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        for src, dst in [("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                         ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
                         ("input_layernorm", "attention_norm"),
                         ("post_attention_layernorm", "ffn_norm")]:
            out[f"{p}{dst}.weight"] = sd[f"{p}{src}.weight"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("spec", ["local", "te"])
def test_internlm2_roundtrip_and_equivalence(llama, spec):
    model, cfg = llama
    intern = _internlm2_state(model, cfg)
    mc = hm.hf_to_megatron(intern, cfg, spec)
    _assert_same_state(hm.megatron_to_hf(mc, cfg, family="internlm2"), intern)
    # Same weights as the Llama-named checkpoint: InternLM2 exports as a plain LlamaForCausalLM.
    _assert_same_state(mc, hm.hf_to_megatron(_hf_state(model), cfg, spec))
    _assert_same_state(hm.megatron_to_hf(mc, cfg), _hf_state(model))


def test_vocab_padding_modes_and_tied_embeddings(llama):
    model, cfg = llama
    hf_state = _hf_state(model)
    embed = hf_state["model.embed_tokens.weight"]
    for mode, expected_row in [("zeros", torch.zeros(64)), ("last", embed[-1]),
                               ("mean", embed.mean(0))]:
        mc = hm.hf_to_megatron(hf_state, cfg, padded_vocab=384, pad_mode=mode)
        w = mc["embedding.word_embeddings.weight"]
        assert w.shape == (384, 64) and torch.equal(w[:200], embed)
        torch.testing.assert_close(w[200:], expected_row.expand(184, -1), rtol=0, atol=1e-7)
        _assert_same_state(hm.megatron_to_hf(mc, cfg), hf_state)
    with pytest.raises(hm.MappingError, match="smaller"):
        hm.hf_to_megatron(hf_state, cfg, padded_vocab=100)
    tied = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    mc = hm.hf_to_megatron(tied, cfg)
    assert torch.equal(mc["output_layer.weight"], mc["embedding.word_embeddings.weight"])
    # A shared-embedding Megatron model (no output_layer) exports lm_head = embedding.
    del mc["output_layer.weight"]
    out = hm.megatron_to_hf(mc, cfg)
    assert torch.equal(out["lm_head.weight"], embed)


def test_mapping_errors_name_the_tensor(llama, mixtral):
    model, cfg = llama
    hf_state = _hf_state(model)
    missing = {k: v for k, v in hf_state.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(hm.MappingError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        hm.hf_to_megatron(missing, cfg)
    with pytest.raises(hm.MappingError, match="not mapped, e.g. model.layers.2"):
        hm.hf_to_megatron({**hf_state, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, cfg)
    bad = dict(hf_state, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)})
    with pytest.raises(hm.MappingError, match=r"k_proj.weight has shape \(8, 64\)"):
        hm.hf_to_megatron(bad, cfg)
    with pytest.raises(hm.MappingError, match="dense"):
        hm.hf_to_megatron(_hf_state(mixtral[0]), cfg)
    mc = hm.hf_to_megatron(hf_state, cfg)
    mc["decoder.layers.0.extra.weight"] = torch.zeros(1)
    mc["decoder.layers.0.mlp.linear_fc1._extra_state"] = None  # ignored
    with pytest.raises(hm.MappingError, match="decoder.layers.0.extra.weight"):
        hm.megatron_to_hf(mc, cfg)
    # A prefix (the SPHINX model's language_model.) is honoured both ways.
    pre = hm.hf_to_megatron(hf_state, cfg, prefix="language_model.")
    _assert_same_state(hm.megatron_to_hf({**pre, "vision.w": torch.zeros(1)}, cfg,
                                         prefix="language_model."), hf_state)


def test_qkv_layout_is_per_group():
    cfg = LLMConfig("t", 1, 8, 16, 4, 2, 32)  # 4 heads of 2, 2 groups
    h = 8
    q = torch.arange(8 * h, dtype=torch.float32).view(8, h) + 1000  # head i -> rows 2i, 2i+1
    k = torch.arange(4 * h, dtype=torch.float32).view(4, h) + 2000
    v = torch.arange(4 * h, dtype=torch.float32).view(4, h) + 3000
    qkv = hm.qkv_to_megatron(q, k, v, cfg)
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3 then k1 then v1
    expected = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    assert torch.equal(qkv, expected)
    for a, b in zip(hm.qkv_from_megatron(qkv, cfg), (q, k, v)):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("recipe", ["debug", "debug-moe", "sphinx-tiny", "sphinx-intern2",
                                    "sphinx-plus", "sphinx-moe"])
def test_config_roundtrip(recipe):
    cfg = get_recipe(recipe).llm
    hf = hm.hf_config_from_llm(cfg, bos_token_id=1, eos_token_id=2)
    assert hf.architectures == [cfg.hf_architecture] and hf.eos_token_id == 2
    back = hm.llm_config_from_hf(hf.to_dict(), name=cfg.name)
    assert back == cfg


def test_config_parsing_of_raw_json_and_refusals():
    intern = {"architectures": ["InternLM2ForCausalLM"], "auto_map": {"AutoConfig": "x.Y"},
              "model_type": "internlm2", "bias": False, "hidden_act": "silu",
              "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "num_hidden_layers": 32, "rms_norm_eps": 1e-5,
              "rope_theta": 1000000, "rope_scaling": None, "vocab_size": 92544,
              "max_position_embeddings": 32768, "tie_word_embeddings": False}
    cfg = hm.llm_config_from_hf(intern, name="InternLM2-7B")
    assert cfg == get_recipe("sphinx-intern2").llm
    # Dynamic NTK only acts beyond max_position_embeddings: accepted as plain RoPE.
    dynamic = {**intern, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    assert hm.llm_config_from_hf(dynamic, name="InternLM2-7B") == cfg
    for change, msg in [({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
                        ({"bias": True}, "bias=True"),
                        ({"hidden_act": "gelu"}, "hidden_act"),
                        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
                        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
                        ({"head_dim": 64}, "head_dim")]:
        with pytest.raises(hm.MappingError, match=msg):
            hm.llm_config_from_hf({**intern, **change})
    with pytest.raises(hm.MappingError, match="sliding_window"):
        hm.llm_config_from_hf({**_mixtral().config.to_dict(), "sliding_window": 64})


# --------------------------------------------------------------------------------- hf_io


def test_hf_io_sharded_save_load_and_plain_transformers(tmp_path, llama, mixtral):
    for (model, cfg), cls in [(llama, transformers.LlamaForCausalLM),
                              (mixtral, transformers.MixtralForCausalLM)]:
        out = tmp_path / cfg.name
        exported = hm.megatron_to_hf(hm.hf_to_megatron(_hf_state(model), cfg), cfg)
        hf_io.save_hf_checkpoint(out, exported, hm.hf_config_from_llm(cfg),
                                 max_shard_bytes=60_000)
        index = json.loads((out / hf_io.SAFE_INDEX).read_text())
        assert len(set(index["weight_map"].values())) > 1
        config, state = hf_io.load_hf_checkpoint(out)
        assert config["architectures"] == [cfg.hf_architecture]
        _assert_same_state(state, exported)
        loaded = cls.from_pretrained(out, local_files_only=True).eval()
        ids = _tokens(cfg.vocab_size)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["tiny-llama", "tiny-mixtral"]  # no temp leftovers


def test_hf_io_refusals_leave_nothing_behind(tmp_path, llama):
    model, cfg = llama
    state = _hf_state(model)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf_io.CheckpointError) as err:
        hf_io.load_hf_checkpoint(gpt2)
    assert "GPT2LMHeadModel" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(hf_io.CheckpointError, match="not a directory"):
        hf_io.read_hf_config(tmp_path / "absent")

    out = tmp_path / "ckpt"
    hf_io.save_hf_checkpoint(out, state, hm.hf_config_from_llm(cfg), max_shard_bytes=60_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "moved")
    with pytest.raises(hf_io.CheckpointError, match=f"shard {shard.name} listed"):
        hf_io.load_hf_state(out)
    (tmp_path / "moved").rename(shard)

    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(hf_io.CheckpointError, match="not empty"):
        hf_io.save_hf_checkpoint(out, state, hm.hf_config_from_llm(cfg))
    assert sorted(p.name for p in out.iterdir()) == before
    # A failure while writing (safetensors refuses tensors sharing memory) leaves no output.
    w = torch.zeros(4, 4)
    broken = dict(state, **{"a": w, "b": w[:2]})
    for target, overwrite in [(tmp_path / "fresh", False), (out, True)]:
        with pytest.raises(Exception):
            hf_io.save_hf_checkpoint(target, broken, hm.hf_config_from_llm(cfg),
                                     overwrite=overwrite)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in out.iterdir()) == before
    hf_io.save_hf_checkpoint(out, state, hm.hf_config_from_llm(cfg), overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / hf_io.SAFE_INDEX).exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "gpt2"]


def test_hf_io_index_sizes_dtypes_and_absent_tensors(tmp_path, llama):
    model, cfg = llama
    state = dict(_hf_state(model), **{"model.ids": torch.arange(7)})  # an integer buffer
    nbytes = {k: v.numel() * v.element_size() for k, v in state.items()}
    first = min(state)  # shards are filled in key order
    limit = nbytes[first] - 1  # the first tensor alone is over the limit: its own shard
    out = tmp_path / "ckpt"
    hf_io.save_hf_checkpoint(out, state, hm.hf_config_from_llm(cfg), max_shard_bytes=limit)
    index = json.loads((out / hf_io.SAFE_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    assert sorted(index["weight_map"]) == sorted(state)
    shards = sorted(out.glob("model-*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == [f.name for f in shards]
    assert index["weight_map"][first] == shards[0].name
    for f in shards:  # no empty shard files
        assert hf_io.read_tensor_file(f)
    loaded = hf_io.load_hf_state(out, dtype=torch.bfloat16)
    assert loaded["model.ids"].dtype == torch.int64 and torch.equal(loaded["model.ids"],
                                                                     torch.arange(7))
    assert loaded[first].dtype == torch.bfloat16
    index["weight_map"]["model.ghost.weight"] = shards[0].name
    (out / hf_io.SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(hf_io.CheckpointError, match="model.ghost.weight listed in the index"):
        hf_io.load_hf_state(out)


def test_mixtral_top_k_and_aux_loss_come_from_the_config():
    d = _mixtral(layers=1).config.to_dict()
    cfg = hm.llm_config_from_hf({**d, "num_experts_per_tok": 3, "num_local_experts": 6})
    assert (cfg.num_experts, cfg.moe_router_topk) == (6, 3)
    back = hm.hf_config_from_llm(cfg)
    assert (back.num_local_experts, back.num_experts_per_tok) == (6, 3)


def test_internlm2_directory_converts_to_plain_llama(tmp_path, llama):
    """An InternLM2 checkpoint (remote-code config, legacy .bin) becomes a LlamaForCausalLM."""
    model, cfg = llama
    src = tmp_path / "internlm2"
    src.mkdir()
    d = model.config
    (src / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
        "num_attention_heads": d.num_attention_heads, "num_hidden_layers": d.num_hidden_layers,
        "num_key_value_heads": d.num_key_value_heads, "vocab_size": d.vocab_size,
        "rms_norm_eps": d.rms_norm_eps, "rope_theta": 50000.0, "bias": False,
        "max_position_embeddings": d.max_position_embeddings, "hidden_act": "silu"}))
    torch.save(_internlm2_state(model, cfg), src / "pytorch_model.bin")
    config, state = hf_io.load_hf_checkpoint(src)
    icfg = hm.llm_config_from_hf(config, name=cfg.name)
    assert icfg == cfg and icfg.hf_architecture == "LlamaForCausalLM"
    out = tmp_path / "llama"
    hf_io.save_hf_checkpoint(out, hm.megatron_to_hf(hm.hf_to_megatron(state, icfg), icfg),
                             hm.hf_config_from_llm(icfg))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(loaded) is transformers.LlamaForCausalLM
    ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_copy_tokenizer_files_skips_remote_code(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_internlm2.py"):
        (src / name).write_text("x")
    assert hf_io.copy_tokenizer_files(src, dst) == ["tokenizer.model", "tokenizer_config.json"]
    assert sorted(os.listdir(dst)) == ["tokenizer.model", "tokenizer_config.json"]


# ------------------------------------------------------------------ Megatron in forked ranks


def _build(cfg: LLMConfig, groups, tp=1, pp=1, ep=1, **config_changes):
    from megatron_sphinx.model.llm import ParallelSizes, build_gpt, transformer_config

    tc = transformer_config(cfg, ParallelSizes(tp=tp, pp=pp, ep=ep), dtype=torch.float32,
                            on_gpu=False)
    if config_changes:
        tc = dataclasses.replace(tc, **config_changes)
    return build_gpt(cfg, tc, "local", pre_process=groups.is_first_stage,
                     post_process=groups.is_last_stage, pg_collection=groups.collection).eval()


def _init(world_size: int, **dims):
    """Starts a CPU (gloo) rank, also on a GPU machine: these tests check the CPU path in fp32.

    The forked rank is told CUDA is absent before anything asks, so ``init_distributed`` picks
    gloo and applies the CPU compatibility layer (the GPU path is :func:`test_te_spec_on_gpu`).
    """
    from megatron_sphinx.distributed import init_distributed
    from megatron_sphinx.parallel_dims import ParallelDims

    torch.cuda.is_available = lambda: False
    return init_distributed(ParallelDims(world_size=world_size, **dims), timeout_s=60)


def _parity_worker(rank, world_size, cfg, hf_state, ids, config_changes):
    from megatron_sphinx import cpu_compat

    groups = _init(world_size)
    with cpu_compat.cpu_device_mode(), torch.no_grad():
        model = _build(cfg, groups, **config_changes)
        hm.load_megatron_state(model, hm.hf_to_megatron(hf_state, cfg))
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        logits = model(ids, pos, attention_mask=None)  # [b, s, padded vocab]
        return logits[..., : cfg.vocab_size].clone()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_logits_match_transformers(arch, llama, mixtral):
    model, cfg = llama if arch == "llama" else mixtral
    ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    (logits,) = run_ranks(_parity_worker, 1, cfg, _hf_state(model), ids, {}, timeout=120)
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4
    if arch == "mixtral":
        # Negative control: softmax over all experts before top-k without renormalising is
        # not Mixtral's routing, and the test sees it.
        (wrong,) = run_ranks(_parity_worker, 1, cfg, _hf_state(model), ids,
                             {"moe_router_pre_softmax": True}, timeout=120)
        assert (wrong - ref).abs().max().item() > 1e-3


def _per_token_loss(model, groups, ids, labels, pp: int):
    """Per-token losses ``[b, s]`` on the last stage (None elsewhere), via Megatron's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pos = torch.arange(ids.shape[1]).expand_as(ids)

    def step(data_iterator, mdl):
        tokens, target = next(data_iterator)
        out = mdl(tokens, pos, attention_mask=None, labels=target)  # [b, s]

        def loss_func(loss):
            return loss.sum(), torch.tensor(loss.numel()), {"per_token": loss.detach().clone()}
        return out, loss_func

    fwd = get_forward_backward_func(pp_size=pp)
    out = fwd(forward_step_func=step, data_iterator=iter([(ids, labels)]), model=[model],
              num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
              forward_only=True)
    return out[0]["per_token"] if groups.is_last_stage else None


def _reference_worker(rank, world_size, cfg, hf_state, ids, labels, ckpt_dir):
    from megatron.core import dist_checkpointing

    from megatron_sphinx import cpu_compat

    groups = _init(world_size)
    with cpu_compat.cpu_device_mode(), torch.no_grad():
        model = _build(cfg, groups)
        hm.load_megatron_state(model, hm.hf_to_megatron(hf_state, cfg))
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
        return _per_token_loss(model, groups, ids, labels, 1)


def _layout_worker(rank, world_size, cfg, dims, ckpt_in, ckpt_out, ids, labels):
    from megatron.core import dist_checkpointing

    from megatron_sphinx import cpu_compat

    groups = _init(world_size, **dims)
    with cpu_compat.cpu_device_mode(), torch.no_grad():
        model = _build(cfg, groups, **dims)
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_in)
        model.load_state_dict(state)
        loss = _per_token_loss(model, groups, ids, labels, dims.get("pp", 1))
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_out)
        return loss


def _export_worker(rank, world_size, cfg, ckpt_dir):
    from megatron.core import dist_checkpointing

    from megatron_sphinx import cpu_compat

    groups = _init(world_size)
    with cpu_compat.cpu_device_mode(), torch.no_grad():
        model = _build(cfg, groups)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        return hm.megatron_to_hf(model.state_dict(), cfg)


@pytest.mark.parametrize("arch,dims", [("llama", {"tp": 2}), ("llama", {"pp": 2}),
                                       ("mixtral", {"ep": 2})], ids=["tp2", "pp2", "ep2"])
def test_sharded_layouts_match_and_export_bit_exact(arch, dims, tmp_path):
    model = _llama(256, layers=4) if arch == "llama" else _mixtral(256, layers=4)
    cfg = hm.llm_config_from_hf(model.config, name=f"tiny-{arch}")
    hf_state = _hf_state(model)
    ids = _tokens(cfg.vocab_size)
    labels = torch.roll(ids, -1, dims=1)
    ckpt1, ckpt2 = tmp_path / "tp1", tmp_path / "sharded"
    ckpt1.mkdir()
    ckpt2.mkdir()
    (ref,) = run_ranks(_reference_worker, 1, cfg, hf_state, ids, labels, str(ckpt1),
                       timeout=120)
    with torch.no_grad():  # Megatron TP1 == transformers (loss over the real vocabulary)
        hf_logits = model(ids).logits
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    torch.testing.assert_close(ref, hf_loss, rtol=0, atol=1e-4)
    results = run_ranks(_layout_worker, 2, cfg, dims, str(ckpt1), str(ckpt2), ids, labels,
                        timeout=180)
    losses = [r for r in results if r is not None]
    assert losses, "no rank returned a loss"
    for loss in losses:
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    (exported,) = run_ranks(_export_worker, 1, cfg, str(ckpt2), timeout=120)
    _assert_same_state(exported, hf_state)


# ------------------------------------------------------------------ GPU: Transformer Engine spec


def _te_gpu_main() -> None:
    """Runs in a fresh interpreter (CUDA cannot be used in ranks forked after CUDA checks).

    For a dense and an MoE model: builds the TE-spec LLM on the GPU with the project's builder,
    loads ``hf_to_megatron(spec="te")`` (every non-``_extra_state`` key must match), compares
    logits with ``transformers`` on CPU, and exports back bit-exactly. Prints one JSON line.
    """
    from megatron_sphinx.distributed import init_distributed, shutdown
    from megatron_sphinx.model.llm import ParallelSizes, build_gpt, transformer_config
    from megatron_sphinx.model.specs import transformer_engine_available
    from megatron_sphinx.parallel_dims import ParallelDims

    if not transformer_engine_available():
        print("TE_CHECK_SKIP")
        return
    groups = init_distributed(ParallelDims(world_size=1), timeout_s=120)
    report = {}
    for arch, model in (("llama", _llama()), ("mixtral", _mixtral())):
        cfg = hm.llm_config_from_hf(model.config, name=arch)
        hf_state = _hf_state(model)
        tc = transformer_config(cfg, ParallelSizes(), dtype=torch.float32, on_gpu=True, backend="te")
        gpt = build_gpt(cfg, tc, "te", pre_process=True, post_process=True,
                        pg_collection=groups.collection).eval()
        hm.load_megatron_state(gpt, hm.hf_to_megatron(hf_state, cfg, "te"))
        ids = _tokens(cfg.vocab_size)
        with torch.no_grad():
            ref = model(ids).logits
            pos = torch.arange(SEQ).expand_as(ids).cuda()
            logits = gpt(ids.cuda(), pos, attention_mask=None)[..., : cfg.vocab_size].cpu()
        mc = {k: v.cpu() for k, v in gpt.state_dict().items()
              if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        exported = hm.megatron_to_hf(mc, cfg)
        report[arch] = {
            "spec": hm.detect_spec(mc),
            "max_abs_diff": (logits - ref).abs().max().item(),
            "bit_exact": sorted(exported) == sorted(hf_state)
            and all(torch.equal(exported[k], hf_state[k]) for k in hf_state),
        }
    shutdown()
    print("TE_CHECK " + json.dumps(report))


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine is not installed (GPU machines only)")
def test_te_spec_on_gpu():
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.test_hf_mapping import _te_gpu_main; _te_gpu_main()"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"GPU check failed:\n{proc.stderr[-3000:]}")
    if "TE_CHECK_SKIP" in proc.stdout:
        pytest.skip("Transformer Engine is installed but CUDA is not available")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TE_CHECK ")]
    assert lines, f"no report from the GPU check:\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("TE_CHECK "):])
    for arch, r in report.items():
        assert r["spec"] == "te", arch
        assert r["bit_exact"], arch
        # fp32 on the GPU: TE's kernels round differently from CPU matmuls, still far below
        # the ~1e-1 that one wrong tensor layout produces.
        assert r["max_abs_diff"] < 1e-3, (arch, r)
