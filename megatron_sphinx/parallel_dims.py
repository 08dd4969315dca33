"""Parallel layout arithmetic: how a world of ranks splits into TP x PP x DP (and EP for experts).

Pure arithmetic, no processes: the rules are Megatron-Core 0.19's
(``parallel_state.initialize_model_parallel`` and ``TransformerConfig.__post_init__``), checked
early with messages that say what to change.

Megatron's grids (rank order ``tp-cp-ep-dp-pp``, context parallel fixed at 1 here):

* dense layers: ``world = tp * dp * pp``;
* expert layers: ``world = etp * ep * edp * pp`` where ``etp`` (expert tensor parallel) defaults
  to ``tp``. Expert parallelism is carved out of the dense ``dp * tp`` ranks, so ``etp * ep``
  must divide ``dp * tp``; ``edp`` is what is left (expert data parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}: set {name} >= 1")


@dataclass(frozen=True)
class ParallelDims:
    """A validated parallel layout for ``world_size`` ranks; ``dp`` is derived.

    Example:
        >>> ParallelDims(world_size=8, tp=2, pp=2).dp
        2
    """

    world_size: int
    """Total number of ranks (processes)."""
    tp: int = 1
    """Tensor-parallel size (splits each layer's weights; stays inside a node)."""
    pp: int = 1
    """Pipeline-parallel size (splits the layer stack into stages)."""
    ep: int = 1
    """Expert-parallel size (splits the experts of each MoE layer)."""
    etp: int | None = None
    """Expert tensor-parallel size; None means the same as ``tp`` (Megatron's default)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None for plain 1F1B."""
    sequence_parallel: bool = False
    """Shard activations along the sequence inside the TP group (needs tp > 1)."""
    dp: int = field(init=False)
    """Data-parallel size of the dense layers: world_size / (tp * pp)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "ep"):
            _positive_int(name, getattr(self, name))
        if self.etp is not None:
            _positive_int("etp", self.etp)
        if self.vpp is not None:
            _positive_int("vpp", self.vpp)
        ws, tp, pp = self.world_size, self.tp, self.pp
        if ws % (tp * pp):
            raise ValueError(
                f"world size {ws} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}: "
                f"choose tp and pp whose product divides {ws}"
            )
        object.__setattr__(self, "dp", ws // (tp * pp))
        etp = self.expert_tp
        if (self.dp * tp) % (etp * self.ep):
            raise ValueError(
                f"expert parallel needs etp*ep = {etp}*{self.ep} = {etp * self.ep} to divide "
                f"dp*tp = {self.dp}*{tp} = {self.dp * tp} (experts are spread over the ranks of "
                f"one pipeline stage): choose an ep that divides {self.dp * tp // etp}"
            )
        if self.vpp is not None:
            if pp < 2:
                raise ValueError(
                    f"vpp {self.vpp} needs pipeline parallelism: set pp >= 2 or drop vpp"
                )
            if self.vpp < 2:
                raise ValueError(
                    "vpp must be >= 2 (virtual stages per rank): drop vpp for plain 1F1B")
        if self.sequence_parallel and tp < 2:
            raise ValueError("sequence_parallel needs tp >= 2: raise tp or drop sequence parallel")

    @property
    def expert_tp(self) -> int:
        """Effective expert tensor-parallel size."""
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Expert data-parallel size: world_size / (etp * ep * pp)."""
        return self.world_size // (self.expert_tp * self.ep * self.pp)

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the dense model: tp * pp."""
        return self.tp * self.pp

    def describe(self) -> str:
        """Short human-readable layout, e.g. ``tp2.pp2.dp1.ep1+sp``."""
        text = f"tp{self.tp}.pp{self.pp}.dp{self.dp}.ep{self.ep}"
        if self.etp is not None:
            text += f".etp{self.etp}"
        if self.vpp is not None:
            text += f".vpp{self.vpp}"
        return text + ("+sp" if self.sequence_parallel else "")

    def validate_model(
        self,
        *,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        num_experts: int | None = None,
        seq_length: int | None = None,
        num_microbatches: int | None = None,
        model_name: str = "the model",
    ) -> None:
        """Check that a model's shape fits this layout (Megatron-Core 0.19 rules).

        Args:
            num_layers: Transformer layers of the LLM.
            num_heads: Attention (query) heads.
            num_kv_heads: Key/value heads (GQA groups); None means ``num_heads``.
            num_experts: Experts per MoE layer; None for a dense model.
            seq_length: Sequence length of a micro-batch (checked for sequence parallel).
            num_microbatches: Micro-batches per step and DP rank (checked for pipelines).
            model_name: Name used in messages, e.g. ``"sphinx-tiny"``.

        Raises:
            ValueError: One line saying what to change.
        """
        tp, pp = self.tp, self.pp
        if num_heads % tp:
            raise ValueError(
                f"--tp {tp} does not divide the {num_heads} attention heads of {model_name}: "
                f"choose a tp that divides {num_heads}"
            )
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if kv % tp and tp % kv:
            raise ValueError(
                f"--tp {tp} and the {kv} key/value heads of {model_name} do not divide one "
                f"another: choose a tp that divides {kv} or is a multiple of it"
            )
        if num_layers % pp:
            raise ValueError(
                f"--pp {pp} does not divide the {num_layers} layers of {model_name}: "
                f"choose a pp that divides {num_layers}"
            )
        if self.vpp is not None and num_layers % (pp * self.vpp):
            raise ValueError(
                f"pp*vpp = {pp}*{self.vpp} does not divide the {num_layers} layers of "
                f"{model_name}: choose pp and vpp whose product divides {num_layers}"
            )
        if num_experts is None:
            if self.ep > 1:
                raise ValueError(
                    f"--ep {self.ep} but {model_name} is dense (no experts): set ep to 1"
                )
        else:
            if num_experts % self.ep:
                raise ValueError(
                    f"--ep {self.ep} does not divide the {num_experts} experts of "
                    f"{model_name}: choose an ep that divides {num_experts}"
                )
            if tp > 1 and not self.sequence_parallel:
                raise ValueError(
                    f"{model_name} has MoE layers and tp {tp} > 1: Megatron trains MoE with "
                    "TP only under sequence parallel: enable sequence_parallel"
                )
        if self.sequence_parallel and seq_length is not None and seq_length % tp:
            raise ValueError(
                f"sequence parallel splits the {seq_length}-token sequence over tp {tp}: "
                f"choose a sequence length divisible by {tp}"
            )
        if num_microbatches is not None:
            _positive_int("num_microbatches", num_microbatches)
            if self.vpp is not None and num_microbatches % pp:
                raise ValueError(
                    f"the interleaved schedule needs the {num_microbatches} micro-batches to be "
                    f"a multiple of pp {pp}: change the global batch or the micro-batch size"
                )
