"""Tokenizers: the base LLM's from a local Hugging Face directory, or the project's own offline one.

Nothing here downloads: :func:`load_tokenizer` reads a local directory only
(``local_files_only=True``). For the offline demo, :func:`build_project_tokenizer` trains a small
byte-level BPE (``PROJECT_VOCAB_SIZE`` = 512, the ``debug`` recipe's vocabulary) on the text of the
embedded sample data and saves it as a Hugging Face tokenizer directory with BOS ``<s>``, EOS
``</s>``, pad ``<pad>``, unk ``<unk>`` and a simple chat template (so the ``llm`` template works).
Byte-level BPE encodes any text, so no input ever becomes ``<unk>``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

PROJECT_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
#: Chat template of the project tokenizer (used by the ``llm`` conversation template).
PROJECT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '[' + m['role'] + '] ' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class TokenizerNotFound(FileNotFoundError):
    """A tokenizer path that does not exist or holds no tokenizer files."""


def _check_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise TokenizerNotFound(
            f"tokenizer directory {p} does not exist: pass --tokenizer a local Hugging Face "
            "tokenizer directory (with tokenizer.json or tokenizer.model), or leave it out to use "
            "the project's offline tokenizer")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TokenizerNotFound(
            f"{p} holds no tokenizer.json / tokenizer.model / vocab.json: point --tokenizer at the "
            "base LLM's Hugging Face directory")
    return p


def load_tokenizer(path: str | os.PathLike):
    """Loads a tokenizer from a local Hugging Face directory; never touches the hub.

    Raises:
        TokenizerNotFound: The directory or its tokenizer files are missing.
    """
    from transformers import AutoTokenizer

    p = _check_dir(path)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 over the tokenizer files of ``path`` (names and contents), for store metadata."""
    p = _check_dir(path)
    h = hashlib.sha256()
    for name in sorted(_TOKENIZER_FILES):
        f = p / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int = PROJECT_VOCAB_SIZE):
    """A byte-level BPE ``transformers`` tokenizer trained on ``texts`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + specials "
                         f"({256 + len(SPECIAL_TOKENS)}): raise it")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    bos = SPECIAL_TOKENS.index("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                      special_tokens=[("<s>", bos)]),
    ])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = PROJECT_CHAT_TEMPLATE
    return hf


def build_project_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str] | None = None,
                            vocab_size: int = PROJECT_VOCAB_SIZE) -> Path:
    """Trains the project tokenizer and saves it as a Hugging Face directory at ``out_dir``.

    Args:
        out_dir: Directory to write (created; existing tokenizer files are replaced).
        texts: Training text; default: the rendered dialogs of the embedded sample data
            (:func:`megatron_sphinx.data.sample_data.corpus_texts`).
        vocab_size: Total vocabulary including the special tokens.

    Returns:
        ``out_dir`` as a Path.
    """
    if texts is None:
        from megatron_sphinx.data.sample_data import corpus_texts

        texts = corpus_texts()
    hf = train_bpe(texts, vocab_size)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tokenizer-"))
    try:
        hf.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("project tokenizer (vocab %d) written to %s", len(hf), out)
    return out
