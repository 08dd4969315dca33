"""Held-out evaluation during training: the loss per trained token on a fixed set of batches.

Every evaluation replays the same ``--eval-batches`` global batches of ``--eval-data`` from the
start of its stream (the loader's first state is kept and restored), so the evaluation losses of
one run, of its resumed continuation and of any parallel layout are comparable number for
number. The batches are built like the training batches (global batch, micro-batch, sequence
length, packing and skipping), run forward only, and nothing of the training state changes: no
gradient, no optimizer step, and the training data stream does not move. Between evaluations
the loader is paused (no decoding in the background during training) but keeps its workers and
their image processors, so an evaluation does not rebuild them; they go at the end of training.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sphinx.train.data import by_source
from megatron_sphinx.train.step import LossTotals, eval_step

log = logging.getLogger("megatron_sphinx.train")


@dataclass
class EvalResult:
    """One evaluation (identical on every rank)."""

    loss: float
    """Mean loss per trained token over every evaluation batch."""
    num_loss_tokens: int
    """Trained tokens in the evaluation batches."""
    time_s: float
    """Wall time of the evaluation."""
    source_loss: dict[str, float] = field(default_factory=dict)
    """Mean loss per trained token of every mix source with trained tokens (empty for one
    source)."""


class Evaluator:
    """Evaluates the model on the same held-out batches at every call.

    Args:
        loader: The evaluation loader of this data-parallel rank (``next_step``,
            ``state_dict``, ``load_state_dict``; if it has background workers, ``pause`` to stop
            them between evaluations and ``close`` at the end, or only ``close`` for both).
        batches: Global batches per evaluation.
        seq_length: Tokens per micro-batch (as for the training step).
        pg_collection: Megatron process groups.
        device: Where batches go.
        source_names: The mix sources of the evaluation data, by source id; with more than
            one, each one's loss is reported too.
    """

    def __init__(self, loader, batches: int, *, seq_length: int, pg_collection,
                 device: torch.device, source_names: list[str] | None = None):
        self.loader, self.batches = loader, batches
        self.seq_length, self.pgs, self.device = seq_length, pg_collection, device
        self.source_names = list(source_names or [])
        self.num_sources = max(len(self.source_names), 1)
        self._start = loader.state_dict()

    def __call__(self, model_chunks: list) -> EvalResult:
        """Runs one evaluation of ``model_chunks`` (left in training mode afterwards)."""
        t0 = time.perf_counter()
        self.loader.load_state_dict(self._start)
        total = LossTotals(0.0, 0)
        for chunk in model_chunks:
            chunk.eval()
        try:
            for _ in range(self.batches):
                micro = self.loader.next_step()
                total = total + eval_step(
                    model_chunks, micro, num_microbatches=len(micro),
                    seq_length=self.seq_length, pg_collection=self.pgs, device=self.device,
                    dp_group=self.pgs.dp, num_sources=self.num_sources)
        finally:
            for chunk in model_chunks:
                chunk.train()
            self._pause()
        if total.tokens == 0:
            log.warning("the evaluation batches hold no trained token (no answers): the "
                        "evaluation loss is NaN")
        return EvalResult(loss=total.loss_sum / total.tokens if total.tokens else float("nan"),
                          num_loss_tokens=total.tokens, time_s=time.perf_counter() - t0,
                          source_loss=by_source(self.source_names, total.by_source))

    def _pause(self) -> None:
        """Stops the loader's background work until the next evaluation (its workers stay)."""
        stop = getattr(self.loader, "pause", None) or getattr(self.loader, "close", None)
        if stop is not None:
            stop()

    def close(self) -> None:
        """Frees the loader's background workers (at the end of training)."""
        if hasattr(self.loader, "close"):
            self.loader.close()


def evaluation_due(step: int, interval: int, last_step: int) -> bool:
    """Whether ``step`` evaluates: every ``interval`` steps (0: never) and at the last step."""
    return step == last_step or bool(interval) and step % interval == 0


def describe(rc, cfg) -> str:
    """One line for the log: what is evaluated and how often."""
    when = (f"every {rc.eval_interval} steps and at step {rc.steps}" if rc.eval_interval
            else f"at step {rc.steps}")
    data = rc.eval_data
    if data is None:
        data = f"the held-out {rc.eval_split} of {rc.data or 'the sample data'}"
    elif data != "synthetic" and rc.data and Path(data).resolve() == Path(rc.data).resolve():
        log.warning("--eval-data is the training store %s: the evaluation loss is not held out "
                    "(--eval-split F holds out a part of it)", data)
    return (f"evaluation: {rc.eval_batches} global batches of {cfg.train.global_batch_size} rows "
            f"from {data}, {when}")
