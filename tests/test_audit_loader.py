"""Mutation audit of ``PackedLoader.pause`` and its stats accounting: what
tests/test_loader_rewind.py and tests/test_loader.py let through."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader
from megatron_sphinx.data.sample_source import InMemorySource
from tests.files import photos
from tests.stores import random_photo_samples



def _cfg(**kw) -> LoaderConfig:
    base = dict(seq_length=2048, image_size=448, grid=2, global_batch_size=4, micro_batch_size=2,
                seed=5, weights=[1.0], num_workers=2, prefetch_steps=2, image_interp="linear",
                image_device="cpu")
    return LoaderConfig(**{**base, **kw})


class _SlowSource(InMemorySource):
    """Text-only samples whose reads take a while; counts the reads under way."""

    def __init__(self, n: int = 200, delay: float = 0.02):
        rng = np.random.default_rng(0)
        samples = []
        for _ in range(n):
            k = int(rng.integers(30, 300))
            ids = rng.integers(3, 500, k).astype(np.int32)
            ids[0] = 1
            samples.append(Sample(ids, np.arange(k) >= k // 2))
        super().__init__(samples, [None] * n)
        self.delay, self.lock = delay, threading.Lock()
        self.in_flight = self.calls = 0

    def get(self, i):
        with self.lock:
            self.in_flight += 1
            self.calls += 1
        try:
            time.sleep(self.delay)
            return super().get(i)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_pause_returns_only_when_no_dropped_step_is_still_being_built():
    """``pause`` drops the prefetched steps: queued ones are cancelled and running ones waited
    for, so nothing of them runs on during training (an evaluation loader pauses between
    evaluations; on a GPU its DALI work would compete with the training step)."""
    src = _SlowSource()
    with PackedLoader(src, _cfg()) as ld:
        ld.next_step()
        deadline = time.monotonic() + 20
        while src.in_flight == 0 and time.monotonic() < deadline:  # steps 2-3 being built
            time.sleep(0.001)
        assert src.in_flight > 0, "the loader built nothing ahead"
        ld.pause()
        assert src.in_flight == 0
        calls = src.calls
        time.sleep(0.3)
        assert src.calls == calls  # and nothing went on after it returned
        state = ld.state_dict()
    assert state["step"] == 1


@pytest.fixture(scope="module")
def image_source() -> InMemorySource:
    samples, images = random_photo_samples(24, *photos(limit=4), seed=1, max_len=200,
                                           trained_from=2, text_only_every=3)
    return InMemorySource(samples, images, 448, 2)


def _decodes(stats) -> int:
    return sum(v for k, v in stats.items() if k.startswith("decode:"))


def test_decode_paths_are_counted_for_the_returned_steps_only(image_source):
    """``stats`` counts each decoded image by its decode path (tools/bench_data.py reads
    them), for the steps returned, not for prefetched steps a rewind dropped."""
    with PackedLoader(image_source, _cfg(num_workers=0)) as sync:
        got = [sync.next_step() for _ in range(3)]
        want = dict(sync.stats)
    images = sum(len(pb.view_counts) for step in got for pb in step)
    assert images > 0 and _decodes(want) == images
    with PackedLoader(image_source, _cfg()) as ld:
        start = ld.state_dict()
        ld.next_step()
        time.sleep(0.5)  # steps 2-3 built ahead, then dropped by the rewind
        ld.load_state_dict(start)
        for _ in range(3):
            ld.next_step()
        stats = dict(ld.stats)
    assert _decodes(stats) == images + sum(
        len(pb.view_counts) for pb in got[0])  # step 1 was returned twice, 2-3 once
    assert stats["micro_batches"] == 4 * 2
