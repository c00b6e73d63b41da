"""Gaussian conditional-kernel negative log-likelihood for multi-teacher distillation.

"Learning Task-Agnostic Representations through Multi-Teacher Distillation" (NeurIPS 2025,
arXiv 2510.18680). The student embedding s should carry as much information as possible
about every teacher's embedding t_k; the bound the paper maximises is the log-likelihood of
t_k under a Gaussian kernel conditioned on s. For teacher k (dimension d_k) an MLP head maps
s to (mu_k(s), rho_k(s)) in R^{d_k} x R^{d_k}, and with the per-dimension precision

    lambda = exp(tanh(rho))                      (so 1/e <= lambda <= e: bounded scale)

    log q_k(t | s) = -d_k/2 log(2 pi) + sum_j log lambda_j - 1/2 sum_j lambda_j^2 (t_j - mu_j)^2

which is the log-density of the diagonal Normal(mu, 1/lambda). Over a batch of B texts

    L = sum_k  -1/B sum_b log q_k(t_bk | s_b)          (each term / d_k with normalize_by_dim)

Dividing by d_k keeps a wide teacher (4096-d in the paper) from outweighing the others.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn


def gaussian_kernel_terms(mu: torch.Tensor, rho: torch.Tensor, target: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two data-dependent terms of log q(t | s), per row: ``sum_j log lambda_j`` and
    ``1/2 sum_j lambda_j^2 (t_j - mu_j)^2``; ``mu``, ``rho``, ``target`` (B, d) -> two (B,),
    in float32 or wider. The first does not depend on the target: when it dominates the loss
    (targets far below the kernel's scale of 1/e..e), the gradient into the student is nearly
    the same for every text, the way to a collapse of the student's embeddings."""
    if not (mu.shape == rho.shape == target.shape) or mu.dim() != 2:
        raise ValueError(
            f"mu {tuple(mu.shape)}, rho {tuple(rho.shape)} and target {tuple(target.shape)} "
            "must be the same (B, d) shape"
        )
    dtype = torch.promote_types(mu.dtype, torch.float32)  # bf16 autocast would lose the sums
    mu, rho, target = mu.to(dtype), rho.to(dtype), target.to(dtype)
    log_lambda = torch.tanh(rho)
    precision_sq = torch.exp(2 * log_lambda)
    return log_lambda.sum(-1), 0.5 * (precision_sq * (target - mu).pow(2)).sum(-1)


def gaussian_kernel_log_prob(mu: torch.Tensor, rho: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log q(t | s) of each row: ``mu``, ``rho``, ``target`` (B, d) -> (B,), in float32 or wider."""
    log_lambda, squared_error = gaussian_kernel_terms(mu, rho, target)
    return -0.5 * mu.shape[-1] * math.log(2 * math.pi) + log_lambda - squared_error


class GaussianKernelNLLLoss(nn.Module):
    """Sum over teachers of the mean negative log-likelihood (module docstring).

    ``forward(predictions, targets)``: ``predictions[k] = (mu_k, rho_k)``, ``targets[k] = t_k``,
    each (B, d_k); returns ``(loss, metrics)`` with, per teacher and per dimension (comparable
    across teachers whatever ``normalize_by_dim`` is), the mean NLL (``nll/<k>``) and its two
    parts (``log_lambda/<k>``, ``sq_err/<k>``):
    ``nll/<k> = 1/2 log(2 pi) - log_lambda/<k> + sq_err/<k>``.
    """

    def __init__(self, normalize_by_dim: bool = False):
        super().__init__()
        self.normalize_by_dim = normalize_by_dim

    def forward(
        self,
        predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        targets: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if set(predictions) != set(targets) or not targets:
            raise ValueError(f"teachers differ: heads {sorted(predictions)}, targets {sorted(targets)}")
        total = 0.0
        metrics = {}
        for name, target in targets.items():
            mu, rho = predictions[name]
            log_lambda, squared_error = (term.mean() for term in gaussian_kernel_terms(mu, rho, target))
            dim = target.shape[-1]
            nll = 0.5 * dim * math.log(2 * math.pi) - log_lambda + squared_error
            total = total + (nll / dim if self.normalize_by_dim else nll)
            metrics[f"nll/{name}"] = float(nll.detach()) / dim
            metrics[f"log_lambda/{name}"] = float(log_lambda.detach()) / dim
            metrics[f"sq_err/{name}"] = float(squared_error.detach()) / dim
        return total, metrics
