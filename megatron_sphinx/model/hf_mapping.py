"""Weight and config mapping between Hugging Face LLaMA-family checkpoints and Megatron-Core.

Pure functions on full (unsharded: TP1 / PP1 / EP1) state dicts. Sharded layouts are handled by
Megatron's ``dist_checkpointing`` (save the TP1 model's sharded state dict, load it into any
layout); this module only knows the single-rank names and tensor layouts.

HF side: the on-disk Hub format (what ``save_pretrained`` writes and what the published
checkpoints contain). ``transformers`` 5's in-memory Mixtral layout (fused
``mlp.experts.gate_up_proj``) is accepted on import and converted by :func:`canonical_hf_state`.

Layouts (``ng`` query groups, ``np`` heads, ``d`` head dim, ``h`` hidden, ``f`` ffn):

- ``linear_qkv.weight`` ``[ng * (np/ng + 2) * d, h]``: per group, the group's ``np/ng`` query
  heads, then its key head, then its value head (megatron-core 0.19.2
  ``SelfAttention.get_query_key_value_tensors``). InternLM2's ``wqkv`` has the same layout.
- ``linear_fc1.weight`` ``[2 * f, h]``: ``[gate; up]`` (``swiglu`` chunks the output in two).
- RoPE: both HF LLaMA-format and Megatron (``rotary_interleaved=False``) rotate halves, so q/k
  rows are copied without permutation.
- Vocabulary: Megatron's embedding and output layer have ``padded_vocab_size`` rows; the extra
  rows are added on import and dropped on export.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

from megatron_sphinx.config import LLMConfig

logger = logging.getLogger(__name__)

Spec = Literal["local", "te"]
"""Megatron layer spec: ``local`` (megatron-core modules) or ``te`` (Transformer Engine)."""
PadMode = Literal["zeros", "mean", "last"]
"""How padded vocabulary rows are filled on import."""

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "InternLM2ForCausalLM": "internlm2",
}
"""Supported HF architectures -> weight-name family."""

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """A state dict or config does not fit the mapping (message says what is wrong)."""


# ----------------------------------------------------------------------------------- configs


def _config_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise MappingError(f"expected a transformers config or a config.json dict, got {hf_config!r}")


def hf_architecture_family(hf_config: Any) -> str:
    """``llama``, ``mixtral`` or ``internlm2`` for a config (object or ``config.json`` dict).

    Raises:
        MappingError: For any other architecture, naming the supported ones.
    """
    d = _config_dict(hf_config)
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = d.get("model_type")
    if not archs and model_type in ("llama", "mixtral", "internlm2"):
        return model_type
    found = ", ".join(archs) or f"model_type {model_type!r}"
    raise MappingError(
        f"unsupported architecture {found}: supported are {', '.join(ARCHITECTURES)}")


def _rope_base(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type == "dynamic":
        # Dynamic NTK (InternLM2) only rescales beyond max_position_embeddings: plain RoPE up to
        # there, which is all Megatron trains on. The export is plain RoPE.
        logger.warning("dynamic RoPE scaling is treated as plain RoPE (identical up to "
                       "max_position_embeddings); the exported config has no scaling")
    elif rope_type not in (None, "default"):
        raise MappingError(
            f"RoPE scaling {rope_type!r} is not supported: use a checkpoint with plain RoPE")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def llm_config_from_hf(hf_config: Any, name: str | None = None) -> LLMConfig:
    """The :class:`LLMConfig` of a Hugging Face LLaMA / Mixtral / InternLM2 config.

    Args:
        hf_config: A ``transformers`` config object or the parsed ``config.json`` dict (InternLM2
            configs are remote code: pass the dict, nothing is executed).
        name: Human name for ``LLMConfig.name``; defaults to ``_name_or_path`` or the family.

    Returns:
        The config. InternLM2 maps to ``hf_architecture="LlamaForCausalLM"`` (its export target).

    Raises:
        MappingError: Unsupported architecture or feature (biases, non-SiLU activation, RoPE
            scaling, sliding window, a head_dim other than hidden/heads).
    """
    d = _config_dict(hf_config)
    family = hf_architecture_family(d)
    heads = d["num_attention_heads"]
    hidden = d["hidden_size"]
    if d.get("hidden_act", "silu") != "silu":
        raise MappingError(f"hidden_act {d['hidden_act']!r} is not supported: only silu (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias", "bias"):
        if d.get(flag):
            raise MappingError(f"{flag}=True is not supported: LLaMA-family models have no biases")
    head_dim = d.get("head_dim")
    if head_dim not in (None, hidden // heads):
        raise MappingError(
            f"head_dim {head_dim} != hidden_size/heads {hidden // heads} is not supported")
    window = d.get("sliding_window")
    max_pos = d.get("max_position_embeddings", 4096)
    if window is not None and window < max_pos:
        raise MappingError(
            f"sliding_window {window} < max_position_embeddings {max_pos} is not supported")
    moe = {}
    if family == "mixtral":
        moe = dict(num_experts=d["num_local_experts"], moe_router_topk=d["num_experts_per_tok"],
                   moe_aux_loss_coeff=float(d.get("router_aux_loss_coef", 0.0)))
    return LLMConfig(
        name=name or d.get("_name_or_path") or family,
        num_layers=d["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=d["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=d.get("num_key_value_heads") or heads,
        vocab_size=d["vocab_size"],
        rope_base=_rope_base(d),
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=max_pos,
        hf_architecture="MixtralForCausalLM" if family == "mixtral" else "LlamaForCausalLM",
        **moe,
    )


def hf_config_from_llm(cfg: LLMConfig, **overrides: Any):
    """The ``transformers`` config (``LlamaConfig`` or ``MixtralConfig``) of an :class:`LLMConfig`.

    Args:
        cfg: The LLM architecture; ``cfg.hf_architecture`` picks the class.
        **overrides: Extra config fields, e.g. ``bos_token_id``, ``eos_token_id``, ``dtype``.

    Raises:
        MappingError: If ``cfg.hf_architecture`` is not Llama or Mixtral.
    """
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        hidden_act="silu", tie_word_embeddings=False,
    )
    if cfg.hf_architecture == "LlamaForCausalLM":
        if cfg.is_moe:
            raise MappingError(f"{cfg.name} is MoE: set hf_architecture='MixtralForCausalLM'")
        hf = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif cfg.hf_architecture == "MixtralForCausalLM":
        if not cfg.is_moe:
            raise MappingError(f"{cfg.name} is dense: set hf_architecture='LlamaForCausalLM'")
        hf = transformers.MixtralConfig(
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff, sliding_window=None, **common)
    else:
        raise MappingError(f"hf_architecture {cfg.hf_architecture!r} cannot be exported: use "
                           "LlamaForCausalLM or MixtralForCausalLM")
    hf.architectures = [cfg.hf_architecture]
    for key, value in overrides.items():
        setattr(hf, key, value)
    return hf


# ------------------------------------------------------------------------------ HF key names


def _hf_names(family: str, layer: int) -> dict[str, str]:
    """HF names of one layer's dense tensors (``q``/``k``/``v`` or ``qkv`` for InternLM2)."""
    p = f"model.layers.{layer}."
    if family == "internlm2":
        return {"qkv": p + "attention.wqkv.weight", "o": p + "attention.wo.weight",
                "gate": p + "feed_forward.w1.weight", "up": p + "feed_forward.w3.weight",
                "down": p + "feed_forward.w2.weight", "norm1": p + "attention_norm.weight",
                "norm2": p + "ffn_norm.weight"}
    names = {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
             "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
             "norm1": p + "input_layernorm.weight", "norm2": p + "post_attention_layernorm.weight"}
    if family == "llama":
        names.update(gate=p + "mlp.gate_proj.weight", up=p + "mlp.up_proj.weight",
                     down=p + "mlp.down_proj.weight")
    else:  # mixtral
        names["router"] = p + "block_sparse_moe.gate.weight"
    return names


def _hf_expert_names(layer: int, expert: int) -> dict[str, str]:
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return {"gate": p + "w1.weight", "up": p + "w3.weight", "down": p + "w2.weight"}


def _hf_globals(family: str) -> dict[str, str]:
    if family == "internlm2":
        return {"embed": "model.tok_embeddings.weight", "norm": "model.norm.weight",
                "head": "output.weight"}
    return {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
            "head": "lm_head.weight"}


def hf_family_of_state(hf_state: Mapping[str, torch.Tensor]) -> str:
    """``llama``, ``mixtral`` or ``internlm2`` from the tensor names of an HF state dict."""
    if "model.tok_embeddings.weight" in hf_state:
        return "internlm2"
    if any(".block_sparse_moe." in k or ".mlp.experts." in k or k.endswith(".mlp.gate.weight")
           for k in hf_state):
        return "mixtral"
    return "llama"


def canonical_hf_state(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The on-disk Hub layout of an HF state dict.

    ``transformers`` 5 keeps Mixtral experts in memory as fused ``mlp.experts.gate_up_proj``
    ``[E, 2f, h]`` / ``mlp.experts.down_proj`` ``[E, h, f]`` and the router as ``mlp.gate``;
    checkpoints (and ``save_pretrained``) use ``block_sparse_moe.experts.{e}.w1/w3/w2`` and
    ``block_sparse_moe.gate``. Other tensors pass through unchanged (same objects).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        m = re.match(r"^(model\.layers\.\d+\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|"
                     r"gate\.weight)$", key)
        if m is None:
            out[key] = value
            continue
        prefix, what = m.group(1) + "block_sparse_moe.", m.group(2)
        if what == "gate.weight":
            out[prefix + "gate.weight"] = value
        elif what == "experts.gate_up_proj":
            for e, fused in enumerate(value):  # [2f, h]
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}experts.{e}.w1.weight"] = gate
                out[f"{prefix}experts.{e}.w3.weight"] = up
        else:
            for e, down in enumerate(value):  # [h, f]
                out[f"{prefix}experts.{e}.w2.weight"] = down
    return out


# ------------------------------------------------------------------------ Megatron key names


def _mcore_names(spec: Spec, layer: int, moe: bool) -> dict[str, str]:
    p = f"decoder.layers.{layer}."
    names = {"qkv": p + "self_attention.linear_qkv.weight",
             "o": p + "self_attention.linear_proj.weight"}
    if spec == "local":
        names["norm1"] = p + "input_layernorm.weight"
        names["norm2"] = p + "pre_mlp_layernorm.weight"
    else:
        names["norm1"] = p + "self_attention.linear_qkv.layer_norm_weight"
        # TE fuses the pre-MLP norm into linear_fc1 only for dense MLPs; MoE keeps a TENorm.
        names["norm2"] = p + ("pre_mlp_layernorm.weight" if moe
                              else "mlp.linear_fc1.layer_norm_weight")
    if moe:
        names["router"] = p + "mlp.router.weight"
    else:
        names["fc1"] = p + "mlp.linear_fc1.weight"
        names["fc2"] = p + "mlp.linear_fc2.weight"
    return names


def _mcore_expert_names(layer: int, expert: int, grouped: bool) -> dict[str, str]:
    p = f"decoder.layers.{layer}.mlp.experts."
    if grouped:  # TEGroupedMLP: one GroupedLinear per projection, weight{e} per expert
        return {"fc1": f"{p}linear_fc1.weight{expert}", "fc2": f"{p}linear_fc2.weight{expert}"}
    return {"fc1": f"{p}local_experts.{expert}.linear_fc1.weight",
            "fc2": f"{p}local_experts.{expert}.linear_fc2.weight"}


_MCORE_GLOBALS = {"embed": "embedding.word_embeddings.weight",
                  "norm": "decoder.final_layernorm.weight", "head": "output_layer.weight"}


# --------------------------------------------------------------------------- tensor layouts


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cfg: LLMConfig) -> torch.Tensor:
    """Interleaves HF ``q [np*d, h]``, ``k``, ``v [ng*d, h]`` into Megatron's ``linear_qkv``."""
    ng, d = cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    h = q.shape[-1]
    per_group = cfg.num_attention_heads // ng
    qkv = torch.cat([q.reshape(ng, per_group * d, h), k.reshape(ng, d, h),
                     v.reshape(ng, d, h)], dim=1)  # [ng, (np/ng + 2) * d, h]
    return qkv.reshape(ng * (per_group + 2) * d, h)


def qkv_from_megatron(qkv: torch.Tensor,
                      cfg: LLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits Megatron's ``linear_qkv`` into HF ``q [np*d, h]``, ``k``, ``v [ng*d, h]``."""
    ng, d = cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // ng
    expected = ng * (per_group + 2) * d
    if qkv.shape[0] != expected:
        raise MappingError(f"linear_qkv has {qkv.shape[0]} rows, the config needs {expected}")
    h = qkv.shape[-1]
    q, k, v = qkv.reshape(ng, (per_group + 2) * d, h).split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(),
            v.reshape(-1, h).contiguous())


def _pad_vocab(weight: torch.Tensor, padded: int, mode: PadMode) -> torch.Tensor:
    rows = weight.shape[0]
    if padded == rows:
        return weight
    if padded < rows:
        raise MappingError(f"padded vocabulary {padded} is smaller than the checkpoint's {rows}")
    if mode == "zeros":
        extra = weight.new_zeros(padded - rows, weight.shape[1])
    elif mode == "mean":
        extra = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(padded - rows, -1)
    elif mode == "last":
        extra = weight[-1:].expand(padded - rows, -1)
    else:
        raise MappingError(f"pad_mode {mode!r} is unknown: use zeros, mean or last")
    return torch.cat([weight, extra], dim=0)


# -------------------------------------------------------------------------------- HF -> Mcore


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: LLMConfig, spec: Spec = "local",
                   *, padded_vocab: int | None = None, pad_mode: PadMode = "zeros",
                   moe_grouped_gemm: bool | None = None,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """Maps an HF LLaMA / Mixtral / InternLM2 state dict to a full Megatron ``GPTModel`` one.

    Args:
        hf_state: HF tensors (Hub layout or ``transformers`` 5 in-memory layout). Non-persistent
            buffers (``rotary_emb.inv_freq``) are ignored; any other unknown tensor is an error.
        cfg: The architecture (e.g. from :func:`llm_config_from_hf`).
        spec: ``local`` (separate norms, SequentialMLP experts) or ``te`` (norms fused into
            ``linear_qkv`` / dense ``linear_fc1``, grouped-GEMM experts).
        padded_vocab: Rows of Megatron's embedding/output layer; default the model builder's
            (:func:`megatron_sphinx.model.llm.padded_vocab_size`, the same at every TP size).
        pad_mode: Fill of the padded rows: ``zeros``, ``mean`` of the real rows, or ``last`` row.
        moe_grouped_gemm: TE ``GroupedMLP`` expert names (``weight{e}``); default ``spec == "te"``.
        prefix: Prepended to every Megatron key (e.g. ``language_model.``).

    Returns:
        Megatron tensors (no ``_extra_state``; load with :func:`load_megatron_state`). Tensors
        that need no reshaping are the input objects themselves (no copy).

    Raises:
        MappingError: On a missing, unexpected or wrongly shaped tensor.
    """
    if spec not in ("local", "te"):
        raise MappingError(f"spec {spec!r} is unknown: use local or te")
    grouped = (spec == "te") if moe_grouped_gemm is None else moe_grouped_gemm
    state = canonical_hf_state(hf_state)
    family = hf_family_of_state(state)
    if (family == "mixtral") != cfg.is_moe:
        raise MappingError(f"checkpoint is {family} but config {cfg.name} is "
                           f"{'MoE' if cfg.is_moe else 'dense'}")
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in state:
            raise MappingError(f"HF tensor {key} is missing")
        t = state[key]
        if tuple(t.shape) != shape:
            raise MappingError(f"HF tensor {key} has shape {tuple(t.shape)}, expected {shape}")
        used.add(key)
        return t

    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.hidden_size // cfg.num_attention_heads
    qd, kvd = cfg.num_attention_heads * d, cfg.num_query_groups * d
    out: dict[str, torch.Tensor] = {}
    g_hf, g_mc = _hf_globals(family), _MCORE_GLOBALS
    if padded_vocab is None:
        from megatron_sphinx.model.llm import padded_vocab_size

        padded_vocab = padded_vocab_size(cfg.vocab_size, 1)

    embed = take(g_hf["embed"], (cfg.vocab_size, h))
    out[g_mc["embed"]] = _pad_vocab(embed, padded_vocab, pad_mode)
    if g_hf["head"] in state:
        head = take(g_hf["head"], (cfg.vocab_size, h))
    else:
        logger.info("%s has tied embeddings: the output layer starts as a copy", cfg.name)
        head = embed
    out[g_mc["head"]] = _pad_vocab(head, padded_vocab, pad_mode)
    out[g_mc["norm"]] = take(g_hf["norm"], (h,))

    for layer in range(cfg.num_layers):
        hn, mn = _hf_names(family, layer), _mcore_names(spec, layer, cfg.is_moe)
        if family == "internlm2":  # wqkv already has Megatron's per-group layout
            out[mn["qkv"]] = take(hn["qkv"], (qd + 2 * kvd, h))
        else:
            out[mn["qkv"]] = qkv_to_megatron(take(hn["q"], (qd, h)), take(hn["k"], (kvd, h)),
                                             take(hn["v"], (kvd, h)), cfg)
        out[mn["o"]] = take(hn["o"], (h, qd))
        out[mn["norm1"]] = take(hn["norm1"], (h,))
        out[mn["norm2"]] = take(hn["norm2"], (h,))
        if cfg.is_moe:
            out[mn["router"]] = take(hn["router"], (cfg.num_experts, h))
            for e in range(cfg.num_experts):
                he, me = _hf_expert_names(layer, e), _mcore_expert_names(layer, e, grouped)
                out[me["fc1"]] = torch.cat([take(he["gate"], (f, h)), take(he["up"], (f, h))])
                out[me["fc2"]] = take(he["down"], (h, f))
        else:
            out[mn["fc1"]] = torch.cat([take(hn["gate"], (f, h)), take(hn["up"], (f, h))])
            out[mn["fc2"]] = take(hn["down"], (h, f))

    unexpected = sorted(k for k in state if k not in used and not k.endswith("inv_freq"))
    if unexpected:
        raise MappingError(f"{len(unexpected)} HF tensors are not mapped, e.g. {unexpected[0]} "
                           f"(config {cfg.name}: {cfg.num_layers} layers)")
    return {prefix + k: v for k, v in out.items()}


# -------------------------------------------------------------------------------- Mcore -> HF


def detect_spec(mcore_state: Mapping[str, Any], prefix: str = "") -> Spec:
    """``te`` if the norms are fused into ``linear_qkv``, else ``local``."""
    fused = f"{prefix}decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    return "te" if fused in mcore_state else "local"


def megatron_to_hf(mcore_state: Mapping[str, Any], cfg: LLMConfig, spec: Spec | None = None,
                   *, family: str | None = None,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """Maps a full Megatron ``GPTModel`` state dict to an HF one (Hub layout, contiguous).

    Args:
        mcore_state: Megatron tensors of one TP1/PP1/EP1 model (gathered); ``_extra_state``
            entries and keys not under ``prefix`` are ignored.
        cfg: The architecture; ``cfg.vocab_size`` rows of the (padded) vocabulary are kept.
        spec: ``local`` or ``te``; default detected from the keys. Expert names
            (SequentialMLP or grouped GEMM) are detected too.
        family: HF weight names: ``llama`` / ``mixtral`` (default from ``cfg.is_moe``) or
            ``internlm2`` (InternLM2's own names and packed ``wqkv``).
        prefix: Prefix of the Megatron keys (e.g. ``language_model.``).

    Returns:
        HF tensors, each a contiguous tensor owning its storage (safe for safetensors).
        Without ``output_layer.weight`` (shared embeddings), ``lm_head`` is the embedding.

    Raises:
        MappingError: On a missing, unexpected or wrongly shaped tensor.
    """
    state = {k[len(prefix):]: v for k, v in mcore_state.items()
             if k.startswith(prefix) and not k.endswith("_extra_state")}
    spec = spec or detect_spec(state)
    family = family or ("mixtral" if cfg.is_moe else "llama")
    if (family == "mixtral") != cfg.is_moe:
        raise MappingError(f"family {family} does not fit config {cfg.name}")
    grouped = "decoder.layers.0.mlp.experts.linear_fc1.weight0" in state
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in state:
            raise MappingError(f"Megatron tensor {prefix}{key} is missing (spec {spec})")
        t = state[key]
        if shape is not None and tuple(t.shape) != shape:
            raise MappingError(f"Megatron tensor {prefix}{key} has shape {tuple(t.shape)}, "
                               f"expected {shape}")
        used.add(key)
        return t

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone(memory_format=torch.contiguous_format)

    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.hidden_size // cfg.num_attention_heads
    qd, kvd = cfg.num_attention_heads * d, cfg.num_query_groups * d
    out: dict[str, torch.Tensor] = {}
    g_hf, g_mc = _hf_globals(family), _MCORE_GLOBALS

    def unpad(key: str) -> torch.Tensor:
        t = take(key)
        if t.shape[0] < cfg.vocab_size or t.shape[1] != h:
            raise MappingError(f"Megatron tensor {prefix}{key} has shape {tuple(t.shape)}, "
                               f"expected [>= {cfg.vocab_size}, {h}]")
        return own(t[: cfg.vocab_size])

    out[g_hf["embed"]] = unpad(g_mc["embed"])
    out[g_hf["head"]] = (unpad(g_mc["head"]) if g_mc["head"] in state
                         else out[g_hf["embed"]].clone())
    out[g_hf["norm"]] = own(take(g_mc["norm"], (h,)))

    for layer in range(cfg.num_layers):
        hn, mn = _hf_names(family, layer), _mcore_names(spec, layer, cfg.is_moe)
        qkv = take(mn["qkv"], (qd + 2 * kvd, h))
        if family == "internlm2":
            out[hn["qkv"]] = own(qkv)
        else:
            out[hn["q"]], out[hn["k"]], out[hn["v"]] = (own(t) for t in qkv_from_megatron(qkv, cfg))
        out[hn["o"]] = own(take(mn["o"], (h, qd)))
        out[hn["norm1"]] = own(take(mn["norm1"], (h,)))
        out[hn["norm2"]] = own(take(mn["norm2"], (h,)))
        if cfg.is_moe:
            out[hn["router"]] = own(take(mn["router"], (cfg.num_experts, h)))
            for e in range(cfg.num_experts):
                he, me = _hf_expert_names(layer, e), _mcore_expert_names(layer, e, grouped)
                gate, up = take(me["fc1"], (2 * f, h)).chunk(2, dim=0)
                out[he["gate"]], out[he["up"]] = own(gate), own(up)
                out[he["down"]] = own(take(me["fc2"], (h, f)))
        else:
            gate, up = take(mn["fc1"], (2 * f, h)).chunk(2, dim=0)
            out[hn["gate"]], out[hn["up"]] = own(gate), own(up)
            out[hn["down"]] = own(take(mn["fc2"], (h, f)))

    unexpected = sorted(k for k in state if k not in used)
    if unexpected:
        raise MappingError(f"{len(unexpected)} Megatron tensors are not mapped, e.g. "
                           f"{prefix}{unexpected[0]} (spec {spec}, {cfg.num_layers} layers)")
    return out


def load_megatron_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Loads mapped tensors into a Megatron module; only ``_extra_state`` may be missing.

    Raises:
        MappingError: Naming the first missing or unexpected key.
    """
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        what = (f"missing {missing[0]}" if missing
                else f"unexpected {result.unexpected_keys[0]}")
        raise MappingError(f"state does not fit the module: {len(missing)} missing, "
                           f"{len(result.unexpected_keys)} unexpected ({what})")
