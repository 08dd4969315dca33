"""Fixes for megatron-core 0.19.2 problems that are not CPU-specific (applied on every device).

Three concern Megatron's distributed optimizer running on plain ``torch.optim.AdamW`` (no Apex,
no Transformer Engine): always the case on CPUs, and on GPU installs without TE. Each of those
checks ``HAVE_APEX_OR_TE`` and does nothing where the fused optimizers are used. The fourth
replaces the same installs' fallback multi-tensor gradient norm and scale, which read one value
per gradient tensor on the host, with ``torch._foreach`` ops. The fifth makes the unfused RoPE of
packed (THD) sequences on GPUs one vectorised op instead of a Python loop over segments with
host syncs (GPUs without TE's fused RoPE), its rotation one Triton kernel each way. The sixth
runs the MLP's SwiGLU as one Triton kernel each way instead of Megatron's unfused ops (GPUs
without TE; both kernels chosen by :mod:`kernels.fused_layers`). The seventh lets RMSNorm models
build where Apex is installed without TE (Megatron's Apex norm is LayerNorm only). CPU-only
patches live in
:mod:`megatron_sphinx.cpu_compat`. :func:`megatron_sphinx.distributed.init_distributed` applies
these.
"""
from __future__ import annotations

import collections
import functools
import threading
import weakref

import torch

_lock = threading.Lock()
_applied: list[str] = []


def _fix_distrib_optimizer_step_unshare() -> None:
    """After loading, every parameter has its own Adam ``step`` tensor again.

    ``optimizer/distrib_optimizer.py::DistributedOptimizer.load_state_dict`` (non-apex/TE path)
    puts one ``step`` tensor object into every parameter's state; torch's ``AdamW`` increments
    ``state['step']`` in place per parameter, so after a resume the shared step advances once
    per parameter per iteration and bias correction drifts silently. Each state gets a clone.
    """
    from megatron.core.optimizer import distrib_optimizer as mod

    if mod.HAVE_APEX_OR_TE:
        return
    DistributedOptimizer = mod.DistributedOptimizer
    original = DistributedOptimizer.load_state_dict

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            for state in optimizer.state.values():
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    state["step"] = step.detach().clone()
        return result

    DistributedOptimizer.load_state_dict = load_state_dict


def _fix_distrib_optimizer_fresh_state() -> None:
    """A never-stepped distributed optimizer can build its (checkpoint) state dict.

    ``optimizer/distrib_optimizer.py::DistributedOptimizer.state_dict`` (non-apex/TE path)
    asserts that all parameters share one Adam ``step``; a fresh torch ``AdamW`` has no state at
    all, so the assert fails, and ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``:
    resuming into a new process is impossible. An empty state is filled the way torch's
    ``AdamW`` would on its first step (``step=0``, zero moments), which changes no update; the
    ``step`` on the CPU, or on the parameter's device in fp32 for the fused and capturable forms
    (:mod:`megatron_sphinx.train.adam`).
    """
    from megatron.core.optimizer import distrib_optimizer as mod

    if mod.HAVE_APEX_OR_TE:
        return
    original = mod.DistributedOptimizer.state_dict

    @functools.wraps(original)
    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and len(inner.state) == 0:
            from torch.optim.optimizer import _get_scalar_dtype

            for group in inner.param_groups:
                on_device = bool(group.get("fused") or group.get("capturable"))
                step_dtype = _get_scalar_dtype(is_fused=on_device)
                for param in group["params"]:
                    state = inner.state[param]
                    state["step"] = torch.zeros((), dtype=step_dtype, device=(
                        param.device if on_device else "cpu"))
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format)
        return original(self)

    mod.DistributedOptimizer.state_dict = state_dict


def _fix_distrib_optimizer_load_skips_step() -> None:
    """Loading parameter state leaves torch Adam's tensor ``step`` alone.

    ``optimizer/distrib_optimizer.py::_set_main_param_and_optimizer_states`` copies every
    *tensor* in the inner optimizer's per-parameter state from the loaded tensors; torch's
    ``AdamW`` keeps ``step`` as a tensor, but the ``fully_reshardable`` (and model-space) loaders
    skip ``step`` ("handled separately"), so the copy raises ``KeyError: 'step'``. Missing keys
    are passed as None, which upstream already skips; ``step`` comes from the param groups.
    """
    from megatron.core.optimizer import distrib_optimizer as mod

    if mod.HAVE_APEX_OR_TE:
        return
    cls = mod.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            missing = [k for k, v in state.items() if isinstance(v, torch.Tensor)
                       and k not in tensors]
            if missing:
                tensors = dict(tensors, **{k: None for k in missing})
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor=False, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: fp32 ``[1]`` L2 norm of all tensors, no sync.

    Megatron's fallback (``megatron.core.utils.local_multi_tensor_l2_norm``) builds its result
    with ``torch.tensor(list_of_norms)``, one host read per gradient tensor (~140 per step for
    sphinx-tiny), each a stall until the GPU drains. Here: one ``_foreach_norm`` in fp32 and a
    norm of the stacked norms, on the tensors' device.
    """
    del chunk_size, noop_flag, args
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not used by Megatron's gradient clipping")
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` in a few foreach kernels.

    Megatron's fallback (``megatron.core.utils.local_multi_tensor_scale``) issues two kernels per
    tensor (multiply, copy); used for gradient clipping and the optimizer's main-to-model copies.
    """
    del chunk_size, noop_flag
    src, dst = tensor_lists
    if not dst:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _fix_local_multi_tensor_ops() -> None:
    """Gradient norm and scale without per-tensor host reads where Apex and TE are absent.

    ``optimizer/clip_grads.py`` and ``optimizer/optimizer.py`` bind Megatron's local fallbacks
    when neither Apex nor Transformer Engine is importable; they are swapped for
    :func:`multi_tensor_l2_norm` and :func:`multi_tensor_scale` (same arguments, same results up
    to summation order). Installs with the fused ops are left alone.
    """
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2_norm
    for mod in (clip_grads, optimizer):
        if mod.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = multi_tensor_scale


def thd_rope_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 ``[num_tokens]`` position of each packed token within its segment (no host sync).

    Empty segments (repeated boundaries) are allowed; tokens past ``cu_seqlens[-1]`` (which the
    model never passes: its ``cu_seqlens`` covers the padding) count from it as one more
    segment.
    """
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(num_tokens, device=cu.device, dtype=torch.int64)
    seg = torch.searchsorted(cu, tok, right=True) - 1  # last boundary <= token
    return tok - cu[seg.clamp_(0, cu.numel() - 1)]


#: Recent RoPE tables by (cu_seqlens, freqs, tokens, dtype, mscale): every layer of a forward
#: pass, for queries and keys, rotates by the same table (see :func:`thd_rope_tables`).
_ROPE_TABLES: collections.OrderedDict = collections.OrderedDict()
_ROPE_TABLES_KEPT = 8


def thd_rope_tables(cu_seqlens: torch.Tensor, freqs: torch.Tensor, num_tokens: int,
                    dtype: torch.dtype, mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` ``[t, 1, 1, d]`` of each packed token's rotation (``mscale`` applied,
    in ``dtype``), as Megatron's ``_apply_rotary_pos_emb_bshd`` computes them.

    Computed once per micro-batch: the model passes the same ``cu_seqlens`` and ``freqs`` tensors
    to every layer, so the tables are kept (a few, by tensor identity and version; weak
    references, so a freed tensor whose id is reused never matches) and the ~15 ops of the
    gather, ``cos``, ``sin``, scale and cast run once instead of twice per layer. Gradients
    never flow into ``freqs`` (a buffer); if they would, nothing is kept.
    """
    key = (id(cu_seqlens), cu_seqlens._version, id(freqs), freqs._version, num_tokens, dtype,
           float(mscale))
    kept = _ROPE_TABLES.get(key)
    if kept is not None and kept[0]() is cu_seqlens and kept[1]() is freqs:
        _ROPE_TABLES.move_to_end(key)
        return kept[2], kept[3]
    f = freqs[thd_rope_positions(cu_seqlens, num_tokens)]  # [t, 1, 1, d]
    cos = (torch.cos(f) * mscale).to(dtype)
    sin = (torch.sin(f) * mscale).to(dtype)
    if not freqs.requires_grad:
        _ROPE_TABLES[key] = (weakref.ref(cu_seqlens), weakref.ref(freqs), cos, sin)
        while len(_ROPE_TABLES) > _ROPE_TABLES_KEPT:
            _ROPE_TABLES.popitem(last=False)
    return cos, sin


def thd_rope_one_gather(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                        rotary_interleaved: bool = False, mla_rotary_interleaved: bool = False,
                        mscale: float = 1.0) -> torch.Tensor:
    """RoPE of packed tokens ``t`` ``[t, h, d]``, positions restarting in every segment.

    The rotation of Megatron's ``_apply_rotary_pos_emb_bshd`` over all tokens at once (no host
    sync), its ``cos`` / ``sin`` gathered by position once per micro-batch
    (:func:`thd_rope_tables`); the same values as Megatron's per-segment loop. The rotation is
    one fused kernel each way where it applies (:mod:`kernels.triton_rope`) and
    :mod:`kernels.fused_layers` chooses it (``MEGATRON_SPHINX_ROPE``).
    """
    from megatron.core.models.common.embeddings import rope_utils

    if mla_rotary_interleaved:  # MLA's layout: Megatron's own rotation on the gathered freqs
        pos = thd_rope_positions(cu_seqlens, t.shape[0])
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[pos], rotary_interleaved=rotary_interleaved,
            mla_rotary_interleaved=True, mscale=mscale).squeeze(1)
    cos, sin = thd_rope_tables(cu_seqlens, freqs, t.shape[0], t.dtype, mscale)
    rot_dim = freqs.shape[-1]
    from kernels import fused_layers, triton_rope

    if (triton_rope.supported(t, rot_dim, rotary_interleaved)
            and fused_layers.use_triton("rope", t)):
        return triton_rope.fused_rope(t, cos, sin)  # one kernel each way
    x = t.unsqueeze(1)  # [t, 1, h, d]: Megatron's 4-D layout
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    out = x * cos + rope_utils._rotate_half(x, rotary_interleaved) * sin
    if x_pass.shape[-1]:
        out = torch.cat((out, x_pass), dim=-1)
    return out.squeeze(1)


def _fix_thd_rope_loop() -> None:
    """Unfused RoPE on packed sequences on GPUs in one gather instead of a loop over segments.

    ``models/common/embeddings/rope_utils.py::_apply_rotary_pos_emb_thd`` (used without TE's
    fused RoPE) calls ``cu_seqlens.tolist()`` and ``.item()``, then runs the rotation once per
    segment: on a GPU, a host sync plus ~20 small kernels per packed sample, for queries and
    keys, in every layer (810 ops for 40 samples against 24 for the gather, 10 once a
    micro-batch's tables are kept: ``tools/bench_packed_layers.py``).
    Without context parallelism the result equals :func:`thd_rope_one_gather`, used for CUDA
    tensors. CPUs keep the loop: its per-segment chunks stay in cache and it measured 2.5-4x
    faster there. Context parallelism keeps the upstream path everywhere.
    """
    from megatron.core.models.common.embeddings import rope_utils as mod

    original = mod._apply_rotary_pos_emb_thd

    @functools.wraps(original)
    def _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved=False,
                                  mla_rotary_interleaved=False, mscale=1.0, cp_group=None,
                                  multi_latent_attention=None):
        if (not t.is_cuda or cp_group is None or cp_group.size() != 1
                or multi_latent_attention is not None):
            return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                            mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale,
                            cp_group=cp_group, multi_latent_attention=multi_latent_attention)
        return thd_rope_one_gather(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                                   mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale)

    mod._apply_rotary_pos_emb_thd = _apply_rotary_pos_emb_thd


def swiglu_impl(original):
    """Megatron's ``bias_swiglu_impl`` (the MLP's SwiGLU when ``bias_activation_fusion`` is on,
    as it is on GPUs) with its plain case, no bias and no FP8 or offloaded input, as
    :class:`kernels.triton_swiglu.FusedSwiGLU` where :mod:`kernels.fused_layers` chooses it: one
    kernel each way for the ~13 of the unfused path (Megatron's ``torch.compile`` of it is off
    by default: ``RunConfig.compile_fusions``)."""

    @functools.wraps(original)
    def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
        from kernels import fused_layers, triton_swiglu

        plain = bias is None and not fp8_input_store and not cpu_offload_input
        if plain and input.dim() in (2, 3):
            y = input.view(-1, input.shape[-1])  # [s * b, 2 * ffn]
            if triton_swiglu.supported(y) and fused_layers.use_triton("swiglu", y):
                out = triton_swiglu.FusedSwiGLU.apply(y)
                return out if input.dim() == 2 else out.view(*input.shape[:2], -1)
        return original(input, bias, fp8_input_store, cpu_offload_input)

    bias_swiglu_impl.unfused = original
    return bias_swiglu_impl


def _fix_swiglu_unfused() -> None:
    """The MLP's SwiGLU as one fused kernel each way on GPUs (see :func:`swiglu_impl`)."""
    from megatron.core.transformer import mlp

    mlp.bias_swiglu_impl = swiglu_impl(mlp.bias_swiglu_impl)


def _fix_final_rms_norm_without_te() -> None:
    """RMSNorm models build where Apex is installed and Transformer Engine is not.

    ``transformer/transformer_block.py`` builds a block's final norm from its module global
    ``LayerNormImpl``: TE's ``TENorm`` where TE imports, else Apex's ``FusedLayerNorm``, else
    torch's ``WrappedTorchNorm``. Megatron's ``FusedLayerNorm`` is LayerNorm only (it asserts
    ``config.normalization == "LayerNorm"``), so with Apex and without TE every LLaMA-family
    (RMSNorm) model failed to build. There the final norm is torch's, as the layers' own norms
    already are (Megatron's local spec picks it for RMSNorm); with TE, TE's stays.
    """
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if transformer_block.LayerNormImpl is FusedLayerNorm:
        transformer_block.LayerNormImpl = WrappedTorchNorm


_FIXES = (
    _fix_distrib_optimizer_step_unshare,
    _fix_distrib_optimizer_fresh_state,
    _fix_distrib_optimizer_load_skips_step,
    _fix_local_multi_tensor_ops,
    _fix_thd_rope_loop,
    _fix_swiglu_unfused,
    _fix_final_rms_norm_without_te,
)


def apply() -> list[str]:
    """Installs the fixes once; returns their names."""
    with _lock:
        if not _applied:
            for fix in _FIXES:
                fix()
                _applied.append(fix.__name__)
        return list(_applied)
