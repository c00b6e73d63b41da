"""Replace mode: each text token's state swapped for the nearest sense of its token.

The paper judges an SKD student this way (ORIGINAL_NOTES.md, stage 4): for every text token
whose token id v has a sense-dictionary entry S_v (k_v x d),

    h  ->  S_v[ argmax_j  S_v[j] . h ]          (raw dot product)

and tokens without an entry keep their own state; mean pooling over the text tokens follows
(:class:`ReplaceModeModel` inherits :meth:`Teacher.encode` for that). "Nearest" is the
training target's argmax, and it is computed by the same code: the dictionary is packed by
:class:`embdistill.losses.sense.SenseLoss` (flat ``(sum_v k_v, d)`` centroids, per-entry offsets
and sizes, a vocabulary-sized token -> entry lookup) and scored by its ``sense_logits``, so
replace mode picks exactly the sense the student was trained to predict.

:func:`replace_with_senses` does a whole batch at once on the model's device; the tokens of a
batch are scored in chunks (in order of their entry's k) that bound the ``(tokens, k, d)`` gather.
:func:`replace_reference_loop` is the original's approach (one token at a time on the CPU,
straight from the dictionary), kept for the equality test and the benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import UserError
from ..losses.sense import SenseLoss
from ..teachers import Teacher

# Elements of one chunk's gathered senses (tokens x k_max x d, float32): 2^25 = 128 MiB.
CHUNK_ELEMENTS = 1 << 25


def pack_senses(sense_dict: Mapping[int, np.ndarray], vocab_size: int, device=None) -> SenseLoss:
    """The dictionary packed for batched lookup (the sense loss's layout), on ``device``.

    Raises UserError for an empty dictionary or token ids outside ``vocab_size``."""
    return SenseLoss(sense_dict, vocab_size).to(device)


@torch.no_grad()
def replace_with_senses(
    states: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    senses: SenseLoss,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """A copy of ``states`` (B, T, d) whose text tokens (``text_mask`` (B, T) nonzero) with a
    dictionary entry are replaced by their nearest sense; other positions, padding included,
    are unchanged. Runs on ``states``' device, which must be the packed dictionary's."""
    device = states.device
    entries = senses.entry_of_token[input_ids.to(device)]
    replaced = text_mask.to(device).bool() & (entries >= 0)
    entries = entries[replaced]
    output = states.clone()
    if entries.numel() == 0:
        return output
    token_states = states[replaced]
    # Chunks are padded to their largest k: scoring tokens in order of k keeps that padding
    # small (k ranges from 1 to hundreds); the chunk length bounds memory at the largest k.
    sizes = senses.sizes[entries]
    order = torch.argsort(sizes)
    chunk = max(1, chunk_elements // (int(sizes.max()) * states.shape[-1]))
    rows = torch.empty_like(entries)
    for start in range(0, len(entries), chunk):
        part = order[start : start + chunk]
        nearest = senses.sense_logits(token_states[part], entries[part]).argmax(-1)
        rows[part] = senses.offsets[entries[part]] + nearest
    output[replaced] = senses.centroids[rows].to(states.dtype)
    return output


@torch.no_grad()
def replace_reference_loop(
    states: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    sense_dict: Mapping[int, np.ndarray],
) -> torch.Tensor:
    """The original's replace mode: a Python loop over tokens on the CPU, each scored against
    its entry read from the dictionary. Same result as :func:`replace_with_senses`, slowly."""
    output = states.detach().cpu().clone()
    input_ids, text_mask = input_ids.cpu(), text_mask.cpu()
    for b in range(output.shape[0]):
        for t in range(output.shape[1]):
            entry = sense_dict.get(int(input_ids[b, t])) if text_mask[b, t] else None
            if entry is None:
                continue
            senses = torch.as_tensor(np.asarray(entry, dtype=np.float32))
            nearest = int(torch.argmax(senses @ output[b, t].float()))
            output[b, t] = senses[nearest].to(output.dtype)
    return output


class ReplaceModeModel(Teacher):
    """A loaded model whose token states are replaced by their nearest senses; its inherited
    :meth:`encode` therefore mean-pools the replaced text-token states (replace mode).

    Only text tokens (the embed mask) are replaced: they are the only ones pooled."""

    def __init__(self, model: Teacher, sense_dict: Mapping[int, np.ndarray]):
        # The same loaded model (weights, tokenizer, pooling) seen through another token_states:
        # share its state rather than re-running Teacher's constructor.
        self.__dict__.update(vars(model))
        self.slug = f"{model.slug}+replace"
        # every id the tokenizer can emit must index the lookup table
        vocab_size = max(len(model.tokenizer), model.model.get_input_embeddings().num_embeddings)
        self.senses = pack_senses(sense_dict, vocab_size, model.device)
        if self.senses.hidden_size != model.hidden_size:
            raise UserError(f"the sense dictionary has hidden size {self.senses.hidden_size}, "
                            f"{model.name} {model.hidden_size}: built from another teacher?")
        self.dictionary_values = int(self.senses.centroids.numel())

    def token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states = super().token_states(batch)
        return replace_with_senses(states, batch["input_ids"], batch["embed_mask"], self.senses)
