"""Training losses, one per file, each with its formula and paper in the docstring.

* :class:`~embdistill.losses.sense.SenseLoss`: SKD's cross-entropy over a token's senses.
* :func:`~embdistill.losses.mse.masked_mse`: mean squared error over selected vectors.
"""

from .mse import masked_mse
from .sense import SenseLoss

__all__ = ["SenseLoss", "masked_mse"]
