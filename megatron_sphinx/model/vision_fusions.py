"""Fewer memory passes in the frozen encoders' blocks (same maths, same parameters and names).

The encoders run forward only, in eval mode, and their step is bound by the GPU (H100 run 2:
97-100% busy, ~600 ms per sphinx-tiny step), much of it in memory-bound elementwise kernels.
Three patterns of timm's blocks take an extra pass over a full activation each:

* layer scale then residual add (``x + gamma * y``: a product broadcast over channels, then a
  sum), once per ConvNeXt block and twice per ViT block: here one ``torch.addcmul``, one kernel
  and one rounding;
* the ViT's SwiGLU feed-forward (DINOv2 ViT-g: ``silu(x1) * x2`` on the two strided halves of
  the first projection, two kernels): here the fused Triton kernel on GPUs
  (:mod:`kernels.triton_swiglu`, chosen as for the LLM by :mod:`kernels.fused_layers`).

Two more are opt-in:

* the GELU of a ``Linear, GELU, Linear`` feed-forward (every ConvNeXt block's; ConvNeXt-XXL is
  ~3/4 of the encoders' FLOPs) on the widest activation of the block (4x the channels), in its
  own kernel: with ``gelu="tanh"`` (``--vision-gelu tanh``) computed in the epilogue of the first
  GEMM (``torch._addmm_activation``, cuBLASLt's bias + GELU epilogue), which saves a read and a
  write of that activation. cuBLASLt computes GELU in its tanh form, which differs from the
  exact (erf) GELU by at most ~5e-4 per activation, less than a bf16 rounding of activations
  above ~0.25 (hence opt-in: the maths change slightly). On CPUs torch computes the exact GELU
  there.
* ConvNeXt's depthwise convolution and the LayerNorm after it: with ``dwconv="triton"``
  (``--vision-dwconv triton``) one Triton kernel (:mod:`kernels.triton_dwconv_norm`) that
  writes the normalised map once, where the convolution writes its output and the norm reads it
  back. Same maths and roundings; opt-in until a GPU measures it against cuDNN's convolution.
  Where the kernel cannot run (CPU tensors outside Triton's interpreter, a map not channels
  last) the block runs the torch ops.

:func:`fuse_frozen_blocks` rebinds the ``forward`` of the matching block instances; parameters,
buffers and state-dict names stay timm's, so weights load and save as before. Outputs equal
timm's up to rounding (``tests/test_vision.py``).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.activations import GELU as TimmGELU
from timm.layers.layer_scale import LayerScale
from timm.layers.mlp import GluMlp, Mlp
from timm.models.convnext import ConvNeXtBlock
from timm.models.vision_transformer import Block

from megatron_sphinx.config import VISION_DWCONV_FORMS, VISION_GELU_FORMS


def _convnext_block(self: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's ``ConvNeXtBlock.forward`` in eval mode (no drop path), layer scale and residual
    add as one ``addcmul``."""
    return _convnext_rest(self, x, self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))


def _convnext_block_dwconv_norm(self: ConvNeXtBlock, x: torch.Tensor) -> torch.Tensor:
    """:func:`_convnext_block` with the depthwise convolution and the norm one Triton kernel
    where it takes the map (channels last, on a GPU)."""
    from kernels import triton_dwconv_norm

    nhwc = x.permute(0, 2, 3, 1)  # contiguous for a channels-last map
    conv = self.conv_dw
    if not triton_dwconv_norm.supported(nhwc, conv.kernel_size[0]):
        return _convnext_block(self, x)
    z = triton_dwconv_norm.dwconv_norm(nhwc, conv.weight, conv.bias, self.norm.weight,
                                       self.norm.bias, self.norm.eps)
    return _convnext_rest(self, x, z)


def _convnext_rest(block: ConvNeXtBlock, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A ConvNeXt block after its norm: the feed-forward on the normalised map ``z`` (NHWC
    maths, an NCHW view after), then layer scale and residual add as one ``addcmul``."""
    y = block.mlp(z).permute(0, 3, 1, 2)
    return torch.addcmul(block.shortcut(x), y, block.gamma.reshape(1, -1, 1, 1))


def _plain_dwconv_norm(block: ConvNeXtBlock) -> bool:
    """A stride-1, zero-padded ``k x k`` depthwise convolution (k odd) and an affine LayerNorm
    over the channels: what :mod:`kernels.triton_dwconv_norm` computes."""
    conv, norm, channels = block.conv_dw, block.norm, block.conv_dw.out_channels
    k = conv.kernel_size
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == channels
            and k[0] == k[1] and k[0] % 2 == 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding == (k[0] // 2, k[0] // 2)
            and conv.padding_mode == "zeros" and isinstance(norm, nn.LayerNorm)
            and norm.normalized_shape == (channels,) and norm.weight is not None
            and norm.bias is not None)


def _vit_block(self: Block, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
               is_causal: bool = False) -> torch.Tensor:
    """timm's ``Block.forward`` in eval mode, each layer scale and residual add one ``addcmul``."""
    y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
    x = torch.addcmul(x, y, self.ls1.gamma)
    return torch.addcmul(x, self.mlp(self.norm2(x)), self.ls2.gamma)


def _swiglu_mlp(self: GluMlp, x: torch.Tensor) -> torch.Tensor:
    """timm's ``GluMlp.forward`` with SiLU on the first half (``SwiGLUPacked``) in eval mode, the
    gate one fused kernel where chosen."""
    from kernels import fused_layers, triton_swiglu

    h = self.fc1(x)  # [..., 2f]
    flat = h.reshape(-1, h.shape[-1])
    if triton_swiglu.supported(flat) and fused_layers.use_triton("swiglu", flat):
        gated = triton_swiglu.FusedSwiGLU.apply(flat).view(*h.shape[:-1], -1)
    else:
        a, b = h.chunk(2, dim=-1)
        gated = F.silu(a) * b
    return self.fc2(self.norm(gated))


def _gelu_mlp_epilogue(self: Mlp, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp.forward`` (``Linear, GELU, Linear``) in eval mode, the GELU (tanh form on
    GPUs) in the first GEMM's epilogue."""
    flat = x.reshape(-1, x.shape[-1])
    h = torch._addmm_activation(self.fc1.bias, flat, self.fc1.weight.t(), use_gelu=True)
    return self.fc2(self.norm(h)).view(*x.shape[:-1], -1)


def _is_gelu_mlp(module: nn.Module) -> bool:
    return (type(module) is Mlp and isinstance(module.act, (nn.GELU, TimmGELU))
            and type(module.fc1) is nn.Linear and module.fc1.bias is not None
            and module.drop1.p == 0.0 and module.drop2.p == 0.0)


def _no_drop_path(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Identity) or
               getattr(getattr(module, n, None), "drop_prob", 1.0) == 0.0 for n in names)


def fuse_frozen_blocks(model: nn.Module, gelu: str = "exact",
                       dwconv: str = "torch") -> dict[str, int]:
    """Rebinds the ``forward`` of the blocks of a frozen (eval-mode) timm encoder that match a
    pattern above; returns how many of each kind. Blocks with drop paths that could be active,
    other variants (convolutional MLP, no layer scale, gate last, dropout) keep timm's.

    Args:
        model: The timm encoder.
        gelu: ``exact`` keeps the GELU feed-forwards' own kernels; ``tanh`` computes their GELU
            in the first GEMM's epilogue (see the module's docstring).
        dwconv: ``torch`` runs ConvNeXt's depthwise convolution and norm as torch ops;
            ``triton`` as one kernel where it takes the map (see the module's docstring).
    """
    if gelu not in VISION_GELU_FORMS:
        raise ValueError(f"encoder GELU {gelu!r}: choose {' or '.join(VISION_GELU_FORMS)}")
    if dwconv not in VISION_DWCONV_FORMS:
        raise ValueError(f"encoder depthwise convolution {dwconv!r}: choose "
                         f"{' or '.join(VISION_DWCONV_FORMS)}")
    counts = {"convnext_block": 0, "vit_block": 0, "swiglu_mlp": 0, "gelu_mlp_epilogue": 0,
              "dwconv_norm": 0}
    for module in model.modules():
        if gelu == "tanh" and _is_gelu_mlp(module):
            module.forward = types.MethodType(_gelu_mlp_epilogue, module)
            counts["gelu_mlp_epilogue"] += 1
        elif (type(module) is ConvNeXtBlock and not module.use_conv_mlp
                and module.gamma is not None and _no_drop_path(module, "drop_path")):
            if dwconv == "triton" and _plain_dwconv_norm(module):
                module.forward = types.MethodType(_convnext_block_dwconv_norm, module)
                counts["dwconv_norm"] += 1
            else:
                module.forward = types.MethodType(_convnext_block, module)
            counts["convnext_block"] += 1
        elif (type(module) is Block and isinstance(module.ls1, LayerScale)
                and isinstance(module.ls2, LayerScale)
                and _no_drop_path(module, "drop_path1", "drop_path2")):
            module.forward = types.MethodType(_vit_block, module)
            counts["vit_block"] += 1
        elif (type(module) is GluMlp and isinstance(module.act, nn.SiLU) and not module.gate_last
                and module.chunk_dim == -1 and module.drop1.p == 0.0 and module.drop2.p == 0.0):
            module.forward = types.MethodType(_swiglu_mlp, module)
            counts["swiglu_mlp"] += 1
    return counts


def restore_timm_forwards(model: nn.Module) -> None:
    """Undoes :func:`fuse_frozen_blocks`: every block runs timm's own forward again (benchmarks
    and tests compare the two)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
