"""The sense loss of Sense Knowledge Distillation (SKD).

Paper: "Multi-Sense Embeddings for Language Models and Knowledge Distillation"
(ACL Findings 2025, arXiv 2504.06036).

For every text token position i whose token id v_i has an entry in the sense dictionary,
S_v in R^{k_v x d} (the k_v k-means centroids of the teacher's states of token v), with
score(c, h) the dictionary's sense rule (:mod:`embdistill.senses.packed`):

    dot (the paper's, the default):  score(c, h) = c . h              (raw, no temperature)
    l2:                              score(c, h) = -||h - c||^2
    cos:                             score(c, h) = cos(c, h) / 0.05    (COS_TEMPERATURE)

    target_i  = argmax_j  score(S_v[j], h_teacher(i))
    logits_i  = ( score(S_v[j], h_student(i)) )_j                     in R^{k_v}
    loss      = 1/N sum_{i: k_v > 1}  CE(logits_i, target_i)
              = 1/N sum_{i: k_v > 1}  ( logsumexp_j logits_i[j] - logits_i[target_i] )

where N counts the text tokens with an entry of more than one sense. Tokens without an entry
(and instruction, special and padding tokens, excluded by the embed mask) are skipped, and so
are single-sense tokens (k_v = 1): their cross-entropy is 0 and their prediction always right
whatever the student does, so counting them (as the original does) would only shrink the loss
and inflate the accuracy by their share (reported by the targets stage and the training).
Sense accuracy is the share of those N tokens where argmax_j logits_i[j] equals target_i.

The targets depend only on the frozen teacher, the text, the max length and the dictionary
(its senses and rule), so they are computed once, before training
(:mod:`embdistill.senses.targets`, with :meth:`PackedSenses.targets`), and this loss takes
them as a (B, T) tensor, -1 where a position is not scored. Logits are float32 with autocast
off (:class:`PackedSenses`), so bf16 training scores the senses exactly as the targets were
chosen.
"""

from __future__ import annotations

import torch
from torch import nn

from ..senses.packed import PackedSenses


class SenseLoss(nn.Module):
    """Cross-entropy over each token's senses against stored targets (see the module docstring).

    ``senses``: the packed dictionary (on the student's device), whose rule gives the logits."""

    def __init__(self, senses: PackedSenses):
        super().__init__()
        self.senses = senses

    def forward(
        self, student_states: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean sense cross-entropy, sense accuracy and the number N of scored tokens (with a
        target and more than one sense).

        ``student_states``: (B, T, d); ``input_ids`` and ``targets`` (B, T), targets -1 where
        not scored. With N == 0 the loss is a zero that still depends on the student (so
        backward and DDP work on a batch without such tokens) and the accuracy is 0.
        """
        has_target = targets >= 0
        entries = self.senses.entries(input_ids)[has_target]
        targets = targets[has_target]
        if bool((entries < 0).any()):
            raise ValueError("a sense target at a token without a dictionary entry: the targets "
                             "belong to another dictionary")
        several = self.senses.sizes[entries] > 1
        entries, targets = entries[several], targets[several]
        states = student_states[has_target][several]
        count = int(entries.numel())
        loss = student_states.sum() * 0.0  # keeps the graph when no token is scored
        correct = torch.zeros((), device=student_states.device)
        for part in self.senses.chunks(entries):
            logits = self.senses.logits(states[part], entries[part])
            loss = loss + nn.functional.cross_entropy(logits, targets[part], reduction="sum")
            correct += (logits.detach().argmax(-1) == targets[part]).sum()
        return loss / max(count, 1), correct / max(count, 1), count
