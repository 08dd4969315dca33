"""The SPHINX-X model: frozen MoV encoders -> projector -> packed LLM input -> Megatron GPT.

Pipeline parallelism: the encoders, the projector, the learned image embeddings and the word
embedding live on the first stage only; later stages hold transformer layers (and the last one
the output layer). The LLM input of a packed micro-batch is written in one pass by the pack op
(:func:`kernels.pack_tokens`) from text embeddings, projected visual tokens and the learned
``start_img`` / ``end_img`` / ``skip`` embeddings, following the host-computed
``PackedBatch.pack_index`` (:mod:`megatron_sphinx.data.layout`).
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from kernels import pack_tokens
from megatron_sphinx.config import SphinxConfig
from megatron_sphinx.data.layout import NUM_SPECIAL, PackedBatch
from megatron_sphinx.model.llm import build_gpt
from megatron_sphinx.model.projector import Projector
from megatron_sphinx.model.vision import MixtureOfVisualExperts


class ImageEmbeddings(nn.Module):
    """The learned ``start_img``, ``end_img`` and ``skip`` embeddings (rows 0, 1, 2)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(NUM_SPECIAL, hidden_size, dtype=dtype) * 0.02)


class SphinxModel(MegatronModule):
    """One pipeline stage of SPHINX-X (one model chunk of it under the interleaved schedule).

    Args:
        cfg: The recipe.
        config: Megatron ``TransformerConfig`` of the LLM.
        backend: Layer backend, ``te`` or ``local``.
        pre_process: First pipeline stage (holds encoders, projector and embeddings).
        post_process: Last pipeline stage (holds the output layer; forward returns losses).
        pg_collection: Megatron ``ProcessGroupCollection`` (its ``tp`` group is used for
            sequence-parallel packing).
        vp_stage: The virtual pipeline stage of this chunk (interleaved schedule), else None.
    """

    def __init__(self, cfg: SphinxConfig, config: TransformerConfig, backend: str, *,
                 pre_process: bool = True, post_process: bool = True, pg_collection=None,
                 vp_stage: int | None = None):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # LLaMA-family: untied (read by Megatron)
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        #: Views per encoder call when the training step encodes the step's views as one stream,
        #: each call queued before the first micro-batch needing it
        #: (:func:`~megatron_sphinx.train.step.encoded_ahead`); 0: each micro-batch encodes its
        #: own views. Set by ``build_model``.
        self.vision_batch = 0
        #: Encode micro-batch k+1's views on a second CUDA stream while micro-batch k trains
        #: (``encoded_ahead``; the stream is made at the first step). Set by ``build_model``.
        self.vision_overlap = False
        self.vision_stream: torch.cuda.Stream | None = None
        if pre_process:
            self.vision = MixtureOfVisualExperts(cfg.vision)
            self.projector = Projector(cfg.vision.channels, cfg.llm.hidden_size,
                                       dtype=config.params_dtype)
            self.image_embeddings = ImageEmbeddings(cfg.llm.hidden_size, config.params_dtype)
        self.language_model = build_gpt(cfg.llm, config, backend, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pg_collection,
                                        vp_stage=vp_stage)
        if pre_process:
            # We build the LLM input ourselves and pass it as decoder_input; the word embedding
            # is only asked for the text rows, fully reduced over TP (no sequence scatter).
            self.language_model.embedding.word_embeddings.reduce_scatter_embeddings = False

    def set_input_tensor(self, input_tensor) -> None:
        """Receives the previous pipeline stage's activations (Megatron schedules call this)."""
        self.language_model.set_input_tensor(input_tensor)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Builds the LLM input ``[b * s, 1, h]``: the micro-batch's rows one after the other as
        one THD sequence (``[b * s / tp, 1, h]`` with sequence parallelism)."""
        b, s = batch.shape
        words = self.language_model.embedding.word_embeddings
        text = words(batch.text_ids.unsqueeze(0)).squeeze(0)  # [T, h]
        special = self.image_embeddings.weight  # [3, h]
        if batch.views.shape[0]:
            feats = batch.features  # [V, 257, C]: encoded ahead by the step, or here
            if feats is None:
                feats = self.vision(batch.views)
            visual = self.projector(feats).flatten(0, 1)  # [V * 257, h]
        else:  # no image: the projector still runs (on nothing), so that every trainable
            # parameter gets a gradient, as DDP's overlapped gradient reduce waits for them all
            visual = self.projector(special.new_zeros(0, self.projector.linear.in_features))
        visual = visual.to(text.dtype)
        special = special.to(text.dtype)
        index = batch.pack_index  # [s * b], sequence-first
        if b > 1:  # rows one after the other, as cu_seqlens counts them
            index = index.view(s, b).t().reshape(-1)  # [b * s]
        if self.config.sequence_parallel:
            tp = self.tp_group.size()
            chunk = index.numel() // tp
            rank = self.tp_group.rank()
            index = index[rank * chunk:(rank + 1) * chunk]
            # Each rank writes its sequence chunk; backward all-reduces the sources' gradients.
            text, visual, special = (copy_to_tensor_model_parallel_region(t, group=self.tp_group)
                                     for t in (text, visual, special))
        out = pack_tokens(text, visual, special, index)  # [b * s (/ tp), h]
        return out.view(-1, 1, out.shape[-1])  # [b * s, 1, h]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Runs this stage on a packed micro-batch.

        The ``b`` rows of the micro-batch run as one THD sequence of ``b * s`` tokens
        (``cu_seqlens`` already counts row by row), so a row is only a packing unit.

        Returns:
            Per-token losses ``[1, b * s]`` (row after row) on the last stage, hidden states
            ``[b * s, 1, h]`` elsewhere.
        """
        decoder_input = self.embed(batch) if self.pre_process else None
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
            max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)
        return self.language_model(
            input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input,
            labels=batch.labels.reshape(1, -1) if self.post_process else None,
            packed_seq_params=packed)
