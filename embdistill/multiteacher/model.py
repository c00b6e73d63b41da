"""The multi-teacher student: an encoder, its pooling, one head per teacher, and the targets'
scale.

Heads (one per teacher k, from the student embedding s of size d_s):

* ``kernel`` (the Gaussian kernel's, used by both losses by default): ``head_layers`` hidden
  ReLU layers of width int(1.4 d_k), then one layer giving (mu_k(s), rho_k(s)). The authors'
  kernel (``DistributedFriendlyKernel.py``, ff_layers=3) has 3 hidden layers. The MSE
  baseline reads mu only (rho's rows then get zero gradients; DDP sees no unused parameter).
* ``regression`` (the authors' separate MSE head, ``train_snowflakes.py``): d_s -> d_s -> d_s
  -> d_k, giving mu only.

Targets: for the NLL, each teacher's vectors are standardised per dimension by default,
t' = (t - mean) / std, with the mean and std of the training texts
(:func:`~embdistill.multiteacher.shards.target_statistics`), held as buffers, so that
checkpoints carry them. Raw unit-norm teacher vectors (per-dimension std about 0.05) sit far
below the kernel's scale (lambda in [1/e, e]): the loss is then almost all log-lambda, which
does not depend on the text, and the student collapses. The MSE baseline keeps the authors' raw
targets by default: standardised, its squared error would weigh each dimension by 1/std^2, a
loss the authors did not compare with (``standardizes_targets`` of :mod:`embdistill.objectives`). Without statistics the buffers are
0 and 1 (raw targets).

Only the encoder and pooling are exported; the heads exist for training.

Data: :class:`DistillationDataset` pairs each text with its teachers' vectors (aligned by
text id, see :mod:`embdistill.multiteacher.shards`) and :class:`Collator` tokenises a batch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..teachers import mean_pool
from ..training import LossOutput, to_device
from .shards import TeacherTargets

POOLING = ("cls", "mean")
HEADS = ("kernel", "regression")
HEAD_WIDTH_FACTOR = 1.4
KERNEL_HEAD_LAYERS = 3  # the authors' ff_layers


def targets_kind(standardize: bool) -> str:
    """How a run's targets are named in its log lines and table labels."""
    return "standardised" if standardize else "raw"


class TeacherHead(nn.Module):
    """s (B, d_s) -> (mu, rho), each (B, d_k); rho is None for a head without it."""

    def __init__(self, student_dim: int, teacher_dim: int, *, hidden_layers: int, width: int,
                 with_rho: bool):
        super().__init__()
        layers, size = [], student_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, (2 if with_rho else 1) * teacher_dim))
        self.mlp = nn.Sequential(*layers)
        self.with_rho = with_rho

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.mlp(embedding)
        if not self.with_rho:
            return out, None
        mu, rho = out.chunk(2, dim=-1)
        return mu, rho


def kernel_head(student_dim: int, teacher_dim: int, hidden_layers: int) -> TeacherHead:
    """The Gaussian kernel's head: ``hidden_layers`` ReLU layers of int(1.4 d_k), then (mu, rho)."""
    return TeacherHead(student_dim, teacher_dim, hidden_layers=hidden_layers,
                       width=int(HEAD_WIDTH_FACTOR * teacher_dim), with_rho=True)


def regression_head(student_dim: int, teacher_dim: int) -> TeacherHead:
    """The authors' MSE head: d_s -> d_s -> d_s -> d_k (two hidden ReLU layers of d_s)."""
    return TeacherHead(student_dim, teacher_dim, hidden_layers=2, width=student_dim, with_rho=False)


class TargetScaler(nn.Module):
    """t -> (t - mean) / std for one teacher (buffers: saved and restored with the model)."""

    def __init__(self, dim: int, stats: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        mean, std = stats if stats is not None else (np.zeros(dim), np.ones(dim))
        if np.shape(mean) != (dim,) or np.shape(std) != (dim,):
            raise UserError(f"target statistics of shape {np.shape(mean)}, {np.shape(std)} for a {dim}-d teacher")
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(std), dtype=torch.float32))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return (target - self.mean) / self.std

    def inverse(self, scaled: torch.Tensor) -> torch.Tensor:
        """A prediction on the heads' scale, back in the teacher's space."""
        return scaled * self.std + self.mean


class MultiTeacherStudent(nn.Module):
    """``forward(input_ids, attention_mask) -> {teacher: (mu, rho)}``; ``embed`` gives s,
    ``predict`` maps s to the heads' outputs, ``scale_targets`` puts teacher vectors on the
    heads' scale."""

    def __init__(self, encoder: nn.Module, teacher_dims: Mapping[str, int], pooling: str = "cls", *,
                 heads: str = "kernel", head_layers: int = KERNEL_HEAD_LAYERS,
                 target_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        if pooling not in POOLING:
            raise UserError(f"--pooling must be one of {', '.join(POOLING)}, got '{pooling}'")
        if heads not in HEADS:
            raise UserError(f"heads must be one of {', '.join(HEADS)}, got '{heads}'")
        if head_layers < 1:
            raise UserError(f"--head-layers must be at least 1, got {head_layers}")
        if not teacher_dims:
            raise UserError("a multi-teacher student needs at least one teacher")
        self.encoder = encoder
        self.pooling = pooling
        self.teachers = list(teacher_dims)
        student_dim = encoder.config.hidden_size
        # lists, not ModuleDicts: teacher names may hold dots (hub ids), which keys may not
        self.heads = nn.ModuleList(
            kernel_head(student_dim, teacher_dims[name], head_layers) if heads == "kernel"
            else regression_head(student_dim, teacher_dims[name]) for name in self.teachers)
        self.scalers = nn.ModuleList(TargetScaler(teacher_dims[name], (target_stats or {}).get(name))
                                     for name in self.teachers)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        return mean_pool(states, attention_mask).to(states.dtype)

    def predict(self, embedding: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return {name: head(embedding) for name, head in zip(self.teachers, self.heads)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return self.predict(self.embed(input_ids, attention_mask))

    def scale_targets(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: scaler(targets[name]) for name, scaler in zip(self.teachers, self.scalers)}

    def unscale_predictions(self, predictions: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The heads' mu (per teacher) in the teachers' own space."""
        return {name: scaler.inverse(predictions[name]) for name, scaler in zip(self.teachers, self.scalers)}

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        """AdamW groups: the encoder at ``lr``, the heads at ``head_lr``."""
        return [{"params": list(self.encoder.parameters()), "lr": lr},
                {"params": list(self.heads.parameters()), "lr": head_lr}]


def unwrap(model: nn.Module) -> MultiTeacherStudent:
    """The student inside a DDP wrapper (or the student itself)."""
    return getattr(model, "module", model)


class DistillationDataset:
    """Item i: (text i, [its vector from each teacher]); every teacher has a row per text."""

    def __init__(self, texts: Sequence[str], targets: Sequence[TeacherTargets]):
        for target in targets:
            if len(target) != len(texts):
                raise UserError(f"teacher {target.name} has {len(target)} vectors for {len(texts)} texts")
        self.texts = list(texts)
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        return self.texts[i], [target[i] for target in self.targets]

    def items(self, indices: Sequence[int]) -> list:
        return [self[i] for i in indices]

    def target_rows(self, indices) -> dict[str, np.ndarray]:
        """{teacher: (len(indices), d) float32}: the teachers' vectors of ``indices``."""
        return {target.name: target.rows(indices) for target in self.targets}


class Collator:
    """A list of dataset items -> ``input_ids``, ``attention_mask``, ``targets`` {teacher: (B, d)}."""

    def __init__(self, tokenizer, teacher_names: Sequence[str], max_length: int):
        self.tokenizer = tokenizer
        self.teacher_names = list(teacher_names)
        self.max_length = max_length

    def __call__(self, items: list) -> dict:
        texts = [text for text, _ in items]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        targets = {name: torch.stack([torch.from_numpy(vectors[k]) for _, vectors in items])
                   for k, name in enumerate(self.teacher_names)}
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "targets": targets}


def batches(dataset, collate_fn, batch_size: int, device: torch.device, indices: Sequence[int] | None = None):
    """Collated batches of ``dataset`` (or of its ``indices``), in order, on ``device``."""
    indices = range(len(dataset)) if indices is None else indices
    for start in range(0, len(indices), batch_size):
        yield to_device(collate_fn(dataset.items(indices[start : start + batch_size])), device)
