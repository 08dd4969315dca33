"""Megatron fallbacks replaced by :mod:`megatron_sphinx.upstream_fixes` (no Apex, no TE).

The optimizer fixes for resuming are exercised end to end by ``tests/test_resume.py``, and the
THD RoPE gather by ``tests/test_attention.py``; here the multi-tensor gradient norm and scale.
"""
from __future__ import annotations

import pytest
import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads, optimizer

from megatron_sphinx import upstream_fixes


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (64,), (3, 4, 9), (1,), (128, 33)]
    return [(torch.randn(s, generator=gen) * (i + 1)).to(dtype) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_norm_equals_float64_norm_of_all_elements(dtype):
    grads = _grads(dtype)
    flag = torch.zeros(1, dtype=torch.int)
    norm, per_tensor = upstream_fixes.multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
    want = torch.cat([g.double().flatten() for g in grads]).norm()
    assert per_tensor is None
    assert norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double()[0], want, rtol=1e-6, atol=0)


def test_l2_norm_reads_no_tensor_value_on_the_host():
    """Meta tensors have no values: any host read raises, so this can only pass without one."""
    grads = [torch.empty(5, 3, device="meta"), torch.empty(9, device="meta")]
    flag = torch.zeros(1, dtype=torch.int, device="meta")
    norm, _ = upstream_fixes.multi_tensor_l2_norm(2048 * 32, flag, [grads], False)
    assert norm.device.type == "meta" and norm.shape == (1,)
    with pytest.raises((RuntimeError, NotImplementedError)):  # Megatron's fallback reads each
        mcore_utils.local_multi_tensor_l2_norm(2048 * 32, flag, [grads], False)


def test_scale_in_place_copy_and_scaled_copy_across_dtypes():
    src = _grads(torch.float32)
    flag = torch.zeros(1, dtype=torch.int)

    same = [g.clone() for g in src]
    upstream_fixes.multi_tensor_scale(0, flag, [same, same], 0.25)
    for got, g in zip(same, src):
        torch.testing.assert_close(got, g * 0.25, rtol=0, atol=0)

    for scale in (1.0, 0.5):  # 1.0 is the optimizer's main -> model parameter copy
        dst = [torch.full_like(g, float("nan"), dtype=torch.bfloat16) for g in src]
        upstream_fixes.multi_tensor_scale(0, flag, [src, dst], scale)
        for got, g in zip(dst, src):
            torch.testing.assert_close(got, (g * scale).to(torch.bfloat16), rtol=0, atol=0)


def test_apply_swaps_only_megatron_local_fallbacks():
    upstream_fixes.apply()
    if clip_grads.multi_tensor_applier is not mcore_utils.local_multi_tensor_applier:
        pytest.skip("Apex or Transformer Engine is installed: Megatron uses their fused ops")
    assert clip_grads.l2_norm_impl is upstream_fixes.multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is upstream_fixes.multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is upstream_fixes.multi_tensor_scale


def test_apply_installs_every_fix_once():
    from megatron.core.models.common.embeddings import rope_utils

    names = upstream_fixes.apply()
    assert names == [fix.__name__ for fix in upstream_fixes._FIXES]
    installed = rope_utils._apply_rotary_pos_emb_thd
    assert upstream_fixes.apply() == names
    assert rope_utils._apply_rotary_pos_emb_thd is installed  # not wrapped a second time


def test_rms_norm_models_build_with_apex_without_te(monkeypatch):
    """With Apex and without TE, Megatron builds a block's final norm as Apex's FusedLayerNorm,
    which refuses RMSNorm (every recipe here): the fix makes it torch's norm there, the norm the
    layers already use. (Apex is never installed here: its class is put in place by hand.)"""
    import torch.nn.functional as F
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=F.silu, use_cpu_initialization=True)
    with pytest.raises(AssertionError, match="RMSNorm.*not supported in FusedLayerNorm"):
        FusedLayerNorm(config=cfg, hidden_size=32)
    monkeypatch.setattr(transformer_block, "LayerNormImpl", FusedLayerNorm)
    upstream_fixes._fix_final_rms_norm_without_te()
    assert transformer_block.LayerNormImpl is WrappedTorchNorm
    norm = transformer_block.LayerNormImpl(config=cfg, hidden_size=32, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm)
    monkeypatch.setattr(transformer_block, "LayerNormImpl", "TE's norm")  # TE's stays
    upstream_fixes._fix_final_rms_norm_without_te()
    assert transformer_block.LayerNormImpl == "TE's norm"
