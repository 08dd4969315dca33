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
