"""Mixture of Visual experts (MoV): two frozen timm encoders whose tokens are concatenated.

Per 224-pixel view (pixels in [0, 1], normalised here per encoder):

* ConvNeXt (open_clip's ``convnext_xxlarge`` trunk is timm's ``convnext_xxlarge``): the view is
  resized to 512 so that the stride-32 map is 16x16; its 256 positions plus their mean as a
  leading "cls" token give 257 tokens of 3072 channels.
* DINOv2 ViT-g/14 at 224: CLS + 16x16 patch tokens = 257 tokens of 1536 channels.

The two ``[V, 257, C_i]`` sequences are concatenated along channels (3072 + 1536 = 4608). The
encoders are frozen: eval mode, ``requires_grad=False``, run under ``torch.no_grad``.

:meth:`MixtureOfVisualExperts.encode_in_calls` encodes any number of views in calls of a few
fixed sizes (the training step encodes a step's views with it as one stream, ``--vision-batch``).
Fixed sizes let cuDNN and cuBLAS reuse their plans, and let each size be one CUDA graph
(``cuda_graphs``): the encoders' ~2,000 small kernel launches per call become one replay.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_sphinx.config import EncoderConfig, VisionConfig
from megatron_sphinx.model.vision_fusions import fuse_frozen_blocks, restore_timm_forwards

log = logging.getLogger(__name__)

#: The attention kernels the ViT may use on a GPU: not cuDNN's, which builds an execution plan
#: for each new batch shape (reported at 55-400 ms each), and the number of views changes from one
#: micro-batch to the next. FlashAttention and the memory-efficient kernel need no plan.
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class FrozenEncoder(nn.Module):
    """One frozen timm encoder mapping ``[V, 3, 224, 224]`` views to ``[V, 257, C]`` tokens."""

    def __init__(self, cfg: EncoderConfig, tokens_per_view: int = 257):
        super().__init__()
        self.cfg = cfg
        self.tokens_per_view = tokens_per_view
        self.model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0,
                                       **cfg.timm_kwargs)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        channels = self.model.num_features
        if channels != cfg.channels:
            raise ValueError(f"{cfg.timm_name} has {channels} output channels, the config says "
                             f"{cfg.channels}: fix EncoderConfig.channels")
        self._channels_last = False  # weights moved to NHWC (once, at the first CUDA call)
        self.requires_grad_(False)
        self.eval()
        #: Blocks whose forward runs fewer memory passes (:mod:`.vision_fusions`), by kind.
        self.fused_blocks = fuse_frozen_blocks(self.model)

    def set_fusions(self, gelu: str = "exact", dwconv: str = "torch") -> None:
        """The opt-in fusions: ``exact`` or ``tanh`` GELU in the GELU feed-forwards, ConvNeXt's
        depthwise convolution and norm as ``torch`` ops or one ``triton`` kernel
        (:func:`~megatron_sphinx.model.vision_fusions.fuse_frozen_blocks`)."""
        restore_timm_forwards(self.model)
        self.fused_blocks = fuse_frozen_blocks(self.model, gelu, dwconv)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Stays in eval mode whatever the caller asks: the encoder is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """Encodes views.

        Args:
            views: ``[V, 3, 224, 224]`` pixels in [0, 1].

        Returns:
            ``[V, 257, C]`` tokens (CLS/mean first, then 16x16 row-major).
        """
        dtype = next(self.model.parameters()).dtype
        x = ((views - self.mean) / self.std).to(dtype)
        if x.shape[-1] != self.cfg.input_size:
            x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear",
                              align_corners=False)
        if self.cfg.kind == "convnext" and x.is_cuda:
            # cuDNN's depthwise and pointwise convolutions are much faster in NHWC.
            if not self._channels_last:
                self.model.to(memory_format=torch.channels_last)
                self._channels_last = True
            x = x.contiguous(memory_format=torch.channels_last)
        with sdpa_kernel(GPU_SDPA_BACKENDS) if x.is_cuda else contextlib.nullcontext():
            feats = self.model.forward_features(x)
        if self.cfg.kind == "convnext":
            tokens = feats.flatten(2).transpose(1, 2)  # [V, C, 16, 16] -> [V, 256, C]
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)  # [V, 257, C]
        else:
            tokens = feats[:, : self.tokens_per_view]  # [V, 257, C]: CLS + patches
        if tokens.shape[1] != self.tokens_per_view:
            raise ValueError(f"{self.cfg.timm_name} gave {tokens.shape[1]} tokens per view, "
                             f"expected {self.tokens_per_view}: check input_size / img_size")
        return tokens

    def load_pretrained(self, path: str) -> None:
        """Loads local weights: timm format, open_clip (``visual.trunk.*``) or original DINOv2.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file cannot be read, or its tensors do not match the encoder (names
                or shapes).
        """
        if not os.path.exists(path):
            raise FileNotFoundError(f"encoder weights not found: {path}")
        from megatron_sphinx.model.hf_io import read_tensor_file

        state = read_tensor_file(path)  # a CheckpointError (ValueError) names a damaged file
        if not path.endswith(".safetensors"):
            state = state.get("state_dict", state.get("model", state))
        prefix = "visual.trunk."
        if any(k.startswith(prefix) for k in state):  # open_clip checkpoint
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if self.cfg.kind == "vit" and "mask_token" in state:  # original DINOv2 release
            from timm.models.vision_transformer import checkpoint_filter_fn
            state = checkpoint_filter_fn(state, self.model)
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(k for k in set(state) - set(own) if not k.startswith("head"))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise ValueError(
                f"{path} does not match {self.cfg.timm_name}: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(bad)} with another shape (e.g. {bad[:3]}): pass the weights of this model")
        self.model.load_state_dict({k: state[k] for k in own}, strict=True)
        log.info("loaded %s weights from %s", self.cfg.timm_name, path)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    """``torch.backends.cudnn.benchmark`` on within the block (if ``on``), as it was after."""
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class _GraphedCall:
    """One CUDA graph of ``fn`` on inputs shaped like ``example`` (a frozen, no-grad function).

    ``fn`` runs twice on a side stream first, outside the capture, so that lazy initialisation
    and cuDNN/cuBLAS planning happen there; the graph then replays the captured kernels on its
    own static input and output buffers. Its memory comes from ``pool``, which the graphs of
    one model share: they are replayed one at a time on one stream, and each replay's output is
    copied out before the next (a replay may overwrite the others' intermediates and outputs,
    never its own input).
    """

    def __init__(self, fn, example: torch.Tensor, pool):
        self.static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a loader's) may go on during the capture
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out


class MixtureOfVisualExperts(nn.Module):
    """The frozen encoders of :class:`VisionConfig`, concatenated along channels."""

    #: :meth:`encode_in_calls` rounds a call's views up to a multiple of this (zero views as
    #: padding).
    VIEW_MULTIPLE = 8

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleList(FrozenEncoder(e, cfg.tokens_per_view) for e in cfg.encoders)
        for enc in self.encoders:
            if enc.cfg.weights:
                enc.load_pretrained(enc.cfg.weights)
        #: Encoder calls and views encoded since construction (tests count skipped views here);
        #: the zero views :meth:`encode_in_calls` pads with are counted apart, in
        #: ``num_padding_views``.
        self.num_calls = 0
        self.num_views_encoded = 0
        self.num_padding_views = 0
        #: Replay one CUDA graph per number of views on a GPU (use with :meth:`encode_in_calls`,
        #: whose calls take few sizes; each size is captured at its first call).
        self.cuda_graphs = False
        self._graphs: dict[tuple, _GraphedCall] = {}
        self._graph_pool = None  # the memory pool the graphs share (made at the first capture)
        #: Let cuDNN time its algorithms for each new convolution shape and keep the fastest
        #: (``torch.backends.cudnn.benchmark``, inside the encoders only); the default picks by
        #: heuristics. Each new number of views per call is timed once, so it pays with
        #: :meth:`encode_in_calls`' few call sizes, or over a long run.
        self.cudnn_benchmark = False

    def train(self, mode: bool = True) -> "MixtureOfVisualExperts":
        """Stays in eval mode whatever the caller asks: the encoders are frozen."""
        return super().train(False)

    @property
    def channels(self) -> int:
        """Concatenated output channels."""
        return self.cfg.channels

    def set_fusions(self, gelu: str = "exact", dwconv: str = "torch") -> None:
        """The encoders' opt-in fusions (:meth:`FrozenEncoder.set_fusions`); drops the CUDA
        graphs captured with others."""
        for enc in self.encoders:
            enc.set_fusions(gelu, dwconv)
        self._graphs.clear()

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """``[V, 3, 224, 224]`` views -> ``[V, 257, sum(C_i)]`` tokens."""
        self.num_calls += 1
        self.num_views_encoded += views.shape[0]
        if self.cuda_graphs and views.is_cuda and views.shape[0]:
            key = (tuple(views.shape), views.dtype, views.device)
            if key not in self._graphs:
                log.info("capturing the encoders' CUDA graph for %d views", views.shape[0])
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                self._graphs[key] = _GraphedCall(self._encode, views, self._graph_pool)
            return self._graphs[key](views)
        return self._encode(views)

    def _encode(self, views: torch.Tensor) -> torch.Tensor:
        with _cudnn_benchmark(self.cudnn_benchmark):
            return torch.cat([enc(views) for enc in self.encoders], dim=-1)

    def encode_in_calls(self, views: torch.Tensor, max_views: int) -> Iterator[torch.Tensor]:
        """Encodes ``views`` in calls of at most ``max_views`` (a multiple of
        :attr:`VIEW_MULTIPLE`), the last one padded with zero views up to a multiple of
        :attr:`VIEW_MULTIPLE`, so that calls take at most ``max_views / VIEW_MULTIPLE`` sizes.

        A generator: each call runs when its tokens are asked for, so a caller can queue the
        GPU work of a call just before the first tokens it needs (padding dropped).
        """
        m = self.VIEW_MULTIPLE
        if max_views < m or max_views % m:
            raise ValueError(f"views per encoder call {max_views}: give a multiple of {m}")
        for start in range(0, views.shape[0], max_views):
            part = views[start:start + max_views]
            pad = -part.shape[0] % m
            if pad:
                part = torch.cat([part, part.new_zeros(pad, *part.shape[1:])])
                self.num_padding_views += pad
                self.num_views_encoded -= pad
            with torch.no_grad():
                tokens = self(part)
            yield tokens[:part.shape[0] - pad]
