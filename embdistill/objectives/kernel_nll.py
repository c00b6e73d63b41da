"""Stage 11's ``--loss nll``: the Gaussian-kernel negative log-likelihood
(:class:`~embdistill.losses.gaussian_nll.GaussianKernelNLLLoss`) of each teacher's kernel head
(mu and rho), on standardised targets by default (the kernel's scale)."""

from __future__ import annotations

from ..errors import UserError
from ..losses import GaussianKernelNLLLoss
from .teacher_heads import MultiTeacherObjective


class KernelNLL(MultiTeacherObjective):
    standardizes_targets = True

    def __init__(self, normalize_by_dim: bool = False):
        super().__init__(normalize_by_dim)
        self.nll = GaussianKernelNLLLoss(normalize_by_dim)

    def of_predictions(self, predictions, targets):
        if any(rho is None for _, rho in predictions.values()):
            raise UserError("the NLL loss needs the kernel heads (mu and rho)")
        return self.nll(predictions, targets)
