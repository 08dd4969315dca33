"""The local-directory tokenizer loader and the project's offline BPE tokenizer."""
from __future__ import annotations

import pytest

from megatron_sphinx.config import get_recipe
from megatron_sphinx.data.sample_data import corpus_texts
from megatron_sphinx.data.tokenizer import (
    PROJECT_VOCAB_SIZE, TokenizerNotFound, build_project_tokenizer, load_tokenizer,
    tokenizer_hash)


@pytest.fixture(scope="module")
def corpus():
    return corpus_texts()


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory, corpus):
    return build_project_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", corpus)


def test_project_tokenizer_fits_the_debug_recipe(project_dir):
    tok = load_tokenizer(project_dir)
    assert len(tok) <= get_recipe("debug").llm.vocab_size == PROJECT_VOCAB_SIZE
    assert len(tok) > 300  # merges were learned, not just bytes
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert tok.chat_template
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # BOS added by default


def test_project_tokenizer_roundtrips_any_text(project_dir):
    tok = load_tokenizer(project_dir)
    for text in ["### Human: What colour is the circle?\n### Assistant: red.\n###",
                 "unicode: ümlaut, 日本語, emoji 🙂, tabs\tand  spaces", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_project_tokenizer_compresses_sample_text(project_dir, corpus):
    tok = load_tokenizer(project_dir)
    text = corpus[0]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < 0.5 * len(text.encode())


def test_build_is_deterministic(tmp_path, project_dir, corpus):
    again = build_project_tokenizer(tmp_path / "again", corpus)
    assert tokenizer_hash(again) == tokenizer_hash(project_dir)
    other = build_project_tokenizer(tmp_path / "other", corpus[: len(corpus) // 3], 400)
    assert tokenizer_hash(other) != tokenizer_hash(project_dir)
    # building into an existing tokenizer directory replaces it
    assert build_project_tokenizer(other, corpus) == other
    assert tokenizer_hash(other) == tokenizer_hash(project_dir)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerNotFound, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerNotFound, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="vocab_size"):
        build_project_tokenizer(tmp_path / "t", ["abc"], vocab_size=100)


def test_hash_follows_every_tokenizer_file(tmp_path, project_dir):
    """A changed tokenizer_config.json (special tokens, chat template) is another tokenizer."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(project_dir, copy)
    assert tokenizer_hash(copy) == tokenizer_hash(project_dir)
    cfg = copy / "tokenizer_config.json"
    text = cfg.read_text()
    assert '"<pad>"' in text
    cfg.write_text(text.replace('"<pad>"', '"</s>"'))
    assert tokenizer_hash(copy) != tokenizer_hash(project_dir)
