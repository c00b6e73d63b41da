"""Stage 11's ``--loss mse``, the baseline: the squared error of each head's mu
(:func:`~embdistill.losses.mse.masked_mse`), summed over the teachers, on the authors' raw
targets by default (standardised, it would weigh each dimension by 1/variance); the head is
the authors' separate regression head unless --mse-head shared."""

from __future__ import annotations

import argparse

from ..losses import masked_mse
from .teacher_heads import MultiTeacherObjective


class TeacherMSE(MultiTeacherObjective):
    standardizes_targets = False

    @classmethod
    def heads(cls, args: argparse.Namespace) -> str:
        return "regression" if args.mse_head == "separate" else "kernel"

    def of_predictions(self, predictions, targets):
        loss, metrics = 0.0, {}
        for name, target in targets.items():
            mse, _ = masked_mse(predictions[name][0], target)
            loss = loss + mse
            metrics[f"mse/{name}"] = float(mse.detach())
        return loss, metrics
