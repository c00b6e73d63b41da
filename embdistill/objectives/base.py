"""What stage 5's training objectives share: the run they are built in (:class:`StudentRun`)
and the contract each one fulfils (:class:`StudentObjective`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..artifacts import fingerprint
from ..distributed import DistEnv
from ..errors import UserError
from ..input_format import MaxLength
from ..paths import Paths
from ..teachers import Teacher, load_teacher
from ..training import LossOutput


@dataclass
class StudentRun:
    """What stage 5 knows of the run before an objective is built: its options, folders,
    training texts, the tokens per example (``length``: --max-length, the teacher's limit and
    the length used, computed once by the stage), the student's layers, this process's device
    and the process group."""

    args: argparse.Namespace
    paths: Paths
    tokenizer: Any  # embdistill.teachers.Tokenizer
    examples: list
    length: MaxLength
    layers: int
    device: torch.device
    env: DistEnv

    @property
    def max_length(self) -> int:
        """The tokens each example is cut to."""
        return self.length.used


class StudentObjective:
    """A stage 5 objective: the class declares, its instance trains.

    The class, before anything is loaded (a finished run is skipped on these alone):
    ``run_name`` (the default --run), ``needs`` (the inputs it reads: ``sense_dict``,
    ``targets``, ``teacher_states``...; run_train.sh computes ``targets`` first),
    ``summary_metrics`` (shown in the stage's last line besides the loss), :meth:`add_args`
    (its own options), :meth:`inputs` (its input files, checked), :meth:`identity` (what it adds
    to the run's identity) and :meth:`export_identity` (what it adds to the export's).

    :meth:`build` returns the instance: the Trainer's ``loss_fn`` (``__call__`` calls the
    model and the formula of :mod:`embdistill.losses`; on the held-out batches it is also the
    validation loss), ``teacher`` (whose first layers the student copies), ``collate`` (dataset
    indices -> a batch), ``data_metrics`` (for the export manifest), :meth:`export_extras`
    (``export_student``'s keywords) and :meth:`report` (a log line after training).
    """

    run_name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    summary_metrics: ClassVar[tuple[str, ...]] = ()

    teacher: Teacher | None
    collate: Callable[[list[int]], dict]
    data_metrics: dict[str, float] = {}

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        pass

    @classmethod
    def inputs(cls, run: StudentRun) -> dict[str, Path]:
        return {}

    @classmethod
    def identity(cls, run: StudentRun, inputs: dict[str, Path]) -> dict:
        return {key: fingerprint(path) for key, path in inputs.items()}

    @classmethod
    def export_identity(cls, run: StudentRun) -> dict:
        return {}

    @classmethod
    def build(cls, run: StudentRun, inputs: dict[str, Path]) -> "StudentObjective":
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def reference_teacher(self, run: StudentRun) -> Teacher:
        """The whole teacher, whose embeddings the validation compares the student's with."""
        return load_teacher(run.args.teacher, device="cpu", dtype=torch.float32)

    def release_teacher(self) -> None:
        """Called once the student is built: an objective whose loss does not run the teacher
        drops it here (its memory)."""

    def export_extras(self) -> dict:
        return {}

    def report(self) -> None:
        pass


def example_collator(tokenize: Callable, examples: list, max_length: int) -> Callable[[list[int]], dict]:
    """Dataset indices -> the tokenized batch of those examples, with their ``example_ids``."""
    def collate(ids: list[int]) -> dict[str, torch.Tensor]:
        return {**tokenize([examples[i] for i in ids], max_length=max_length), "example_ids": torch.tensor(ids)}
    return collate


def objective_named(registry: dict, name: str):
    """``registry[name]``, or a one-line error naming the known ones."""
    if name not in registry:
        raise UserError(f"--loss must be one of {', '.join(registry)}, got '{name}'")
    return registry[name]
