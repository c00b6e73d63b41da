"""``--loss sense-pooled``: SKD's sense loss plus ``--sentence-weight`` W times the pooled
sentence-embedding term of ``--loss pooled-mse``:

    loss = sense_loss + W * pooled_mse

(:class:`~embdistill.losses.sense.SenseLoss`, :func:`~embdistill.losses.pooled_mse.pooled_mse`),
both on the student's same final token states. The sense loss keeps each token's sense; the
pooled term keeps the geometry of the sentence embedding that the export emits, which the
per-token loss leaves free. W = 0 is the sense loss exactly (the pooled term is still computed
and logged as ``pooled_mse``). The whole teacher is loaded (the pooled targets need it), on
--teacher-device; its embedding of each text is computed once
(:class:`~.pooled_matching.TeacherSentenceEmbeddings`).

The unit of the mean stays the sense loss's (the scored tokens), so that the Trainer weighs
micro-batches exactly as ``--loss sense`` does: each micro-batch's pooled term (a mean over
its texts) weighs as its scored tokens do, and a micro-batch without a scored token adds none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..cli import non_negative_float
from ..senses.dictionary import SenseDictionary
from ..teachers import Teacher
from ..training import LossOutput
from .base import StudentRun
from .pooled_matching import TeacherSentenceEmbeddings, load_whole_teacher
from .sense import SenseDistillation


class SensePooled(SenseDistillation):
    run_name = "skd-pooled"
    needs = ("sense_dict", "targets", "teacher_embeddings")
    summary_metrics = ("sense_accuracy", "pooled_mse", "single_sense_share")

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        # the sense options are SenseDistillation's, added to the parser with it
        parser.add_argument_group("--loss sense-pooled").add_argument(
            "--sentence-weight", type=non_negative_float, default=1.0,
            help="sense-pooled: the weight W of the pooled sentence-embedding term "
            "(loss = sense + W x pooled-mse; 0: the sense loss exactly)")

    @classmethod
    def identity(cls, run: StudentRun, inputs: dict[str, Path | SenseDictionary]) -> dict:
        return super().identity(run, inputs) | {"sentence_weight": run.args.sentence_weight}

    @classmethod
    def load_teacher(cls, run: StudentRun) -> Teacher:
        return load_whole_teacher(run)

    @classmethod
    def build(cls, run: StudentRun, inputs: dict[str, Path | SenseDictionary]) -> "SensePooled":
        objective = super().build(run, inputs)
        objective.embeddings = TeacherSentenceEmbeddings(objective.teacher)
        objective.sentence_weight = run.args.sentence_weight
        objective.examples = len(run.examples)
        sense_collate = objective.collate
        objective.collate = lambda ids: {**sense_collate(ids), "example_ids": torch.tensor(ids)}
        return objective

    def reference_teacher(self, run: StudentRun) -> Teacher:
        return self.embeddings.teacher

    def release_teacher(self) -> None:
        pass  # the pooled term runs it

    def report(self) -> None:
        self.embeddings.report(self.examples)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        sense = self.of_states(states, batch)
        pooled = self.embeddings.loss(states, batch)
        return LossOutput(sense.loss + self.sentence_weight * pooled, sense.count,
                          {**sense.metrics, "pooled_mse": pooled.detach()})
