"""ConvNeXt's depthwise convolution and the LayerNorm after it in one Triton kernel (forward only;
GPU, or CPU tensors under the interpreter).

Every ConvNeXt block starts ``z = LayerNorm_C(dwconv_kxk(x))`` on a channels-last map
(CLIP-ConvNeXt-XXL: 40 blocks, k = 7, 384 to 3072 channels). Unfused, the convolution writes its
output and the norm reads it back; and H100 run 2's profile has the convolution kernel itself at
61 ms of a sphinx-tiny step (``docs/gpu/h100/run2/kernels.txt``), several times what its bytes
take at the GPU's bandwidth. Here one program computes the convolution of a few pixels of one
image row over all channels (each tap a ``[pixels, channels]`` tile from the cache, fp32
accumulation), then their LayerNorm over the channels, and writes ``z`` once.

Maths as the unfused pair's: the convolution's output (bias included) is rounded to the input's
dtype, as the convolution's kernel writes it, then normalised in fp32 and rounded once more. The
frozen encoders need no gradient, so there is no backward. Chosen by ``--vision-dwconv triton``
(:mod:`megatron_sphinx.model.vision_fusions`), which checks the kernel against the torch ops at
start-up (:func:`kernels.fused_layers.self_check`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton_support import runs_here, tl, triton

__all__ = ["dwconv_norm", "reference_dwconv_norm", "supported"]

#: ``(accumulators, warps)`` per program: fp32 accumulators (pixels x channels padded to a power
#: of two), which bound the registers it holds, and warps. A first guess, not yet measured on a
#: GPU; ``tools/bench_vision.py --dwconv-tiles`` sweeps others (it sets this).
DEFAULT_TILE = (16384, 8)


def supported(x: torch.Tensor, kernel_size: int) -> bool:
    """Whether the kernel takes ``x`` ``[B, H, W, C]`` (contiguous, i.e. a channels-last map
    permuted to NHWC) with an odd ``kernel_size``, on a GPU (or a CPU tensor under the
    interpreter)."""
    if triton is None or x.dim() != 4 or not x.is_contiguous() or kernel_size % 2 == 0:
        return False
    return x.is_floating_point() and runs_here(x)


def reference_dwconv_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          eps: float) -> torch.Tensor:
    """The torch ops the kernel replaces, on ``x`` ``[B, H, W, C]``: a depthwise ``k x k``
    convolution (stride 1, zero padding ``k // 2``), then LayerNorm over ``C``; ``[B, H, W, C]``."""
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=x.shape[-1])
    return F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[-1],), norm_weight, norm_bias, eps)


if triton is not None:
    @triton.jit
    def _dwconv_norm_kernel(x_ptr, w_ptr, cb_ptr, g_ptr, nb_ptr, z_ptr, H, W, C, stride_w, eps,
                            K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        h = tl.program_id(1)
        image = tl.program_id(2).to(tl.int64) * H * W * C
        w = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for dy in range(K):  # a loop (unrolled 49 taps compile for ~17 s per channel count)
            hh = h + dy - K // 2
            row_ok = (hh >= 0) & (hh < H)
            for dx in tl.static_range(K):
                ww = w + dx - K // 2
                ok = ((ww >= 0) & (ww < W) & row_ok)[:, None] & c_ok[None, :]
                v = tl.load(x_ptr + image + (hh * W + ww)[:, None] * C + c[None, :], mask=ok,
                            other=0.0)
                tap = tl.load(w_ptr + c * stride_w + dy * K + dx, mask=c_ok, other=0.0)
                acc += v.to(tl.float32) * tap.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(cb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        # the convolution's output as its own kernel would write it, then LayerNorm over C
        y = tl.where(c_ok[None, :], acc.to(z_ptr.dtype.element_ty).to(tl.float32), 0.0)
        mean = tl.sum(y, axis=1) / C
        d = tl.where(c_ok[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        gamma = tl.load(g_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(nb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        z = d * rstd[:, None] * gamma[None, :] + beta[None, :]
        out = z_ptr + image + (h * W + w)[:, None] * C + c[None, :]
        tl.store(out, z.to(z_ptr.dtype.element_ty), mask=(w < W)[:, None] & c_ok[None, :])


def dwconv_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm_C(depthwise_conv(x))`` of ``x`` ``[B, H, W, C]`` (contiguous; see
    :func:`supported`) in one kernel; ``weight`` ``[C, 1, k, k]`` (stride 1, zero padding
    ``k // 2``), ``bias`` ``[C]`` or None, the norm's ``[C]`` weight and bias. Returns a new
    contiguous ``[B, H, W, C]`` tensor in ``x``'s dtype."""
    b, h, w, c = x.shape
    k = weight.shape[-1]
    if weight.shape != (c, 1, k, k) or not supported(x, k):
        raise ValueError(f"dwconv_norm takes a contiguous [B, H, W, C] map and [C, 1, k, k] "
                         f"weights with k odd, on a GPU; got {tuple(x.shape)} "
                         f"(contiguous {x.is_contiguous()}) and {tuple(weight.shape)}")
    taps = weight.reshape(c, k * k)
    if taps.stride(1) != 1:
        taps = taps.contiguous()
    z = torch.empty_like(x)
    accumulators, warps = DEFAULT_TILE
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(triton.next_power_of_2(w), accumulators // block_c))
    grid = (triton.cdiv(w, block_p), h, b)
    _dwconv_norm_kernel[grid](x, taps, bias if bias is not None else taps, norm_weight,
                              norm_bias, z, h, w, c, taps.stride(0), eps, K=k,
                              HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c,
                              num_warps=warps)
    return z
