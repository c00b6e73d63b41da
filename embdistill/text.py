"""The instruction/separator text format and tokenisation with the embed mask.

A training example is ``"<instruction> !@#$%^&*()<text>"`` (the original's format). The model
reads the example with the separator removed (``"<instruction> <text>"``: the instruction
conditions every token through attention), but only the *text* tokens are gathered, trained
on and pooled; ``embed_mask`` marks them. An example without the separator is all text, and
its embed mask is its attention mask (special tokens included, as sentence-transformers pools).
"""

from __future__ import annotations

import torch

from .errors import UserError

SEPARATOR = "!@#$%^&*()"


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


def tokenize_with_embed_mask(
    tokenizer, examples: list[str], max_length: int = 512
) -> dict[str, torch.Tensor]:
    """Tokenise examples; return padded ``input_ids``, ``attention_mask`` and ``embed_mask``
    (long tensors, B x T).

    The model input of an example is the example with its separator removed. ``embed_mask``
    marks the non-special tokens with at least one character after the separator (a BPE token
    that straddles the boundary, like ``" text"``, counts as text). Examples without a separator
    get ``embed_mask == attention_mask``. An example whose text tokens were all truncated away
    gets an all-zero embed-mask row: callers pooling over it must expect an empty row.
    A tokenizer without a pad token pads with its end-of-sequence token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; the embed mask needs "
            "character offsets (load it with AutoTokenizer, use_fast=True)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(examples, str):
        examples = [examples]
    if not examples:
        raise UserError("no examples to tokenise")

    model_inputs, text_starts, all_text = [], [], []
    for example in examples:
        head, sep, tail = example.partition(SEPARATOR)
        model_inputs.append(head + tail)
        text_starts.append(len(head))  # the first character of the text in the model input
        all_text.append(not sep)

    encoded = tokenizer(
        model_inputs,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    attention_mask = encoded["attention_mask"].long()
    offsets = encoded["offset_mapping"]  # (B, T, 2) character spans in the model input
    is_text = (offsets[..., 1] > torch.tensor(text_starts)[:, None]) & (
        offsets[..., 1] > offsets[..., 0]  # zero-width spans are special or padding tokens
    )
    embed_mask = (is_text & (encoded["special_tokens_mask"] == 0)).long() * attention_mask
    all_text = torch.tensor(all_text)
    embed_mask[all_text] = attention_mask[all_text]
    return {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": attention_mask,
        "embed_mask": embed_mask,
    }
