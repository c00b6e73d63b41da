"""What a model reads: the instruction/separator format, input formats, and tokenisation with
the embed mask.

A training example is ``"<instruction> !@#$%^&*()<text>"`` (the original's format). The model
reads it with the separator removed, in its :class:`InputFormat`, but only the *text* tokens
are gathered, trained on and pooled; ``embed_mask`` marks them. Two formats:

* ``plain`` (encoders such as MiniLM): sentence-transformers' prompt. The model reads
  ``"<instruction> <text>"``; the embed mask leaves out the tokens of the prompt
  ``"<instruction> "`` (with the leading special token) as ``Pooling(include_prompt=False)``
  does, so the text's tokens and the closing special token are pooled; an example without an
  instruction pools every token. An exported student is then a plain SentenceTransformer
  folder (the instruction as its default prompt) that embeds exactly as it was evaluated.
* ``llm2vec`` (Llama decoders, the paper's teacher): exactly what ``llm2vec`` 0.2.3 feeds its
  model (``LLM2Vec.encode`` -> ``_convert_to_str``, ``prepare_for_tokenization``, ``tokenize``
  in llm2vec/llm2vec.py). The instruction ends with ``:`` (mteb's ``llm2vec_instruction``); the
  document is cut by words to ``doc_max_length`` (400) tokens; for
  ``meta-llama/Meta-Llama-3-8B-Instruct`` (the base of LLM2Vec-Meta-Llama-3-8B-Instruct-mntp)
  the whole input becomes Llama-3's user turn,
  ``<|start_header_id|>user<|end_header_id|>\\n\\n<instruction> <text><|eot_id|>`` after the
  tokenizer's ``<|begin_of_text|>``; rows are padded on the left with the end-of-sequence
  token; the embed mask is the last n tokens of a row, n being the token count of
  ``<text><|eot_id|>`` tokenised alone (so the closing ``<|eot_id|>`` is pooled too). The
  supervised LLM2Vec adapter was trained on this input; with bidirectional attention every
  token state depends on all of it.

A text far longer than ``max_length`` tokens is cut (at a space, after enough characters for
more than ``max_length`` tokens) before it is tokenised: a 10 MB text costs what its first
tokens cost, and the tokens kept are the same as without the cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UserError

SEPARATOR = "!@#$%^&*()"

# Characters per token to look at before the first cut; a cut that holds too few tokens is
# widened (x2) until it holds enough, so this is a speed setting, not a correctness one
# (English news: about 4.5 characters per WordPiece token).
_CHARS_PER_TOKEN = 6


@dataclass(frozen=True)
class InputFormat:
    """How a model reads an example (see the module docstring)."""

    name: str = "plain"
    llm2vec: bool = False  # llm2vec's tokenisation (left padding, last-n embed mask)
    prefix: str = ""  # wrapped around "<instruction> <text>" (llm2vec's prepare_for_tokenization)
    suffix: str = ""
    doc_max_length: int | None = None  # llm2vec: the text is cut to this many tokens, by words

    @classmethod
    def from_dict(cls, fields: dict, source: str) -> "InputFormat":
        """The format saved as a dict (``dataclasses.asdict``); UserError naming ``source`` otherwise."""
        try:
            return cls(**fields)
        except TypeError:
            raise UserError(f"{source}: not an input format ({fields!r:.200})") from None


PLAIN = InputFormat()
LLM2VEC = InputFormat("llm2vec", llm2vec=True, doc_max_length=400)
LLM2VEC_LLAMA3_CHAT = InputFormat("llm2vec-llama3-chat", llm2vec=True,
                                  prefix="<|start_header_id|>user<|end_header_id|>\n\n",
                                  suffix="<|eot_id|>", doc_max_length=400)
LLM2VEC_INST = InputFormat("llm2vec-inst", llm2vec=True, prefix="[INST] ", suffix=" [/INST]",
                           doc_max_length=400)
# llm2vec's prepare_for_tokenization, keyed as it is by the base model's name.
LLM2VEC_CHAT_BASES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": LLM2VEC_LLAMA3_CHAT,
    "meta-llama/Llama-2-7b-chat-hf": LLM2VEC_INST,
    "mistralai/Mistral-7B-Instruct-v0.2": LLM2VEC_INST,
}


def input_format_for(base: str, model_type: str) -> InputFormat:
    """The format llm2vec gives a decoder of ``base`` (its chat turn, else none); ``plain``
    for encoders."""
    if model_type not in ("llama", "mistral", "gemma"):
        return PLAIN
    return LLM2VEC_CHAT_BASES.get(str(base), LLM2VEC)


def format_example(instruction: str, text: str) -> str:
    """``"<instruction> !@#$%^&*()<text>"``; an empty instruction gives ``"!@#$%^&*()<text>"``."""
    instruction = instruction.strip()
    return f"{instruction} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def split_example(example: str) -> tuple[str, str]:
    """``(instruction, text)`` of an example; without a separator the instruction is ``""``."""
    instruction, sep, text = example.partition(SEPARATOR)
    if not sep:
        return "", example
    return instruction.strip(), text


def llm2vec_instruction(instruction: str) -> str:
    """mteb's LLM2Vec wrapper ends every instruction with ':' (``llm2vec_instruction`` in
    mteb/models/model_implementations/llm2vec_models.py)."""
    if instruction and instruction[-1] != ":":
        instruction = instruction.strip(".") + ":"
    return instruction


def _token_count(tokenizer, text: str, limit: int) -> int:
    """min(limit, tokens of ``text`` without special tokens), tokenising only a prefix."""
    return min(limit, len(tokenizer(cut_long_text(tokenizer, text, limit), add_special_tokens=False,
                                     verbose=False)["input_ids"]))


def cut_long_text(tokenizer, text: str, max_tokens: int) -> str:
    """One text through :func:`cut_long_texts`."""
    return cut_long_texts(tokenizer, [text], max_tokens)[0]


def cut_long_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text, or a prefix of it ending before a run of whitespace, whose first
    ``max_tokens`` tokens are those of the whole text (so truncating either to ``max_tokens``
    gives the same tokens). Tokenisers split at whitespace before anything else, so only the
    prefix's last word may tokenise differently from the whole text: a prefix is accepted when
    more than ``max_tokens`` tokens end before that word; one that holds too few is widened
    (x2) until it holds enough or is the whole text. The prefixes of a round are tokenised in
    one batch."""
    texts = list(texts)
    result = list(texts)
    limit = max(max_tokens, 1) * _CHARS_PER_TOKEN
    pending = [i for i, text in enumerate(texts) if len(text) > limit]
    while pending:
        cuts = {i: _space_run_before(texts[i], limit) for i in pending}
        tried = [i for i in pending if cuts[i] > 0]
        accepted = set()
        if tried:
            # verbose=False: a prefix longer than the model's limit is the point here, not a mistake
            spans = tokenizer([texts[i][: cuts[i]] for i in tried], add_special_tokens=False,
                              return_offsets_mapping=True, verbose=False)["offset_mapping"]
            for i, row in zip(tried, spans):
                last_word = _space_run_before(texts[i], cuts[i])
                if sum(1 for _, end in row if end <= last_word) > max_tokens:
                    result[i] = texts[i][: cuts[i]]
                    accepted.add(i)
        limit *= 2
        pending = [i for i in pending if i not in accepted and len(texts[i]) > limit]
    return result


def _space_run_before(text: str, end: int) -> int:
    """Where the last run of whitespace starting before ``end`` starts (-1: none)."""
    start = max(text.rfind(char, 0, end) for char in " \t\n\r")
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start


def llm2vec_document(tokenizer, text: str, doc_max_length: int, max_length: int) -> str:
    """llm2vec's ``_convert_to_str`` cut: while the text has more than ``doc_max_length``
    tokens (counted up to ``max_length``), keep int(words x doc_max_length / tokens) words."""
    count = _token_count(tokenizer, text, max_length)
    words = None
    while count > doc_max_length:
        words = words if words is not None else text.split()
        words = words[: int(len(words) * doc_max_length / count)]
        text = " ".join(words)
        count = _token_count(tokenizer, text, max_length)
    return text


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [([pad_id] * (width - len(r)) + r) if left else (r + [pad_id] * (width - len(r)))
              for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def _pad_id(tokenizer) -> int:
    """The pad token, else end-of-sequence (as llm2vec pads); the tokenizer is not changed."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return pad_id


def effective_max_length(requested: int, model_limit: int) -> int:
    """The tokens per example actually used: ``requested`` (a stage's --max-length) cut to the
    model's limit (its ``max_seq_length``), as :meth:`embdistill.teachers.Teacher.tokenize`
    cuts. Artefacts and exports record this, not the request: MiniLM asked for 512 reads 256,
    and every later stage must read 256 too."""
    return min(requested, model_limit)


@dataclass(frozen=True)
class MaxLength:
    """A run's tokens per example, computed once where a stage resolves its model and carried to
    whatever reads, checks or records a length: ``requested`` (its --max-length), ``limit`` (the
    model's ``max_seq_length``) and ``used`` (:func:`effective_max_length` of the two)."""

    requested: int
    limit: int
    used: int

    @classmethod
    def of(cls, requested: int, limit: int) -> "MaxLength":
        return cls(requested, limit, effective_max_length(requested, limit))


def tokenize_with_embed_mask(
    tokenizer, examples: list[str], max_length: int = 512, input_format: InputFormat = PLAIN,
) -> dict[str, torch.Tensor]:
    """Tokenise examples in ``input_format``; return padded ``input_ids``, ``attention_mask``
    and ``embed_mask`` (long tensors, B x T). See the module docstring for both formats.

    An example whose text tokens were all truncated away gets an all-zero embed-mask row:
    callers pooling over it must expect an empty row.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; the embed mask needs "
            "character offsets (load it with AutoTokenizer, use_fast=True)"
        )
    if isinstance(examples, str):
        examples = [examples]
    if not examples:
        raise UserError("no examples to tokenise")
    if max_length < 1:
        raise UserError(f"max length must be at least 1, got {max_length}")
    pad_id = _pad_id(tokenizer)
    if input_format.llm2vec:
        return _tokenize_llm2vec(tokenizer, examples, max_length, input_format, pad_id)
    return _tokenize_plain(tokenizer, examples, max_length, pad_id)


def _tokenize_plain(tokenizer, examples: list[str], max_length: int, pad_id: int) -> dict:
    """sentence-transformers' reading of a prompt: ``"<instruction> "`` is prepended to the text
    and its tokens are left out of the mean (``Pooling(include_prompt=False)``: the first n
    tokens, n being the prompt's token count without a trailing special token). An example
    without an instruction pools every token."""
    prompts, texts = [], []
    for example in examples:
        head, sep, tail = example.partition(SEPARATOR)
        if not sep:  # all text
            head, tail = "", head
        prompts.append(head)
        texts.append(tail)
    model_inputs = [head + text for head, text in zip(prompts, cut_long_texts(tokenizer, texts, max_length))]
    rows = tokenizer(model_inputs, truncation=True, max_length=max_length)["input_ids"]
    lengths = {prompt: prompt_length(tokenizer, prompt) for prompt in set(prompts)}
    embed_rows = [[0] * min(lengths[p], len(row)) + [1] * max(len(row) - lengths[p], 0)
                  for row, p in zip(rows, prompts)]
    return _batch(rows, embed_rows, pad_id, left=tokenizer.padding_side == "left")


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` as sentence-transformers counts them to exclude it from pooling
    (``Transformer._get_prompt_length``): with special tokens, less a trailing special token;
    0 for no prompt."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


def _tokenize_llm2vec(tokenizer, examples: list[str], max_length: int, fmt: InputFormat,
                      pad_id: int) -> dict:
    model_inputs, text_parts = [], []
    for example in examples:
        instruction, text = split_example(example)
        if fmt.doc_max_length:
            text = llm2vec_document(tokenizer, text, fmt.doc_max_length, max_length)
        text = cut_long_text(tokenizer, text, max_length)
        instruction = llm2vec_instruction(instruction)
        joined = f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"
        # prepare_for_tokenization strips only where it wraps the input in a chat turn
        wrapped = fmt.prefix + joined.strip() + fmt.suffix if fmt.prefix or fmt.suffix else joined
        head, _, tail = wrapped.partition(SEPARATOR)
        model_inputs.append(head + tail)
        text_parts.append(tail)
    rows = tokenizer(model_inputs, truncation=True, max_length=max_length)["input_ids"]
    text_lengths = [len(ids) for ids in tokenizer(text_parts, truncation=True, max_length=max_length,
                                                    add_special_tokens=False)["input_ids"]]
    embed_rows = [[0] * (len(row) - min(n, len(row))) + [1] * min(n, len(row))
                  for row, n in zip(rows, text_lengths)]
    return _batch(rows, embed_rows, pad_id, left=True)


def _batch(rows: list[list[int]], embed_rows: list[list[int]], pad_id: int, left: bool) -> dict:
    return {
        "input_ids": _pad(rows, pad_id, left),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, left),
        "embed_mask": _pad(embed_rows, 0, left),
    }
