"""Masked mean squared error between predicted and target vectors.

    loss = 1/|M| sum_{i in M} 1/d || p_i - t_i ||^2

over the positions i selected by the mask M (all positions without a mask), p_i, t_i in R^d.
Two uses share it:

* SKD's ``--loss mse`` ablation: p = the student's token states, t = the teacher's, M = the
  text tokens (the embed mask); the plain feature-matching baseline that the sense loss of
  arXiv 2504.06036 is compared with.
* the multi-teacher MSE baseline of arXiv 2510.18680: p = an MLP head's prediction of a
  teacher's embedding from the student's, t = that embedding, one vector per text.
"""

from __future__ import annotations

import torch


def masked_mse(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """The loss above (computed in float32) and |M|, the number of vectors averaged.

    ``predicted``, ``target``: (..., d); ``mask``: the leading shape (...), nonzero = selected.
    With |M| == 0 the loss is a zero that still depends on ``predicted``.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ")
    squared = (predicted.float() - target.float()).pow(2).mean(-1)
    if mask is not None:
        squared = squared[mask.bool()]
    count = int(squared.numel())
    return squared.sum() / max(count, 1), count
