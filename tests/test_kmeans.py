"""Batched torch k-means against scikit-learn, and its own guarantees (seeding, monotone
objective, batch independence, empty clusters, option checks)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from embdistill.errors import UserError
from embdistill.senses import kmeans as km
from embdistill.senses.kmeans import KMeansResult, check_backend, kmeans, kmeans_torch

# (n, d, true centres, k, spread): separated to overlapping blobs, and k above the true count.
# With 4 seedings both implementations reach the same optimum on these for every seed tried;
# where k is far from the true count both fall into local optima (either can be 5% off).
BLOBS = [(300, 16, 6, 6, 1.0), (500, 32, 8, 8, 3.0), (400, 8, 5, 5, 2.5), (800, 64, 12, 12, 4.0),
         (600, 24, 10, 10, 2.0), (400, 16, 6, 8, 1.5)]


def blobs(i: int) -> tuple[np.ndarray, int]:
    n, d, centres, k, spread = BLOBS[i]
    x, _ = make_blobs(n_samples=n, n_features=d, centers=centres, cluster_std=spread, random_state=i)
    return x.astype(np.float32), k


def sklearn_objective(x: np.ndarray, k: int, n_init: int) -> float:
    from sklearn.cluster import KMeans

    return float(KMeans(n_clusters=k, n_init=n_init, random_state=0).fit(x).inertia_)


@pytest.mark.parametrize("i", range(len(BLOBS)))
def test_objective_within_one_percent_of_sklearn(i):
    x, k = blobs(i)
    ours = kmeans_torch([x], [k], n_init=4)[0]
    reference = sklearn_objective(x, k, n_init=4)
    assert ours.centroids.shape == (k, x.shape[1])
    # the returned objective is the real one of the returned centroids
    d2 = ((x[:, None, :] - ours.centroids[None]) ** 2).sum(-1).min(1).sum()
    assert ours.objective[-1] == pytest.approx(d2, rel=1e-4)
    assert abs(ours.objective[-1] - reference) <= 0.01 * reference


@pytest.mark.parametrize("i", range(3))
def test_the_backends_find_the_same_clusters_of_separated_blobs(i):
    """torch, scikit-learn (the original's) and faiss: one partition of well-separated blobs."""
    x, k = blobs(i)
    labels = []
    for backend in ("torch", "sklearn", "faiss"):
        result = kmeans([x], [k], backend=backend, n_init=4, seed=i)[0]
        assert result.centroids.dtype == np.float32 and result.iterations >= 1
        labels.append(((x[:, None, :] - result.centroids[None]) ** 2).sum(-1).argmin(1))
    for other in labels[1:]:  # the same partition, whatever each backend calls its clusters
        assert len(set(zip(labels[0], other))) == k


def test_objective_never_increases():
    rng = np.random.default_rng(0)
    points = [rng.normal(size=(n, 24)).astype(np.float32) for n in (50, 200, 400)]
    points.append(np.repeat(rng.normal(size=(6, 24)), 20, axis=0).astype(np.float32))  # duplicates
    for x, result in zip(points, kmeans_torch(points, [7, 20, 40, 9], tol=0.0, max_iter=100)):
        objective = np.asarray(result.objective)
        assert len(objective) == result.iterations + 1
        assert result.iterations > 1
        rounding = 1e-6 * float((x.astype(np.float64) ** 2).sum())  # float32 distance arithmetic
        assert (np.diff(objective) <= rounding).all()
        assert objective[-1] < objective[0]


def test_same_seed_same_output_other_seed_other_output():
    rng = np.random.default_rng(1)
    points = [rng.normal(size=(n, 16)).astype(np.float16) for n in (30, 90, 150)]
    first = kmeans_torch(points, [5, 9, 12], keys=[7, 8, 9], seed=3)
    again = kmeans_torch(points, [5, 9, 12], keys=[7, 8, 9], seed=3)
    other = kmeans_torch(points, [5, 9, 12], keys=[7, 8, 9], seed=4)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        assert a.objective == b.objective
        assert not np.array_equal(a.centroids, c.centroids)


def test_batched_token_equals_token_alone():
    rng = np.random.default_rng(2)
    sizes, ks = [8, 40, 41, 120, 300, 77], [5, 5, 11, 30, 25, 1]
    points = [(rng.normal(size=(n, 20)) * (1 + i)).astype(np.float32) for i, n in enumerate(sizes)]
    keys = [101, 5, 77, 3, 42, 9]
    batched = kmeans_torch(points, ks, keys=keys, n_init=2)
    for p, k, key, together in zip(points, ks, keys, batched):
        alone = kmeans_torch([p], [k], keys=[key], n_init=2)[0]
        assert together.iterations == alone.iterations
        np.testing.assert_allclose(together.centroids, alone.centroids, rtol=1e-5, atol=1e-5)
        assert together.objective[-1] == pytest.approx(alone.objective[-1], rel=1e-5)


def test_empty_cluster_takes_the_farthest_point():
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    centre_ok = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.tensor([[0, 0, 1, 1]])  # cluster 2 is empty
    nearest = torch.tensor([[0.25, 0.25, 16.0, 16.0]])  # point 3 is farthest (ties: the first)
    centres = km._update(x, mask, centre_ok, labels, nearest)
    # point 2 moves into the empty cluster and leaves cluster 1, which keeps point 3
    assert centres[0, :, 0].tolist() == [0.5, 10.0, 2.0]


def test_kmeans_plus_plus_spreads_the_first_centres():
    # three tight far-apart groups: greedy k-means++ must seed one centre in each
    rng = np.random.default_rng(3)
    groups = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    x = (groups[rng.integers(3, size=90)] + rng.normal(size=(90, 2)) * 0.1).astype(np.float32)
    for seed in range(5):
        result = kmeans_torch([x], [3], seed=seed, max_iter=1)[0]
        nearest_group = np.linalg.norm(result.centroids[:, None] - groups[None], axis=-1).argmin(1)
        assert sorted(nearest_group) == [0, 1, 2]


def test_options_are_checked():
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k <= n"):
        kmeans_torch([x], [5])
    with pytest.raises(ValueError, match="one entry per token"):
        kmeans_torch([x, x], [2])
    with pytest.raises(ValueError, match="max_iter"):
        kmeans_torch([x], [2], n_init=0)
    with pytest.raises(UserError, match="unknown k-means backend"):
        check_backend("scipy")
    assert kmeans_torch([], []) == []


def test_faiss_backend_is_refused_when_missing(monkeypatch):
    monkeypatch.setattr(km.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        kmeans([np.zeros((4, 2), np.float32)], [2], backend="faiss")


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is optional and not installed")
def test_faiss_backend_close_to_sklearn():
    x, k = blobs(0)
    result = kmeans([x], [k], backend="faiss", n_init=4)[0]
    assert isinstance(result, KMeansResult) and result.centroids.shape == (k, x.shape[1])
    assert abs(result.objective[-1] - sklearn_objective(x, k, 4)) <= 0.01 * sklearn_objective(x, k, 4)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is optional and not installed")
def test_faiss_runs_on_the_stages_gpu_when_it_has_one(monkeypatch):
    """faiss-gpu mocked on faiss-cpu: the GPU index on the CUDA device the stage runs on (its
    number), the same k-means as on the CPU; --device cpu and a faiss without GPUs stay on it."""
    import faiss

    made = []

    class Config:
        device = -1

    def gpu_flat_l2(resources, dim, config):
        made.append((dim, config.device))
        return faiss.IndexFlatL2(dim)  # stands in for faiss.GpuIndexFlatL2

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", gpu_flat_l2, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    x, k = blobs(1)
    on_cpu = kmeans([x, x[:50]], [k, 2], backend="faiss", device="cpu")
    assert made == []
    on_gpu = kmeans([x, x[:50]], [k, 2], backend="faiss", device=torch.device("cuda", 2))
    assert made == [(x.shape[1], 2)]  # one index for every token, on cuda:2
    for a, b in zip(on_cpu, on_gpu):
        np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    kmeans([x], [k], backend="faiss", device="cuda:0")
    assert len(made) == 1
