"""The heads fitted before the student moves (``--head-warmup-steps``).

Heads start random; trained together with the student from the first step, they send the
student gradients that serve heads which do not fit yet (on main, the heads' R2 went from
-0.59 to -3.95 over the README demo's 48 steps while the student collapsed). So a fresh run
first fits the heads alone, on the student's embeddings computed once:

1. the embeddings (student in eval mode, no gradients) of the texts of ``steps`` global
   batches, at most the whole training set (a seeded sample), each rank encoding its share,
   then gathered so that every rank holds the same cache;
2. ``steps`` AdamW steps (constant ``lr``: ``--head-lr``) of the heads alone, on global
   batches drawn from the cache (seeded), with the run's loss on the scaled targets (read
   from the shards, not cached);
3. the heads broadcast from rank 0, so that every rank starts training with the same bits.

The student's parameters are not in this optimiser and get no gradient: they do not change.
A cache beats a frozen student inside the training loop because a step then costs no forward
pass of the encoder (BENCHMARKS.md, "Multi-teacher distillation", has the measurement).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..distributed import DistEnv
from ..objectives.teacher_heads import MultiTeacherObjective
from .model import Collator, DistillationDataset, MultiTeacherStudent, batches

log = logging.getLogger("embdistill.multiteacher.warmup")


@torch.no_grad()
def cached_embeddings(model: MultiTeacherStudent, dataset: DistillationDataset, collate_fn: Collator,
                      indices: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """(len(indices), d_s) float32 embeddings of the student in eval mode."""
    was_training = model.training
    model.eval()
    parts = [model.embed(batch["input_ids"], batch["attention_mask"]).float()
             for batch in batches(dataset, collate_fn, batch_size, device, indices)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, model.encoder.config.hidden_size, device=device)


def _gather_cache(indices: np.ndarray, embeddings: torch.Tensor, env: DistEnv) -> tuple[np.ndarray, torch.Tensor]:
    """Every rank's (indices, embeddings) on every rank, in the order of the indices (so that
    the cache does not depend on the number of ranks)."""
    if env.distributed:
        parts = [None] * env.world_size
        dist.all_gather_object(parts, (indices, embeddings.cpu().numpy()))
        indices = np.concatenate([p[0] for p in parts])
        embeddings = torch.cat([torch.from_numpy(p[1]) for p in parts]).to(embeddings.device)
    order = np.argsort(indices, kind="stable")
    return indices[order], embeddings[torch.from_numpy(order).to(embeddings.device)]


def fit_heads(model: MultiTeacherStudent, dataset: DistillationDataset, collate_fn: Collator,
              loss: MultiTeacherObjective, *, steps: int, batch_size: int, texts_per_step: int, lr: float,
              weight_decay: float, max_grad_norm: float, seed: int, device: torch.device,
              env: DistEnv) -> dict:
    """Fit ``model``'s heads for ``steps`` steps on cached embeddings (module docstring);
    ``batch_size``: texts per forward pass when caching; ``texts_per_step``: the global batch.
    Returns a summary (texts cached, steps, loss of the first and last step, seconds)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_cache = min(len(dataset), steps * texts_per_step)
    chosen = rng.permutation(len(dataset))[:n_cache]
    mine = chosen[env.rank :: env.world_size]
    indices, embeddings = _gather_cache(mine, cached_embeddings(model, dataset, collate_fn, mine,
                                                                batch_size, device), env)
    encoded_s = time.perf_counter() - started
    heads = model.heads
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < min(texts_per_step, len(indices)):
            order += rng.permutation(len(indices)).tolist()
        rows, order = order[:texts_per_step], order[texts_per_step:]
        targets = {name: torch.from_numpy(vectors).to(device)
                   for name, vectors in dataset.target_rows(indices[rows]).items()}
        value, _ = loss.of_predictions(model.predict(embeddings[rows]), model.scale_targets(targets))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if max_grad_norm:
            nn.utils.clip_grad_norm_(heads.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(float(value.detach()))
    for parameter in heads.parameters():
        parameter.grad = None
        if env.distributed:
            dist.broadcast(parameter.data, src=0)
    summary = {"texts": int(len(indices)), "steps": steps, "lr": lr,
               "first_loss": losses[0] if losses else math.nan,
               "last_loss": losses[-1] if losses else math.nan,
               "encode_s": round(encoded_s, 3), "seconds": round(time.perf_counter() - started, 3)}
    log.info("head warm-up: %d steps on cached embeddings of %d texts (%.1f s, %.1f s of it encoding): "
             "loss %.4g -> %.4g", steps, summary["texts"], summary["seconds"], encoded_s,
             summary["first_loss"], summary["last_loss"])
    return summary
