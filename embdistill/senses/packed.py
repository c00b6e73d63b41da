"""The sense dictionary packed for batched lookup: one piece of code for everything that picks
a token's sense (the stored targets, the sense loss, replace mode, the replace export).

For a text token at position i with token id v and dictionary entry S_v (k_v x d), its sense
under a state h is ``argmax_j score(S_v[j], h)``, and the sense loss's logits are those scores.
The score is the dictionary's *sense rule*, chosen when the dictionary is built (stage 3,
``--sense-rule``) and recorded in its manifest and in an exported replace folder:

* ``dot`` (default; the original's ``--sense_func dot``, arXiv 2504.06036): ``S_v[j] . h``,
  the raw dot product. Not the nearest sense in distance: a sense of larger norm wins over a
  closer one.
* ``l2``: ``-||h - S_v[j]||^2``, the nearest sense in Euclidean distance (the k-means
  assignment rule that made the senses).
* ``cos``: ``cos(S_v[j], h) / COS_TEMPERATURE``, the nearest sense in angle.

A dictionary that records no rule (the original's files, or ours from before the option) is
``dot``. Argmaxes (targets, replace mode) do not depend on the temperature; the loss does.

What replace mode substitutes (:meth:`PackedSenses.replace`, the evaluation's ``replace:`` rows
and the exported ``st-replace`` folder alike) is, under every rule, the chosen sense's centroid
itself: the mean of the teacher states k-means put in that cluster, as stored. Which centroid
differs: under ``l2`` it is the cluster k-means put the state in (k-means assigns to the
nearest centroid in distance: tests/test_replace.py); under ``dot`` a sense of larger norm often
wins over the state's own cluster (43 % of 9,041 real MiniLM states of 40 tokens, issue 22);
under ``cos`` the nearest in angle, which differs from the cluster where centroids of one
direction have different norms (4.4 % of those states). Under ``cos`` the centroid is kept as
it is, not normalised and rescaled to the state's norm: replace mode asks what the dictionary
alone carries once the student has picked a sense, so the substituted vector must come from the
dictionary only (the state's norm would be a second channel from the student, which the sense
loss never trained), and the same vector for the same sense keeps the rows of the three rules
and the teacher's ceiling row comparable. The centroid is also the vector closest, in squared
distance, to the states of its cluster.
Packed, the dictionary is one flat ``(sum_v k_v, d)`` matrix of centroids with
per-entry ``offsets`` and ``sizes``, plus a vocabulary-sized ``entry_of_token`` (-1 for tokens
without an entry). Tokens are scored in chunks ordered by k, each padded only to its own
largest k (-inf logits on the padding): k ranges from 1 to hundreds and frequent tokens have
the most senses, so padding every token to the largest k, or storing the dictionary as an
``(entries, k_max, d)`` block, would multiply the memory of a 4096-d model's gathered senses.

Logits are computed in float32 with autocast off, whatever the caller's autocast: under bf16
autocast an ``einsum`` would round 4096-d dot products of norm ~100 to 8 bits and flip about
one target in six. Centroids are kept in the dictionary's own dtype (float16 as stored by the
cluster stage: half the device memory of float32, and the same values once widened).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import UserError

# Floats in one chunk's gathered senses (tokens x k_max x d, float32): 2^25 = 128 MiB (the l2
# rule holds a second such tensor, the differences).
CHUNK_ELEMENTS = 1 << 25
SENSE_RULES = ("dot", "l2", "cos")
DEFAULT_SENSE_RULE = "dot"  # the original's; also the rule of a dictionary that records none
# Cosines lie in [-1, 1], and the senses of one token point in close directions, so that the
# cosine gaps between them are a few hundredths to tenths: at temperature 1 logits differ by
# at most 2, so the target's probability among 5 senses could not pass 0.65 and at such gaps
# stays near 1/k, a loss that barely tells the senses apart. 0.05 is SimCSE's (Gao et al., EMNLP 2021), the common
# choice for cosine logits; it turns those gaps into logit gaps of about 1 to 4.
COS_TEMPERATURE = 0.05


def check_sense_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`SENSE_RULES`, else a one-line UserError."""
    if rule not in SENSE_RULES:
        raise UserError(f"unknown sense rule {rule!r}: choose one of {', '.join(SENSE_RULES)}")
    return rule


class PackedSenses(nn.Module):
    """A sense dictionary ``{token_id: (k, d) array}`` (as :func:`load_sense_dict` returns it)
    packed for lookup by token id; ``vocab_size`` is the lookup table's length (every id the
    tokenizer can emit); ``rule`` scores a state against a sense (module docstring). Buffers
    move with ``.to(device)``."""

    def __init__(self, sense_dict: Mapping[int, np.ndarray | torch.Tensor], vocab_size: int,
                 rule: str = DEFAULT_SENSE_RULE, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        if not sense_dict:
            raise UserError("the sense dictionary is empty")
        token_ids = sorted(int(t) for t in sense_dict)
        outside = [t for t in (token_ids[0], token_ids[-1]) if not 0 <= t < vocab_size]
        if outside:
            raise UserError(
                f"the sense dictionary has token id {outside[0]}, outside the model's vocabulary "
                f"(size {vocab_size}): was it built with another tokenizer?"
            )
        arrays = [np.asarray(sense_dict[t]) for t in token_ids]
        dims = {a.shape[1] if a.ndim == 2 else -1 for a in arrays}
        if len(dims) != 1 or -1 in dims or any(a.shape[0] == 0 for a in arrays):
            raise UserError("the sense dictionary's entries must be non-empty (k, d) arrays of one d")
        dtype = np.float16 if all(a.dtype == np.float16 for a in arrays) else np.float32
        centroids = torch.from_numpy(np.concatenate([a.astype(dtype, copy=False) for a in arrays]))
        sizes = torch.tensor([len(a) for a in arrays], dtype=torch.long)
        self._build(torch.tensor(token_ids, dtype=torch.long), centroids, sizes, vocab_size, rule, chunk_elements)

    def _build(self, token_ids: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor,
               vocab_size: int, rule: str, chunk_elements: int) -> None:
        self.rule = check_sense_rule(rule)
        self.chunk_elements = chunk_elements
        self.hidden_size = centroids.shape[1]
        entry_of_token = torch.full((vocab_size,), -1, dtype=torch.long)
        entry_of_token[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("centroids", centroids, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("entry_of_token", entry_of_token, persistent=False)

    # ------------------------------------------------------------------------------ tensors

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The packed dictionary as plain tensors (for safetensors): token ids, sizes, centroids
        (the rule is not a tensor: the caller stores :attr:`rule` beside them)."""
        return {"token_ids": self.token_ids.cpu(), "sizes": self.sizes.cpu(),
                "centroids": self.centroids.cpu().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], vocab_size: int, rule: str = DEFAULT_SENSE_RULE,
                     chunk_elements: int = CHUNK_ELEMENTS) -> "PackedSenses":
        """Inverse of :meth:`to_tensors`; UserError when the tensors do not fit together."""
        try:
            token_ids, sizes, centroids = (tensors[k] for k in ("token_ids", "sizes", "centroids"))
        except KeyError as exc:
            raise UserError(f"packed sense dictionary without {exc.args[0]!r}") from None
        consistent = (token_ids.ndim == sizes.ndim == 1 and centroids.ndim == 2
                      and len(token_ids) == len(sizes) > 0 and int(sizes.sum()) == len(centroids)
                      and bool((sizes > 0).all()) and bool(torch.isfinite(centroids.float()).all())
                      and 0 <= int(token_ids.min()) and int(token_ids.max()) < vocab_size)
        if not consistent:
            raise UserError("packed sense dictionary: token ids, sizes and centroids do not fit "
                            f"together (or ids outside the vocabulary of {vocab_size})")
        packed = cls.__new__(cls)
        nn.Module.__init__(packed)
        packed._build(token_ids.long(), centroids, sizes.long(), vocab_size, rule, chunk_elements)
        return packed

    @property
    def n_values(self) -> int:
        """Numbers the dictionary holds (for a model-size column)."""
        return int(self.centroids.numel())

    # ------------------------------------------------------------------------------ scoring

    def entries(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The dictionary entry of each token id (-1: none), same shape as ``input_ids``."""
        return self.entry_of_token[input_ids.to(self.entry_of_token.device)]

    def chunks(self, entries: torch.Tensor) -> Iterator[torch.Tensor]:
        """Positions of ``entries`` in order of k, cut so that a chunk's padded senses hold
        about ``chunk_elements`` floats (at least one token per chunk)."""
        if len(entries) == 0:
            return iter(())
        sizes = self.sizes[entries]
        length = max(1, self.chunk_elements // (int(sizes.max()) * self.hidden_size))
        return iter(torch.argsort(sizes, stable=True).split(length))

    def logits(self, states: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, k_max) of N states (N, d) against their entries' senses under
        the rule, -inf on padding; differentiable in ``states``; autocast off."""
        sizes = self.sizes[entries]
        slot = torch.arange(int(sizes.max()) if len(entries) else 1, device=states.device)
        valid = slot < sizes[:, None]
        rows = torch.where(valid, self.offsets[entries, None] + slot, 0)
        with torch.autocast(states.device.type, enabled=False):
            senses, states = self.centroids[rows].float(), states.float()
            if self.rule == "l2":  # the difference itself, not |h|^2 - 2 h.c + |c|^2, which cancels
                logits = -(senses - states[:, None]).square().sum(-1)
            elif self.rule == "cos":
                logits = torch.einsum("nkd,nd->nk", nn.functional.normalize(senses, dim=-1),
                                      nn.functional.normalize(states, dim=-1)) / COS_TEMPERATURE
            else:
                logits = torch.einsum("nkd,nd->nk", senses, states)
        return logits.masked_fill(~valid, float("-inf"))

    @torch.no_grad()
    def nearest(self, states: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """The index (within its entry) of each state's sense under the rule (its largest
        logit), (N,) long."""
        nearest = torch.empty_like(entries)
        for part in self.chunks(entries):
            nearest[part] = self.logits(states[part], entries[part]).argmax(-1)
        return nearest

    @torch.no_grad()
    def targets(self, states: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) long: at text tokens (``text_mask``) with an entry, the sense of the state
        under the rule; -1 elsewhere. ``states`` (B, T, d) on this module's device."""
        entries = self.entries(input_ids)
        scored = text_mask.to(entries.device).bool() & (entries >= 0)
        targets = torch.full_like(entries, -1)
        targets[scored] = self.nearest(states[scored], entries[scored])
        return targets

    @torch.no_grad()
    def replace(self, states: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """A copy of ``states`` (B, T, d) whose text tokens with an entry are replaced by their
        sense under the rule (replace mode); other positions, padding included, are unchanged."""
        entries = self.entries(input_ids)
        replaced = text_mask.to(entries.device).bool() & (entries >= 0)
        output = states.clone()
        entries = entries[replaced]
        if entries.numel():
            rows = self.offsets[entries] + self.nearest(states[replaced], entries)
            output[replaced] = self.centroids[rows].to(states.dtype)
        return output
