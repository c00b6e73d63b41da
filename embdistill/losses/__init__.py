"""Training losses, one per file, each with its formula and paper in the docstring.

* :class:`~embdistill.losses.sense.SenseLoss`: SKD's cross-entropy over a token's senses.
* :class:`~embdistill.losses.gaussian_nll.GaussianKernelNLLLoss`: the multi-teacher
  Gaussian-kernel negative log-likelihood.
* :func:`~embdistill.losses.mse.masked_mse`: mean squared error over selected vectors.
* :func:`~embdistill.losses.pooled_mse.pooled_mse`: squared distance of the student's sentence
  embeddings to the teacher's.
"""

from .gaussian_nll import GaussianKernelNLLLoss
from .mse import masked_mse
from .pooled_mse import pooled_mse
from .sense import SenseLoss

__all__ = ["GaussianKernelNLLLoss", "SenseLoss", "masked_mse", "pooled_mse"]
