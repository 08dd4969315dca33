"""Encoders for the vision tests, with weights far from timm's initial ones."""
from __future__ import annotations

import torch

from megatron_sphinx.config import get_recipe


def scaled(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` with every parameter drawn from N(0, 0.5): the layer scales far from their
    tiny initial values (1e-6), so that the blocks' branches count (the debug tokens reach ~30)."""
    torch.manual_seed(seed)
    for p in module.parameters():
        p.data.normal_(0.0, 0.5)
    return module


def debug_convnext():
    """The debug recipe's ConvNeXt as a :class:`FrozenEncoder`, :func:`scaled`."""
    from megatron_sphinx.model.vision import FrozenEncoder

    cfg = next(e for e in get_recipe("debug").vision.encoders if e.kind == "convnext")
    torch.manual_seed(0)
    return scaled(FrozenEncoder(cfg))


def gpu_fusion_run(**fusions) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The debug ConvNeXt in bf16 on the GPU, on 8 views: its tokens with the default fusions,
    its tokens with ``set_fusions(**fusions)``, and the CUDA kernels that second call ran (name
    -> launches, from the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    enc = debug_convnext().cuda().to(torch.bfloat16)
    views = torch.rand(8, 3, 224, 224, device="cuda")
    before = enc(views).float()
    enc.set_fusions(**fusions)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        after = enc(views).float()
        torch.cuda.synchronize()
    return before, after, {e.key: e.count for e in prof.key_averages()}
