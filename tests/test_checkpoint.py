"""Which checkpoint a run starts from, and the checks made before anything is built.

Pure file-system behaviour of :mod:`megatron_sphinx.train.checkpoint` (no Megatron, no process
group): the newest complete checkpoint by step, the ``latest`` pointer, incomplete and ``.tmp``
folders, ``--save`` over ``--load``, ``keep_last`` pruning, and shard files cut short. End-to-end
saves and resumes are in ``tests/test_resume.py``.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from megatron_sphinx.train import checkpoint as ckpt_lib
from megatron_sphinx.train.checkpoint import (CheckpointError, CheckpointMeta, check_complete,
                                              find_latest, iter_name, list_complete, start_point)


def _meta(step: int) -> dict:
    return CheckpointMeta(step=step, recipe="debug", layout={"tp": 1, "pp": 1, "ep": 1, "dp": 1},
                          code_version="test", consumed={}).__dict__


def _complete(save: Path, step: int) -> Path:
    d = save / iter_name(step)
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps(_meta(step)))
    return d


def test_newest_complete_checkpoint_is_found_by_step_without_a_pointer(tmp_path):
    for step in (9, 10, 100, 2):
        _complete(tmp_path, step)
    (tmp_path / (iter_name(200) + ".tmp")).mkdir()  # a save in progress
    (tmp_path / iter_name(300)).mkdir()  # renamed but no meta.json: never complete
    assert [p.name for p in list_complete(tmp_path)] == [iter_name(s) for s in (2, 9, 10, 100)]
    assert find_latest(tmp_path) == tmp_path / iter_name(100)
    assert find_latest(tmp_path / "absent") is None


def test_latest_pointer_wins_only_when_it_names_a_complete_checkpoint(tmp_path):
    _complete(tmp_path, 5)
    _complete(tmp_path, 20)
    (tmp_path / "latest").write_text(iter_name(5) + "\n")
    assert find_latest(tmp_path) == tmp_path / iter_name(5)
    (tmp_path / iter_name(30)).mkdir()  # a crash after the pointer moved, before meta.json
    (tmp_path / "latest").write_text(iter_name(30))
    assert find_latest(tmp_path) == tmp_path / iter_name(20)


def test_save_directorys_own_checkpoint_wins_over_load(tmp_path):
    save, load = tmp_path / "save", tmp_path / "init"
    _complete(load, 0)
    assert start_point(save, load) == load / iter_name(0)  # nothing saved yet: --load
    _complete(save, 7)
    assert start_point(save, load) == save / iter_name(7)  # a requeued run resumes itself
    assert start_point(None, load / iter_name(0)) == load / iter_name(0)
    assert start_point(save, None) == save / iter_name(7)
    assert start_point(None, None) is None
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        start_point(tmp_path / "empty_save", tmp_path)


class _Groups:
    """Process groups of one rank (what ``save_checkpoint`` asks of them)."""

    def __getattr__(self, name):
        return types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)


def test_keep_last_prunes_to_exactly_that_many(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    # Megatron's tensor I/O is replaced: this checks the directory bookkeeping around it.
    monkeypatch.setattr(dist_checkpointing, "save", lambda state, path: None)
    monkeypatch.setattr(ckpt_lib, "_sharded_state", lambda *a, **k: {})
    for step in (1, 2, 3, 4):
        meta = CheckpointMeta(**dict(_meta(step), has_optimizer=False))  # weights only
        ckpt_lib.save_checkpoint(tmp_path, step, [], None, None, _Groups(), meta=meta,
                                 common={}, keep_last=2)
    assert [p.name for p in list_complete(tmp_path)] == [iter_name(3), iter_name(4)]
    assert (tmp_path / "latest").read_text() == iter_name(4)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_shard_cut_short_is_named(tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt = _complete(tmp_path, 3)
    state = {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(256)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "metadata.json").write_text("{}")
    assert check_complete(ckpt).step == 3
    md = dcp.FileSystemReader(str(ckpt)).read_metadata()
    ends = [(i.relative_path, i.offset + i.length) for i in md.storage_data.values()]
    shard, end = max(ends, key=lambda e: e[1])
    first_len = min(i.length for i in md.storage_data.values())
    assert end > first_len  # the last record sits past the first one's length
    data = (ckpt / shard).read_bytes()
    (ckpt / shard).write_bytes(data[: end - 1])  # its last byte lost
    with pytest.raises(CheckpointError, match=f"shard {shard} is truncated"):
        check_complete(ckpt)
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard}"):
        check_complete(ckpt)


@pytest.mark.parametrize("now, rng", [((1, 1, 2), True), ((2, 1, 2), False), ((1, 2, 2), False),
                                      ((1, 1, 1), False)], ids=["same", "tp", "pp", "ep"])
def test_rng_states_load_only_onto_the_layout_they_were_saved_from(tmp_path, monkeypatch, now,
                                                                   rng):
    from megatron.core import dist_checkpointing

    d = _complete(tmp_path, 4)
    meta = dict(_meta(4), layout={"tp": 1, "pp": 1, "ep": 2, "dp": 1})
    (d / "meta.json").write_text(json.dumps(meta))
    asked = {}

    def sharded_state(*a, with_rng, **k):
        asked["rng"] = with_rng
        return {}

    monkeypatch.setattr(ckpt_lib, "_sharded_state", sharded_state)
    monkeypatch.setattr(dist_checkpointing, "load",
                        lambda state, path: {"model": {}, "optimizer": {}})
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict",
                        lambda path: {"state": {"step": 4, "scheduler": {}}})
    sizes = dict(zip(("tp", "pp", "ep"), now))
    pgs = types.SimpleNamespace(**{k: types.SimpleNamespace(size=lambda v=v: v)
                                   for k, v in sizes.items()})
    noop = types.SimpleNamespace(load_state_dict=lambda *a, **k: None)
    state = ckpt_lib.load_checkpoint(d, [noop], noop, noop, pgs)
    assert state["step"] == 4 and asked["rng"] is rng
