"""The separator format and the embed mask, on MiniLM's WordPiece and a Llama-3-like BPE."""

import pytest
import torch
from transformers import AutoTokenizer

from embdistill.errors import UserError
from embdistill.text import SEPARATOR, format_example, split_example, tokenize_with_embed_mask


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_tokenizer_dir)


def masked_ids(batch, row):
    return batch["input_ids"][row][batch["embed_mask"][row].bool()].tolist()


def test_format_and_split_round_trip():
    assert SEPARATOR == "!@#$%^&*()"
    example = format_example("  Classify the topic:  ", "Stocks rallied.")
    assert example == "Classify the topic: !@#$%^&*()Stocks rallied."
    assert split_example(example) == ("Classify the topic:", "Stocks rallied.")
    assert format_example("", "Stocks rallied.") == "!@#$%^&*()Stocks rallied."
    assert split_example("!@#$%^&*()Stocks rallied.") == ("", "Stocks rallied.")
    assert split_example("no separator here") == ("", "no separator here")


def test_bert_embed_mask_is_exactly_the_text_tokens(bert_tokenizer):
    texts = ["Stocks rallied today as markets cheered.", "A cat sat."]
    examples = [format_example("Classify the topic of the news article:", t) for t in texts]
    batch = tokenize_with_embed_mask(bert_tokenizer, examples)

    assert set(batch) == {"input_ids", "attention_mask", "embed_mask"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    for row, text in enumerate(texts):
        # the text alone, tokenised independently, is exactly what the mask selects
        assert masked_ids(batch, row) == bert_tokenizer(text, add_special_tokens=False)["input_ids"]
        # the model reads instruction + " " + text, separator removed, with [CLS] ... [SEP]
        expected_input = bert_tokenizer("Classify the topic of the news article: " + text)["input_ids"]
        n = len(expected_input)
        assert batch["input_ids"][row, :n].tolist() == expected_input
        assert batch["attention_mask"][row].sum() == n
    # the shorter row is padded, and padding is outside both masks
    assert batch["embed_mask"][1][batch["attention_mask"][1] == 0].sum() == 0


def test_llama_bpe_embed_mask_takes_the_token_straddling_the_boundary(llama_tokenizer):
    assert llama_tokenizer.pad_token is None
    texts = ["markets fell and stocks slid", "the team won"]
    examples = [format_example("Classify the topic of the news article:", t) for t in texts]
    batch = tokenize_with_embed_mask(llama_tokenizer, examples)

    assert llama_tokenizer.pad_token == llama_tokenizer.eos_token  # pads with eos when none is set
    for row, text in enumerate(texts):
        # byte-level BPE glues the joining space onto the first text word ("Ġmarkets"): that
        # token has text characters, so it is a text token
        expected = llama_tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        assert masked_ids(batch, row) == expected
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, length - len(expected) : length].tolist() == expected
        assert batch["input_ids"][row, 0] == llama_tokenizer.bos_token_id
        assert batch["embed_mask"][row, 0] == 0  # BOS is not text
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == llama_tokenizer.eos_token_id).all()


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_no_separator_pools_every_token(which, bert_tokenizer, llama_tokenizer):
    tokenizer = bert_tokenizer if which == "bert" else llama_tokenizer
    examples = ["the team won the match", "Classify: !@#$%^&*()stocks slid", "a cat"]
    batch = tokenize_with_embed_mask(tokenizer, examples)
    for row in (0, 2):  # no separator: specials included, as sentence-transformers pools
        assert torch.equal(batch["embed_mask"][row], batch["attention_mask"][row])
    assert batch["embed_mask"][1].sum() < batch["attention_mask"][1].sum()


def test_empty_instruction_marks_all_but_special_tokens(bert_tokenizer):
    batch = tokenize_with_embed_mask(bert_tokenizer, [format_example("", "stocks rallied")])
    assert masked_ids(batch, 0) == bert_tokenizer("stocks rallied", add_special_tokens=False)["input_ids"]
    assert batch["attention_mask"].sum() - batch["embed_mask"].sum() == 2  # [CLS] and [SEP]


def test_truncation_can_leave_an_empty_embed_mask_row(bert_tokenizer):
    long_instruction = " ".join(["classify"] * 20)
    examples = [format_example(long_instruction, "stocks rallied"), format_example("topic:", "stocks rallied")]
    batch = tokenize_with_embed_mask(bert_tokenizer, examples, max_length=8)
    assert batch["input_ids"].shape[1] == 8
    assert batch["embed_mask"][0].sum() == 0  # text truncated away entirely
    assert masked_ids(batch, 1) == bert_tokenizer("stocks rallied", add_special_tokens=False)["input_ids"]


def test_slow_tokenizer_and_empty_input_are_user_errors(minilm_dir, bert_tokenizer):
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=str(minilm_dir / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(UserError, match="not a fast tokenizer"):
        tokenize_with_embed_mask(slow, ["topic: !@#$%^&*()text"])
    with pytest.raises(UserError, match="no examples"):
        tokenize_with_embed_mask(bert_tokenizer, [])
