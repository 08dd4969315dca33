"""Mutation audit of ``step.forward_step`` leaving the first stage's inputs on the host on later
pipeline stages: what tests/test_layout.py let through (it takes the expected fields from
``FIRST_STAGE_ONLY`` itself, and calls ``forward_step`` on a bare model)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.layout import Sample, build_packed_batch
from megatron_sphinx.model.sphinx import SphinxModel
from megatron_sphinx.train.step import forward_step

META = torch.device("meta")  # stands in for the GPU: what was moved lands there


class _Stage(SphinxModel):
    def __init__(self, pre_process: bool):
        nn.Module.__init__(self)
        self.pre_process = pre_process

    def forward(self, batch):
        return batch


class _Wrapper(nn.Module):
    """Like Megatron's DDP and Float16Module: the stage is ``.module``, no ``pre_process``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.module = inner

    def forward(self, batch):
        return self.module(batch)


def _batch():
    ids = np.arange(10, 50, dtype=np.int32)
    ids[0] = 1
    smp = Sample(ids, np.arange(40) >= 30, (300, 500), source_id=0)
    views = torch.rand(image_geometry(300, 500, 448, 2).num_views, 3, 224, 224)
    return build_packed_batch([[smp]], 2048, 448, 2, views)


def _on_host(model) -> set[str]:
    got, _ = forward_step(META, 1, iter([_batch()]), model)
    return {name for name, v in vars(got).items() if torch.is_tensor(v) and v.device != META}


def test_a_later_stage_moves_everything_but_the_three_input_sources():
    """The fields named here, not read from the code under test: a later stage still needs
    the packing boundaries, positions, labels, loss mask and loss sources on its device."""
    assert _on_host(_Stage(pre_process=False)) == {"views", "text_ids", "pack_index"}
    assert _on_host(_Stage(pre_process=True)) == set()


def test_the_stage_is_found_inside_its_wrappers():
    """The schedules pass the DDP-wrapped chunk: the first stage must still get its pixels on
    the device (and a later one must not)."""
    assert _on_host(_Wrapper(_Wrapper(_Stage(pre_process=True)))) == set()
    assert _on_host(_Wrapper(_Stage(pre_process=False))) == {"views", "text_ids", "pack_index"}
