"""The unified dialog, its validation, the named chat templates, and tokenisation to a Sample.

Every source becomes a :class:`Dialog`: alternating human / assistant turns, optionally one image.
The image never sits inside the text: a ``<image>`` placeholder only says that the dialog has an
image and is removed; the image's views always go right after BOS
(:attr:`megatron_sphinx.data.layout.Sample.image_slot` = 1), as in SPHINX.

Validation (:func:`check_dialog`) drops with a reason, never silently:

- ``empty_conversation``: no turns, or no text in any turn;
- ``starts_with_assistant``: the first turn is the assistant's;
- ``roles_not_alternating`` / ``unknown_role`` / ``empty_turn`` (a human turn holding only
  ``<image>`` is not empty: its content is the image);
- ``placeholder_without_image``: ``<image>`` appears but the dialog has no image;
- ``multiple_image_placeholders``: more than one ``<image>`` (one image per dialog);
- ``no_assistant_turn``: nothing to train on.

and keeps with a counted note:

- ``image_without_placeholder``: an image but no ``<image>``: the image is used, placed at the
  start like every image (SPHINX puts the image first whatever the text says);
- ``trailing_human_turn_removed``: a last human turn with no answer is removed.

Templates render a dialog to text plus the character spans that carry loss; a template is picked by
name (:data:`TEMPLATES`): ``sphinx`` (the public SPHINX / LLaMA2-Accessory format) or ``llm`` (the
base tokenizer's own chat template).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from megatron_sphinx.data.layout import Sample

logger = logging.getLogger(__name__)

HUMAN, ASSISTANT = "human", "assistant"
IMAGE_TOKEN = "<image>"
_ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT,
                 "bot": ASSISTANT, "model": ASSISTANT}


@dataclass
class Dialog:
    """One multi-turn conversation, optionally about one image.

    Attributes:
        turns: ``(role, text)`` pairs, role ``"human"`` or ``"assistant"``.
        image: Path of the image file, its encoded bytes, or None (text only).
        source: Name of the mix source it came from.
        id: Identifier within the source (for logs).
    """

    turns: list[tuple[str, str]]
    image: str | bytes | None = None
    source: str = ""
    id: str = ""


class DialogError(ValueError):
    """A dialog that cannot be used; ``reason`` is the short counted drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def normalize_role(role: str) -> str:
    """Maps source role names (``human``/``user``, ``gpt``/``assistant``...) to ours.

    Raises:
        DialogError: ``unknown_role``.
    """
    r = _ROLE_ALIASES.get(str(role).strip().lower())
    if r is None:
        raise DialogError("unknown_role", repr(role))
    return r


def check_dialog(dialog: Dialog) -> tuple[Dialog, list[str]]:
    """Validates and cleans a dialog (see the module docstring for the rules).

    Returns:
        ``(clean dialog, notes)``: ``<image>`` removed from the text, roles normalised, text
        stripped; ``notes`` lists counted, non-fatal fixes.

    Raises:
        DialogError: With the drop reason.
    """
    notes: list[str] = []
    if not dialog.turns or not any(str(t).strip() for _, t in dialog.turns):
        raise DialogError("empty_conversation")
    turns = [(normalize_role(r), "" if t is None else str(t)) for r, t in dialog.turns]
    n_placeholders = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    if n_placeholders > 1:
        raise DialogError("multiple_image_placeholders", f"{n_placeholders} <image> tags")
    if n_placeholders and dialog.image is None:
        raise DialogError("placeholder_without_image")
    if dialog.image is not None and not n_placeholders:
        notes.append("image_without_placeholder")
    held_image = [IMAGE_TOKEN in t for _, t in turns]  # such a turn's content is the image
    turns = [(r, t.replace(IMAGE_TOKEN, "").strip()) for r, t in turns]
    if turns[0][0] == ASSISTANT:
        raise DialogError("starts_with_assistant")
    for i, (r, t) in enumerate(turns):
        if not t and not (r == HUMAN and held_image[i]):
            raise DialogError("empty_turn", f"turn {i}")
        if i and r == turns[i - 1][0]:
            raise DialogError("roles_not_alternating", f"turns {i - 1} and {i} are both {r}")
    if turns[-1][0] == HUMAN:
        turns = turns[:-1]
        notes.append("trailing_human_turn_removed")
    if not turns:
        raise DialogError("no_assistant_turn")
    return replace(dialog, turns=turns), notes


# ----------------------------------------------------------------------------- templates

Spans = list[tuple[int, int]]


class ChatTemplate:
    """Renders validated turns to ``(text, spans)``; ``spans`` are the ``[start, end)`` character
    ranges trained on (assistant answers and the separator that ends them). BOS is not part of the
    text: the encoder adds it."""

    name = "base"

    def render(self, turns: Sequence[tuple[str, str]]) -> tuple[str, Spans]:
        raise NotImplementedError


@dataclass
class SphinxTemplate(ChatTemplate):
    """The public SPHINX (LLaMA2-Accessory ``conv_v1``) format::

        {system}\\n\\n### Human: {q}\\n### Assistant: {a}\\n### Human: ...\\n###

    Loss on ``{a}\\n###``, as in the reference, whose generation stops at ``###``.
    """

    system: str = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
    """The fixed system sentence of the reference code."""
    name = "sphinx"

    def render(self, turns: Sequence[tuple[str, str]]) -> tuple[str, Spans]:
        parts = [self.system, "\n\n"]
        pos = len(self.system) + 2
        spans: Spans = []
        for role, text in turns:
            head = "### Human: " if role == HUMAN else "### Assistant: "
            parts += [head, text, "\n"]
            start = pos + len(head)
            pos = start + len(text) + 1
            if role == ASSISTANT:
                spans.append((start, pos + 3))  # answer + "\n###"
        parts.append("###")
        return "".join(parts), spans


@dataclass
class LLMTemplate(ChatTemplate):
    """The base tokenizer's own chat template (``tokenizer.apply_chat_template``).

    Assistant spans are found by rendering growing prefixes of the dialog: turn ``j``'s span runs
    from the end of ``turns[:j]`` rendered with the generation prompt to the end of
    ``turns[:j + 1]``, so whatever the template appends to an answer (EOS, end-of-turn) is trained.
    A leading BOS string is removed (the encoder adds the BOS id).
    """

    tokenizer: object = None
    """A ``transformers`` tokenizer with a ``chat_template``."""
    name = "llm"

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("template 'llm' needs a tokenizer with a chat_template "
                             "(tokenizer_config.json): use --template sphinx instead")

    def _apply(self, turns, gen: bool) -> str:
        msgs = [{"role": "user" if r == HUMAN else "assistant", "content": t} for r, t in turns]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def render(self, turns: Sequence[tuple[str, str]]) -> tuple[str, Spans]:
        full = self._apply(turns, False)
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        cut = len(bos) if bos and full.startswith(bos) else 0
        spans: Spans = []
        for j, (role, _) in enumerate(turns):
            if role != ASSISTANT:
                continue
            pre = self._apply(turns[:j], True)
            post = self._apply(turns[:j + 1], False)
            if not (full.startswith(post) and post.startswith(pre)):
                raise DialogError("template_not_prefix_stable",
                                  "the chat template renders a turn differently in a longer "
                                  "dialog: use --template sphinx")
            spans.append((len(pre) - cut, len(post) - cut))
        return full[cut:], spans


TEMPLATES: dict[str, Callable[..., ChatTemplate]] = {
    "sphinx": lambda tokenizer=None: SphinxTemplate(),
    "llm": lambda tokenizer=None: LLMTemplate(tokenizer),
}


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """The chat template called ``name`` (see :data:`TEMPLATES`).

    Raises:
        ValueError: Unknown name, or ``llm`` with a tokenizer lacking a chat template.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)


# ----------------------------------------------------------------------------- tokenisation

@dataclass
class DialogEncoder:
    """Tokenizes validated dialogs in batches: ``[BOS] + template text``, with target masks.

    The whole rendered text is tokenized at once (so merges across turn boundaries match what the
    model sees at inference); a token is a target iff its character range overlaps a trained span.
    Slow (non-``is_fast``) tokenizers fall back to tokenizing span by span.

    Args:
        tokenizer: A ``transformers`` tokenizer (see :mod:`megatron_sphinx.data.tokenizer`).
        template: A template name or a :class:`ChatTemplate`.
    """

    tokenizer: object
    template: str | ChatTemplate = "sphinx"
    _tmpl: ChatTemplate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tmpl = (self.template if isinstance(self.template, ChatTemplate)
                      else get_template(self.template, self.tokenizer))
        self.bos_id = self.tokenizer.bos_token_id
        if self.bos_id is None:
            raise ValueError("the tokenizer has no bos_token: set one in its "
                             "tokenizer_config.json (the sequence starts with BOS)")

    @property
    def template_name(self) -> str:
        """Name of the chat template in use."""
        return self._tmpl.name

    def render(self, dialog: Dialog) -> tuple[str, Spans]:
        """The template text and trained spans of a validated dialog."""
        return self._tmpl.render(dialog.turns)

    def encode(self, dialogs: Sequence[Dialog]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(input_ids int32 [n], target_mask bool [n])`` per validated dialog, BOS first.

        Raises:
            DialogError: From the template (e.g. an unstable ``llm`` chat template).
        """
        rendered = [self._tmpl.render(d.turns) for d in dialogs]
        if not rendered:
            return []
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer([t for t, _ in rendered], add_special_tokens=False,
                                 return_offsets_mapping=True)
            out = []
            for ids, offs, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
                offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)  # [n, 2]
                mask = np.zeros(len(ids), dtype=bool)
                for a, b in spans:
                    mask |= (offs[:, 0] < b) & (offs[:, 1] > a)
                out.append(self._finish(ids, mask))
            return out
        return [self._encode_slow(text, spans) for text, spans in rendered]

    def _encode_slow(self, text: str, spans: Spans) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        mask: list[bool] = []
        cuts = sorted({0, len(text), *[p for s in spans for p in s]})
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = self.tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            tgt = any(sa <= a and b <= sb for sa, sb in spans)
            ids += piece
            mask += [tgt] * len(piece)
        return self._finish(ids, np.asarray(mask, dtype=bool))

    def _finish(self, ids, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate([[self.bos_id], np.asarray(ids, dtype=np.int64)]).astype(np.int32)
        return ids, np.concatenate([[False], mask])

    def to_sample(self, dialog: Dialog, image_hw: tuple[int, int] | None = None,
                  source_id: int = 0) -> Sample:
        """One validated dialog as a :class:`Sample` (image views after BOS)."""
        ids, mask = self.encode([dialog])[0]
        return Sample(ids, mask, image_hw=image_hw, image_slot=1, source_id=source_id)
