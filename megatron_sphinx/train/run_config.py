"""The training run's settings (everything that is not the model recipe)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    """Settings of one training run, from the command line."""

    recipe: str = "debug"
    """Recipe name (see ``megatron_sphinx.config.RECIPES``)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
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
    """Packed rows per micro-batch, run as one THD sequence; None takes the recipe's (1)."""
    lr: float | None = None
    """Peak learning rate; None takes the recipe's."""
    seed: int | None = None
    """Seed; None takes the recipe's."""
    backend: str = "auto"
    """Transformer layers: auto, te (Transformer Engine) or local."""
    dtype: str = "auto"
    """auto (bf16 on GPUs, fp32 on CPUs), bf16 or fp32."""
    recompute: str | None = None
    """Activation recompute: None, selective or full."""
    fp8: bool = False
    """FP8 GEMMs in the Transformer Engine layers (hybrid E4M3/E5M2, delayed scaling)."""
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

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype {self.dtype}: choose auto, bf16 or fp32")
        if self.recompute not in (None, "selective", "full"):
            raise ValueError(f"--recompute {self.recompute}: choose selective or full")
