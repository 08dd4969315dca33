"""A resumed run reproduces an uninterrupted one, also on another parallel layout."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks

COMMON = dict(recipe="debug", data="synthetic", steps=6, global_batch_size=2, seq_length=1400)


def _train(rank, world_size, save, load=None, **kw):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    try:
        run(RunConfig(save=save, load=load, **{**COMMON, **kw}))
    except SystemExit as exc:
        return exc.code
    return 0


def _losses(save) -> dict[int, float]:
    lines = Path(save, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("full"))
    assert run_ranks(_train, 1, save, timeout=300) == [0]
    return _losses(save)


def test_resume_same_layout_is_exact(uninterrupted, tmp_path):
    save, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    assert run_ranks(partial(_train, exit_interval=3, tensorboard_dir=tb), 1, save,
                     timeout=300) == [3]
    assert sorted(_losses(save)) == [1, 2, 3]
    assert (Path(save) / "iter_0000003" / "meta.json").exists()
    # resumes from --save, no flag
    assert run_ranks(partial(_train, tensorboard_dir=tb), 1, save, timeout=300) == [0]
    resumed = _losses(save)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == uninterrupted[step], step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (step, pytest.approx(resumed[step], rel=1e-6)) for step in range(1, 7)]


@pytest.mark.parametrize("target", [dict(world=1, layout={}), dict(world=2, layout={"pp": 2})],
                         ids=["tp2_to_tp1", "tp2_to_pp2"])
def test_tp2_checkpoint_resumes_on_other_layouts(uninterrupted, tmp_path, target):
    first = str(tmp_path / "tp2")
    assert run_ranks(partial(_train, tp=2, exit_interval=3), 2, first, timeout=300) == [3, 3]
    second = str(tmp_path / "other")
    codes = run_ranks(partial(_train, load=first, **target["layout"]), target["world"], second,
                      timeout=300)
    assert set(codes) == {0}
    resumed = _losses(second)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step



def test_interleaved_pipeline_checkpoint_resumes_on_one_process(tmp_path):
    """``--pp 2 --vpp 2`` saves two model chunks per rank (``model0``, ``model1``); their
    layers carry global numbers, so one process resumes them exactly. (A layout's own
    initial weights differ from one process's: the reference is the interleaved run.)"""
    full, first, second = (str(tmp_path / name) for name in ("full", "vpp", "one"))
    interleaved = partial(_train, pp=2, vpp=2)
    assert run_ranks(interleaved, 2, full, timeout=300) == [0, 0]
    assert run_ranks(partial(interleaved, exit_interval=3), 2, first, timeout=300) == [3, 3]
    assert run_ranks(partial(_train, load=first), 1, second, timeout=300) == [0]
    reference, resumed = _losses(full), _losses(second)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
    # It also converts: to Hugging Face and back gives the interleaved checkpoint's weights.
    from tests.test_convert import _from_hf_worker, _to_hf_worker

    hf, back = str(tmp_path / "hf"), str(tmp_path / "back")
    run_ranks(_to_hf_worker, 1, first, hf, None, timeout=180)
    run_ranks(_from_hf_worker, 1, ["--hf", hf, "--recipe", "debug", "--out", back], timeout=180)
    want, got = (run_ranks(_saved_weights, 1, str(d), timeout=120)[0]
                 for d in (Path(first) / "iter_0000003", Path(back) / "iter_0000000"))
    assert len(want) > 10 and want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_expert_parallel_moe_resumes_exactly(tmp_path):
    """debug-moe on two expert-parallel ranks: Megatron chains two distributed optimizers (the
    experts' parameters reduce over their own data-parallel group), each torch's fused AdamW;
    a run stopped after step 3 and resumed reproduces the uninterrupted one exactly."""
    full, stopped = str(tmp_path / "full"), str(tmp_path / "stopped")
    moe = partial(_train, recipe="debug-moe", ep=2)
    assert run_ranks(moe, 2, full, timeout=300) == [0, 0]
    assert run_ranks(partial(moe, exit_interval=3), 2, stopped, timeout=300) == [3, 3]
    assert run_ranks(moe, 2, stopped, timeout=300) == [0, 0]
    reference, resumed = _losses(full), _losses(stopped)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == reference[step], step


def _saved_weights(rank, world_size, ckpt) -> dict:
    """The model weights of a checkpoint as full tensors (no model needed)."""
    from megatron.core import dist_checkpointing

    torch.distributed.init_process_group("gloo")
    tensors = dist_checkpointing.load_plain_tensors(str(ckpt))
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer")
            and "rng" not in k and isinstance(v, torch.Tensor)}


def test_dp2_checkpoint_holds_the_gathered_weights(tmp_path):
    """Under the overlapped parameter gather (the default) a rank holds only its own shard of
    the updated weights until the next forward pass; a save must gather them first (a resume
    would not show it: the optimizer's shards restore the weights, but a conversion or
    ``--eval-only`` reads the saved weights)."""
    one, dp2 = str(tmp_path / "one"), str(tmp_path / "dp2")
    assert run_ranks(partial(_train, exit_interval=3), 1, one, timeout=300) == [3]
    assert run_ranks(partial(_train, exit_interval=3), 2, dp2, timeout=300) == [3, 3]
    ref, got = (run_ranks(_saved_weights, 1, str(Path(d) / "iter_0000003"), timeout=120)[0]
                for d in (one, dp2))
    assert len(ref) > 10 and ref.keys() == got.keys()
    bad = [k for k in ref if not torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7)]
    assert not bad, bad
