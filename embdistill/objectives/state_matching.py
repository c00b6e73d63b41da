"""The MSE ablation (``--loss mse``): the student's final token states against the frozen
teacher's at the text tokens (:func:`~embdistill.losses.mse.masked_mse`), the teacher running
on the fly."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from ..cli import non_negative_float
from ..distributed import resolve_device
from ..losses import masked_mse
from ..students import default_teacher_device
from ..teachers import Teacher, load_teacher
from ..training import LossOutput
from .base import StudentObjective, StudentRun, example_collator

log = logging.getLogger("embdistill.objectives.state_matching")


class StateMatching(StudentObjective):
    """The teacher runs on the fly (storing its states for a whole corpus would take 8 KB per
    token for a 4096-d fp16 teacher), but an example's states are kept in memory (on the CPU)
    after its first batch while they fit in ``cache_bytes``, when ``batch`` carries
    ``example_ids`` (:func:`~.base.example_collator`): the teacher then runs only on a batch's
    examples that are not kept. The teacher is frozen and deterministic, so kept states are the
    ones it would compute again (up to float rounding: another batch pads differently)."""

    run_name = "mse"
    needs = ("teacher_states",)

    def __init__(self, teacher: Teacher, cache_bytes: int = 0):
        self.teacher = teacher
        self.cache_bytes = cache_bytes
        self.kept: dict[int, torch.Tensor] = {}  # example id -> its states at attended tokens
        self.kept_bytes = 0
        self.teacher_examples = 0  # examples the teacher ran on

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("--loss mse, pooled-mse, sense-pooled")
        group.add_argument("--teacher-device", default=None,
                           help="mse, pooled-mse, sense-pooled (the whole teacher): default and cuda: a spare GPU per process (cuda:LOCAL_RANK + LOCAL_WORLD_SIZE) "
                           "when the node has one, else the student's (default) or this process's GPU (cuda); "
                           "otherwise as --device")
        group.add_argument("--teacher-cache-gb", type=non_negative_float, default=4.0,
                           help="mse: keep each example's teacher states in memory after its first batch, up "
                           "to this many GB per machine (split between its processes); the teacher runs only "
                           "on examples not kept; 0: none")

    @classmethod
    def export_identity(cls, run: StudentRun) -> dict:
        return {"export_replace": False}  # recorded by every mse export: a finished one stays skipped

    @classmethod
    def build(cls, run: StudentRun, inputs: dict[str, Path]) -> "StateMatching":
        teacher = load_teacher(run.args.teacher, device=teacher_device(run.args.teacher_device, run))
        # the budget is the machine's: its processes share it
        objective = cls(teacher, cache_bytes=int(run.args.teacher_cache_gb * 2**30 / run.env.local_world_size))
        objective.collate = example_collator(run.tokenizer.tokenize, run.examples, run.max_length)
        objective.examples = len(run.examples)
        return objective

    def reference_teacher(self, run: StudentRun) -> Teacher:
        return self.teacher

    def report(self) -> None:
        log.info("teacher states kept in memory: %d of %d examples (%.0f MB); the teacher ran on %d examples",
                 len(self.kept), self.examples, self.kept_bytes / 2**20, self.teacher_examples)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss, count = masked_mse(states, self.teacher_states(batch).to(states.device), batch["embed_mask"])
        return LossOutput(loss, count, {})

    def teacher_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's (B, T, d) states of ``batch`` (zeros at the padding of kept rows)."""
        if not self.cache_bytes or "example_ids" not in batch:
            self.teacher_examples += len(batch["input_ids"])
            return self.teacher.token_states(batch)
        ids, attended = batch["example_ids"].tolist(), batch["attention_mask"].bool().cpu()
        missing = [row for row, i in enumerate(ids) if i not in self.kept]
        computed = None
        if missing:
            rows = torch.tensor(missing)
            computed = self.teacher.token_states({key: batch[key][rows] for key in ("input_ids", "attention_mask")}).cpu()
            self.teacher_examples += len(missing)
        reference = computed if computed is not None else self.kept[ids[0]]
        states = reference.new_zeros(*attended.shape, reference.shape[-1])
        for row, i in enumerate(ids):
            if i in self.kept:
                states[row, attended[row]] = self.kept[i]
        for position, row in enumerate(missing):
            states[row] = computed[position]
            example = computed[position, attended[row]]  # a copy (mask indexing), not a view
            if self.kept_bytes + example.nbytes <= self.cache_bytes:
                self.kept[ids[row]], self.kept_bytes = example, self.kept_bytes + example.nbytes
        return states


def teacher_device(arg: str | None, run: StudentRun) -> torch.device:
    """--teacher-device: None and ``cuda`` give the teacher a spare GPU of its own when the node
    has one per process; None falls back to the student's device, ``cuda`` to this process's
    GPU; anything else reads as --device does."""
    if arg is None:
        return default_teacher_device(run.device, run.env, run.env.local_world_size)
    if arg == "cuda":
        return default_teacher_device(resolve_device("cuda", run.env), run.env, run.env.local_world_size)
    return resolve_device(arg, run.env)
