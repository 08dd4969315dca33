"""The trainable projector from concatenated visual tokens to the LLM width."""
from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """``Linear(C, hidden)`` then ``LayerNorm(hidden)``, as in SPHINX-X.

    Replicated on every tensor-parallel rank (it is small next to the LLM); its gradients are
    identical across those ranks by construction of the pack op's sequence-parallel wrapping.
    """

    def __init__(self, in_channels: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = nn.Linear(in_channels, hidden_size, dtype=dtype)
        self.norm = nn.LayerNorm(hidden_size, dtype=dtype)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., C]`` -> ``[..., hidden]``."""
        return self.norm(self.linear(tokens.to(self.linear.weight.dtype)))
