"""SKD's objective (``--loss sense``): the sense loss (:class:`~embdistill.losses.sense.SenseLoss`)
of the student's final token states against the sense targets stored by scripts/04_targets.py;
no teacher runs. Tokens of a single sense are left out (their share is logged and kept in the
export manifest); the export adds ``st-replace``, the student in replace mode."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from ..artifacts import fingerprint
from ..errors import UserError
from ..losses import SenseLoss
from ..senses.dictionary import SenseDictionary
from ..senses.packed import PackedSenses
from ..senses.targets import TargetCollator, TargetsConfig, load_targets, single_sense_count
from ..teachers import Teacher, load_teacher
from ..texts import texts_inputs
from ..training import LossOutput
from .base import StudentObjective, StudentRun

log = logging.getLogger("embdistill.objectives.sense")


class SenseDistillation(StudentObjective):
    """The sense loss of the student's states against ``batch["sense_targets"]`` (from
    :class:`~embdistill.senses.targets.TargetCollator`)."""

    run_name = "skd"
    needs = ("sense_dict", "targets")
    summary_metrics = ("sense_accuracy", "single_sense_share")

    def __init__(self, senses: PackedSenses, *, export_replace: bool = False):
        self.sense_loss = SenseLoss(senses)
        self.senses = senses
        self.export_replace = export_replace

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("--loss sense")
        group.add_argument("--sense-dict", default=None,
                           help="sense dictionary (default: sense_dict/<task>/<teacher>.kmeanspkl)")
        group.add_argument("--allow-teacher-mismatch", action="store_true",
                           help="accept a sense dictionary whose manifest names another teacher "
                           "(e.g. the same model under another name)")
        group.add_argument("--targets", default=None,
                           help="sense targets of scripts/04_targets.py (default: work/<task>/<teacher>/targets.npz)")
        group.add_argument("--allow-max-length-mismatch", action="store_true",
                           help="use a dictionary gathered with another --max-length")
        group.add_argument("--export-replace", action=argparse.BooleanOptionalAction, default=True,
                           help="sense loss: also export/st-replace, the student in replace mode")

    @classmethod
    def inputs(cls, run: StudentRun) -> dict[str, Path | SenseDictionary]:
        args, paths = run.args, run.paths
        sense_dict = paths.sense_dict if args.sense_dict is None else Path(args.sense_dict)
        targets = paths.targets if args.targets is None else Path(args.targets)
        if not sense_dict.is_file():
            raise UserError(f"missing sense dictionary {sense_dict}: run run_sep_cluster.sh "
                            f"{' '.join(args.task)} --teacher {args.teacher} first, or pass --sense-dict")
        # opened once (its manifest read once) and passed on to identity() and build()
        dictionary = SenseDictionary.open(sense_dict)
        dictionary.check_gathered_with(run.length, run.tokenizer.input_format.name, args.allow_max_length_mismatch)
        if not targets.is_file():
            raise UserError(f"missing sense targets {targets}: run scripts/04_targets.py "
                            f"--task {' '.join(args.task)} --teacher {args.teacher} first (run_train.sh does)")
        return {"targets": targets, "sense_dict": dictionary}

    @classmethod
    def identity(cls, run: StudentRun, inputs: dict[str, Path | SenseDictionary]) -> dict:
        # the dictionary's manifest too (the sense rule is not in the pickle): what replace mode binds to
        return {"targets": fingerprint(inputs["targets"]), "sense_dict": inputs["sense_dict"].identity}

    @classmethod
    def export_identity(cls, run: StudentRun) -> dict:
        return {"export_replace": run.args.export_replace}

    @classmethod
    def load_teacher(cls, run: StudentRun) -> Teacher:
        # the teacher only gives the student its first layers: those alone, on the CPU
        return load_teacher(run.args.teacher, device="cpu", dtype=torch.float32, layers=run.layers)

    @classmethod
    def build(cls, run: StudentRun, inputs: dict[str, Path | SenseDictionary]) -> "SenseDistillation":
        teacher = cls.load_teacher(run)
        dictionary = inputs["sense_dict"]
        senses = dictionary.packed(teacher.vocab_size, hidden_size=teacher.hidden_size,
                                   teacher=None if run.args.allow_teacher_mismatch else teacher.slug).to(run.device)
        config = TargetsConfig.of(run.tokenizer, run.max_length, dictionary)
        stored = load_targets(inputs["targets"], config, {"sense_dict": dictionary.path, **texts_inputs(run.paths)},
                              senses, len(run.examples))
        single, scored, share = single_sense_count(stored.token_ids, stored.targets, senses)
        log.info("sense dictionary %s: %d tokens, %d senses, sense rule %s; targets %s: %d of %d scored "
                 "tokens have a single sense and are left out of the loss", dictionary.path,
                 len(senses.sizes), len(senses.centroids), senses.rule, inputs["targets"], single, scored)
        objective = cls(senses, export_replace=run.args.export_replace)
        objective.teacher = teacher
        objective.collate = TargetCollator(run.tokenizer.tokenize, run.examples, stored, run.max_length)
        objective.data_metrics = {"single_sense_share": share}
        return objective

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.of_states(states, batch)

    def of_states(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The loss of the student's final token ``states`` of ``batch``."""
        loss, accuracy, count = self.sense_loss(states, batch["input_ids"], batch["sense_targets"])
        return LossOutput(loss, count, {"sense_accuracy": accuracy})

    def release_teacher(self) -> None:
        self.teacher = None  # the student has its own copy of the layers; the loss needs none

    def export_extras(self) -> dict:
        return {"senses": self.senses} if self.export_replace else {}
