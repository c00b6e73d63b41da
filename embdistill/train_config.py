"""A training run's optimisation settings (:class:`TrainConfig`), the stages' options that set
them (:func:`add_training_args`) and what identifies a run (:func:`resolved_config`)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .artifacts import normalise_config
from .cli import non_negative_float, non_negative_int, positive_float, positive_int
from .errors import UserError
from .schedules import SCHEDULES


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the SKD paper's reference run (per rank)."""

    epochs: int = 5
    batch_size: int = 3  # per rank and micro-batch
    lr: float = 5e-6  # as used: scale it by the world size before, if wanted
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    schedule: str = "cosine"  # after the warm-up: "cosine" decay to 0 or "constant"
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float = 0.0  # 0: no clipping
    max_steps: int = 0  # 0: as many as the epochs give; else stop (and end the schedule) there
    save_every: int = 1000  # optimiser steps between checkpoints (and at each epoch end)
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    bf16: bool = True  # autocast on CUDA; ignored on the CPU
    dist_timeout_s: float = 1800.0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_steps", "max_grad_norm", "max_steps"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.dist_timeout_s <= 0:
            raise UserError(f"--dist-timeout must be positive, got {self.dist_timeout_s}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")

    @classmethod
    def from_args(cls, args, *, lr_scale: float = 1.0) -> "TrainConfig":
        """From the options of :func:`add_training_args` (``lr_scale``: e.g. the world size)."""
        return cls(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr * lr_scale,
            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, schedule=args.schedule,
            grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
            max_steps=args.max_steps, save_every=args.save_every, keep_last=args.keep_last,
            log_every=args.log_every, seed=args.seed, bf16=args.bf16,
            dist_timeout_s=args.dist_timeout,
        )


# Stage 5's optimisation recipes (scripts/05_train.py --recipe; an option given explicitly wins).
# "measured": what the recipe study measured on the demo's bbc-news and a user file of short texts
# (BENCHMARKS.md, "Recipe study"): with the checkpoint kept by validation, no exported student below
# its untrained start. "paper": the SKD paper's reference run, per process (lr x world size).
STUDENT_RECIPES = {
    "measured": TrainConfig(epochs=2, batch_size=16, lr=3e-4, warmup_steps=10),
    "paper": TrainConfig(),
}
DEFAULT_RECIPE = "measured"


def recipe_arg(parser, recipe: str) -> None:
    """The --recipe option (its value ``recipe`` is already known: :func:`recipe_of`)."""
    recipes = "; ".join(f"{name}: {c.epochs} epochs, batch {c.batch_size} per process, lr {c.lr:g} (x world "
                        f"size), {c.warmup_steps} warm-up steps, {c.schedule} decay"
                        for name, c in STUDENT_RECIPES.items())
    parser.add_argument("--recipe", choices=tuple(STUDENT_RECIPES), default=recipe,
                        help=f"the training loop's defaults ({recipes}); options given explicitly win")


def recipe_of(argv) -> str:
    """The --recipe in ``argv`` (None: the command line; default :data:`DEFAULT_RECIPE`), read before the stage's parser is
    built so that its defaults (and --help) are the recipe's; a bad value exits 2 naming it."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe", choices=tuple(STUDENT_RECIPES), default=DEFAULT_RECIPE)
    return parser.parse_known_args(argv)[0].recipe


def add_training_args(parser, defaults: TrainConfig, *, lr_help: str = "learning rate",
                      schedule_help: str = "") -> None:
    """The shared loop's options, with a method's reference run as their defaults
    (``schedule_help``: a method's note on --schedule, e.g. what its authors used)."""
    group = parser.add_argument_group("training loop")
    group.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="passes over the data")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                       help="examples per process and micro-batch")
    group.add_argument("--lr", type=non_negative_float, default=defaults.lr, help=lr_help)
    group.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay,
                       help="AdamW weight decay")
    group.add_argument("--warmup-steps", type=non_negative_int, default=defaults.warmup_steps,
                       help="steps of linear warm-up before the schedule")
    group.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                       help="learning rate after the warm-up: cosine decay to 0 at the last step, "
                       "or constant" + (f"; {schedule_help}" if schedule_help else ""))
    group.add_argument("--grad-accum", type=positive_int, default=defaults.grad_accum,
                       help="micro-batches per optimiser step (effective batch = batch x accum x processes)")
    group.add_argument("--max-grad-norm", type=non_negative_float, default=defaults.max_grad_norm,
                       help="gradient clipping (0: off)")
    group.add_argument("--max-steps", type=non_negative_int, default=defaults.max_steps,
                       help="stop after this many steps (0: epochs decide)")
    group.add_argument("--save-every", type=positive_int, default=defaults.save_every,
                       help="steps between checkpoints (and one at each epoch end)")
    group.add_argument("--keep-last", type=positive_int, default=defaults.keep_last, help="checkpoints kept")
    group.add_argument("--log-every", type=positive_int, default=defaults.log_every,
                       help="steps between metrics rows")
    group.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="continue from the latest checkpoint of this run")
    group.add_argument("--dist-timeout", type=positive_float, default=defaults.dist_timeout_s,
                       help="seconds a process waits for the others before giving up")
    group.add_argument("--no-bf16", dest="bf16", action="store_false",
                       help="no bf16 autocast on CUDA")


def resolved_config(run_config: Mapping[str, Any], config: TrainConfig, world_size: int) -> dict:
    """What identifies a training run: the caller's ``run_config`` (model, data, loss), the
    optimisation settings and the number of processes. The Trainer's checkpoints and config.json
    hold it; the stages' export manifests hold it too, so that a finished run is skipped only
    when all of it is unchanged."""
    return {"run": normalise_config(dict(run_config)),
            "train": dataclasses.asdict(config) | {"world_size": world_size}}

