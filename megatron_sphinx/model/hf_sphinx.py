"""SPHINX-X as a Hugging Face ``transformers`` model: config, model, Auto-class registration.

Importing this module registers :class:`SphinxXConfig` (``model_type = "sphinx_x"``) with
``AutoConfig`` and :class:`SphinxXForConditionalGeneration` with ``AutoModelForImageTextToText``
and ``AutoModelForCausalLM``; nothing is read from the network and no remote code runs.

Directory layout (written by ``tools/convert_to_hf.py`` and :meth:`save_pretrained`)::

    HF_DIR/config.json               SphinxXConfig: text_config, vision (encoders, grid), template
    HF_DIR/multimodal.safetensors    vision.*, projector.*, image_embeddings.weight
    HF_DIR/tokenizer files           copies of the LLM's (so AutoTokenizer works on HF_DIR)
    HF_DIR/language_model/           a plain LlamaForCausalLM / MixtralForCausalLM checkpoint
                                     (config, safetensors, tokenizer): loads with transformers
                                     alone, no custom code

The LLM weights are stored once, in ``language_model/``. The model's input is built exactly as in
training: :func:`megatron_sphinx.data.layout.build_packed_batch` lays out ``[BOS] [views] [text]``
(``start_img``, 257 visual tokens, ``end_img`` per encoded view; one ``skip`` embedding per fully
padded sub-image) and the reference pack op (:func:`kernels.pack_tokens`, ``impl="torch"``)
writes the embeddings, so the LLM sees the same sequence as the Megatron model.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          PreTrainedConfig, PreTrainedModel)
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from kernels import pack_tokens
from megatron_sphinx.config import EncoderConfig, VisionConfig
from megatron_sphinx.data.layout import NUM_SPECIAL, PAD_INDEX, Sample, build_packed_batch
from megatron_sphinx.model.projector import Projector
from megatron_sphinx.model.vision import MixtureOfVisualExperts

logger = logging.getLogger(__name__)

MULTIMODAL_WEIGHTS = "multimodal.safetensors"
"""File of the non-LLM weights (encoders, projector, image embeddings) in a SPHINX-X directory."""
LANGUAGE_MODEL_FOLDER = "language_model"
"""Sub-directory holding the plain ``transformers`` LLM."""


def vision_to_dict(cfg: VisionConfig) -> dict:
    """JSON-serialisable form of a :class:`VisionConfig` (encoder weight paths dropped)."""
    d = dataclasses.asdict(cfg)
    for enc in d["encoders"]:
        enc["weights"] = None  # the weights travel in multimodal.safetensors
    return json.loads(json.dumps(d))  # tuples -> lists, as config.json will hold them


def vision_from_dict(d: dict) -> VisionConfig:
    """The :class:`VisionConfig` of :func:`vision_to_dict`'s output."""
    d = dict(d)
    encoders = [EncoderConfig(**{**e, "mean": tuple(e["mean"]), "std": tuple(e["std"])})
                for e in d.pop("encoders")]
    return VisionConfig(encoders=encoders, **d)


class SphinxXConfig(PreTrainedConfig):
    """Configuration of :class:`SphinxXForConditionalGeneration`.

    Attributes:
        text_config: The LLM's config (``LlamaConfig`` or ``MixtralConfig``).
        vision: :class:`~megatron_sphinx.config.VisionConfig` as a dict (see
            :func:`vision_to_dict`): encoders, ``image_size``, ``grid``, ``view_size``.
        recipe: Name of the training recipe the weights come from.
        chat_template: Conversation template name (:mod:`megatron_sphinx.data.conversation`).
        stop_strings: Text that ends an answer in that template (generation stops there).
        language_model_folder: Sub-directory of the plain LLM checkpoint.
    """

    model_type = "sphinx_x"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision: dict | None = None
    recipe: str = ""
    chat_template: str = "sphinx"
    stop_strings: list[str] | None = None
    language_model_folder: str = LANGUAGE_MODEL_FOLDER
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision is None:
            from megatron_sphinx.config import get_recipe

            self.vision = vision_to_dict(get_recipe("debug").vision)
        if self.stop_strings is None:
            self.stop_strings = ["###"] if self.chat_template == "sphinx" else []

    @property
    def vision_config(self) -> VisionConfig:
        """The vision settings as a :class:`VisionConfig`."""
        return vision_from_dict(self.vision)


class ImageEmbeddings(nn.Module):
    """The learned ``start_img``, ``end_img``, ``skip`` rows: the same parameter name
    (``image_embeddings.weight``) and shape ``[3, h]`` as the Megatron model's."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(NUM_SPECIAL, hidden_size) * 0.02)


@dataclass
class SphinxXOutput(ModelOutput):
    """Output of :meth:`SphinxXForConditionalGeneration.forward`.

    Attributes:
        logits: ``[b, s, vocab]`` next-token logits over the expanded sequence.
        attention_mask: ``[b, s]`` 1 at real positions, 0 at right padding.
        inputs_embeds: ``[b, s, h]`` the LLM input that was built.
        cache: The LLM's key/value cache (when ``use_cache``).
    """

    logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    cache: Any = None


def _image_bytes(image: Any) -> bytes:
    """Encoded bytes of an image given as bytes, a path or a PIL image (PIL: lossless PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # PIL.Image.Image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be bytes, a path or a PIL image, got {type(image).__name__}")


def preprocess_image(image: Any, vision: VisionConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """The views of one image, as in training: ``([V, 3, v, v] in [0, 1], (height, width))``.

    Uses the Pillow reference of the training transform
    (:func:`megatron_sphinx.data.images.reference_views`; DALI matches it within 2/255): resize
    the longer side to ``image_size``, pad top-left with the CLIP mean, global view first, then
    the sub-images that are not fully padded.
    """
    from megatron_sphinx.data.images import reference_views

    views, hw = reference_views(_image_bytes(image), vision.image_size, vision.grid)
    return torch.from_numpy(views), hw


class SphinxXForConditionalGeneration(PreTrainedModel):
    """SPHINX-X: frozen MoV encoders -> projector -> LLM, with the training sequence layout.

    Args:
        config: The model config.
        language_model: An already built LLM to use (``from_pretrained`` passes the loaded one);
            None builds a randomly initialised one from ``config.text_config``.
    """

    config_class = SphinxXConfig
    base_model_prefix = "sphinx_x"
    main_input_name = "input_ids"
    _no_split_modules = ["FrozenEncoder"]
    _supports_sdpa = True

    def __init__(self, config: SphinxXConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        vision = config.vision_config
        hidden = config.text_config.hidden_size
        self.vision = MixtureOfVisualExperts(vision)
        self.projector = Projector(vision.channels, hidden)
        self.image_embeddings = ImageEmbeddings(hidden)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:  # loaded weights: post_init must not re-initialise them
            for module in language_model.modules():
                module._is_hf_initialized = True
        self.language_model = language_model
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The encoders, projector and embeddings initialise themselves (as in training)."""

    # ------------------------------------------------------------------------------ I/O

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: SphinxXConfig | None = None, dtype: Any = None,
                        **kwargs) -> "SphinxXForConditionalGeneration":
        """Loads a SPHINX-X directory (local files only; see the module docstring).

        Args:
            pretrained_model_name_or_path: The directory.
            config: Use this config instead of ``config.json``.
            dtype: dtype of the whole model (``torch.bfloat16``, ``"auto"``...); default: the LLM
                loads in its stored dtype and the multimodal part follows it.
            **kwargs: Passed to the LLM's ``from_pretrained`` (e.g. ``attn_implementation``,
                ``device_map``); the multimodal part goes where the LLM's embedding is.

        Raises:
            OSError: Not a SPHINX-X directory, or a file missing (the message names it).
        """
        from safetensors.torch import load_file

        if model_args:
            raise TypeError("SphinxXForConditionalGeneration.from_pretrained takes no positional "
                            "model arguments")
        path = Path(pretrained_model_name_or_path)
        if not (path / "config.json").is_file():
            raise OSError(f"{path} is not a local SPHINX-X directory (no config.json): SPHINX-X "
                          "models load from local files only")
        for hub_only in ("local_files_only", "revision", "cache_dir", "token", "force_download",
                         "trust_remote_code", "subfolder"):
            kwargs.pop(hub_only, None)
        config = config or SphinxXConfig.from_pretrained(path)
        llm_dir = path / config.language_model_folder
        weights = path / MULTIMODAL_WEIGHTS
        for need in (llm_dir / "config.json", weights):
            if not need.is_file():
                raise OSError(f"{path} is incomplete: {need.relative_to(path)} is missing")
        llm_kwargs = dict(kwargs, local_files_only=True)
        if dtype is not None:
            llm_kwargs["dtype"] = dtype
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, **llm_kwargs)
        config.text_config = llm.config
        model = cls(config, language_model=llm)
        state = load_file(str(weights))
        missing, unexpected = model.load_multimodal_state_dict(state)
        if missing or unexpected:
            raise OSError(f"{weights} does not fit the config: {len(missing)} tensors missing "
                          f"(e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:2]})")
        embed = llm.get_input_embeddings().weight  # the multimodal part follows the LLM's input
        for part in (model.vision, model.projector, model.image_embeddings):
            part.to(device=embed.device, dtype=embed.dtype)
        model.name_or_path = str(path)
        model.eval()
        return model

    def multimodal_state_dict(self) -> dict[str, torch.Tensor]:
        """The non-LLM tensors (what ``multimodal.safetensors`` holds), contiguous copies."""
        return {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()
                if not k.startswith("language_model.")}

    def load_multimodal_state_dict(self, state: dict[str, torch.Tensor]
                                   ) -> tuple[list[str], list[str]]:
        """Copies non-LLM tensors in; returns ``(missing, unexpected)`` key lists."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            unexpected += [f"{k} (shape {tuple(state[k].shape)})" for k in bad]
        if not missing and not unexpected:
            with torch.no_grad():
                for k, v in own.items():
                    v.copy_(state[k])
        return missing, unexpected

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Writes the SPHINX-X directory layout (LLM in ``language_model/``, stored once).

        ``kwargs`` go to the LLM's ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.language_model.save_pretrained(out / self.config.language_model_folder, **kwargs)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(out)
        save_file(self.multimodal_state_dict(), str(out / MULTIMODAL_WEIGHTS),
                  metadata={"format": "pt"})

    # --------------------------------------------------------------------------- forward

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embedding."""
        return self.language_model.get_input_embeddings()

    def build_inputs_embeds(self, input_ids: torch.Tensor | Sequence[Sequence[int]],
                            views: torch.Tensor | None = None,
                            image_hw: Sequence[tuple[int, int] | None] | None = None,
                            text_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM input of a batch, laid out exactly as in training.

        Args:
            input_ids: ``[b, n]`` text tokens per row, BOS first (or a list of id lists).
            views: ``[V, 3, v, v]`` views in [0, 1] of all images in row order (global view, then
                the valid sub-images; :func:`preprocess_image`). None for text only.
            image_hw: Per row, the ``(height, width)`` of its image or None.
            text_mask: ``[b, n]`` 1 for real tokens when rows of ``input_ids`` are right-padded.

        Returns:
            ``(inputs_embeds [b, s, h], attention_mask [b, s])``; rows are right-padded to the
            longest expanded row.
        """
        rows = [list(map(int, r)) for r in (input_ids.tolist() if torch.is_tensor(input_ids)
                                           else input_ids)]
        if text_mask is not None:
            rows = [r[: int(m.sum())] for r, m in zip(rows, text_mask)]
        image_hw = list(image_hw) if image_hw is not None else [None] * len(rows)
        if len(image_hw) != len(rows):
            raise ValueError(f"image_hw has {len(image_hw)} entries for {len(rows)} rows")
        vis = self.config.vision_config
        samples = [Sample(np.asarray(r, dtype=np.int32), np.zeros(len(r), dtype=bool),
                          image_hw=tuple(hw) if hw is not None else None)
                   for r, hw in zip(rows, image_hw)]
        seq = max(s.length(vis.image_size, vis.grid) for s in samples)
        words = self.get_input_embeddings()
        device = words.weight.device
        batch = build_packed_batch([[s] for s in samples], seq, vis.image_size, vis.grid,
                                   views.cpu() if views is not None else None)
        text = words(batch.text_ids.to(device))  # [T, h]
        special = self.image_embeddings.weight
        if batch.views.shape[0]:
            feats = self.vision(batch.views.to(device))  # [V, 257, C]
            visual = self.projector(feats).flatten(0, 1)  # [V * 257, h]
        else:
            visual = special.new_zeros(0, special.shape[1])
        index = batch.pack_index.to(device)  # [s * b], sequence-first
        out = pack_tokens(text, visual.to(text.dtype), special.to(text.dtype), index,
                          impl="torch")  # [s * b, h]
        b = len(rows)
        embeds = out.view(seq, b, -1).transpose(0, 1)  # [b, s, h]
        mask = (index.view(seq, b) != PAD_INDEX).transpose(0, 1).long()  # [b, s]
        return embeds, mask

    def forward(self, input_ids: torch.Tensor | None = None, views: torch.Tensor | None = None,
                image_hw: Sequence[tuple[int, int] | None] | None = None,
                text_mask: torch.Tensor | None = None, use_cache: bool = False,
                **kwargs) -> SphinxXOutput:
        """Logits of text + image rows (see :meth:`build_inputs_embeds` for the arguments).

        ``kwargs`` go to the LLM (e.g. ``output_hidden_states``).
        """
        if input_ids is None:
            raise ValueError("input_ids is required (text tokens, BOS first)")
        embeds, mask = self.build_inputs_embeds(input_ids, views, image_hw, text_mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache,
                                  **kwargs)
        return SphinxXOutput(logits=out.logits, attention_mask=mask, inputs_embeds=embeds,
                             cache=getattr(out, "cache", None))

    # -------------------------------------------------------------------------- generate

    def load_tokenizer(self):
        """The tokenizer stored with the model (local files only)."""
        from transformers import AutoTokenizer

        where = Path(self.name_or_path or ".")
        for cand in (where, where / self.config.language_model_folder):
            if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
                return AutoTokenizer.from_pretrained(str(cand), local_files_only=True)
        raise ValueError(f"no tokenizer files in {where}: pass tokenizer= (convert with "
                         "--tokenizer to store one)")

    def prompt_ids(self, prompt: str, tokenizer) -> list[int]:
        """``[BOS] + template(prompt)`` up to where the assistant's answer starts."""
        from megatron_sphinx.data.conversation import ASSISTANT, HUMAN, get_template

        template = get_template(self.config.chat_template, tokenizer)
        text, spans = template.render([(HUMAN, prompt), (ASSISTANT, "x")])
        prefix = text[: spans[-1][0]]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return [tokenizer.bos_token_id] + list(ids)

    @torch.no_grad()
    def generate(self, image: Any = None, prompt: str = "", max_new_tokens: int = 64,
                 tokenizer=None, **generate_kwargs) -> str:
        """Answers ``prompt`` about ``image`` (greedy unless ``do_sample=True`` is passed).

        Args:
            image: Encoded bytes, a path, a PIL image, or None for a text-only prompt.
            prompt: The human turn.
            max_new_tokens: Tokens to generate at most.
            tokenizer: A ``transformers`` tokenizer; default: the one stored with the model.
            **generate_kwargs: Passed to the LLM's ``generate`` (``do_sample``, ...).

        Returns:
            The answer text, cut at the template's stop string.
        """
        tokenizer = tokenizer or self.load_tokenizer()
        ids = self.prompt_ids(prompt, tokenizer)
        views, hw = (None, None) if image is None else preprocess_image(
            image, self.config.vision_config)
        embeds, mask = self.build_inputs_embeds([ids], views, [hw])
        generate_kwargs.setdefault("do_sample", False)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                           max_new_tokens=max_new_tokens, eos_token_id=eos,
                                           pad_token_id=pad, **generate_kwargs)  # [1, n_new]
        text = tokenizer.decode(new[0], skip_special_tokens=True)
        for stop in self.config.stop_strings or []:
            text = text.split(stop)[0]
        return text.strip()


def register() -> None:
    """Registers the config and model with the ``transformers`` Auto classes (idempotent)."""
    try:
        AutoConfig.register(SphinxXConfig.model_type, SphinxXConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            auto.register(SphinxXConfig, SphinxXForConditionalGeneration)
        except ValueError:
            pass


register()

__all__ = ["LANGUAGE_MODEL_FOLDER", "MULTIMODAL_WEIGHTS", "SphinxXConfig",
           "SphinxXForConditionalGeneration", "SphinxXOutput", "preprocess_image", "register",
           "vision_from_dict", "vision_to_dict"]
