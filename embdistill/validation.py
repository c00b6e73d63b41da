"""Validation on held-out texts and the kept checkpoint, for both training stages.

A run holds out a seeded slice of its texts (:func:`validation_split`), never trained on, and
scores the student on it at step 0 (the untrained start) and every ``val_every`` steps, by
criteria that need no labels (:class:`Validation`):

* ``similarity``: Spearman's rank correlation between the student's and the teacher's pairwise
  cosine similarities of the pooled sentence embeddings of the validation texts (the mean over
  teachers, for several);
* ``cka``: linear CKA between the student's and the teacher's pooled embeddings;
* ``loss``: the objective's own loss on the validation texts (and its metrics, such as the
  sense accuracy).

:class:`CheckpointSelection` keeps the weights of the best validated step by ``--keep-best``
(step 0 included; a later step must score strictly better to replace it; ``last``: the last
step), as ``checkpoints/best.pt`` (written atomically) and in every checkpoint, so that a
resumed run keeps its best so far; the stage exports those weights and writes
``selection.json`` beside the export: the kept step, the criterion and every validated step's
scores. :class:`ValidationHook` is the Trainer's ``on_step_end`` part that does both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_open, save_json
from .errors import UserError

log = logging.getLogger("embdistill.validation")

CRITERIA = ("similarity", "cka", "loss", "last")
# Chosen by measurement (bench/study_skd.py, BENCHMARKS.md "The validation criterion"): across
# the validated steps of 3 seeds x several objectives, similarity ranked the checkpoints as the
# mteb mean over four families does (Spearman 0.94 on bbc-news) and needs no labels and no
# objective of its own; the loss did about as well but differs per objective; cka preferred the
# untrained student in every run.
DEFAULT_CRITERION = "similarity"
HIGHER_IS_BETTER = {"similarity": True, "cka": True, "loss": False}
MIN_VALIDATION_TEXTS = 3  # a rank correlation of pairwise similarities needs 3 pairs
STRUCTURE_TEXTS = 1024  # similarity and cka read the first N validation texts (N^2 / 2 pairs)
BEST_NAME = "best.pt"


def add_selection_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-best", choices=CRITERIA, default=DEFAULT_CRITERION,
                        help="export the validated step (step 0, the untrained student, included) that "
                        "scores best on the held-out texts: similarity (rank correlation of the "
                        "student's and teacher's pairwise cosines), cka (linear CKA with the teacher's "
                        "embeddings), loss (the objective's validation loss), or the last step "
                        f"(default {DEFAULT_CRITERION}: it ranks checkpoints as mteb does, BENCHMARKS.md)")


def validation_split(n_texts: int, fraction: float, seed: int, *, count: int | None = None,
                     cap: int | None = None, min_texts: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of ``n_texts`` texts: disjoint, seeded (a numpy permutation,
    no torch RNG), both sorted. ``count`` texts held out when given, else ``round(n_texts x
    fraction)``, at most ``cap``; a fraction that gives fewer than ``min_texts`` holds out none."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {fraction}")
    if count is not None:
        if count and not MIN_VALIDATION_TEXTS <= count < n_texts:
            raise UserError(f"--val-texts {count} of {n_texts} texts: hold out 0 (none) or from "
                            f"{MIN_VALIDATION_TEXTS} to {n_texts - 1}")
        n_val = count
    else:
        n_val = int(round(n_texts * fraction)) if fraction else 0
        n_val = min(n_val, cap) if cap else n_val
        if n_val < min_texts:
            n_val = 0
        elif fraction and not 1 <= n_val < n_texts:
            raise UserError(f"--val-fraction {fraction} of {n_texts} texts leaves no training or validation text")
    order = np.random.default_rng(seed).permutation(n_texts)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def indices_digest(indices: Iterable[int]) -> str:
    """A short digest of held-out indices (with the texts' fingerprint, it names the texts)."""
    return hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()[:16]


def _pair_cosines(embedding: np.ndarray) -> np.ndarray:
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    return (unit @ unit.T)[np.triu_indices(len(unit), k=1)]


def similarity_agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Spearman's rank correlation of the two models' pairwise cosines over the same texts
    (nan when either is constant, e.g. a collapsed student)."""
    from scipy.stats import spearmanr

    student_cosines, teacher_cosines = _pair_cosines(student), _pair_cosines(teacher)
    if np.ptp(student_cosines) == 0 or np.ptp(teacher_cosines) == 0:
        return float("nan")
    return float(spearmanr(student_cosines, teacher_cosines).statistic)


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of two (n, d) embeddings of the same texts (Kornblith et al. 2019)."""
    a = a.astype(np.float64) - a.mean(0)
    b = b.astype(np.float64) - b.mean(0)
    denominator = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    return float(np.linalg.norm(b.T @ a) ** 2 / denominator) if denominator > 0 else float("nan")


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn, batches: Iterable) -> dict[str, float]:
    """The loss and metrics averaged over every unit of ``batches`` (collated, on the model's
    device; eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0
    for batch in batches:
        loss, count, metrics = loss_fn(model, batch)
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value) * count
        total += count
    model.train(was_training)
    return {name: value / max(total, 1) for name, value in sums.items()}


class Validation:
    """``validation(model) -> {similarity, cka, loss, ...}`` on the held-out texts.

    ``embed(model)``: the student's pooled embeddings of the validation texts, as its export
    embeds them; ``teachers``: each teacher's embeddings of the same texts (computed once);
    ``loss(model)``: the objective's metrics on them (:func:`evaluate_loss`), or None; it runs
    after ``embed``, on the same weights (so it may reuse the embedding pass's forward)."""

    def __init__(self, embed: Callable[[nn.Module], torch.Tensor], teachers: Mapping[str, np.ndarray],
                 loss: Callable[[nn.Module], dict[str, float]] | None = None):
        self.embed = embed
        self.teachers = {name: np.asarray(vectors, dtype=np.float32)[:STRUCTURE_TEXTS]
                         for name, vectors in teachers.items()}
        self.loss = loss

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            student = self.embed(model).float().cpu().numpy()[:STRUCTURE_TEXTS]
        model.train(was_training)
        scores = {"similarity": float(np.mean([similarity_agreement(student, t) for t in self.teachers.values()])),
                  "cka": float(np.mean([linear_cka(student, t) for t in self.teachers.values()]))}
        if self.loss is not None:
            scores.update(self.loss(model))
        return scores


def _better(criterion: str, score: float, best: float) -> bool:
    if math.isnan(score):
        return False
    if math.isnan(best):
        return True
    return score > best if HIGHER_IS_BETTER[criterion] else score < best


class CheckpointSelection:
    """The validated steps' scores and the weights of the best by ``criterion`` (module
    docstring); ``best_path``: where the kept weights are copied (None: on other ranks)."""

    def __init__(self, criterion: str, best_path: Path | None):
        if criterion not in CRITERIA:
            raise UserError(f"--keep-best must be one of {', '.join(CRITERIA)}, got '{criterion}'")
        self.criterion = criterion
        self.best_path = best_path
        self.history: list[dict[str, float]] = []  # {"step": ..., **scores}, in step order
        self.kept_step: int | None = None
        self.kept_model: dict[str, torch.Tensor] | None = None  # None for "last": the final weights

    def consider(self, step: int, scores: Mapping[str, float], model: nn.Module) -> None:
        self.history.append({"step": step, **scores})
        if self.criterion == "last":
            self.kept_step = step
            return
        if self.criterion not in scores:
            raise UserError(f"--keep-best {self.criterion}: the validation measures no {self.criterion} "
                            f"(it measures {', '.join(scores)})")
        if self.kept_step is None or _better(self.criterion, scores[self.criterion], self.kept_score):
            self.kept_step = step
            self.kept_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._save_best()

    @property
    def kept_score(self) -> float:
        return next(row[self.criterion] for row in self.history if row["step"] == self.kept_step) \
            if self.criterion != "last" else float("nan")

    def _save_best(self) -> None:
        if self.best_path is None or self.kept_model is None:
            return
        self.best_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.best_path, "wb") as fh:
            torch.save({"model": self.kept_model, "step": self.kept_step, "criterion": self.criterion}, fh)

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "history": self.history, "kept_step": self.kept_step,
                "kept_model": self.kept_model}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The state of a checkpoint (best.pt may hold a later step, from before a kill)."""
        self.history = [dict(row) for row in state["history"]]
        self.kept_step, self.kept_model = state["kept_step"], state["kept_model"]
        self._save_best()

    def restore_kept(self, model: nn.Module, last_step: int) -> int:
        """Load the kept weights into ``model`` (which holds ``last_step``'s); return the kept
        step. Warns in one line when no later step beat the untrained start."""
        if self.kept_model is not None and self.kept_step != last_step:
            model.load_state_dict(self.kept_model)
        kept = last_step if self.kept_step is None else self.kept_step
        if self.criterion != "last" and kept == 0 and last_step > 0:
            later = [row[self.criterion] for row in self.history if row["step"] > 0]
            log.warning("training never beat the untrained student on the held-out texts by %s (step 0: %.4f, "
                        "best later step: %.4f): exporting the untrained student (step 0)", self.criterion,
                        self.kept_score, (max if HIGHER_IS_BETTER[self.criterion] else min)(later))
        elif self.history:
            log.info("kept step %d of %d by %s (%s)", kept, last_step, self.criterion,
                     "the last step" if self.criterion == "last" else f"score {self.kept_score:.4f}")
        return kept

    def summary(self, kept_step: int, last_step: int, validation: Mapping[str, Any]) -> dict[str, Any]:
        """selection.json (and the export manifest's ``selection``)."""
        return {"criterion": self.criterion, "kept_step": kept_step, "last_step": last_step,
                "kept_score": None if self.criterion == "last" else self.kept_score,
                "validation": dict(validation), "scores": self.history}


def write_selection(summary: Mapping[str, Any], run_dir: Path) -> None:
    save_json(dict(summary), Path(run_dir) / "selection.json")


class ValidationHook:
    """The validation part of a Trainer's ``on_step_end``: at step 0, every ``val_every``
    steps (0: none between) and at the last step, score the model and let ``selection``
    consider it; returns the scores as ``val/<name>`` metrics."""

    def __init__(self, validation: Callable[[nn.Module], dict[str, float]], selection: CheckpointSelection,
                 val_every: int):
        self.validation = validation
        self.selection = selection
        self.val_every = val_every

    def __call__(self, model: nn.Module, step: int, finished: bool) -> dict[str, float]:
        if not (step == 0 or finished or (self.val_every and step % self.val_every == 0)):
            return {}
        scores = self.validation(model)
        self.selection.consider(step, scores, model)
        return {f"val/{name}": value for name, value in scores.items()}
