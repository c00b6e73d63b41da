"""``--loss pooled-mse``: the student's sentence embedding, pooled and normalised as its export
embeds, against the whole teacher's of the same text
(:func:`~embdistill.losses.pooled_mse.pooled_mse`); no head: what is trained is what ships.
The teacher's embedding of each text is computed once (:class:`TeacherSentenceEmbeddings`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..losses import pooled_mse
from ..teachers import Teacher, load_teacher, sentence_embedding
from ..training import LossOutput
from .base import StudentObjective, StudentRun, example_collator
from .state_matching import teacher_device

log = logging.getLogger("embdistill.objectives.pooled_matching")


class TeacherSentenceEmbeddings:
    """``embeddings(batch)``: the teacher's (B, d) sentence embeddings of ``batch``'s examples
    (by ``example_ids``), each computed the first time its example is in a batch, on the
    batch's tokens, and kept in memory (CPU, float32: 4 d bytes a text, 1.5 KB for MiniLM):
    from the second epoch on the teacher does not run. Kept lazily rather than all at the
    start, because a rank's share of the texts changes every epoch (the sampler shuffles);
    the teacher is frozen and deterministic, so a kept embedding is the one it would compute
    again (up to float rounding: another batch pads differently)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.kept: dict[int, torch.Tensor] = {}  # example id -> its embedding
        self.teacher_examples = 0  # examples the teacher ran on

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["example_ids"].tolist()
        missing = [row for row, i in enumerate(ids) if i not in self.kept]
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            computed = self.teacher.sentence_embeddings(
                {key: batch[key][rows] for key in ("input_ids", "attention_mask", "embed_mask")}).cpu()
            self.kept.update((ids[row], embedding) for row, embedding in zip(missing, computed))
            self.teacher_examples += len(missing)
        return torch.stack([self.kept[i] for i in ids])

    def loss(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`pooled_mse` of the student's final token ``states`` of ``batch``, pooled as its
        export pools them (normalised when the teacher normalises)."""
        student = sentence_embedding(states, batch["embed_mask"], self.teacher.normalize)
        return pooled_mse(student, self(batch).to(student.device))

    def report(self, examples: int) -> None:
        log.info("teacher sentence embeddings kept in memory: %d of %d examples; the teacher ran on %d examples",
                 len(self.kept), examples, self.teacher_examples)


def load_whole_teacher(run: StudentRun) -> Teacher:
    """The whole teacher, on --teacher-device: the student's first layers and the embeddings."""
    return load_teacher(run.args.teacher, device=teacher_device(run.args.teacher_device, run))


class PooledMatching(StudentObjective):
    """The loss is the mean over the batch's texts (the unit is the text)."""

    run_name = "pooled-mse"
    needs = ("teacher_embeddings",)

    def __init__(self, embeddings: TeacherSentenceEmbeddings):
        self.embeddings = embeddings
        self.teacher = embeddings.teacher

    @classmethod
    def build(cls, run: StudentRun, inputs: dict[str, Path]) -> "PooledMatching":
        objective = cls(TeacherSentenceEmbeddings(load_whole_teacher(run)))
        objective.collate = example_collator(run.tokenizer.tokenize, run.examples, run.max_length)
        objective.examples = len(run.examples)
        return objective

    def reference_teacher(self, run: StudentRun) -> Teacher:
        return self.embeddings.teacher

    def report(self) -> None:
        self.embeddings.report(self.examples)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return LossOutput(self.embeddings.loss(states, batch), len(batch["input_ids"]), {})
