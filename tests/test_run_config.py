"""The cheap pre-launch checks of a training command (:func:`check_run_inputs`) at their edges."""
from __future__ import annotations

import pytest

from megatron_sphinx.config import get_recipe
from megatron_sphinx.data.geometry import full_image_positions
from megatron_sphinx.train.run_config import RunConfig, check_run_inputs


def test_sequence_must_hold_one_full_image_and_some_text():
    cfg = get_recipe("debug")
    need = full_image_positions(cfg.vision.image_size, cfg.vision.grid)
    with pytest.raises(ValueError, match=f"use a --seq-length above {need}"):
        check_run_inputs(RunConfig(data="synthetic", seq_length=need), cfg)
    check_run_inputs(RunConfig(data="synthetic", seq_length=need + 1), cfg)  # one text token
