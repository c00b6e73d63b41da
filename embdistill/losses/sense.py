"""The sense loss of Sense Knowledge Distillation (SKD).

Paper: "Multi-Sense Embeddings for Language Models and Knowledge Distillation"
(ACL Findings 2025, arXiv 2504.06036).

For every text token position i whose token id v_i has an entry in the sense dictionary,
S_v in R^{k_v x d} (the k_v k-means centroids of the teacher's states of token v):

    target_i  = argmax_j  S_v[j] . h_teacher(i)          (raw dot product, no temperature)
    logits_i  = S_v h_student(i)                          in R^{k_v}
    loss      = 1/N sum_i  CE(logits_i, target_i)
              = 1/N sum_i  ( logsumexp_j S_v[j] . h_student(i) - S_v[target_i] . h_student(i) )

where N counts the text tokens with an entry; tokens without one (and instruction, special
and padding tokens, excluded by the embed mask) are skipped. Sense accuracy is the share of
those N tokens where argmax_j of the student's logits equals target_i.

Batching over tokens with different k_v: the dictionary is packed once into one flat
(sum_v k_v, d) matrix with per-entry offsets and sizes, plus a vocabulary-sized lookup
token id -> entry (-1 for none). A batch's scored tokens are ordered by k and cut into chunks;
each chunk gathers its senses into a (n, k_max_chunk, d) tensor padded to the largest k in
*that chunk*, with -inf logits on the padding. k ranges from 1 to hundreds and frequent tokens
have the most senses, so padding to the dictionary's (or the batch's) largest k would multiply
the memory of a 4096-d model's gathered senses, which autograd keeps for the backward pass;
for the same reason the dictionary is stored flat, not as an (entries, k_max, d) block.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import UserError


class SenseLoss(nn.Module):
    """Cross-entropy over each token's senses (see the module docstring).

    ``sense_dict``: ``{token_id: array (k, d)}`` as returned by
    :func:`embdistill.senses.dictionary.load_sense_dict`. ``vocab_size``: the model's
    vocabulary size (the lookup table's length); token ids of the dictionary must be below it.
    ``chunk_elements``: about how many floats one chunk's gathered senses may hold.
    The packed dictionary lives in float32 buffers, so ``.to(device)`` moves it with the module.
    """

    def __init__(self, sense_dict: Mapping[int, np.ndarray | torch.Tensor], vocab_size: int,
                 chunk_elements: int = 1 << 25):
        super().__init__()
        self.chunk_elements = chunk_elements
        if not sense_dict:
            raise UserError("the sense dictionary is empty")
        token_ids = sorted(int(t) for t in sense_dict)
        outside = [t for t in (token_ids[0], token_ids[-1]) if not 0 <= t < vocab_size]
        if outside:
            raise UserError(
                f"the sense dictionary has token id {outside[0]}, outside the model's vocabulary "
                f"(size {vocab_size}): was it built with another tokenizer?"
            )
        blocks = [torch.as_tensor(np.asarray(sense_dict[t], dtype=np.float32)) for t in token_ids]
        dims = {b.shape[1] if b.ndim == 2 else -1 for b in blocks}
        if len(dims) != 1 or -1 in dims or any(b.shape[0] == 0 for b in blocks):
            raise UserError("the sense dictionary's entries must be non-empty (k, d) arrays of one d")
        sizes = torch.tensor([b.shape[0] for b in blocks], dtype=torch.long)
        entry_of_token = torch.full((vocab_size,), -1, dtype=torch.long)
        entry_of_token[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        self.hidden_size = dims.pop()
        self.register_buffer("centroids", torch.cat(blocks), persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("entry_of_token", entry_of_token, persistent=False)

    def sense_logits(self, states: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Logits (N, k_max) of N states (N, d) against their entries' senses; -inf on padding."""
        sizes = self.sizes[entries]
        k_max = int(sizes.max()) if len(entries) else 1
        slot = torch.arange(k_max, device=states.device)
        valid = slot < sizes[:, None]
        rows = torch.where(valid, self.offsets[entries, None] + slot, 0)
        senses = self.centroids[rows]  # (N, k_max, d)
        logits = torch.einsum("nkd,nd->nk", senses, states.float())
        return logits.masked_fill(~valid, float("-inf"))

    def chunks_by_size(self, entries: torch.Tensor) -> list[torch.Tensor]:
        """Positions of ``entries`` in order of k, cut so that a chunk's padded senses hold
        about ``chunk_elements`` floats (at least one token per chunk)."""
        if len(entries) == 0:
            return []
        sizes = self.sizes[entries]
        order = torch.argsort(sizes, stable=True)
        length = max(1, self.chunk_elements // (int(sizes.max()) * self.hidden_size))
        return list(order.split(length))

    def forward(
        self,
        student_states: torch.Tensor,
        teacher_states: torch.Tensor,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean sense cross-entropy, sense accuracy and the number N of scored tokens.

        ``student_states``, ``teacher_states``: (B, T, d); ``input_ids``, ``text_mask``: (B, T);
        all on the module's device.
        With N == 0 the loss is a zero that still depends on the student (so backward and DDP
        work on a batch without dictionary tokens) and the accuracy is 0.
        """
        entries = self.entry_of_token[input_ids]
        scored = text_mask.bool() & (entries >= 0)
        entries = entries[scored]
        count = int(entries.numel())
        student_states, teacher_states = student_states[scored], teacher_states[scored]
        loss = student_states.sum() * 0.0  # keeps the graph when no token is scored
        correct = torch.zeros((), device=student_states.device)
        for part in self.chunks_by_size(entries):
            with torch.no_grad():
                targets = self.sense_logits(teacher_states[part], entries[part]).argmax(-1)
            logits = self.sense_logits(student_states[part], entries[part])
            loss = loss + nn.functional.cross_entropy(logits, targets, reduction="sum")
            correct += (logits.detach().argmax(-1) == targets).sum()
        return loss / max(count, 1), correct / max(count, 1), count
