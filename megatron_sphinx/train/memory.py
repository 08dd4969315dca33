"""Per-GPU memory and step-time model of a SPHINX-X parallel layout (the layout planner's maths).

Memory of one rank of pipeline stage ``s`` (bytes), for Megatron-Core 0.19 as this project builds
it (:mod:`megatron_sphinx.train.build`: DDP with ``grad_reduce_in_fp32``, the distributed
optimizer, untied embeddings, no linear biases):

* **parameters**: the trainable parameters the rank holds (dense ones ``/ tp``, experts
  ``/ (ep * etp)``, the projector and the learned image embeddings replicated over TP) at the
  parameter dtype (2 bytes bf16, 4 bytes fp32);
* **gradients**: the DDP gradient buffer, fp32 (4 bytes per trainable parameter, not sharded);
* **optimizer**: the distributed optimizer's shards: fp32 main parameters (bf16 runs only) and the
  two Adam moments, 12 (bf16) or 8 (fp32) bytes per parameter, dense parameters sharded over the
  data-parallel group and expert parameters over the expert-data-parallel group;
* **encoders**: the frozen encoders' weights at the model dtype, first stage only;
* **activations**: tensors saved for backward, counted tensor by tensor for the layer code that
  runs (Korthikanti et al. 2022, "Reducing Activation Recomputation", Table 2, redone for RMSNorm,
  SwiGLU, grouped-query attention, no dropout, packed flash/SDPA attention, see
  :func:`layer_activation_bytes`), for the stage's layers and the micro-batches the pipeline
  schedule keeps in flight on it (1F1B: ``min(pp - s, m)``; interleaved: chunk forward passes,
  see :func:`warmup_passes` and :func:`schedule_peak`), plus the projector and pack inputs
  (first stage, first chunk), the final norm, output layer and cross-entropy (last stage, last
  chunk), and the largest transient: the frozen encoders' forward working set (first stage,
  measured once on the meta device, like the encoder FLOPs of :mod:`.flops`) or the start of
  backward (output-layer gradients);
* **inputs**: the micro-batch tensors (views as fp32 pixels, index and label rows).

Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (the planner keeps a
headroom for them), and the optimizer's transient buffers (fused Adam has none).

Two kernel paths differ in what they save: ``te`` (Transformer Engine: fused norm+linear,
flash attention with grouped-query K/V, fused SwiGLU) and ``local`` (Megatron's own modules and
:class:`~megatron_sphinx.model.attention.PackedDotProductAttention`: separate norms, K/V repeated
to every head, unfused SwiGLU), the CPU path that the tests measure.

:class:`TensorMemoryTracker` measures what this module estimates: the live bytes of every tensor
storage created under it, on any device (CPU included, where ``torch.cuda`` statistics do not
exist).
"""
from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_sphinx.config import SphinxConfig
from megatron_sphinx.data.geometry import POSITIONS_PER_VIEW
from megatron_sphinx.model.llm import padded_vocab_size
from megatron_sphinx.parallel_dims import ParallelDims
from megatron_sphinx.train.flops import causal_pairs, step_flops
from megatron_sphinx.train.pipeline_schedule import schedule_ops, schedule_peak, warmup_passes

GIB = 1024 ** 3
F32 = 4
I64 = 8
Recompute = Literal["none", "selective", "full"]
KernelPath = Literal["te", "local"]


# ------------------------------------------------------------------------------ measurement

class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while it is active, and their peak.

    Every aten op's non-aliasing outputs (views, in-place and ``out=`` results are skipped: they
    reuse a storage) register their storage once; a weak-reference finalizer subtracts it when
    the storage is freed. Storages created before the tracker, or outside aten ops (e.g.
    ``torch.from_numpy``), are not counted.

    Example:
        >>> with TensorMemoryTracker() as tracker:
        ...     y = torch.ones(1024) * 2
        >>> tracker.peak >= 8192
        True
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        """Bytes of the counted storages alive now."""
        self.peak = 0
        """Highest ``live`` since construction or :meth:`reset_peak`."""
        self._seen: set[int] = set()

    def reset_peak(self) -> None:
        """Starts a new peak from the current live bytes."""
        self.peak = self.live

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view of, or an in-place write into, an existing storage
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def _weightless_vision(cfg: SphinxConfig):
    vision = copy.deepcopy(cfg.vision)
    for enc in vision.encoders:
        enc.weights = None
    return vision


_VISION_CACHE: dict[str, tuple[int, int, int]] = {}


def _vision_on_meta(cfg: SphinxConfig, dtype: torch.dtype) -> tuple[int, int, int]:
    """(frozen parameters, transient bytes at 1 view, at 2 views) of the encoders, on meta."""
    from megatron_sphinx.model.vision import MixtureOfVisualExperts

    key = repr((cfg.vision, str(dtype)))
    if key in _VISION_CACHE:
        return _VISION_CACHE[key]
    with torch.device("meta"):
        mov = MixtureOfVisualExperts(_weightless_vision(cfg)).to(dtype)
    n_params = sum(p.numel() for p in mov.parameters())
    peaks = []
    v = cfg.vision.view_size
    for n in (1, 2):
        views = torch.empty(n, 3, v, v, device="meta")
        with TensorMemoryTracker() as tracker:
            mov(views)
        peaks.append(tracker.peak)
    _VISION_CACHE[key] = (n_params, peaks[0], peaks[1])
    return _VISION_CACHE[key]


def vision_footprint(cfg: SphinxConfig, dtype: torch.dtype) -> tuple[int, float, float]:
    """Frozen-encoder parameters and forward working set ``base + per_view * V`` (bytes).

    Measured once per recipe on the meta device with :class:`TensorMemoryTracker`: the encoders
    run under ``no_grad``, so nothing is kept for backward, but their intermediate feature maps
    (e.g. ConvNeXt's 4x-wide MLP at 128x128) exist while they run.

    Returns:
        ``(n_params, base_bytes, bytes_per_view)``.
    """
    n_params, one, two = _vision_on_meta(cfg, dtype)
    per_view = float(two - one)
    return n_params, float(one) - per_view, per_view


# ------------------------------------------------------------------------------ parameters

@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds (element counts)."""

    dense: int
    """Trainable parameters sharded over the dense data-parallel group."""
    expert: int
    """Trainable expert parameters, sharded over the expert-data-parallel group."""
    frozen: int
    """Frozen encoder parameters (first stage only)."""

    @property
    def trainable(self) -> int:
        """Dense plus expert parameters."""
        return self.dense + self.expert


def stage_layers(cfg: SphinxConfig, pp: int, stage: int) -> int:
    """Transformer layers on ``stage`` (Megatron splits them evenly; pp must divide them)."""
    return cfg.llm.num_layers // pp


def stage_params(cfg: SphinxConfig, dims: ParallelDims, stage: int,
                 frozen_params: int = 0) -> StageParams:
    """What one rank of ``stage`` holds under ``dims`` (see the module docstring)."""
    llm, tp = cfg.llm, dims.tp
    h, f = llm.hidden_size, llm.ffn_hidden_size
    kv = llm.num_query_groups * (h // llm.num_attention_heads)
    vocab = padded_vocab_size(llm.vocab_size, tp)
    attn = (h * (h + 2 * kv) + h * h) // tp
    norms = 2 * h  # input and pre-MLP RMSNorm weights, replicated over TP
    if llm.is_moe:
        mlp_dense = h * llm.num_experts  # the router, replicated
        expert = 3 * h * f * llm.num_experts // (dims.ep * dims.expert_tp)
    else:
        mlp_dense, expert = 3 * h * f // tp, 0
    n = stage_layers(cfg, dims.pp, stage)
    dense = n * (attn + norms + mlp_dense)
    first, last = stage == 0, stage == dims.pp - 1
    if first:
        c = cfg.vision.channels
        dense += vocab * h // tp + c * h + h + 2 * h + 3 * h  # embedding, projector, image emb.
    if last:
        dense += vocab * h // tp + h  # output layer, final norm
    return StageParams(dense, n * expert, frozen_params if first else 0)


# ------------------------------------------------------------------------------ activations

def layer_activation_bytes(cfg: SphinxConfig, dims: ParallelDims, seq_length: int, *,
                           act_bytes: int, path: KernelPath, recompute: Recompute) -> float:
    """Bytes one transformer layer keeps for backward, per micro-batch, on one rank.

    With ``t`` positions, ``ts = t / tp`` under sequence parallelism (else ``t``), per-rank
    widths ``h/tp`` (query heads), ``kv`` (key/value heads, at least one per rank) and ``f/tp``;
    ``E`` the activation dtype size; statistics (RMSNorm ``rstd``, attention log-sum-exp) fp32.

    Attention block: norm input ``x`` (``ts*h``); ``local`` also the normalised ``x*rstd`` and
    the QKV input (``ts*h`` each), ``te``'s fused norm+linear keeps ``ln_out`` only; RoPE's
    cos/sin per packed segment for q and k (``4*t*d``); core attention: q, k and v (``local``:
    k and v repeated to all ``h/tp`` query heads; ``te``: ``kv`` wide), its output (``local``:
    per segment, then copied into the projection input) and the log-sum-exp; the output
    projection's input. Selective recompute keeps only the core attention's inputs (q and the
    un-repeated k, v); full recompute keeps only the layer input.

    MLP block: the same norm terms; SwiGLU keeps the fc1 output (``2f``) and the fc2 input
    (``f``); ``local`` also keeps ``silu(gate)`` and ``up + offset`` (``f`` each). MoE: the
    router input, the routed tokens (``ts * topk * etp``, balanced over experts) with their fc1
    input (``h``), fc1 output, the probability-scaled activation (``local``: four ``f`` tensors per
    routed token in Megatron's SequentialMLP; ``te`` grouped GEMM with the fused weighted SwiGLU:
    one) and routing indices.
    """
    llm, tp = cfg.llm, dims.tp
    t = seq_length
    ts = t / tp if dims.sequence_parallel else t
    h, a = llm.hidden_size, llm.num_attention_heads
    d = h // a
    h_l, a_l = h / tp, a / tp
    kv_l = max(llm.num_query_groups // tp, 1) * d
    E = act_bytes
    if recompute == "full":
        return E * ts * h
    norm_keep = 2 if path == "te" else 3  # x + ln_out, or x + x*rstd + linear input
    rope = 4 * t * d * E
    if recompute == "selective":
        core = t * (h_l + 2 * kv_l) * E  # checkpointed core attention: its inputs only
        lse = 0.0
    elif path == "te":
        core = t * (h_l + 2 * kv_l) * E  # output shared with the projection input
        lse = t * a_l * F32
    else:
        core = t * 4 * h_l * E  # q, repeated k and v, per-segment outputs
        lse = t * a_l * F32
    attention = norm_keep * ts * h * E + F32 * ts + rope + core + lse + t * h_l * E
    if llm.is_moe:
        k, etp = llm.moe_router_topk, dims.expert_tp
        routed = ts * k * etp
        per_token_f = (6 if path == "local" else 3) * llm.ffn_hidden_size / etp
        mlp = ((norm_keep * ts * h + routed * h + routed * per_token_f) * E
               + F32 * (ts + ts * k + routed) + I64 * (ts * k + 2 * routed))
    else:
        f_l = llm.ffn_hidden_size / tp
        mlp = (norm_keep * ts * h + (5 if path == "local" else 3) * t * f_l) * E + F32 * ts
    return attention + mlp


_ops = functools.lru_cache(maxsize=4096)(schedule_ops)  # plan_layouts asks for the same often


@dataclass
class StageMemory:
    """Estimated peak memory of one rank of one pipeline stage (bytes)."""

    stage: int
    """Pipeline stage."""
    params: float
    """Trainable parameters at the parameter dtype."""
    grads: float
    """fp32 gradient buffer."""
    optimizer: float
    """Distributed-optimizer shards (main params, Adam moments)."""
    encoders: float
    """Frozen encoder weights (first stage)."""
    activations: float
    """Saved activations of the in-flight micro-batches plus the largest transient."""
    inputs: float
    """The micro-batch's tensors."""
    detail: dict = field(default_factory=dict)
    """Activation terms (per layer, in flight, stage extras, transients)."""

    @property
    def total(self) -> float:
        """Sum of every part."""
        return (self.params + self.grads + self.optimizer + self.encoders + self.activations
                + self.inputs)

    def as_gib(self) -> dict:
        """The parts and total in GiB."""
        keys = ("params", "grads", "optimizer", "encoders", "activations", "inputs")
        out = {k: getattr(self, k) / GIB for k in keys}
        out["total"] = self.total / GIB
        return out


def max_views(seq_length: int) -> int:
    """Most encoded views a row of ``seq_length`` positions can hold (259 positions each)."""
    return seq_length // POSITIONS_PER_VIEW


def estimate_memory(cfg: SphinxConfig, dims: ParallelDims, *, seq_length: int,
                    num_microbatches: int, dtype: torch.dtype = torch.bfloat16,
                    path: KernelPath = "te", recompute: Recompute = "none",
                    views: int | None = None) -> list[StageMemory]:
    """Per-stage peak memory of one rank (see the module docstring for every term).

    Args:
        cfg: The recipe.
        dims: The layout (``dims.pp`` stages).
        seq_length: Positions per packed row (micro-batch of one row).
        num_microbatches: Micro-batches per step on each data-parallel rank.
        dtype: Parameter and activation dtype (bf16 on GPUs, fp32 on CPUs).
        path: ``te`` (GPU kernels) or ``local`` (Megatron's own modules, the CPU path).
        recompute: Activation recompute: none, selective (core attention) or full.
        views: Encoded views per row; None takes the most that fit (an upper bound).

    Returns:
        One :class:`StageMemory` per pipeline stage.
    """
    E = torch.finfo(dtype).bits // 8
    frozen, vis_base, vis_per_view = vision_footprint(cfg, dtype)
    n_views = max_views(seq_length) if views is None else views
    n_vis = n_views * cfg.vision.tokens_per_view
    h, t = cfg.llm.hidden_size, seq_length
    vocab_l = padded_vocab_size(cfg.llm.vocab_size, dims.tp) / dims.tp
    ts = t / dims.tp if dims.sequence_parallel else t
    per_layer = layer_activation_bytes(cfg, dims, t, act_bytes=E, path=path, recompute=recompute)
    full_layer = layer_activation_bytes(cfg, dims, t, act_bytes=E, path=path, recompute="none")
    opt_bytes = 12 if E < 4 else 8
    v = cfg.vision.view_size
    inputs = n_views * 3 * v * v * F32 + (I64 * 4 + F32 * 2) * t  # views; ids, index, labels...
    vpp = dims.vpp or 1
    chunk_layers = cfg.llm.num_layers // (dims.pp * vpp)
    out = []
    for s in range(dims.pp):
        sp = stage_params(cfg, dims, s, frozen)
        first, last = s == 0, s == dims.pp - 1
        head = tail = 0.0
        if first:  # projector input and LayerNorm input/statistics, pack index, token ids
            head = n_vis * (cfg.vision.channels + h) * E + 2 * F32 * n_vis + 2 * I64 * t
        if last:  # final norm, output-layer input, fp32 softmax of the cross-entropy, labels
            tail = ((3 if path == "local" else 2) * ts * h * E + F32 * ts
                    + F32 * t * vocab_l + (I64 + 1) * t)
        # Per chunk: the first chunk of the first stage holds the projector and embedding
        # activations and runs the encoders; the last chunk of the last stage holds the output
        # layer and needs its gradients at the start of backward (bf16: logits-gradient cast).
        saved = [chunk_layers * per_layer] * vpp
        saved[0] += head
        saved[-1] += tail
        fwd_t = [vis_base + vis_per_view * n_views if first else 0.0] + [0.0] * (vpp - 1)
        bwd_t = [full_layer if recompute == "full" else 0.0] * vpp  # one layer rebuilt
        if last:
            bwd_t[-1] += t * h * E + vocab_l * h * E + (2 * t * vocab_l if E < 4 else 0)
        # At its peak 1F1B holds min(pp - s, m) micro-batches (warm-up + 1) of L / pp layers:
        # L layers' activations on stage 0, L / pp on the last. Interleaving holds warm-up + 1
        # = 2 (pp - s - 1) + (vpp - 1) pp + 1 chunk passes of L / (pp vpp) layers: on rank 0
        # pp - 1 passes more than 1F1B's pp vpp, L (1 + (pp - 1) / (pp vpp)) layers; on the
        # last rank about pp (vpp - 1) / vpp micro-batches instead of one (the ranks even out).
        # Rank 0's first chunk keeps its projector inputs for up to 2 pp micro-batches
        # (1F1B: pp), and its encoders run while the warm-up passes are held (at pp 2: L layers;
        # 1F1B: L / 2). Replaying the pass order puts each chunk's extras and transients where
        # the schedule has them.
        ops = _ops(dims.pp, s, num_microbatches, dims.vpp)
        activations = schedule_peak(ops, saved, fwd_t, bwd_t)
        warm = warmup_passes(dims.pp, s, num_microbatches, dims.vpp)
        out.append(StageMemory(
            stage=s, params=sp.trainable * E, grads=sp.trainable * F32,
            optimizer=opt_bytes * (sp.dense / dims.dp + sp.expert / dims.expert_dp),
            encoders=sp.frozen * E, activations=activations, inputs=inputs,
            detail={"per_layer": per_layer, "layers": stage_layers(cfg, dims.pp, s),
                    "vpp": vpp, "chunk_layers": chunk_layers, "warmup": warm,
                    "in_flight": min(warm + 1, num_microbatches * vpp), "stage_extra": head + tail,
                    "bwd_transient": max(bwd_t),
                    "vision_transient": vis_base + vis_per_view * n_views, "views": n_views}))
    return out



# ------------------------------------------------------------------------------ step time

@dataclass(frozen=True)
class StepTime:
    """FLOPs-based time of one optimizer step."""

    seconds: float
    """Estimated step time: compute with the pipeline bubble, plus the pipeline messages."""
    model_flops: float
    """FLOPs of the step as :func:`.flops.step_flops` counts them (for MFU)."""
    executed_flops: float
    """Model FLOPs plus recomputation."""
    bubble_fraction: float
    """Pipeline bubble: (pp - 1) / (vpp * m + pp - 1) of the compute time (vpp 1: 1F1B)."""
    p2p_seconds: float = 0.0
    """Part of ``seconds`` spent on pipeline messages (0 without pipelining)."""
    p2p_bytes: float = 0.0
    """Bytes one pipeline rank sends per step (activations forward, gradients backward)."""


def estimate_step_time(cfg: SphinxConfig, dims: ParallelDims, *, seq_length: int,
                       global_batch_size: int, mfu: float, peak_tflops: float,
                       recompute: Recompute = "none", sample_length: int | None = None,
                       views_per_row: float | None = None, p2p_gbs: float = 25.0,
                       p2p_latency_s: float = 20e-6, act_bytes: int = 2) -> StepTime:
    """Step time of a layout: FLOPs over the achieved throughput, with the pipeline schedule.

    Each of the ``m = G / dp`` micro-batches (one packed row) costs, on stage ``s``, the LLM
    FLOPs of its layers divided over TP, plus on the first stage the frozen encoders and the
    projector, which every TP rank runs in full (they are replicated, not tensor-parallel).
    Compute runs at ``mfu * peak``.

    1F1B takes ``m + pp - 1`` slots of the slowest stage (the first). The interleaved schedule
    (``vpp`` chunks per rank) fills and drains with chunk passes of ``1 / vpp`` slot: it takes
    ``m + (pp - 1) / vpp`` slots, a bubble of ``(pp - 1) / (vpp * m + pp - 1)`` (Narayanan et
    al. 2021), assuming every chunk pass takes ``1 / vpp`` slot (the encoders, in the first
    chunk only, make that one longer in practice).

    Pipeline messages are the only communication modelled (TP, EP and DP collectives are what
    separates a real MFU from 1): a rank sends each chunk pass's output forward and its input
    gradient backward, ``2 * m * vpp`` messages (an inner rank's count; the end ranks send
    ``m`` fewer) of one micro-batch's activations, ``[t/tp, h]`` under sequence parallelism.
    Sends and receives overlap each other (full duplex) but not compute: each message adds
    ``p2p_latency_s + bytes / p2p_gbs`` to the step. An upper bound (the interleaved schedule
    runs with ``overlap_p2p_comm``, which hides part of it) on what interleaving pays for its
    smaller bubble: ``vpp`` times the messages of 1F1B.

    Args:
        cfg: The recipe.
        dims: The layout.
        seq_length: Positions per row; every position is computed, padding included.
        global_batch_size: Rows per step.
        mfu: Fraction of peak the compute reaches.
        peak_tflops: Dense peak of one GPU (989 for an H100 in bf16).
        recompute: Adds a forward of the recomputed part (full: whole LLM; selective: attention).
        sample_length: Mean packed-sample length for the attention cost; default one image
            sample (all views encoded plus 100 text tokens), at most ``seq_length``.
        views_per_row: Encoded views per row; default rows full of such samples.
        p2p_gbs: Achieved point-to-point bandwidth between pipeline neighbours, GB/s
            (Megatron's rank order puts pp outermost: neighbours sit on different nodes once
            ``world / pp >= 8``; 25 is about half of a 400 Gb/s InfiniBand link per GPU).
        p2p_latency_s: Fixed cost of one message.
        act_bytes: Bytes per activation element in the messages (2 for bf16).
    """
    grid = cfg.vision.grid
    per_image = 1 + grid * grid
    if sample_length is None:
        sample_length = per_image * POSITIONS_PER_VIEW + 100
    sample_length = min(sample_length, seq_length)
    if views_per_row is None:
        views_per_row = seq_length / sample_length * per_image
    n_samples = seq_length / sample_length
    pairs = n_samples * causal_pairs([sample_length])
    row = step_flops(cfg, seq_length, pairs, 0)
    vis = step_flops(cfg, 0, 0.0, 1)
    llm = row["llm"] + row["attention"]
    extra = {"none": 0.0, "selective": row["attention"] / 3, "full": llm / 3}[recompute]
    vision_row = (vis["projector"] + vis["encoders"]) * views_per_row
    m = global_batch_size // dims.dp
    pp, vpp = dims.pp, dims.vpp or 1
    rate = mfu * peak_tflops * 1e12
    # The first stage is the slowest: its share of the LLM plus the replicated vision work.
    slot = ((llm + extra) / (pp * dims.tp) + vision_row) / rate
    compute = (m + (pp - 1) / vpp) * slot
    p2p_bytes = p2p_seconds = 0.0
    if pp > 1:
        ts = seq_length / dims.tp if dims.sequence_parallel else seq_length
        message = ts * cfg.llm.hidden_size * act_bytes
        n_messages = 2 * m * vpp
        p2p_bytes = n_messages * message
        p2p_seconds = n_messages * (p2p_latency_s + message / (p2p_gbs * 1e9))
    model = global_batch_size * (llm + vision_row)
    executed = global_batch_size * (llm + extra + vision_row * dims.tp)
    return StepTime(compute + p2p_seconds, model, executed, (pp - 1) / (vpp * m + pp - 1),
                    p2p_seconds, p2p_bytes)


# ------------------------------------------------------------------------------ planning

@dataclass
class LayoutPlan:
    """One candidate layout with its memory and time estimates."""

    dims: ParallelDims
    """The layout (``sequence_parallel`` whenever tp > 1)."""
    recompute: Recompute
    """Activation recompute."""
    stages: list[StageMemory]
    """Memory per pipeline stage."""
    time: StepTime
    """Step-time estimate."""
    fits: bool
    """Whether the busiest stage fits the usable GPU memory."""

    @property
    def peak(self) -> StageMemory:
        """The stage with the most memory (the one that decides the fit)."""
        return max(self.stages, key=lambda s: s.total)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _vpp_options(pp: int, max_vpp: int) -> list[int | None]:
    """None (1F1B), then 2, 4, ... up to ``max_vpp`` where there is a pipeline."""
    out: list[int | None] = [None]
    v = 2
    while pp > 1 and v <= max_vpp:
        out.append(v)
        v *= 2
    return out


def plan_layouts(cfg: SphinxConfig, *, gpus: int, gpu_mem_gib: float, seq_length: int,
                 global_batch_size: int, mfu: float = 0.4, peak_tflops: float = 989.0,
                 headroom: float = 0.1, max_tp: int = 8, dtype: torch.dtype = torch.bfloat16,
                 path: KernelPath = "te", views: int | None = None,
                 recompute_options: tuple[Recompute, ...] = ("none", "selective", "full"),
                 micro_batch_size: int = 1, max_vpp: int = 8,
                 p2p_gbs: float = 25.0) -> list[LayoutPlan]:
    """Every valid TP/PP/VPP/EP/DP layout and recompute option, sorted by estimated step time.

    A layout is valid when :class:`ParallelDims` and its ``validate_model`` accept it
    (Megatron-Core 0.19 rules: ``etp * ep`` divides ``dp * tp``, ep divides the experts, MoE with
    TP needs sequence parallelism, interleaving needs pp >= 2, ``pp * vpp`` dividing the layers
    and a micro-batch count that is a multiple of pp...), tp is a power of two up to ``max_tp``
    (one node), vpp is 1 (plain 1F1B) or a power of two up to ``max_vpp``, sequence
    parallelism is on whenever tp > 1, and the global batch splits over dp into micro-batches
    of ``micro_batch_size`` rows (run as one THD sequence, so estimated as one row of
    ``micro_batch_size * seq_length`` positions; ``views`` is per row). It fits when its
    busiest stage needs at most ``(1 - headroom) * gpu_mem_gib`` (the headroom covers the CUDA
    context, NCCL buffers and fragmentation, which are not modelled).

    Returns:
        Every valid plan (fitting or not), fastest first; ties by lower peak memory, then by
        lower vpp.
    """
    llm = cfg.llm
    usable = (1.0 - headroom) * gpu_mem_gib * GIB
    tps = [t for t in (1, 2, 4, 8, 16) if t <= max_tp and gpus % t == 0]
    eps = _divisors(llm.num_experts) if llm.is_moe else [1]
    plans = []
    for tp in tps:
        for pp in _divisors(llm.num_layers):
            if gpus % (tp * pp):
                continue
            for ep in eps:
                for vpp in _vpp_options(pp, max_vpp):
                    try:
                        dims = ParallelDims(world_size=gpus, tp=tp, pp=pp, ep=ep, vpp=vpp,
                                            sequence_parallel=tp > 1)
                        if global_batch_size % dims.dp or \
                                (global_batch_size // dims.dp) % micro_batch_size:
                            continue
                        m = global_batch_size // dims.dp // micro_batch_size
                        dims.validate_model(num_layers=llm.num_layers,
                                            num_heads=llm.num_attention_heads,
                                            num_kv_heads=llm.num_query_groups,
                                            num_experts=llm.num_experts, seq_length=seq_length,
                                            num_microbatches=m, model_name=cfg.name)
                    except ValueError:
                        continue
                    for rc in recompute_options:
                        tokens = seq_length * micro_batch_size  # per micro-batch
                        stages = estimate_memory(
                            cfg, dims, seq_length=tokens, num_microbatches=m, dtype=dtype,
                            path=path, recompute=rc,
                            views=None if views is None else views * micro_batch_size)
                        time = estimate_step_time(
                            cfg, dims, seq_length=tokens,
                            global_batch_size=global_batch_size // micro_batch_size, mfu=mfu,
                            peak_tflops=peak_tflops, recompute=rc, p2p_gbs=p2p_gbs,
                            act_bytes=torch.finfo(dtype).bits // 8)
                        peak = max(s.total for s in stages)
                        plans.append(LayoutPlan(dims, rc, stages, time, peak <= usable))
    plans.sort(key=lambda p: (p.time.seconds, p.peak.total, p.dims.vpp or 1))
    return plans
