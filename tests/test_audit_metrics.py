"""Mutation audit of the ``--tensorboard-dir`` checks (run_config): what tests/test_metrics.py
and tests/test_train_cli.py let through."""
from __future__ import annotations

import importlib.util

import pytest

from megatron_sphinx.config import get_recipe
from megatron_sphinx.train.run_config import RunConfig, check_run_inputs


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_tensorboard_dir_is_refused(value):
    """An empty path would pass the directory check (it is the current directory) and
    SummaryWriter would then write to ./runs/<date>_<host> instead."""
    with pytest.raises(ValueError, match="--tensorboard-dir is empty"):
        RunConfig(data="synthetic", tensorboard_dir=value)


def test_a_missing_tensorboard_package_is_one_line_before_launch(tmp_path, monkeypatch):
    """Without the tensorboard package rank 0 would fail at SummaryWriter only after the
    process groups and the model were built: the pre-launch check says what to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    rc = RunConfig(data="synthetic", tensorboard_dir=str(tmp_path / "tb"))
    with pytest.raises(ValueError, match="needs the tensorboard package: pip install"):
        check_run_inputs(rc, get_recipe("debug"))
    assert not (tmp_path / "tb").exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    check_run_inputs(rc, get_recipe("debug"))  # installed (requirements.txt): accepted

