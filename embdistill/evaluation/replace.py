"""Replace mode: each text token's state swapped for its token's sense under the dictionary's rule.

The paper judges an SKD student this way (arXiv 2504.06036, evaluation): for every text token
whose token id v has a sense-dictionary entry S_v (k_v x d),

    h  ->  S_v[ argmax_j  score(S_v[j], h) ]

with the dictionary's sense rule as the score (:mod:`embdistill.senses.packed`): the raw dot
product by default, as the paper's code does (which the paper calls the "nearest" sense; it is
not the nearest in distance), or ``l2`` (nearest in distance) or ``cos`` (in angle). Tokens
without an entry keep their own state; mean pooling over the text tokens follows
(:class:`ReplaceModeModel` inherits :meth:`Teacher.encode` for that). The sense is the training
target's argmax under the same rule, computed by the same code
(:class:`embdistill.senses.packed.PackedSenses`, in float32), so replace mode picks exactly the
sense the student was trained to predict. A
batch is replaced at once on the model's device, its tokens scored in chunks ordered by k.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..senses.packed import PackedSenses
from ..teachers import Teacher


class ReplaceModeModel(Teacher):
    """``model`` (the same weights, tokenizer and pooling) whose text-token states are replaced
    by their senses under ``senses.rule``; its inherited :meth:`encode` therefore mean-pools the replaced
    states. Only text tokens (the embed mask) are replaced: they are the only ones pooled."""

    def __init__(self, model: Teacher, senses: PackedSenses):
        super().__init__(model.name, f"{model.slug}+replace", model.model, model.tokenizer,
                         normalize=model.normalize, max_seq_length=model.max_seq_length,
                         input_format=model.input_format)
        if senses.hidden_size != model.hidden_size:
            raise UserError(f"the sense dictionary has hidden size {senses.hidden_size}, "
                            f"{model.name} {model.hidden_size}: built from another teacher?")
        self.senses = senses.to(model.device)

    def token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states = super().token_states(batch)
        return self.senses.replace(states, batch["input_ids"], batch["embed_mask"])
