"""The multi-teacher student: an encoder, its pooling, and one head per teacher.

Head k is the paper's 3-layer MLP (width 1.4 x d_k, ReLU) from the student embedding s to
(mu_k(s), rho_k(s)); its last layer emits both halves, so the MSE baseline, which reads mu
only, trains the same parameters (rho's rows get zero gradients; DDP sees no unused
parameter). Only the encoder and pooling are exported; the heads exist for training.

Data: :class:`DistillationDataset` pairs each text with its teachers' vectors (aligned by
text id, see :mod:`embdistill.multiteacher.shards`) and :class:`Collator` tokenises a batch.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..losses.gaussian_nll import GaussianKernelNLLLoss
from ..losses.mse import masked_mse
from ..teachers import mean_pool
from ..training import LossOutput
from .shards import TeacherTargets

POOLING = ("cls", "mean")
LOSSES = ("nll", "mse")
HEAD_WIDTH_FACTOR = 1.4


class TeacherHead(nn.Module):
    """s (B, d_s) -> (mu, rho), each (B, d_k)."""

    def __init__(self, student_dim: int, teacher_dim: int, width_factor: float = HEAD_WIDTH_FACTOR):
        super().__init__()
        width = round(width_factor * teacher_dim)
        self.mlp = nn.Sequential(
            nn.Linear(student_dim, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 2 * teacher_dim),
        )

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, rho = self.mlp(embedding).chunk(2, dim=-1)
        return mu, rho


class MultiTeacherStudent(nn.Module):
    """``forward(input_ids, attention_mask) -> {teacher: (mu, rho)}``; ``embed`` gives s."""

    def __init__(self, encoder: nn.Module, teacher_dims: Mapping[str, int], pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLING:
            raise UserError(f"--pooling must be one of {', '.join(POOLING)}, got '{pooling}'")
        if not teacher_dims:
            raise UserError("a multi-teacher student needs at least one teacher")
        self.encoder = encoder
        self.pooling = pooling
        self.teachers = list(teacher_dims)
        student_dim = encoder.config.hidden_size
        # a list, not a ModuleDict: teacher names may hold dots (hub ids), which keys may not
        self.heads = nn.ModuleList(TeacherHead(student_dim, teacher_dims[name]) for name in self.teachers)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        return mean_pool(states, attention_mask).to(states.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        embedding = self.embed(input_ids, attention_mask)
        return {name: head(embedding) for name, head in zip(self.teachers, self.heads)}


def make_loss_fn(kind: str, normalize_by_dim: bool = False) -> Callable[[nn.Module, dict], LossOutput]:
    """The Trainer's ``loss_fn`` for ``nll`` (Gaussian kernel) or ``mse`` (mu only); the unit
    of the mean is the text."""
    if kind not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got '{kind}'")
    nll = GaussianKernelNLLLoss(normalize_by_dim)

    def loss_fn(model: nn.Module, batch: dict) -> LossOutput:
        predictions = model(batch["input_ids"], batch["attention_mask"])
        targets = batch["targets"]
        if kind == "nll":
            loss, metrics = nll(predictions, targets)
        else:
            loss, metrics = 0.0, {}
            for name, target in targets.items():
                mse, _ = masked_mse(predictions[name][0], target)
                loss = loss + mse
                metrics[f"mse/{name}"] = float(mse.detach())
        return LossOutput(loss, int(batch["input_ids"].shape[0]), metrics)

    return loss_fn


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


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn, dataset, collate_fn, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """The loss and metrics averaged over every text of ``dataset`` (eval mode, no gradients)."""
    from ..training import to_device

    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0
    for start in range(0, len(dataset), batch_size):
        batch = to_device(collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]), device)
        loss, count, metrics = loss_fn(model, batch)
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(value) * count
        total += count
    model.train(was_training)
    return {name: value / max(total, 1) for name, value in sums.items()}
