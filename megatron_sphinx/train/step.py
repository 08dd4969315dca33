"""One optimizer step: Megatron's pipeline schedule over the micro-batches, then the optimizer.

The loss is the mean over every trained token of the global batch (``calculate_per_token_loss``):
each micro-batch returns its loss sum and token count, Megatron divides the gradients by the
global token count, so every parallel layout and micro-batch split gives the same update.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_sphinx.data.layout import PackedBatch
from megatron_sphinx.train.build import unwrap


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    """Mean loss per trained token over the global batch."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when Megatron reports none: a step skipped
    on non-finite gradients)."""
    num_loss_tokens: int
    """Trained tokens in the global batch."""
    update_successful: bool
    """False when the optimizer skipped the step (e.g. non-finite gradients)."""
    source_losses: tuple[tuple[float, int], ...] = ()
    """``(loss sum, trained tokens)`` of every mix source, by source id (empty for one
    source)."""


@dataclass
class LossTotals:
    """Loss sums over one or more global batches (identical on every rank)."""

    loss_sum: float
    """Sum of the per-token losses of every trained token."""
    tokens: int
    """Trained tokens."""
    by_source: tuple[tuple[float, int], ...] = ()
    """``(loss sum, trained tokens)`` of every mix source, by source id (empty for one
    source)."""

    def __add__(self, other: "LossTotals") -> "LossTotals":
        pairs = tuple((a[0] + b[0], a[1] + b[1]) for a, b in zip(self.by_source, other.by_source))
        return LossTotals(self.loss_sum + other.loss_sum, self.tokens + other.tokens,
                          pairs or self.by_source or other.by_source)


def loss_func(loss_mask: torch.Tensor, loss_sources: torch.Tensor | None, num_sources: int,
              output: torch.Tensor):
    """Megatron loss function: per-token losses ``[b, s]`` -> (sum, token count, report).

    With several mix sources the report also holds ``source loss``, ``[2, num_sources]``: the
    loss sum and trained tokens of each source (``loss_sources``: the source of every position).
    """
    losses = output.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}
    if num_sources > 1:
        if loss_sources is None:
            raise ValueError("a micro-batch without loss_sources in a run over several mix "
                             "sources: build it with layout.build_packed_batch")
        source = loss_sources.reshape(-1).clamp(min=0)  # padding (-1) is never trained
        per = torch.zeros(2, num_sources, dtype=torch.float32, device=losses.device)
        per[0].index_add_(0, source, (losses * mask).detach())
        per[1].index_add_(0, source, mask)
        report["source loss"] = per
    return loss_sum, num_tokens, report


#: What only the first pipeline stage (its first chunk) reads: the LLM input's sources.
FIRST_STAGE_ONLY = ("views", "text_ids", "pack_index")


def forward_step(device: torch.device, num_sources: int, data_iterator, model):
    """Megatron forward-step function: runs the model on the next micro-batch (copied to the
    device without the pixels and the pack op's inputs where this chunk does not build the
    LLM input)."""
    batch: PackedBatch = next(data_iterator)
    builds_input = unwrap(model).pre_process
    batch = batch.to(device, non_blocking=True, skip=() if builds_input else FIRST_STAGE_ONLY)
    output = model(batch)
    return output, partial(loss_func, batch.loss_mask, batch.loss_sources, num_sources)


class _QueuedCalls:
    """The encoder calls of a step, run in order as :func:`encoded_ahead` asks for views.

    With ``stream`` (a second CUDA stream) each call runs there and records an event; the main
    stream waits for that event only where it reads the call's tokens, so the encoders run
    while the main stream is busy with the micro-batches before.
    """

    def __init__(self, calls: Iterator[torch.Tensor], stream: torch.cuda.Stream | None):
        self.calls, self.stream = calls, stream
        self.held: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self.encoded = 0  # views encoded so far
        if stream is not None:  # the views were copied and concatenated on the main stream
            stream.wait_stream(torch.cuda.current_stream())

    def cover(self, views: int) -> None:
        """Runs (queues, on a GPU) the calls up to the one holding view ``views - 1``."""
        while self.encoded < views:
            event = None
            if self.stream is None:
                tokens = next(self.calls)
            else:
                main = torch.cuda.current_stream()
                with torch.cuda.stream(self.stream):
                    tokens = next(self.calls)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                tokens.record_stream(main)  # made on the side stream, read on the main one
            self.held.append((self.encoded, tokens, event))
            self.encoded += tokens.shape[0]

    def take(self, start: int, n: int) -> torch.Tensor:
        """The tokens of views ``start .. start + n - 1`` (covered), ready on the main stream;
        calls holding no later view are dropped."""
        parts = []
        for at, tokens, event in self.held:
            if at < start + n and at + tokens.shape[0] > start:
                if event is not None:
                    torch.cuda.current_stream().wait_event(event)
                # slices (never written again: autograd may keep them for the projector's
                # backward), concatenated when the micro-batch spans two calls
                parts.append(tokens[max(start - at, 0):start + n - at])
        self.held = [h for h in self.held if h[0] + h[1].shape[0] > start + n]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def encoded_ahead(model_chunk, microbatches: Iterable[PackedBatch],
                  device: torch.device) -> Iterator[PackedBatch]:
    """The micro-batches, their views encoded ahead (``features``) where the chunk builds the
    LLM input and asks for it (``SphinxModel.vision_batch`` > 0 or ``vision_overlap``).

    With ``vision_batch`` the views of all the step's micro-batches are encoded in calls of
    that many views (:meth:`MixtureOfVisualExperts.encode_in_calls`: few fixed sizes, CUDA
    graphs possible), else in one call per micro-batch. A generator, read by the schedule one
    micro-batch at a time: a call is queued just before the first micro-batch whose views it
    holds, so the GPU runs it while the host is still launching the LLM's many small kernels of
    the micro-batches before (the LLM's forward and backward are bound by the host's launches,
    the encoders by the GPU).

    With ``vision_overlap`` (GPUs) the calls run one micro-batch further ahead, on a second
    CUDA stream (``SphinxModel.vision_stream``): micro-batch k+1's views are encoded while the
    main stream runs micro-batch k's forward and backward, in the gaps the host leaves there.
    The encoders are frozen: the tokens are those each micro-batch's own call would give.
    """
    model = unwrap(model_chunk)
    overlap = model.pre_process and model.vision_overlap
    if not (model.pre_process and (model.vision_batch or overlap)):
        yield from microbatches
        return
    batches = [b.to(device, non_blocking=True) for b in microbatches]
    counts = [b.views.shape[0] for b in batches]
    if model.vision_batch:
        views = [torch.cat([b.views for b in batches])]
        calls = model.vision.encode_in_calls(views[0], model.vision_batch)
    else:
        views = [b.views for b in batches if b.views.shape[0]]
        calls = (model.vision(v) for v in views)
    stream = None
    if overlap and device.type == "cuda":
        if model.vision_stream is None:
            model.vision_stream = torch.cuda.Stream(device=device)
        stream = model.vision_stream
        for v in views:  # made on the main stream, read on the side one
            v.record_stream(stream)
    queue = _QueuedCalls(calls, stream)
    ends = list(itertools.accumulate(counts))  # views up to micro-batch k, included
    ahead = 1 if overlap else 0
    for k, (batch, n) in enumerate(zip(batches, counts)):
        queue.cover(ends[min(k + ahead, len(ends) - 1)])
        if n:
            batch = dataclasses.replace(batch, features=queue.take(ends[k] - n, n))
        yield batch


def run_schedule(model_chunks: list, microbatches: Iterable[PackedBatch], *,
                 num_microbatches: int, seq_length: int, pg_collection, device: torch.device,
                 forward_only: bool, num_sources: int = 1) -> list[dict]:
    """Megatron's pipeline schedule over this rank's micro-batches (``num_sources``: mix
    sources whose losses are reported apart when more than one).

    Returns:
        The loss reports of the micro-batches (on the last pipeline stage; empty elsewhere).
    """
    pp = pg_collection.pp
    interleaved = len(model_chunks) > 1
    fwd_bwd = get_forward_backward_func(pp_size=pp.size(),
                                        vp_size=len(model_chunks) if interleaved else None)
    extra = {"pg_collection": pg_collection}
    if pp.size() > 1:
        extra["p2p_communicator"] = P2PCommunicator(pp_group=pp, config=model_chunks[0].config)
    if interleaved:  # every chunk reads every micro-batch (the first chunk for its input,
        # the others for cu_seqlens, the last for the labels): one iterator each
        microbatches = list(microbatches)
        data = [encoded_ahead(model_chunks[0], microbatches, device)]
        data += [iter(microbatches) for _ in model_chunks[1:]]
    else:
        data = encoded_ahead(model_chunks[0], microbatches, device)
    return fwd_bwd(
        forward_step_func=partial(forward_step, device, num_sources),
        data_iterator=data,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
        **extra,
    )


def global_loss(reports: list[dict], *, pg_collection, device: torch.device,
                dp_group, num_sources: int = 1) -> LossTotals:
    """The loss sums of the global batch, the same on every rank.

    Reports exist on the last pipeline stage only: they are summed, reduced over the
    data-parallel group, then shared over the pipeline.
    """
    by_source = num_sources > 1
    totals = torch.zeros(2 + 2 * num_sources * by_source, dtype=torch.float64, device=device)
    for r in reports:
        totals[:2] += r["lm loss"].to(totals)
        if by_source:
            totals[2:] += r["source loss"].to(totals).t().reshape(-1)  # (sum, tokens) pairs
    torch.distributed.all_reduce(totals, group=dp_group)
    pp = pg_collection.pp
    if pp.size() > 1:
        last = torch.distributed.get_global_rank(pp, pp.size() - 1)
        torch.distributed.broadcast(totals, src=last, group=pp)
    values = totals.tolist()
    pairs = tuple((values[k], int(values[k + 1])) for k in range(2, len(values), 2))
    return LossTotals(values[0], int(values[1]), pairs)


def train_step(model_chunks: list, optimizer, microbatches: Iterable[PackedBatch], *,
               num_microbatches: int, seq_length: int, pg_collection, device: torch.device,
               dp_group, num_sources: int = 1) -> StepResult:
    """Forward and backward over ``num_microbatches`` micro-batches, then one optimizer step.

    Args:
        model_chunks: The DDP-wrapped model chunks of this rank.
        optimizer: The Megatron optimizer over those chunks.
        microbatches: This rank's micro-batches (every pipeline stage iterates its own copy).
        num_microbatches: Micro-batches per step on this rank.
        seq_length: Tokens per micro-batch, ``rows x packed sequence length`` (pipeline p2p
            shapes: a micro-batch's rows run as one THD sequence).
        pg_collection: Megatron process groups.
        device: Where batches go.
        dp_group: Data-parallel group over which the reported loss is summed.
        num_sources: Mix sources of the data; with more than one, the result has each
            source's loss too.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(model_chunks, microbatches, num_microbatches=num_microbatches,
                           seq_length=seq_length, pg_collection=pg_collection, device=device,
                           forward_only=False, num_sources=num_sources)
    update_successful, grad_norm, _ = optimizer.step()
    totals = global_loss(reports, pg_collection=pg_collection, device=device,
                         dp_group=dp_group, num_sources=num_sources)
    return StepResult(loss=totals.loss_sum / max(totals.tokens, 1),
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      num_loss_tokens=totals.tokens, update_successful=bool(update_successful),
                      source_losses=totals.by_source)


def eval_step(model_chunks: list, microbatches: Iterable[PackedBatch], *, num_microbatches: int,
              seq_length: int, pg_collection, device: torch.device,
              dp_group, num_sources: int = 1) -> LossTotals:
    """Forward only (no gradient, no update) over one global batch.

    Returns:
        The loss sums over the global batch (per source too when ``num_sources`` > 1), the
        same on every rank.
    """
    with torch.no_grad():
        reports = run_schedule(model_chunks, microbatches, num_microbatches=num_microbatches,
                               seq_length=seq_length, pg_collection=pg_collection,
                               device=device, forward_only=True, num_sources=num_sources)
    return global_loss(reports, pg_collection=pg_collection, device=device, dp_group=dp_group,
                       num_sources=num_sources)
