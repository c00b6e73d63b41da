"""What stage 11's objectives share (:class:`MultiTeacherObjective`): a loss on each teacher's
head of the pooled student against that teacher's stored embeddings (the teachers' shards of
scripts/10_teacher_embeddings.py), scaled as the student holds them; the unit of the mean is
the text."""

from __future__ import annotations

import argparse
from typing import ClassVar, Mapping

import torch
from torch import nn

from ..multiteacher.model import unwrap
from ..training import LossOutput

Predictions = Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]  # teacher -> (mu, rho or None)


class MultiTeacherObjective:
    """The Trainer's ``loss_fn`` for stage 11. A subclass declares ``standardizes_targets``
    (whether its targets are standardised unless --standardize says otherwise) and
    :meth:`heads` (the heads it reads), and computes :meth:`of_predictions`, the loss on
    predictions already made (the heads' warm-up uses it on cached embeddings)."""

    needs: ClassVar[tuple[str, ...]] = ("teacher_shards",)
    standardizes_targets: ClassVar[bool]

    def __init__(self, normalize_by_dim: bool = False):
        self.normalize_by_dim = normalize_by_dim

    @classmethod
    def standardizes(cls, standardize: bool | None) -> bool:
        """Whether a run standardises its targets: ``standardize`` when given (--standardize or
        --no-standardize), else the objective's default."""
        return cls.standardizes_targets if standardize is None else standardize

    @classmethod
    def heads(cls, args: argparse.Namespace) -> str:
        """The heads' kind (:class:`~embdistill.multiteacher.model.MultiTeacherStudent`)."""
        return "kernel"

    def of_predictions(self, predictions: Predictions,
                       targets: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict) -> LossOutput:
        predictions = model(batch["input_ids"], batch["attention_mask"])
        loss, metrics = self.of_predictions(predictions, unwrap(model).scale_targets(batch["targets"]))
        return LossOutput(loss, int(batch["input_ids"].shape[0]), metrics)
