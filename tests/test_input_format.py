"""The separator format, input formats and the embed mask, on MiniLM's WordPiece and a
tokenizer built like Llama-3's (byte-level BPE, Llama-3's regex split and special tokens)."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from embdistill.errors import UserError
from embdistill.input_format import (LLM2VEC, LLM2VEC_LLAMA3_CHAT, PLAIN, SEPARATOR, InputFormat,
                             cut_long_text, format_example, input_format_for, split_example,
                             tokenize_with_embed_mask)


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


def test_bert_embed_mask_is_the_text_and_its_closing_sep(bert_tokenizer):
    """sentence-transformers' prompt rule: [CLS] and the instruction are left out, the text
    and the closing [SEP] are pooled."""
    texts = ["Stocks rallied today as markets cheered.", "A cat sat."]
    examples = [format_example("Classify the topic of the news article:", t) for t in texts]
    batch = tokenize_with_embed_mask(bert_tokenizer, examples)

    assert set(batch) == {"input_ids", "attention_mask", "embed_mask"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    for row, text in enumerate(texts):
        # the text alone, tokenised independently, then [SEP], is exactly what the mask selects
        expected = bert_tokenizer(text, add_special_tokens=False)["input_ids"] + [bert_tokenizer.sep_token_id]
        assert masked_ids(batch, row) == expected
        # the model reads instruction + " " + text, separator removed, with [CLS] ... [SEP]
        expected_input = bert_tokenizer("Classify the topic of the news article: " + text)["input_ids"]
        n = len(expected_input)
        assert batch["input_ids"][row, :n].tolist() == expected_input
        assert batch["attention_mask"][row].sum() == n
    # the shorter row is padded, and padding is outside both masks
    assert batch["embed_mask"][1][batch["attention_mask"][1] == 0].sum() == 0


def sentence_transformers_prompt_mask(tokenizer, prompt, text):
    """The pooled positions as sentence-transformers 6 chooses them for ``prompt`` + ``text``:
    Transformer._get_prompt_length (prompt tokens with specials, less a trailing special
    token), then Pooling._exclude_prompt_from_mask (the first that many positions)."""
    ids = tokenizer(prompt)["input_ids"]
    length = len(ids) - (ids[-1] in tokenizer.all_special_ids)
    total = len(tokenizer(prompt + text)["input_ids"])
    return [0] * length + [1] * (total - length)


def test_llama_bpe_embed_mask_is_sentence_transformers_prompt_rule(llama_tokenizer):
    """Byte-level BPE: the prompt "<instruction> " alone ends in a lone space token which, in
    context, is glued to the first text word: sentence-transformers then leaves that word out
    of the mean, and so do we (what it scores is what we ship)."""
    assert llama_tokenizer.pad_token is None
    texts = ["markets fell and stocks slid", "the team won"]
    instruction = "Classify the topic of the news article:"
    examples = [format_example(instruction, t) for t in texts]
    before = copy.deepcopy(llama_tokenizer.__dict__)
    batch = tokenize_with_embed_mask(llama_tokenizer, examples)

    assert llama_tokenizer.pad_token is None  # pads with eos, without changing the tokenizer
    assert llama_tokenizer.__dict__.keys() == before.keys()
    for row, text in enumerate(texts):
        length = int(batch["attention_mask"][row].sum())
        assert batch["embed_mask"][row, :length].tolist() == sentence_transformers_prompt_mask(
            llama_tokenizer, instruction + " ", text)
        assert batch["input_ids"][row, 0] == llama_tokenizer.bos_token_id
        assert batch["embed_mask"][row, 0] == 0  # BOS is not text
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == llama_tokenizer.eos_token_id).all()


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_no_instruction_pools_every_token(which, bert_tokenizer, llama_tokenizer):
    tokenizer = bert_tokenizer if which == "bert" else llama_tokenizer
    examples = ["the team won the match", "Classify: !@#$%^&*()stocks slid", "a cat", format_example("", "a dog")]
    batch = tokenize_with_embed_mask(tokenizer, examples)
    for row in (0, 2, 3):  # no prompt: specials included, as sentence-transformers pools
        assert torch.equal(batch["embed_mask"][row], batch["attention_mask"][row])
    assert batch["embed_mask"][1].sum() < batch["attention_mask"][1].sum()


def test_truncation_can_leave_an_empty_embed_mask_row(bert_tokenizer):
    long_instruction = " ".join(["classify"] * 20)
    examples = [format_example(long_instruction, "stocks rallied"), format_example("topic:", "stocks rallied")]
    batch = tokenize_with_embed_mask(bert_tokenizer, examples, max_length=8)
    assert batch["input_ids"].shape[1] == 8
    assert batch["embed_mask"][0].sum() == 0  # text truncated away entirely
    assert masked_ids(batch, 1) == bert_tokenizer("stocks rallied", add_special_tokens=False)["input_ids"] + [102]


def test_slow_tokenizer_and_empty_input_are_user_errors(minilm_dir, bert_tokenizer):
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=str(minilm_dir / "vocab.txt"))
    assert not slow.is_fast
    with pytest.raises(UserError, match="not a fast tokenizer"):
        tokenize_with_embed_mask(slow, ["topic: !@#$%^&*()text"])
    with pytest.raises(UserError, match="no examples"):
        tokenize_with_embed_mask(bert_tokenizer, [])


# ---------------------------------------------------------------------------------------------
# llm2vec's input, re-implemented here from its published source (llm2vec 0.2.3, llm2vec.py:
# LLM2Vec.encode -> _convert_to_str, prepare_for_tokenization, tokenize) and mteb's wrapper


def llm2vec_reference(tokenizer, pairs, *, base, max_length=512, doc_max_length=400):
    """(input_ids, attention_mask, embed_mask) as llm2vec computes them for (instruction, text)
    pairs, the instruction as mteb's LLM2Vec wrapper passes it."""
    from mteb.models.model_implementations.llm2vec_models import llm2vec_instruction

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    def convert_to_str(instruction, text):
        tokenized_q = tokenizer(text, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length, add_special_tokens=False)
        tokenized_q_length = len(tokenized_q["input_ids"][0])
        while tokenized_q_length > doc_max_length:
            reduction_ratio = doc_max_length / tokenized_q_length
            reduced_length = int(len(text.split()) * reduction_ratio)
            text = " ".join(text.split()[:reduced_length])
            tokenized_q = tokenizer(text, return_tensors="pt", padding=True, truncation=True,
                                    max_length=max_length, add_special_tokens=False)
            tokenized_q_length = len(tokenized_q["input_ids"][0])
        return f"{instruction.strip()} !@#$%^&*(){text}" if instruction else f"!@#$%^&*(){text}"

    def prepare_for_tokenization(text):
        if base == "meta-llama/Meta-Llama-3-8B-Instruct":
            return "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
        return text

    sentences = [prepare_for_tokenization(convert_to_str(llm2vec_instruction(i), t)) for i, t in pairs]
    texts_2, original_texts = [], []
    for text in sentences:
        t = text.split("!@#$%^&*()")
        texts_2.append(t[1] if len(t) > 1 else "")
        original_texts.append("".join(t))
    original = tokenizer(original_texts, return_tensors="pt", padding=True, truncation=True,
                         max_length=max_length)
    embed_mask = []
    for t_i, t in enumerate(texts_2):
        ids = tokenizer([t], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)
        e_m = torch.zeros_like(original["attention_mask"][t_i])
        if len(ids["input_ids"][0]) > 0:
            e_m[-len(ids["input_ids"][0]):] = torch.ones(len(ids["input_ids"][0]))
        embed_mask.append(e_m)
    return original["input_ids"], original["attention_mask"], torch.stack(embed_mask)


LLM2VEC_PAIRS = [
    ("Given a online banking query, find the corresponding intents", "How do I top up my card?"),
    ("Classify user passages.", "markets fell and stocks slid as investors worried about rates"),
    ("Classify the sentiment:", "  the team won  "),
    ("", "a cat sat on the mat"),
    ("Classify the topic of the news article", " ".join(["Stocks rallied today as markets cheered."] * 12)),
]


@pytest.mark.parametrize("base, fmt", [("meta-llama/Meta-Llama-3-8B-Instruct", LLM2VEC_LLAMA3_CHAT),
                                       ("meta-llama/Meta-Llama-3-8B", LLM2VEC)])
@pytest.mark.parametrize("max_length, doc_max_length", [(512, 400), (48, 30), (40, 10)])
def test_llm2vec_inputs_equal_llm2vecs_own(llama_tokenizer, base, fmt, max_length, doc_max_length):
    """Same input ids, attention and embed masks as llm2vec, including its cut of long documents
    by words (the long example is cut for the small doc_max_length) and, for Llama-3-Instruct,
    the user turn whose closing <|eot_id|> is pooled."""
    assert input_format_for(base, "llama") == fmt
    fmt = InputFormat(**{**fmt.__dict__, "doc_max_length": doc_max_length})
    examples = [format_example(instruction, text) for instruction, text in LLM2VEC_PAIRS]
    ours = tokenize_with_embed_mask(llama_tokenizer, examples, max_length, fmt)
    ids, attention, embed = llm2vec_reference(llama_tokenizer, LLM2VEC_PAIRS, base=base,
                                              max_length=max_length, doc_max_length=doc_max_length)
    assert torch.equal(ours["input_ids"], ids)
    assert torch.equal(ours["attention_mask"], attention)
    assert torch.equal(ours["embed_mask"], embed)


def test_llama3_chat_input_reads_the_user_turn(llama_tokenizer):
    batch = tokenize_with_embed_mask(llama_tokenizer, [format_example("Classify the topic.", "the team won")],
                                     input_format=LLM2VEC_LLAMA3_CHAT)
    ids = batch["input_ids"][0].tolist()
    assert llama_tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                           "Classify the topic: the team won<|eot_id|>")
    # the text and the closing <|eot_id|> are pooled (counted on the text alone, as llm2vec
    # does: in this tiny vocabulary "the" alone takes one token more than " the" in context)
    pooled = llama_tokenizer.decode(batch["input_ids"][0][batch["embed_mask"][0].bool()])
    assert pooled.endswith(" the team won<|eot_id|>")


def test_input_format_rule():
    assert input_format_for("sentence-transformers/all-MiniLM-L6-v2", "bert") == PLAIN
    assert input_format_for("/some/tiny/llama", "llama") == LLM2VEC
    assert InputFormat.from_dict(LLM2VEC_LLAMA3_CHAT.__dict__, "x") == LLM2VEC_LLAMA3_CHAT
    with pytest.raises(UserError, match="not an input format"):
        InputFormat.from_dict({"nonsense": 1}, "x")


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_long_texts_are_cut_before_tokenising_with_the_same_tokens(which, bert_tokenizer, llama_tokenizer):
    tokenizer = bert_tokenizer if which == "bert" else llama_tokenizer
    sentence = "Markets fell and stocks slid as investors worried about rates.\n\n"
    text = sentence * 20_000  # ~1.3 MB
    cut = cut_long_text(tokenizer, text, 64)
    assert len(cut) < 64 * 16 * 4 < len(text)
    full = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    assert tokenizer(cut, add_special_tokens=False)["input_ids"][:64] == full
    # and through the embed-mask tokenisation, in both formats, against the uncut text
    plain = tokenize_with_embed_mask(tokenizer, [format_example("Classify:", text)], 64)
    expected = tokenizer("Classify: " + text, truncation=True, max_length=64)["input_ids"]
    assert plain["input_ids"][0].tolist() == expected
    if which == "llama":
        ours = tokenize_with_embed_mask(tokenizer, [format_example("Classify:", text)], 64, LLM2VEC)
        ids, _, embed = llm2vec_reference(tokenizer, [("Classify:", text)], base="", max_length=64)
        assert torch.equal(ours["input_ids"], ids) and torch.equal(ours["embed_mask"], embed)
    assert cut_long_text(tokenizer, "short text", 64) == "short text"
    assert cut_long_text(tokenizer, "x" * 10_000, 4) == "x" * 10_000  # no space to cut at


def test_real_bbc_articles_cut_before_tokenising_give_the_tokens_of_the_whole_article(bert_tokenizer):
    """MiniLM's tokenizer, the demo's 128 tokens, real BBC articles (the longest included) and a
    text of words longer than WordPiece reads (one [UNK] each: the first cut holds too few tokens and widens):
    the ids equal those of the whole text truncated, while most articles are cut."""
    from embdistill.input_format import cut_long_texts
    from embdistill.tasks import bbc_news_articles

    articles = sorted((article.text for article in bbc_news_articles()), key=len)
    texts = articles[::20] + articles[-3:] + [" ".join(["x" * 120] * 300) + " and then some words"]
    cut = cut_long_texts(bert_tokenizer, texts, 128)
    assert sum(len(c) < len(t) for c, t in zip(cut, texts)) > len(texts) / 2
    assert len(cut[-1]) > 128 * 6  # widened past the first guess
    examples = [format_example("Classify the news", text) for text in texts]
    ours = tokenize_with_embed_mask(bert_tokenizer, examples, 128)
    whole = bert_tokenizer(["Classify the news " + text for text in texts], truncation=True, max_length=128,
                           padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours["input_ids"], whole)
