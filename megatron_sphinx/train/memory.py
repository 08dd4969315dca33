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
  :func:`layer_activation_bytes`), for the stage's layers and the micro-batches 1F1B keeps in
  flight on it (``min(pp - s, m)``), plus the projector and pack inputs (first stage), the final
  norm, output layer and cross-entropy (last stage), and the largest transient: the frozen
  encoders' forward working set (first stage, measured once on the meta device, like the encoder
  FLOPs of :mod:`.flops`) or the start of backward (output-layer gradients);
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
    out = []
    for s in range(dims.pp):
        sp = stage_params(cfg, dims, s, frozen)
        first, last = s == 0, s == dims.pp - 1
        in_flight = min(dims.pp - s, num_microbatches)
        saved = stage_layers(cfg, dims.pp, s) * per_layer
        extra = 0.0
        if first:  # projector input and LayerNorm input/statistics, pack index, token ids
            extra += n_vis * (cfg.vision.channels + h) * E + 2 * F32 * n_vis + 2 * I64 * t
        if last:  # final norm, output-layer input, fp32 softmax of the cross-entropy, labels
            extra += ((3 if path == "local" else 2) * ts * h * E + F32 * ts
                      + F32 * t * vocab_l + (I64 + 1) * t)
        bwd_transient = 0.0
        if last:  # output-layer input gradient and weight gradient; bf16 logits-gradient cast
            bwd_transient = t * h * E + vocab_l * h * E + (2 * t * vocab_l if E < 4 else 0)
        if recompute == "full":
            bwd_transient += full_layer  # one layer's activations rebuilt during its backward
        train_peak = in_flight * (saved + extra) + bwd_transient
        vision_peak = 0.0
        if first:  # the encoders run while the earlier in-flight micro-batches are held
            vision_peak = (in_flight - 1) * (saved + extra) + vis_base + vis_per_view * n_views
        activations = max(train_peak, vision_peak)
        out.append(StageMemory(
            stage=s, params=sp.trainable * E, grads=sp.trainable * F32,
            optimizer=opt_bytes * (sp.dense / dims.dp + sp.expert / dims.expert_dp),
            encoders=sp.frozen * E, activations=activations, inputs=inputs,
            detail={"per_layer": per_layer, "layers": stage_layers(cfg, dims.pp, s),
                    "in_flight": in_flight, "stage_extra": extra, "bwd_transient": bwd_transient,
                    "vision_transient": vis_base + vis_per_view * n_views, "views": n_views}))
    return out


# ------------------------------------------------------------------------------ step time

@dataclass(frozen=True)
class StepTime:
    """FLOPs-based time of one optimizer step."""

    seconds: float
    """Estimated step time."""
    model_flops: float
    """FLOPs of the step as :func:`.flops.step_flops` counts them (for MFU)."""
    executed_flops: float
    """Model FLOPs plus recomputation."""
    bubble_fraction: float
    """Pipeline bubble: (pp - 1) / (m + pp - 1) of the step."""


def estimate_step_time(cfg: SphinxConfig, dims: ParallelDims, *, seq_length: int,
                       global_batch_size: int, mfu: float, peak_tflops: float,
                       recompute: Recompute = "none", sample_length: int | None = None,
                       views_per_row: float | None = None) -> StepTime:
    """Step time of a layout: FLOPs over the achieved throughput, with the 1F1B schedule.

    Each of the ``m = G / dp`` micro-batches (one packed row) costs, on stage ``s``, the LLM
    FLOPs of its layers divided over TP, plus on the first stage the frozen encoders and the
    projector, which every TP rank runs in full (they are replicated, not tensor-parallel).
    1F1B takes ``m + pp - 1`` slots of the slowest stage. Compute runs at ``mfu * peak``;
    communication is not modelled (it is what separates a real MFU from 1).

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
    rate = mfu * peak_tflops * 1e12
    # The first stage is the slowest: its share of the LLM plus the replicated vision work.
    slot = ((llm + extra) / (dims.pp * dims.tp) + vision_row) / rate
    seconds = (m + dims.pp - 1) * slot
    model = global_batch_size * (llm + vision_row)
    executed = global_batch_size * (llm + extra + vision_row * dims.tp)
    return StepTime(seconds, model, executed, (dims.pp - 1) / (m + dims.pp - 1))


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


def plan_layouts(cfg: SphinxConfig, *, gpus: int, gpu_mem_gib: float, seq_length: int,
                 global_batch_size: int, mfu: float = 0.4, peak_tflops: float = 989.0,
                 headroom: float = 0.1, max_tp: int = 8, dtype: torch.dtype = torch.bfloat16,
                 path: KernelPath = "te", views: int | None = None,
                 recompute_options: tuple[Recompute, ...] = ("none", "selective", "full"),
                 micro_batch_size: int = 1) -> list[LayoutPlan]:
    """Every valid TP/PP/EP/DP layout and recompute option, sorted by estimated step time.

    A layout is valid when :class:`ParallelDims` and its ``validate_model`` accept it
    (Megatron-Core 0.19 rules: ``etp * ep`` divides ``dp * tp``, ep divides the experts, MoE with
    TP needs sequence parallelism...), tp is a power of two up to ``max_tp`` (one node),
    sequence parallelism is on whenever tp > 1, and the global batch splits over dp into
    micro-batches of ``micro_batch_size`` rows (run as one THD sequence, so estimated as one row
    of ``micro_batch_size * seq_length`` positions; ``views`` is per row). It fits when its busiest stage needs at most
    ``(1 - headroom) * gpu_mem_gib`` (the headroom covers the CUDA context, NCCL buffers and
    fragmentation, which are not modelled).

    Returns:
        Every valid plan (fitting or not), fastest first; ties by lower peak memory.
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
                try:
                    dims = ParallelDims(world_size=gpus, tp=tp, pp=pp, ep=ep,
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
                        peak_tflops=peak_tflops, recompute=rc)
                    peak = max(s.total for s in stages)
                    plans.append(LayoutPlan(dims, rc, stages, time, peak <= usable))
    plans.sort(key=lambda p: (p.time.seconds, p.peak.total))
    return plans
