"""k-means for many small problems at once: one per token, each with its own k.

:func:`kmeans_torch` clusters a batch of tokens together on any torch device: their samples are
padded to the batch's largest n and their centroids to its largest k, with masks, so one
batched matrix product serves every token. Per token it is scikit-learn's algorithm: greedy
k-means++ seeding (``2 + int(log k)`` candidates per centre, the one that lowers the potential
most is kept), then Lloyd iterations until the assignments stop changing or the squared centre
shift falls to ``tol`` times the mean per-feature variance of the token's samples, at most
``max_iter`` iterations; an empty cluster is moved to the point farthest from its centre;
``n_init`` seedings, the lowest objective wins.

Randomness is per token: every draw comes from ``numpy.random.default_rng([seed, key,
restart])`` with the token's ``key`` (its id), made before the batch runs. A token therefore
gets the same centroids whichever batch it lands in and on whichever device (up to float
rounding), and a rerun gets the same bits (centroid sums are a matrix product, not atomics).
Tokens leave the Lloyd loop as they converge, so a batch costs what its tokens cost, not
max_iter times its slowest.

The reference backends run one token at a time: ``sklearn`` (``sklearn.cluster.KMeans``, what
the original ran) and ``faiss`` (``faiss.Kmeans``; only when faiss is installed, e.g.
``pip install faiss-cpu``; on the stage's CUDA device when faiss has GPU support and sees a GPU,
e.g. ``faiss-gpu`` from ``pip install .[gpu]``).
Every backend returns one :class:`KMeansResult` per token.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError

BACKENDS = ("torch", "faiss", "sklearn")


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    # Sum of squared distances of the samples to their nearest centroid: entry i after i Lloyd
    # updates (entry 0: the seeding), the last for the returned centroids. sklearn reports the
    # final value only.
    objective: list[float]
    iterations: int
    converged: bool


def check_backend(name: str) -> str:
    """``name`` if it can run here; UserError otherwise."""
    if name not in BACKENDS:
        raise UserError(f"unknown k-means backend '{name}': choose one of {', '.join(BACKENDS)}")
    if name == "faiss" and importlib.util.find_spec("faiss") is None:
        raise UserError("--backend faiss needs faiss (pip install faiss-cpu, or faiss-gpu for GPUs: "
                        "pip install .[gpu]); or use torch or sklearn")
    return name


def _check(points: Sequence[np.ndarray], ks: Sequence[int], keys, max_iter: int, tol: float,
           n_init: int) -> list[int]:
    if len(points) != len(ks) or (keys is not None and len(keys) != len(points)):
        raise ValueError("points, ks and keys must have one entry per token")
    for p, k in zip(points, ks):
        if p.ndim != 2 or not 1 <= k <= len(p):
            raise ValueError(f"need 1 <= k <= n for (n, d) samples; got k={k} for shape {tuple(p.shape)}")
    if len({p.shape[1] for p in points}) > 1:
        raise ValueError("all tokens' samples must have the same dimension")
    if max_iter < 1 or tol < 0 or n_init < 1:
        raise ValueError(f"need max_iter >= 1, tol >= 0, n_init >= 1; got {max_iter}, {tol}, {n_init}")
    return list(range(len(points))) if keys is None else [int(k) for k in keys]


def _local_trials(k: int) -> int:
    return 2 + int(math.log(k))  # scikit-learn's greedy k-means++


def _seed_int(seed: int, key: int, restart: int) -> int:
    """A 31-bit seed for the one-token backends, from the same stream key as the torch draws."""
    return int(np.random.SeedSequence([seed, key, restart]).generate_state(1)[0] >> 1)


# -------------------------------------------------------------------------------- torch


def pad_points(points: Sequence[np.ndarray], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Several tokens' samples (n_i, d) as one (B, N, d) tensor padded with zeros, N the largest
    n_i, and the (B, N) mask of real samples."""
    n_max = max(len(p) for p in points)
    x = torch.zeros(len(points), n_max, points[0].shape[1], device=device, dtype=dtype)
    mask = torch.zeros(len(points), n_max, device=device, dtype=torch.bool)
    for i, p in enumerate(points):
        x[i, : len(p)] = torch.from_numpy(np.array(p)).to(device=device, dtype=dtype)  # a copy: p may be read-only
        mask[i, : len(p)] = True
    return x, mask


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum(-1)


def _sq_dist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, P, Q) between rows of a (B, P, d) and b (B, Q, d), given their
    squared norms (computed once per batch for the samples)."""
    cross = torch.baddbmm(b_sq[:, None, :], a, b.transpose(1, 2), alpha=-2)
    return cross.add_(a_sq[:, :, None]).clamp_min_(0)


def _rows(t: torch.Tensor, rows: torch.Tensor, everyone: bool) -> torch.Tensor:
    return t if everyone else t[rows]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for x (B, N, d), index (B, J) -> (B, J, d)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, mask: torch.Tensor, k: torch.Tensor,
                      n: torch.Tensor, uniforms: torch.Tensor, trials: torch.Tensor) -> torch.Tensor:
    """Greedy k-means++ centres (B, K, d); ``uniforms`` (B, K, L) are each token's draws."""
    batch, _, dim = x.shape
    k_max = int(k.max())
    centres = torch.zeros(batch, k_max, dim, device=x.device, dtype=x.dtype)
    first = (uniforms[:, 0, 0] * n).long().clamp_max(n - 1)[:, None]
    centres[:, :1] = _take(x, first)
    closest = _sq_dist(centres[:, :1], x_sq.gather(1, first), x, x_sq)[:, 0] * mask
    potential = closest.sum(1)
    trial_ok = torch.arange(uniforms.shape[2], device=x.device)[None, :] < trials[:, None]
    for c in range(1, k_max):
        rows = torch.nonzero(k > c).squeeze(1)
        everyone = len(rows) == batch
        xr, xr_sq, closest_r = (_rows(t, rows, everyone) for t in (x, x_sq, closest))
        targets = uniforms[rows, c] * potential[rows, None]
        candidates = torch.searchsorted(closest_r.cumsum(1), targets).clamp_max_(n[rows, None] - 1)
        cand_x = _take(xr, candidates)  # (R, L, d)
        dist = _sq_dist(cand_x, xr_sq.gather(1, candidates), xr, xr_sq)
        dist = torch.minimum(dist, closest_r[:, None, :]) * _rows(mask, rows, everyone)[:, None, :]
        cand_pot = dist.sum(-1).masked_fill(~trial_ok[rows], math.inf)
        best = cand_pot.argmin(1)
        pick = torch.arange(len(rows), device=x.device)
        closest[rows] = dist[pick, best]
        potential[rows] = cand_pot[pick, best]
        centres[rows, c] = cand_x[pick, best]
    return centres


def _assign(x, x_sq, mask, centres, centre_ok):
    """Nearest valid centre of every sample: (squared distance, label), padding at distance 0."""
    dist = _sq_dist(x, x_sq, centres, _sq_norms(centres)).masked_fill_(~centre_ok[:, None, :], math.inf)
    nearest, labels = dist.min(-1)
    return nearest.masked_fill_(~mask, 0.0), labels


def _update(x, mask, centre_ok, labels, nearest):
    """New centres: the means of their samples; an empty cluster takes the sample farthest from
    its centre, which leaves its old cluster (scikit-learn's relocation)."""
    dim = x.shape[2]
    # Sums as a product with the one-hot assignment: BLAS-fast, and deterministic on GPUs too
    # (index_add_ would use atomics there and is slow on CPUs).
    one_hot = torch.nn.functional.one_hot(labels, centre_ok.shape[1]).to(x.dtype) * mask[..., None]
    sums = torch.bmm(one_hot.transpose(1, 2), x)
    counts = one_hot.sum(1)
    empty = (counts == 0) & centre_ok
    if empty.any():
        farthest = nearest.masked_fill(~mask, -1.0).argsort(dim=1, descending=True, stable=True)
        moved = farthest.gather(1, (empty.cumsum(1) - 1).clamp_min(0))  # (B, K): j-th empty takes j-th farthest
        moved_x = _take(x, moved) * empty[..., None]
        donors = labels.gather(1, moved)
        sums.scatter_add_(1, donors[..., None].expand(-1, -1, dim), -moved_x)
        counts.scatter_add_(1, donors, -empty.to(x.dtype))
        sums = torch.where(empty[..., None], moved_x, sums)
        counts = torch.where(empty, 1.0, counts)
    return sums / counts.clamp_min(1)[..., None]


def _lloyd(x, x_sq, mask, k, centres, tol, max_iter):
    """Lloyd iterations of every token until it converges; returns (centres, objective history,
    iterations, converged). Finished tokens are frozen; the working tensors are compacted to the
    unfinished ones when half have finished, so copying stays proportional to the work."""
    batch = x.shape[0]
    centre_ok = torch.arange(centres.shape[1], device=x.device)[None, :] < k[:, None]
    history: list[list[float]] = [[] for _ in range(batch)]
    iterations = torch.zeros(batch, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)
    rows = torch.arange(batch, device=x.device)  # batch index of each working row
    live = torch.ones(batch, dtype=torch.bool, device=x.device)
    previous = torch.full(mask.shape, -1, device=x.device, dtype=torch.long)
    work = [x, x_sq, mask, centres, centre_ok, previous, tol]
    for _ in range(max_iter):
        wx, wx_sq, wmask, wcentres, wok, wprevious, wtol = work
        nearest, labels = _assign(wx, wx_sq, wmask, wcentres, wok)
        for row, value in zip(rows[live].tolist(), nearest.sum(1)[live].tolist()):
            history[row].append(value)
        new = _update(wx, wmask, wok, labels, nearest)
        shift = ((new - wcentres) ** 2).sum((1, 2))  # invalid centres are 0 in both
        unchanged = ((labels == wprevious) | ~wmask).all(1)
        done = live & (unchanged | (shift <= wtol))
        work[3] = torch.where(live[:, None, None], new, wcentres)
        work[5] = torch.where(live[:, None], labels, wprevious)
        iterations[rows[live].cpu()] += 1
        converged[rows[done].cpu()] = True
        live = live & ~done
        if not live.any():
            break
        if int(live.sum()) <= len(live) // 2:
            centres[rows] = work[3]
            keep = live.nonzero().squeeze(1)
            rows, live, work = rows[keep], live[keep], [t[keep] for t in work]
    centres[rows] = work[3]
    nearest, _ = _assign(x, x_sq, mask, centres, centre_ok)
    for row, value in enumerate(nearest.sum(1).tolist()):
        history[row].append(value)
    return centres, history, iterations, converged


@torch.no_grad()
def kmeans_torch(
    points: Sequence[np.ndarray],
    ks: Sequence[int],
    *,
    keys: Sequence[int] | None = None,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int = 1,
    device: torch.device | str = "cpu",
) -> list[KMeansResult]:
    """Cluster every ``points[i]`` (n_i, d) into ``ks[i]`` centroids, all in one batch.

    ``keys[i]`` (default i) names token i's random stream. Memory is about
    B * n_init * N * max(K, d, 2 + log K) floats for B tokens, N the largest n, K the largest k."""
    keys = _check(points, ks, keys, max_iter, tol, n_init)
    if not points:
        return []
    items = [(i, r) for i in range(len(points)) for r in range(n_init)]
    x, mask = pad_points([points[i] for i, _ in items], device, torch.float32)
    n = mask.sum(1)
    k = torch.tensor([ks[i] for i, _ in items], device=device)
    trials = torch.tensor([_local_trials(ks[i]) for i, _ in items], device=device)
    uniforms = np.zeros((len(items), int(k.max()), int(trials.max())), dtype=np.float32)
    tol_abs = np.zeros(len(items), dtype=np.float32)
    for row, (i, r) in enumerate(items):
        uniforms[row, : ks[i], : _local_trials(ks[i])] = np.random.default_rng(
            [seed, keys[i], r]).random((ks[i], _local_trials(ks[i])))
        # scikit-learn's tolerance: tol times the mean per-feature variance of the samples
        tol_abs[row] = tol * np.asarray(points[i], dtype=np.float32).var(axis=0).mean()
    uniforms, tol_abs = torch.from_numpy(uniforms).to(device), torch.from_numpy(tol_abs).to(device)
    x_sq = _sq_norms(x)
    centres = _kmeans_plus_plus(x, x_sq, mask, k, n, uniforms, trials)
    centres, history, iterations, converged = _lloyd(x, x_sq, mask, k, centres, tol_abs, max_iter)
    centres = centres.cpu().numpy()
    results = []
    for i in range(len(points)):
        rows = range(i * n_init, (i + 1) * n_init)
        best = min(rows, key=lambda row: history[row][-1])
        results.append(KMeansResult(centres[best, : ks[i]].copy(), history[best],
                                    int(iterations[best]), bool(converged[best])))
    return results


# ----------------------------------------------------------------- one token at a time


def kmeans_sklearn(points, ks, *, keys=None, seed=0, max_iter=300, tol=1e-4, n_init=1,
                   device=None) -> list[KMeansResult]:
    """scikit-learn's KMeans per token (the original's way); objective: the final value only."""
    from sklearn.cluster import KMeans

    keys = _check(points, ks, keys, max_iter, tol, n_init)
    results = []
    for p, k, key in zip(points, ks, keys):
        model = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, tol=tol,
                       random_state=_seed_int(seed, key, 0))
        model.fit(np.asarray(p, dtype=np.float32))
        results.append(KMeansResult(model.cluster_centers_.astype(np.float32), [float(model.inertia_)],
                                    int(model.n_iter_), int(model.n_iter_) < max_iter))
    return results


def faiss_gpu_index(faiss, dim: int, device) -> tuple[object, object] | None:
    """(GPU resources, flat L2 index) on the CUDA ``device`` when faiss was built with GPU
    support and sees a GPU; None otherwise (faiss then runs on the CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    resources, config = faiss.StandardGpuResources(), faiss.GpuIndexFlatConfig()
    config.device = device.index or 0
    return resources, faiss.GpuIndexFlatL2(resources, dim, config)


def kmeans_faiss(points, ks, *, keys=None, seed=0, max_iter=300, tol=1e-4, n_init=1,
                 device=None) -> list[KMeansResult]:
    """faiss.Kmeans per token, no subsampling; k-means++ seeding where faiss has it (>= 1.14,
    else random); its assignments on the GPU of a CUDA ``device`` when faiss can
    (:func:`faiss_gpu_index`). ``tol`` is unused: faiss stops when the objective stops changing."""
    import faiss

    keys = _check(points, ks, keys, max_iter, tol, n_init)
    seeding = {"init_method": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS} if hasattr(
        faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS") else {}
    gpu = faiss_gpu_index(faiss, points[0].shape[1], device) if points else None  # resources live as long
    results = []
    for p, k, key in zip(points, ks, keys):
        data = np.ascontiguousarray(p, dtype=np.float32)
        best = None
        for restart in range(n_init):  # our own redo loop: faiss's nredo mixes the redos' stats
            model = faiss.Kmeans(data.shape[1], k, niter=max_iter, seed=_seed_int(seed, key, restart),
                                 min_points_per_centroid=1, max_points_per_centroid=len(data) + 1,
                                 verbose=False, **seeding)
            if gpu is not None:
                model.index = gpu[1]  # train and assign search it (reset per use)
            model.train(data)
            final = float(model.assign(data)[0].sum())
            if best is None or final < best.objective[-1]:
                best = KMeansResult(model.centroids.copy(), [*map(float, model.obj), final],
                                    len(model.obj), len(model.obj) < max_iter)
        results.append(best)
    return results


_RUNNERS = {"torch": kmeans_torch, "sklearn": kmeans_sklearn, "faiss": kmeans_faiss}


def kmeans(points: Sequence[np.ndarray], ks: Sequence[int], *, backend: str = "torch",
           **options) -> list[KMeansResult]:
    """Dispatch to a backend (see :data:`BACKENDS`); options as :func:`kmeans_torch`'s."""
    return _RUNNERS[check_backend(backend)](points, ks, **options)
