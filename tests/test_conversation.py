"""Dialog validation, chat templates and tokenisation to a Sample."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_sphinx.data.conversation import (
    Dialog, DialogEncoder, DialogError, LLMTemplate, SphinxTemplate, check_dialog, get_template,
    normalize_role)
from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.tokenizer import train_bpe

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the human's questions.")
TEXTS = [
    "### Human: What colour is the circle?\n### Assistant: The circle is red.\n###",
    "How many shapes are there? There are three shapes. What is 12 + 7? 12 + 7 = 19.",
    SYSTEM, "[user] hello</s>\n[assistant] hi there</s>\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, vocab_size=400)


def test_sphinx_template_matches_reference_format():
    text, spans = SphinxTemplate().render([("human", "Q1"), ("assistant", "A1"),
                                           ("human", "Q2"), ("assistant", "A2")])
    assert text == (SYSTEM + "\n\n### Human: Q1\n### Assistant: A1\n### Human: Q2\n"
                    "### Assistant: A2\n###")
    assert [text[a:b] for a, b in spans] == ["A1\n###", "A2\n###"]


@pytest.mark.parametrize("turns,image,reason", [
    ([], None, "empty_conversation"),
    ([("human", "  "), ("assistant", "")], None, "empty_conversation"),
    ([("gpt", "hello"), ("human", "hi")], None, "starts_with_assistant"),
    ([("human", "<image>\nwhat?"), ("gpt", "a cat")], None, "placeholder_without_image"),
    ([("human", "<image> <image> two"), ("gpt", "x")], "a.jpg", "multiple_image_placeholders"),
    ([("human", "a"), ("human", "b"), ("gpt", "c")], None, "roles_not_alternating"),
    ([("narrator", "a"), ("gpt", "b")], None, "unknown_role"),
    ([("human", "a"), ("gpt", "  ")], None, "empty_turn"),
    ([("human", "<image>"), ("gpt", "a cat"), ("human", "  "), ("gpt", "b")], "a.jpg",
     "empty_turn"),
    ([("human", "only a question")], None, "no_assistant_turn"),
])
def test_check_dialog_drops_with_reason(turns, image, reason):
    with pytest.raises(DialogError) as e:
        check_dialog(Dialog(turns, image))
    assert e.value.reason == reason


def test_check_dialog_fixes_are_counted():
    d, notes = check_dialog(Dialog([("user", "What is this?"), ("assistant", "A cat."),
                                    ("human", "and?")], image="cat.jpg"))
    assert notes == ["image_without_placeholder", "trailing_human_turn_removed"]
    assert d.turns == [("human", "What is this?"), ("assistant", "A cat.")]
    d, notes = check_dialog(Dialog([("human", "<image>\nWhat is this?"), ("gpt", "A cat.")],
                                   image="cat.jpg"))
    assert notes == [] and d.turns[0] == ("human", "What is this?")


def _answers_text(tok, ids, mask):
    return tok.decode(ids[mask].tolist())


def test_encoder_masks_exactly_the_answers(tok):
    enc = DialogEncoder(tok, "sphinx")
    d, _ = check_dialog(Dialog([("human", "What colour is the circle?"),
                                ("gpt", "The circle is red."),
                                ("human", "What is 12 + 7?"), ("gpt", "12 + 7 = 19.")]))
    (ids, mask), = enc.encode([d])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids[0] == tok.bos_token_id
    assert not mask[0]
    assert tok.decode(ids[1:].tolist()) == enc.render(d)[0]
    target = _answers_text(tok, ids, mask)
    assert target.replace(" ", "") == "Thecircleisred.\n###12+7=19.\n###"
    assert "Human" not in target and "colour" not in target and "chat" not in target
    # The untrained tokens are the system prompt and the human turns (and role headers).
    rest = tok.decode(ids[1:][~mask[1:]].tolist())
    assert rest.startswith(SYSTEM) and "What colour is the circle?" in rest


def test_encoder_batch_equals_single(tok):
    enc = DialogEncoder(tok, "sphinx")
    ds = [check_dialog(Dialog([("human", f"What is {i} + {i}?"), ("gpt", f"{2 * i}.")]))[0]
          for i in range(5)]
    batch = enc.encode(ds)
    for d, (ids, mask) in zip(ds, batch):
        (ids1, mask1), = enc.encode([d])
        assert np.array_equal(ids, ids1) and np.array_equal(mask, mask1)


def test_caption_dialog_whose_question_is_only_the_image(tok):
    """Caption data often asks nothing but ``<image>``: that turn is the image, not empty."""
    enc = DialogEncoder(tok, "sphinx")
    d, notes = check_dialog(Dialog([("human", "<image>"), ("gpt", "A red circle.")],
                                   image="x.jpg"))
    assert notes == [] and d.turns == [("human", ""), ("assistant", "A red circle.")]
    (ids, mask), = enc.encode([d])
    assert _answers_text(tok, ids, mask).replace(" ", "") == "Aredcircle.\n###"
    assert enc.to_sample(d, image_hw=(300, 300), source_id=0).image_slot == 1
    with pytest.raises(DialogError, match="empty_turn"):  # without an image it is empty
        check_dialog(Dialog([("human", "   "), ("gpt", "A red circle.")]))


def test_to_sample_image_after_bos(tok):
    enc = DialogEncoder(tok, "sphinx")
    d, _ = check_dialog(Dialog([("human", "<image>\nWhat colour is the circle?"),
                                ("gpt", "The circle is red.")], image="x.jpg"))
    s = enc.to_sample(d, image_hw=(300, 900), source_id=3)
    assert s.image_slot == 1 and s.source_id == 3 and s.image_hw == (300, 900)
    geo = image_geometry(300, 900, 448, 2)
    assert geo.num_skipped() == 2
    assert s.length(448, 2) == len(s.input_ids) + geo.num_positions()


def test_llm_template_uses_tokenizer_chat_template(tok):
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + "
                         "m['content'] + eos_token + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    enc = DialogEncoder(tok, "llm")
    d, _ = check_dialog(Dialog([("human", "hello"), ("gpt", "hi there"),
                                ("human", "again"), ("gpt", "yes")]))
    text, spans = enc.render(d)
    assert text == ("[user] hello</s>\n[assistant] hi there</s>\n[user] again</s>\n"
                    "[assistant] yes</s>\n")
    assert [text[a:b] for a, b in spans] == ["hi there</s>\n", "yes</s>\n"]
    (ids, mask), = enc.encode([d])
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    eos = tok.eos_token_id
    assert eos in ids[mask].tolist()  # the end of an answer is trained
    assert _answers_text(tok, ids, mask).replace(" ", "").replace("</s>", "|") == \
        "hithere|\nyes|\n"


def test_llm_template_requires_chat_template():
    t = train_bpe(TEXTS, vocab_size=300)
    t.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        get_template("llm", t)
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("vicuna")
    assert isinstance(get_template("sphinx"), SphinxTemplate)
    assert LLMTemplate.name == "llm"


def test_slow_tokenizer_fallback_masks_answers(tok):
    class Slow:
        """A tokenizer without offsets (``is_fast`` False), delegating to ``tok``."""

        is_fast = False
        bos_token_id = tok.bos_token_id

        def __call__(self, text, add_special_tokens=False):
            return tok(text, add_special_tokens=add_special_tokens)

    d, _ = check_dialog(Dialog([("human", "What is 12 + 7?"), ("gpt", "12 + 7 = 19.")]))
    (ids, mask), = DialogEncoder(Slow(), "sphinx").encode([d])
    assert ids[0] == tok.bos_token_id
    assert _answers_text(tok, ids, mask) == "12 + 7 = 19.\n###"


def test_sentencepiece_style_tokenizer():
    """A LLaMA-like tokenizer (Metaspace pre-tokenizer, ``▁`` word prefixes) masks right too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    d, _ = check_dialog(Dialog([("human", "What colour is the circle?"),
                                ("gpt", "The circle is red.")]))
    (ids, mask), = DialogEncoder(hf, "sphinx").encode([d])
    pieces = hf.convert_ids_to_tokens(ids[mask].tolist())
    assert "".join(pieces).replace("▁", "") == "Thecircleisred.\n###"


@pytest.mark.parametrize("role,expect", [
    ("human", "human"), ("user", "human"), (" USER ", "human"), ("Human", "human"),
    ("gpt", "assistant"), ("assistant", "assistant"), ("bot", "assistant"),
    ("model", "assistant"), ("GPT", "assistant"),
])
def test_source_role_names_map_to_ours(role, expect):
    assert normalize_role(role) == expect


@pytest.mark.parametrize("role", ["system", "", "gpt4", "users"])
def test_unknown_roles_are_refused(role):
    with pytest.raises(DialogError) as e:
        normalize_role(role)
    assert e.value.reason == "unknown_role"
