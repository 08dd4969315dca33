"""Typed configs, one per component, and the recipe registry of the SPHINX-X family.

A recipe is a small function returning a :class:`SphinxConfig`. Real recipes carry the published
architectures; the ``debug`` recipes differ from them only in sizes, so one code path serves all.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

from megatron_sphinx.data.geometry import TOKENS_PER_VIEW

#: The frozen encoders' opt-in fusions (:mod:`megatron_sphinx.model.vision_fusions`): the GELU
#: feed-forwards' GELU (``--vision-gelu``) and ConvNeXt's depthwise convolution + norm
#: (``--vision-dwconv``), the default first.
VISION_GELU_FORMS = ("exact", "tanh")
VISION_DWCONV_FORMS = ("torch", "triton")


@dataclass
class LLMConfig:
    """Architecture of the language model (a LLaMA-family decoder, dense or MoE)."""

    name: str
    """Human name of the base LLM, e.g. ``TinyLlama-1.1B``."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU inner width (per expert for MoE)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (grouped-query attention); equal to heads for plain MHA."""
    vocab_size: int
    """Tokenizer vocabulary size (before padding for tensor parallelism)."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_position_embeddings: int = 4096
    """Longest sequence the recipe trains on."""
    num_experts: int | None = None
    """Experts per MoE layer; None for a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to (MoE only)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing loss weight (MoE only); Mixtral-style training uses a small value."""
    hf_architecture: str = "LlamaForCausalLM"
    """The ``transformers`` class the converted LLM loads as."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} "
                "heads: change one of them")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{self.num_attention_heads} heads are not divisible by {self.num_query_groups} "
                "query groups: change num_query_groups")
        if self.num_experts is not None and not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(f"moe_router_topk must be in [1, {self.num_experts}]")

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts is not None


@dataclass
class EncoderConfig:
    """One frozen vision encoder (a timm model)."""

    timm_name: str
    """timm model name, e.g. ``convnext_xxlarge`` or ``vit_giant_patch14_dinov2``."""
    channels: int
    """Output channels (3072 for ConvNeXt-XXL, 1536 for ViT-g)."""
    kind: Literal["convnext", "vit"]
    """``convnext``: stride-32 map pooled to 16x16 + mean token; ``vit``: CLS + 16x16 patches."""
    mean: tuple[float, float, float]
    """Input normalisation mean (RGB, [0, 1] pixels)."""
    std: tuple[float, float, float]
    """Input normalisation std."""
    input_size: int = 224
    """Side the view is resized to before the encoder: 512 for ConvNeXt (a 16x16 stride-32 map),
    224 for DINOv2 (16x16 patches of 14)."""
    timm_kwargs: dict = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (the debug recipes shrink depth and width here)."""
    weights: str | None = None
    """Local path of pretrained weights (open_clip / timm / HF file); None = random init."""


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """The Mixture of Visual experts and the high-resolution layout."""

    encoders: list[EncoderConfig]
    """Frozen encoders whose 257-token outputs are concatenated along channels."""
    image_size: int = 448
    """Side of the padded square the image is resized into (672 for -2K)."""
    grid: int = 2
    """Sub-images per side (3 for -2K)."""
    view_size: int = 224
    """Encoder input side."""
    tokens_per_view: int = TOKENS_PER_VIEW
    """Visual tokens per encoded view (CLS/mean + 16x16)."""

    def __post_init__(self) -> None:
        if self.image_size != self.grid * self.view_size:
            raise ValueError(
                f"image_size {self.image_size} must equal grid {self.grid} x view_size "
                f"{self.view_size}")

    @property
    def channels(self) -> int:
        """Concatenated encoder channels: the projector's input width."""
        return sum(e.channels for e in self.encoders)


@dataclass
class TrainConfig:
    """Optimisation hyperparameters (the paper's one-stage recipe)."""

    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_fraction: float = 0.01
    """Fraction of the total steps spent in linear warm-up."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    global_batch_size: int = 256
    """Packed sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Packed sequences per forward pass per rank."""
    seq_length: int = 4096
    """Packed sequence length in LLM tokens (after image expansion)."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}: change --global-batch-size or "
                "--micro-batch-size")


@dataclass
class SphinxConfig:
    """A whole SPHINX-X model and its training recipe."""

    name: str
    """Recipe name, e.g. ``sphinx-tiny``."""
    llm: LLMConfig
    """The language model."""
    vision: VisionConfig
    """The visual experts and image layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation hyperparameters."""
    paper_model_parallel: int = 1
    """Model-parallel degree the paper used (for documentation and layout planning)."""

    def replace(self, **changes) -> "SphinxConfig":
        """A copy with top-level fields replaced (sub-configs are deep-copied)."""
        return dataclasses.replace(copy.deepcopy(self), **changes)


def _full_encoders() -> list[EncoderConfig]:
    return [
        EncoderConfig("convnext_xxlarge", 3072, "convnext", CLIP_MEAN, CLIP_STD, input_size=512),
        EncoderConfig("vit_giant_patch14_dinov2", 1536, "vit", IMAGENET_MEAN, IMAGENET_STD,
                      timm_kwargs={"img_size": 224}),
    ]


def _debug_encoders() -> list[EncoderConfig]:
    return [
        # The same timm classes as the real encoders, shrunk in depth and width.
        EncoderConfig("convnext_xxlarge", 64, "convnext", CLIP_MEAN, CLIP_STD, input_size=512,
                      timm_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}),
        EncoderConfig("vit_giant_patch14_dinov2", 32, "vit", IMAGENET_MEAN, IMAGENET_STD,
                      timm_kwargs={"img_size": 224, "depth": 1, "embed_dim": 32, "num_heads": 2,
                                   "mlp_ratio": 2.0}),
    ]


RECIPES: dict[str, Callable[[], SphinxConfig]] = {}


def register(fn: Callable[[], SphinxConfig]) -> Callable[[], SphinxConfig]:
    """Adds a recipe function to :data:`RECIPES` under its config's name."""
    RECIPES[fn().name] = fn
    return fn


@register
def sphinx_tiny() -> SphinxConfig:
    """SPHINX-Tiny: TinyLlama-1.1B.

    Two packed rows per micro-batch (one THD sequence of 8192 tokens): the 1.1B LLM's forward
    and backward are bound by the host's kernel launches at one row, and two rows halve the
    launches per token (one H100, 8 rows of 4096 per step: 1.32 s against 1.44 s at one row,
    docs/PERFORMANCE.md).
    """
    llm = LLMConfig("TinyLlama-1.1B", 22, 2048, 5632, 32, 4, 32000)
    return SphinxConfig("sphinx-tiny", llm, VisionConfig(_full_encoders()),
                        TrainConfig(micro_batch_size=2))


@register
def sphinx_intern2() -> SphinxConfig:
    """SPHINX-Intern2: InternLM2-7B (RoPE base 1e6, vocabulary 92544)."""
    llm = LLMConfig("InternLM2-7B", 32, 4096, 14336, 32, 8, 92544, rope_base=1e6,
                    max_position_embeddings=32768)
    return SphinxConfig("sphinx-intern2", llm, VisionConfig(_full_encoders()))


@register
def sphinx_plus() -> SphinxConfig:
    """SPHINX-Plus: LLaMA2-13B."""
    llm = LLMConfig("LLaMA2-13B", 40, 5120, 13824, 40, 40, 32000)
    return SphinxConfig("sphinx-plus", llm, VisionConfig(_full_encoders()), paper_model_parallel=2)


@register
def sphinx_plus_2k() -> SphinxConfig:
    """SPHINX-Plus-2K: LLaMA2-13B at 672 px with a 3x3 grid."""
    cfg = sphinx_plus()
    cfg.name = "sphinx-plus-2k"
    cfg.vision = VisionConfig(_full_encoders(), image_size=672, grid=3)
    return cfg


@register
def sphinx_moe() -> SphinxConfig:
    """SPHINX-MoE: Mixtral-8x7B (8 experts, top-2, RoPE base 1e6, lr 5e-6)."""
    llm = LLMConfig("Mixtral-8x7B", 32, 4096, 14336, 32, 8, 32000, rope_base=1e6,
                    max_position_embeddings=32768, num_experts=8, moe_router_topk=2,
                    moe_aux_loss_coeff=0.02, hf_architecture="MixtralForCausalLM")
    return SphinxConfig("sphinx-moe", llm, VisionConfig(_full_encoders()),
                        TrainConfig(lr=5e-6), paper_model_parallel=8)


@register
def debug() -> SphinxConfig:
    """``sphinx-tiny``'s shape at toy size: trains on a CPU in well under a second per step."""
    llm = LLMConfig("debug-llama", 4, 64, 176, 4, 2, 512, max_position_embeddings=2048)
    train = TrainConfig(lr=2e-3, global_batch_size=2, micro_batch_size=1, seq_length=2048)
    return SphinxConfig("debug", llm, VisionConfig(_debug_encoders()), train)


@register
def debug_moe() -> SphinxConfig:
    """``sphinx-moe``'s shape at toy size (4 experts, top-2)."""
    cfg = debug()
    cfg.name = "debug-moe"
    cfg.llm = dataclasses.replace(cfg.llm, name="debug-mixtral", num_experts=4, moe_router_topk=2,
                                  hf_architecture="MixtralForCausalLM")
    return cfg


def get_recipe(name: str) -> SphinxConfig:
    """Returns a fresh config of recipe ``name``.

    Raises:
        ValueError: With the list of known recipes when ``name`` is unknown.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
