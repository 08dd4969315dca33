"""The training run's settings (everything that is not the model recipe)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_sphinx.config import VISION_DWCONV_FORMS, VISION_GELU_FORMS

if TYPE_CHECKING:
    from megatron_sphinx.config import SphinxConfig


#: The forms of torch's AdamW step (``--adam``; :mod:`megatron_sphinx.train.adam`).
ADAM_FORMS = ("fused", "foreach")


@dataclass(frozen=True)
class VisionRun:
    """How the frozen encoders run in the training step (the ``--vision-batch``,
    ``--cuda-graph-vision``, ``--overlap-vision``, ``--vision-gelu``, ``--vision-dwconv`` and
    ``--vision-cudnn-benchmark`` flags). Every choice gives the same tokens (up to rounding), but
    ``gelu="tanh"``.

    Raises:
        ValueError: For settings that do not go together, saying what to change.
    """

    batch: int = 0
    """Encode the views of a step's micro-batches as one stream, in calls of at most this many
    views (a multiple of 8); 0: each micro-batch encodes its own views."""
    cuda_graphs: bool = False
    """Replay each call size as a CUDA graph (GPU; needs ``batch``)."""
    overlap: bool = False
    """Encode micro-batch k+1's views on a second CUDA stream while micro-batch k trains (GPU)."""
    gelu: str = "exact"
    """``exact``, or ``tanh``: the GELU feed-forwards' GELU in its tanh form, in the epilogue of
    their first GEMM on GPUs (:mod:`megatron_sphinx.model.vision_fusions`)."""
    dwconv: str = "torch"
    """``torch``, or ``triton``: ConvNeXt's depthwise convolution and the LayerNorm after it as
    one Triton kernel (GPU; :mod:`kernels.triton_dwconv_norm`)."""
    cudnn_benchmark: bool = False
    """cuDNN times its convolution algorithms for each new shape in the encoders and keeps the
    fastest, instead of picking by heuristics (GPU;
    :attr:`~megatron_sphinx.model.vision.MixtureOfVisualExperts.cudnn_benchmark`)."""

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or (
                self.batch < 0 or self.batch % 8):  # MixtureOfVisualExperts.VIEW_MULTIPLE
            raise ValueError(f"--vision-batch {self.batch}: give a multiple of 8 views per "
                             "encoder call, e.g. 32 (0: each micro-batch encodes its own)")
        if self.cuda_graphs and not self.batch:
            raise ValueError("--cuda-graph-vision captures one graph per encoder call size: add "
                             "--vision-batch N (e.g. 32) so that calls take few sizes")
        if self.gelu not in VISION_GELU_FORMS:
            raise ValueError(f"--vision-gelu {self.gelu}: choose "
                             f"{' or '.join(VISION_GELU_FORMS)}")
        if self.dwconv not in VISION_DWCONV_FORMS:
            raise ValueError(f"--vision-dwconv {self.dwconv}: choose "
                             f"{' or '.join(VISION_DWCONV_FORMS)}")

    def check_device(self, on_gpu: bool) -> None:
        """Raises ValueError (saying what to change) where a choice needs a GPU and
        ``on_gpu`` is False."""
        if on_gpu:
            return
        if self.cuda_graphs:
            raise ValueError("--cuda-graph-vision needs a GPU, and this machine has none: "
                             "drop it")
        if self.overlap:
            raise ValueError("--overlap-vision runs the encoders on a second CUDA stream, and "
                             "this machine has no GPU: drop it")
        if self.dwconv == "triton":
            raise ValueError("--vision-dwconv triton runs a GPU kernel, and this machine has "
                             "no GPU: drop it")
        if self.cudnn_benchmark:
            raise ValueError("--vision-cudnn-benchmark times cuDNN's convolutions, and this "
                             "machine has no GPU: drop it")

    def describe(self, on_gpu: bool) -> str:
        """The ``vision`` entry of the start-up ``kernels:`` line."""
        text = f"step's views in calls of {self.batch}" if self.batch else "per micro-batch"
        if self.cuda_graphs:
            text += ", CUDA graphs"
        if self.overlap:
            text += ", one micro-batch ahead on a second CUDA stream"
            if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
                # As Megatron wants for tensor parallelism on Hopper and older: the two streams
                # then share one hardware queue, and their kernels cannot run side by side.
                text += (" (but CUDA_DEVICE_MAX_CONNECTIONS=1 gives both streams one hardware "
                         "queue: unset it, or set 8, where tensor parallelism is off)")
        if self.gelu == "tanh":
            text += (", GELU in tanh form in the GEMM epilogue" if on_gpu
                     else ", GELU exact (the tanh form is for GPUs)")
        if self.dwconv == "triton":
            text += ", depthwise convolution + norm one Triton kernel"
        if self.cudnn_benchmark:
            text += ", cuDNN convolutions timed per shape (benchmark)"
        return text


@dataclass
class RunConfig:
    """Settings of one training run, from the command line."""

    recipe: str = "debug"
    """Recipe name (see ``megatron_sphinx.config.RECIPES``)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (> 1: Megatron's interleaved schedule)."""
    ep: int = 1
    """Expert-parallel size (MoE recipes)."""
    sequence_parallel: bool = False
    """Sequence parallelism inside the TP group."""
    steps: int = 20
    """Total optimizer steps (a resumed run continues up to this)."""
    data: str | None = None
    """A preprocessed store; None trains on the embedded sample data."""
    save: str | None = None
    """Save directory (checkpoints, metrics.jsonl); holding checkpoints means resume."""
    load: str | None = None
    """Checkpoint (or save directory) to start from."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on a stop signal)."""
    keep_last: int = 0
    """Keep only the newest N checkpoints (0 keeps all)."""
    final_save: bool = True
    """Save a checkpoint when the run reaches ``steps`` (False: metrics only, for benchmarks)."""
    global_batch_size: int | None = None
    """Packed sequences per step; None takes the recipe's."""
    seq_length: int | None = None
    """Packed sequence length; None takes the recipe's."""
    micro_batch_size: int | None = None
    """Packed rows per micro-batch, run as one THD sequence; None takes the recipe's (1; 2 for
    sphinx-tiny)."""
    lr: float | None = None
    """Peak learning rate; None takes the recipe's."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay; None takes the recipe's (0)."""
    warmup_fraction: float | None = None
    """Fraction of ``steps`` in linear warm-up; None takes the recipe's (0.01)."""
    weight_decay: float | None = None
    """AdamW weight decay; None takes the recipe's (0)."""
    clip_grad: float | None = None
    """Gradient-norm clip, 0 turns clipping off; None takes the recipe's (1.0)."""
    adam: str = "fused"
    """Where Megatron falls back to torch's AdamW (no Apex or Transformer Engine): ``fused``
    runs the step as one kernel per parameter group, ``foreach`` as torch's multi-tensor ops
    (:mod:`megatron_sphinx.train.adam`). The updates agree up to fp32 rounding."""
    seed: int | None = None
    """Seed; None takes the recipe's."""
    backend: str = "auto"
    """Transformer layers: auto, te (Transformer Engine) or local."""
    dtype: str = "auto"
    """auto (bf16 on GPUs, fp32 on CPUs), bf16 or fp32."""
    recompute: str | None = None
    """Activation recompute: None, selective or full."""
    overlap_grad_reduce: bool = True
    """Reduce-scatter gradient buckets during the backward pass (False: after it)."""
    overlap_param_gather: bool = True
    """All-gather updated parameter buckets during the next forward pass (False: in the
    optimizer step)."""
    fp8: bool = False
    """FP8 GEMMs in the Transformer Engine layers (hybrid E4M3/E5M2, delayed scaling)."""
    compile_fusions: bool = False
    """torch.compile Megatron's fused functions (SwiGLU, bias-dropout-add). Off by default:
    sphinx-tiny's step on one H100 took 2.76 s with them against 2.08 s without
    (docs/PERFORMANCE.md). Takes effect through ``TORCH_COMPILE_DISABLE``, which torch reads at
    import, so the training command sets it before importing torch."""
    vision_batch: int = 0
    """Encode the views of a step's micro-batches as one stream, in encoder calls of at most
    this many views (a multiple of 8; the last call is padded with zero views to a multiple of
    8, so calls take few shapes), each queued just before the first micro-batch that needs it;
    0: each micro-batch encodes its own views. The tokens are the same (the encoders are
    frozen)."""
    cuda_graph_vision: bool = False
    """Replay the frozen encoders as CUDA graphs, one per call size (needs ``vision_batch``
    and a GPU)."""
    overlap_vision: bool = False
    """Encode micro-batch k+1's views on a second CUDA stream while micro-batch k trains, so
    that the encoders (bound by the GPU) fill the gaps of the LLM's forward and backward (bound
    by the host's launches); needs a GPU, and more than one hardware queue
    (``CUDA_DEVICE_MAX_CONNECTIONS`` unset or above 1) for the streams to run side by side. The
    tokens are the same."""
    vision_gelu: str = "exact"
    """``exact``, or ``tanh``: the encoders' GELU feed-forwards (ConvNeXt's) compute GELU in its
    tanh form in the epilogue of their first GEMM on GPUs, one pass over their widest
    activation fewer; the tokens then differ slightly from exact GELU's
    (:mod:`megatron_sphinx.model.vision_fusions`)."""
    vision_dwconv: str = "torch"
    """``torch``, or ``triton``: ConvNeXt's depthwise convolution and the LayerNorm after it run
    as one Triton kernel on GPUs (checked against the torch ops at start-up), which writes the
    normalised map once; the same tokens up to rounding."""
    vision_cudnn_benchmark: bool = False
    """cuDNN times its algorithms for each new convolution shape of the encoders and keeps the
    fastest (``torch.backends.cudnn.benchmark`` inside the encoders), instead of choosing by
    heuristics; each new number of views per call costs one timing, so it suits
    ``vision_batch`` or long runs. GPU only; the same tokens up to rounding."""
    packing: bool = True
    """Pack several samples per sequence (False: one padded sample per sequence)."""
    skip_padded_views: bool = True
    """Replace fully padded sub-images by one skip token (False: encode every sub-image)."""
    exit_interval: int | None = None
    """Save and exit (code 3, "requeue me") when the step count is a multiple of this."""
    exit_after_minutes: float | None = None
    """Save and exit after this much wall time (clusters without preemption signals)."""
    timeout_minutes: float = 10.0
    """Collective timeout: a dead rank ends the job after at most this long."""
    log_interval: int = 1
    """Console line every N steps (metrics.jsonl gets every step)."""
    tensorboard_dir: str | None = None
    """Also write every step's numbers as TensorBoard scalars there (rank 0); None: no."""
    eval_data: str | None = None
    """A held-out preprocessed store (or ``synthetic``) to evaluate on; None: no evaluation."""
    eval_split: float | None = None
    """Hold out this fraction of the training store's samples and evaluate on them."""
    eval_interval: int = 0
    """Evaluate every N steps and at the last step (0: at the last step only)."""
    eval_batches: int = 8
    """Global batches per evaluation (the same batches every time)."""
    eval_only: bool = False
    """Evaluate the checkpoint the run starts from (or the initial weights) once, then stop:
    no training step, nothing written."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "steps", "log_interval"):
            _at_least(name, getattr(self, name), 1)
        _at_least("eval_batches", self.eval_batches, 1)
        for name in ("save_interval", "keep_last", "eval_interval"):
            _at_least(name, getattr(self, name), 0, "0 turns it off")
        for name, low in (("global_batch_size", 1), ("micro_batch_size", 1), ("seq_length", 2),
                          ("exit_interval", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is not None:
                _at_least(name, value, low, "or leave it out")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"--lr {self.lr}: give 0 or a positive learning rate (or leave it "
                             "out)")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{_flag(name)} {value}: give 0 or a positive number (or "
                                 "leave it out)")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction {self.warmup_fraction}: give a fraction of the "
                             "steps in [0, 1), e.g. 0.01 (or leave it out)")
        if self.exit_after_minutes is not None and not (
                math.isfinite(self.exit_after_minutes) and self.exit_after_minutes > 0):
            raise ValueError(f"--exit-after-minutes {self.exit_after_minutes}: give a positive "
                             "number of minutes (or leave it out)")
        if not (math.isfinite(self.timeout_minutes) and self.timeout_minutes > 0):
            raise ValueError(f"--timeout-minutes {self.timeout_minutes}: give a positive number "
                             "of minutes")
        if self.sequence_parallel and self.tp < 2:
            raise ValueError("--sp splits sequences over the TP group: raise --tp to 2 or more, "
                             "or drop --sp")
        _ = self.vision  # VisionRun checks the encoder flags when it is made
        if self.backend not in ("auto", "te", "local"):
            raise ValueError(f"--backend {self.backend}: choose auto, te or local")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype {self.dtype}: choose auto, bf16 or fp32")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"--recompute {self.recompute}: choose selective or full")
        if self.adam not in ADAM_FORMS:
            raise ValueError(f"--adam {self.adam}: choose {' or '.join(ADAM_FORMS)}")
        if self.tensorboard_dir is not None and not str(self.tensorboard_dir).strip():
            raise ValueError("--tensorboard-dir is empty: pass a directory or leave it out")
        if self.data is not None and not str(self.data).strip():
            raise ValueError("--data is empty: pass a store path, synthetic, or leave it out")
        if self.eval_data is not None and not str(self.eval_data).strip():
            raise ValueError("--eval-data is empty: pass a held-out store path, synthetic, or "
                             "leave it out")
        if self.eval_split is not None:
            if self.eval_data is not None:
                raise ValueError("give --eval-data (another store) or --eval-split (a part of "
                                 "--data), not both")
            if not (math.isfinite(self.eval_split) and 0 < self.eval_split < 1):
                raise ValueError(f"--eval-split {self.eval_split}: give a fraction between 0 "
                                 "and 1, e.g. 0.01")
            if self.data == "synthetic":
                raise ValueError("--eval-split holds out part of a store: with --data synthetic "
                                 "use --eval-data synthetic")
        if self.eval_only and not self.evaluates:
            raise ValueError("--eval-only needs --eval-data (a held-out store) or --eval-split "
                             "(a part of --data)")
        if self.eval_interval and not self.evaluates:
            raise ValueError(f"--eval-interval {self.eval_interval} needs --eval-data (a "
                             "held-out store) or --eval-split (a part of --data)")

    @property
    def vision(self) -> VisionRun:
        """How the frozen encoders run (the ``--vision-*`` flags)."""
        return VisionRun(self.vision_batch, self.cuda_graph_vision, self.overlap_vision,
                         self.vision_gelu, self.vision_dwconv, self.vision_cudnn_benchmark)

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates (``--eval-data`` or ``--eval-split`` given)."""
        return self.eval_data is not None or self.eval_split is not None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _at_least(name: str, value: int, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{_flag(name)} must be at least {low}, got {value}"
                         + (f" ({hint})" if hint else ""))


def check_run_inputs(rc: RunConfig, cfg: SphinxConfig) -> None:
    """Checks a run's paths and lengths against the recipe before anything is built.

    Cheap (no process group, no model, no Megatron import): the sequence length holds an image,
    ``--data`` is a store with samples for this recipe's image layout, ``--save`` can be
    written (and its ``run.json``, if any, read), and the checkpoint the run would start from
    (the newest in ``--save``, else ``--load``) is of this recipe and whole: ``meta.json``
    readable, every shard present and long enough; a store position it holds resumes only with
    the batch settings and data it was made with. The training loop still checks what needs
    the launch or Megatron (the parallel layout, ``--save`` belonging to this run).

    Raises:
        ValueError: One line saying what to change.
    """
    from megatron_sphinx.cli import check_output_dir, check_store
    from megatron_sphinx.data.geometry import full_image_positions
    from megatron_sphinx.train import checkpoint as ckpt_lib

    seq = rc.seq_length if rc.seq_length is not None else cfg.train.seq_length
    need = full_image_positions(cfg.vision.image_size, cfg.vision.grid)
    if seq <= need:
        raise ValueError(f"--seq-length {seq} cannot hold one image of recipe {cfg.name} "
                         f"({need} positions at image size {cfg.vision.image_size}, grid "
                         f"{cfg.vision.grid}) and its text: use a --seq-length above {need}")
    lr = rc.lr if rc.lr is not None else cfg.train.lr
    min_lr = rc.min_lr if rc.min_lr is not None else cfg.train.min_lr
    if min_lr > lr:
        raise ValueError(f"--min-lr {min_lr} is above the peak learning rate {lr}: lower it or "
                         "raise --lr")
    gbs = rc.global_batch_size or cfg.train.global_batch_size
    mbs = rc.micro_batch_size or cfg.train.micro_batch_size
    if gbs % mbs:
        raise ValueError(f"global batch {gbs} is not a multiple of micro-batch {mbs}: change "
                         "--global-batch-size or --micro-batch-size")
    samples = None
    if rc.data not in (None, "synthetic"):
        samples = check_store(rc.data, "--data", image_size=cfg.vision.image_size,
                              grid=cfg.vision.grid)
        if rc.eval_split is not None:  # training sees the part that is not held out
            from megatron_sphinx.data.split import checked_mask

            samples -= int(checked_mask(samples, rc.eval_split).sum())
    if rc.eval_data not in (None, "synthetic"):
        check_store(rc.eval_data, "--eval-data", image_size=cfg.vision.image_size,
                    grid=cfg.vision.grid)
    if rc.tensorboard_dir is not None:
        check_output_dir(rc.tensorboard_dir, "--tensorboard-dir")
        if importlib.util.find_spec("tensorboard") is None:  # torch.utils.tensorboard's need
            raise ValueError("--tensorboard-dir needs the tensorboard package: pip install "
                             "tensorboard (requirements.txt pins it), or leave the flag out")
    if rc.save:
        check_output_dir(rc.save, "--save")
        run_json = Path(rc.save) / "run.json"
        if run_json.is_file():
            try:
                json.loads(run_json.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"--save {rc.save}: its run.json is unreadable ({exc}): restore "
                                 "it or pass a new directory") from None
    ckpt = ckpt_lib.start_point(rc.save, rc.load)
    if ckpt is not None:
        meta = ckpt_lib.read_meta(ckpt)
        if meta.recipe != cfg.name:
            in_save = bool(rc.save) and Path(rc.save) in ckpt.parents
            other = "a new --save directory" if in_save else "another checkpoint"
            raise ValueError(f"{'--save' if in_save else '--load'} {ckpt} is a checkpoint of "
                             f"recipe {meta.recipe!r}, not {cfg.name!r}: pass --recipe "
                             f"{meta.recipe} or {other}")
        ckpt_lib.check_complete(ckpt)
        if not rc.eval_only:  # an evaluation reads the weights only: any batch settings do
            _check_data_position(rc, cfg, meta, ckpt, samples)


def _check_data_position(rc: RunConfig, cfg: SphinxConfig, meta, ckpt: Path,
                         samples: int | None) -> None:
    """A store loader's position resumes only with the settings that made its batches."""
    from megatron_sphinx.data.loader import check_resume

    state = meta.consumed or {}
    if rc.data == "synthetic" or not meta.has_optimizer or "global_batch_size" not in state:
        return  # synthetic data now or then, or weights only: no store position to continue
    fingerprint = None
    if rc.data is not None:  # the store's fingerprint, as the loader will compute it
        from megatron_sphinx.data import split, store

        fingerprint = store.read_meta(rc.data)[0].fingerprint or ""
        if rc.eval_split is not None:
            fingerprint = split.subset_fingerprint(fingerprint,
                                                   split.part_tags(rc.eval_split)[0])
    t = cfg.train
    try:
        check_resume(state, num_samples=samples, fingerprint=fingerprint,
                     global_batch_size=rc.global_batch_size or t.global_batch_size,
                     micro_batch_size=rc.micro_batch_size or t.micro_batch_size,
                     seq_length=rc.seq_length or t.seq_length, packing=rc.packing,
                     skip_padded=rc.skip_padded_views)
    except ValueError as exc:
        raise ValueError(f"{ckpt}: {exc}") from None
