"""Rewinding the loader (every held-out evaluation does) keeps its workers and their image
processors: the same batches every time, processors built once, only returned work counted,
and no thread left after ``close``."""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import wait

import pytest
import torch

from megatron_sphinx.data import loader as loader_mod
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader
from megatron_sphinx.data.sample_source import InMemorySource
from megatron_sphinx.data.store import StoreReader
from megatron_sphinx.train import evaluate
from megatron_sphinx.train.evaluate import Evaluator
from megatron_sphinx.train.step import LossTotals
from tests.files import photos
from tests.stores import random_photo_samples, write_source_store

WORKERS = 2
COUNTED = ("samples", "tokens", "positions", "micro_batches")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> StoreReader:
    """36 samples over 2 sources, three in four with an image, as a zarr store."""
    samples, images = random_photo_samples(36, *photos(), seed=0, max_len=400, trained_from=3,
                                           text_only_every=4, sources=2)
    path = tmp_path_factory.mktemp("rewind") / "s.zarr"
    write_source_store(path, InMemorySource(samples, images, 448, 2), ["a", "b"])
    return StoreReader(path, image_size=448, grid=2)


def cfg(**kw) -> LoaderConfig:
    base = dict(seq_length=4096, image_size=448, grid=2, global_batch_size=4, micro_batch_size=2,
                seed=5, weights=[1.0, 1.0], num_workers=WORKERS, prefetch_steps=2,
                image_interp="linear", image_device="cpu")
    return LoaderConfig(**{**base, **kw})


@pytest.fixture
def built(monkeypatch) -> list[int]:
    """Thread idents of every ImageProcessor the loader constructs."""
    idents: list[int] = []

    class Counting(loader_mod.ImageProcessor):
        def __init__(self, *a, **k):
            idents.append(threading.get_ident())
            super().__init__(*a, **k)

    monkeypatch.setattr(loader_mod, "ImageProcessor", Counting)
    return idents


def steps(loader, n) -> list[list]:
    return [loader.next_step() for _ in range(n)]


def assert_same(a: list[list], b: list[list]) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            for f in dataclasses.fields(x):
                u, v = getattr(x, f.name), getattr(y, f.name)
                assert torch.equal(u, v) if torch.is_tensor(u) else u == v, f.name


def loader_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Alive loader threads started since ``before``."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("loader")]


def let_prefetch_finish(ld: PackedLoader) -> None:
    """Waits until the producer filled its queue and the queued steps are built, so that a
    rewind has finished work to drop."""
    for _ in range(200):
        if ld._queue.full():
            break
        threading.Event().wait(0.02)
    assert ld._queue.full(), "the loader did not prefetch"
    wait([fut for fut, _ in list(ld._queue.queue)], timeout=60)


def test_rewinds_replay_the_same_batches_on_the_same_workers(store, built):
    with PackedLoader(store, cfg(num_workers=0)) as fresh:
        ref = steps(fresh, 3)
    assert sum(pb.views.shape[0] for s in ref for pb in s) > 0  # images are decoded
    before = set(threading.enumerate())
    with PackedLoader(store, cfg()) as ld:
        start = ld.state_dict()
        built.clear()
        pools = []
        for _ in range(4):  # the first pass and three rewinds
            ld.load_state_dict(start)
            assert_same(steps(ld, 3), ref)
            let_prefetch_finish(ld)  # steps 4-5 are built ahead, then dropped by the rewind
            pools.append({t for t in loader_threads(before) if t.name != "loader-plan"})
        assert len(pools[0]) == WORKERS and all(p == pools[0] for p in pools)  # kept
        assert 0 < len(built) <= WORKERS  # one processor per worker thread, ever
        assert set(built) <= {t.ident for t in pools[0]}


def test_pause_keeps_the_state_of_the_last_returned_step(store, built):
    with PackedLoader(store, cfg(num_workers=0)) as fresh:
        ref = steps(fresh, 4)
    built.clear()
    before = set(threading.enumerate())
    with PackedLoader(store, cfg()) as ld:
        assert_same(steps(ld, 2), ref[:2])
        state = ld.state_dict()
        let_prefetch_finish(ld)
        ld.pause()
        assert ld.state_dict() == state and ld.step == 2
        alive = loader_threads(before)
        assert [t.name for t in alive if t.name == "loader-plan"] == []  # nothing ahead
        assert len(alive) == WORKERS  # the workers wait, idle
        ld.pause()  # twice: nothing to stop
        assert_same(steps(ld, 2), ref[2:])
        assert ld.step == 4 and len(built) <= WORKERS


def test_stats_count_only_returned_steps(store):
    """A rewind drops prefetched steps that were already built: they are not counted."""
    def two_then_rewind_three(ld):
        start = ld.state_dict()
        steps(ld, 2)
        if ld.cfg.num_workers:
            let_prefetch_finish(ld)
        ld.load_state_dict(start)
        steps(ld, 3)  # the loader builds steps 4-5 ahead meanwhile: not counted either
        return {k: ld.stats[k] for k in COUNTED}

    with PackedLoader(store, cfg(num_workers=0)) as sync:
        want = two_then_rewind_three(sync)
    with PackedLoader(store, cfg()) as ld:
        got = two_then_rewind_three(ld)
    assert want["micro_batches"] == 5 * 2 and want["samples"] > 0
    assert got == want


def test_close_stops_every_thread_and_can_be_repeated(store):
    before = set(threading.enumerate())
    ld = PackedLoader(store, cfg())
    steps(ld, 2)
    assert {t.name for t in loader_threads(before)} >= {"loader-plan", "loader_0"}
    ld.close()
    assert loader_threads(before) == []
    ld.close()
    # the state is kept: a closed loader goes on with new workers, and closes again
    with PackedLoader(store, cfg(num_workers=0)) as fresh:
        ref = steps(fresh, 3)
    assert_same(steps(ld, 1), ref[2:])
    ld.close()
    ld.close()
    assert loader_threads(before) == []


# --------------------------------------------------------------- the evaluator

def _batch_loss(calls: list):
    """A forward step whose loss is a fixed function of every tensor of the batch."""
    def eval_step(model_chunks, micro, **kw):
        calls.append(threading.get_ident())
        s = sum(float(pb.text_ids.double().sum()) + float(pb.labels.double().sum())
                + float(pb.views.double().sum())
                for pb in micro)
        n = sum(pb.num_tokens for pb in micro)
        return LossTotals(s, n)
    return eval_step


def test_evaluator_replays_the_same_loss_and_builds_processors_once(store, built, monkeypatch):
    monkeypatch.setattr(evaluate, "eval_step", _batch_loss([]))
    pgs = type("Groups", (), {"dp": None})()
    with PackedLoader(store, cfg(num_workers=0)) as fresh:
        want = Evaluator(fresh, 3, seq_length=4096, pg_collection=pgs,
                         device=torch.device("cpu"))([])
    before = set(threading.enumerate())
    built.clear()
    ld = PackedLoader(store, cfg())
    ev = Evaluator(ld, 3, seq_length=4096, pg_collection=pgs, device=torch.device("cpu"))
    results = []
    for _ in range(3):
        results.append(ev([]))
        alive = loader_threads(before)  # paused: the workers wait, nothing is built ahead
        assert len(alive) == WORKERS and "loader-plan" not in {t.name for t in alive}
    assert [r.loss for r in results] == [want.loss] * 3 and want.num_loss_tokens > 0
    assert {r.num_loss_tokens for r in results} == {want.num_loss_tokens}
    assert 0 < len(built) <= WORKERS
    ev.close()
    assert loader_threads(before) == []


class _PausingLoader:
    def __init__(self):
        self.calls: list[str] = []

    def next_step(self):
        return [1]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        self.calls.append("rewind")

    def pause(self):
        self.calls.append("pause")

    def close(self):
        self.calls.append("close")


def test_evaluator_pauses_between_evaluations_and_closes_at_the_end(monkeypatch):
    monkeypatch.setattr(evaluate, "eval_step", lambda chunks, micro, **kw: LossTotals(1.0, 1))
    ld = _PausingLoader()
    ev = Evaluator(ld, 2, seq_length=8, pg_collection=type("G", (), {"dp": None})(),
                   device=torch.device("cpu"))
    ev([])
    ev([])
    assert ld.calls == ["rewind", "pause", "rewind", "pause"]
    ev.close()
    assert ld.calls[-1] == "close" and ld.calls.count("close") == 1
