"""How many senses a token gets: the original's MCL rule (batched in torch) or a fixed k.

The original runs Markov clustering (MCL) on each token's n samples only to obtain a cluster
count M, then asks k-means for ``k = int(0.4 M) if M > 900 else int(0.1 M)``, at least 5; a
token with n < 5 or n <= k keeps its raw vectors (:func:`keeps_raw_vectors`).

MCL here follows the ``markov_clustering`` package's ``run_mcl`` on a dense matrix, which the
original called with ``inflation=1.65`` and defaults otherwise: similarity
``1 / (euclidean distance + 0.01)``, the diagonal set to a self-loop of 1, columns normalised
to sum 1, then per iteration expansion (matrix square), inflation (element-wise power,
re-normalised), pruning (entries < 1e-3 set to 0 except each column's maximum) and a
convergence check (``np.allclose`` with the previous matrix), at most 100 iterations. M is the
number of distinct non-zero patterns among the rows of attractors (nodes with a non-zero
diagonal), as ``get_clusters`` counts them.

:func:`mcl_counts` runs that on many tokens at once: their similarity matrices are padded to
the batch's largest n; padded nodes are isolated (a self-loop and no edge), so they stay their
own attractors and never touch real nodes; tokens leave the batch as they converge, so each
token's result is the one it gets alone (bench/bench_cluster.py has the original's approach, one
token at a time in NumPy, that it is timed and tested against).

MCL costs O(n^3) per iteration and token, far more than k-means, and its count depends on the
scale of the states (the similarity is compared with a self-loop of 1): on MiniLM token states
it finds few clusters, so the rule gives k = 5 to every token, while the same states scaled up
10-50x (distances like a 4096-d LLM's) give M close to n. The ``fixed`` rule gives every token
the same k (by default 5, the rule's floor) at no cost; :func:`spot_check` runs MCL on a few
tokens to tell whether the two rules agree for the teacher at hand. BENCHMARKS.md,
"Clustering", has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .kmeans import pad_points

MIN_SENSES = 5  # the original's floor on k, and on n for clustering at all
K_RULES = ("mcl", "fixed")


def k_from_mcl_count(m: int) -> int:
    """The original's k for a token whose MCL found ``m`` clusters."""
    return max(MIN_SENSES, int(0.4 * m) if m > 900 else int(0.1 * m))


def keeps_raw_vectors(n: int, k: int) -> bool:
    """The original keeps a token's raw vectors as its senses when it has too few samples."""
    return n < MIN_SENSES or n <= k


@dataclass(frozen=True)
class MCLParams:
    """MCL settings; the defaults are the original's (inflation 1.65, run_mcl's others)."""

    inflation: float = 1.65
    expansion: int = 2
    loop_value: float = 1.0
    max_iter: int = 100
    prune_threshold: float = 1e-3
    distance_offset: float = 0.01  # similarity = 1 / (distance + offset)

    def __post_init__(self):
        if not self.inflation > 1:
            raise ValueError(f"inflation must be > 1, got {self.inflation}")
        if not (isinstance(self.expansion, int) and self.expansion > 1):
            raise ValueError(f"expansion must be an integer > 1, got {self.expansion}")
        if self.loop_value <= 0 or self.prune_threshold < 0 or self.distance_offset <= 0:
            raise ValueError("loop_value and distance_offset must be > 0, prune_threshold >= 0")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class MCLCount:
    clusters: int  # M
    iterations: int
    converged: bool


# --------------------------------------------------------------------------- batched torch


def _mcl_step(matrix: torch.Tensor, params: MCLParams) -> torch.Tensor:
    """Expansion, inflation, pruning of a batch of column-stochastic matrices (B, N, N): a new
    matrix, the rest in place (memory traffic is what costs besides the product)."""
    step = torch.linalg.matrix_power(matrix, params.expansion).pow_(params.inflation)
    step.div_(step.sum(dim=-2, keepdim=True))
    if params.prune_threshold > 0:
        top = step.argmax(dim=-2, keepdim=True)
        kept = step.gather(-2, top)
        step.masked_fill_(step < params.prune_threshold, 0.0).scatter_(-2, top, kept)  # column maxima stay
    return step


def _allclose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """np.allclose(a, b) per batch item (rtol 1e-5, atol 1e-8), for non-negative b."""
    return (a - b).abs_().sub_(b, alpha=1e-5).le_(1e-8).flatten(1).all(dim=1)


def _count_clusters(matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Distinct non-zero row patterns among real attractors, per batch item."""
    pattern = (matrix != 0).to(matrix.dtype)
    attractor = (torch.diagonal(matrix, dim1=-2, dim2=-1) != 0) & mask
    common = pattern @ pattern.transpose(-1, -2)  # shared non-zero columns of rows i and j
    size = pattern.sum(-1)
    same = (common == size[:, :, None]) & (common == size[:, None, :])
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)
    duplicate = (same & earlier & attractor[:, None, :]).any(-1)
    return (attractor & ~duplicate).sum(-1)


def mcl_counts(
    points: Sequence[np.ndarray],
    params: MCLParams = MCLParams(),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[MCLCount]:
    """MCL cluster counts of several tokens' samples (each (n_i, d)), batched on ``device``.

    Memory: a few (B, N, N) matrices, N the largest n; callers batch tokens of similar n."""
    if not points:
        return []
    x, mask = pad_points(points, device, dtype)
    real_pair = mask[:, :, None] & mask[:, None, :]
    matrix = torch.where(real_pair, 1.0 / (torch.cdist(x, x) + params.distance_offset), 0.0)
    # Padded nodes get a self-loop too: a column of zeros cannot be normalised.
    eye = torch.eye(x.shape[1], device=device, dtype=torch.bool)
    matrix = torch.where(eye, params.loop_value, matrix)
    matrix /= matrix.sum(dim=-2, keepdim=True)  # column-stochastic
    del x
    batch = len(points)
    iterations = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    rows, work = torch.arange(batch, device=device), matrix  # the tokens still iterating
    for _ in range(params.max_iter):
        step = _mcl_step(work, params)
        done = _allclose(step, work)
        iterations[rows.cpu()] += 1
        work = step
        if done.any():  # converged tokens leave: their matrix is final
            matrix[rows[done]] = step[done]
            converged[rows[done].cpu()] = True
            rows, work = rows[~done], step[~done]
            if len(rows) == 0:
                break
    matrix[rows] = work
    counts = _count_clusters(matrix, mask).cpu()
    return [MCLCount(int(c), int(i), bool(v)) for c, i, v in zip(counts, iterations, converged)]


SPOT_CHECK_TOKENS = 16
SPOT_CHECK_N = (10 * (MIN_SENSES + 1), 512)  # MCL's k exceeds the floor only from M >= 60


def spot_check(states: Mapping[int, np.ndarray], k: int, *, seed: int = 0,
               params: MCLParams = MCLParams(), device: torch.device | str = "cpu") -> tuple[int, int]:
    """Does a fixed ``k`` match the MCL rule for this teacher? MCL on up to 16 tokens (a seeded
    choice) whose n lies in SPOT_CHECK_N, where the rule can give more than 5 senses (the upper
    bound keeps the check to seconds); returns (tokens whose MCL k equals k, tokens checked)."""
    low, high = SPOT_CHECK_N
    eligible = sorted(t for t, rows in states.items() if low <= len(rows) <= high)
    if not eligible:
        return 0, 0
    chosen = np.random.default_rng(seed).choice(eligible, min(SPOT_CHECK_TOKENS, len(eligible)), replace=False)
    counts = mcl_counts([states[t] for t in sorted(chosen)], params, device=device)
    return sum(k_from_mcl_count(c.clusters) == k for c in counts), len(counts)
