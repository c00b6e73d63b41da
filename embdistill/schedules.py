"""The learning-rate schedules of :class:`embdistill.training.Trainer`: a factor of the base
rate per optimiser step (``torch.optim.lr_scheduler.LambdaLR``), named by ``TrainConfig.schedule``."""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "constant")


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def constant_with_warmup(warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear 0 -> 1 over ``warmup_steps``, then 1."""

    def factor(step: int) -> float:
        return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0

    return factor


def lr_schedule(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The LR factor of ``TrainConfig.schedule``."""
    if schedule == "constant":
        return constant_with_warmup(warmup_steps)
    return cosine_with_warmup(warmup_steps, total_steps)

