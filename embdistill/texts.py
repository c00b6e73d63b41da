"""Stage 0 files: ``text_train/<task>/train.json`` and ``eval.json``.

``train.json`` is the original's format, a JSON list of ``"<instruction> !@#$%^&*()<text>"``,
so the original's downloaded files drop in. ``eval.json`` holds the labelled splits the
evaluation uses: ``train`` (the same texts as train.json, with labels, for mteb's logistic
regression) and ``test`` (held out: no test text is in train.json).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from .artifacts import load_json, save_json, write_manifest
from .errors import UserError
from .paths import Paths
from .tasks import Splits, Task
from .input_format import format_example, split_example

log = logging.getLogger("embdistill.texts")


def write_texts(task: Task, paths: Paths, splits: Splits, config: dict,
                sources: Mapping[str, str | Path] | None = None) -> dict:
    """Write train.json then eval.json (each atomically, each with a manifest recording
    ``config``, the fingerprints of ``sources``, the files read, and the source rows left
    out, by why); return counts."""
    examples = [format_example(task.instruction, text) for text in splits.train_texts]
    overlap = set(splits.train_texts) & set(splits.test_texts)
    if overlap:  # guarded by Task.load_splits; checked again where the files are written
        raise UserError(f"task {task.name}: {len(overlap)} texts in both train and test")
    classes = {str(label) for label in splits.train_labels or []}
    if len(classes) == 1:  # said now, not after gather, clustering and training
        log.warning("task %s: every training text has the label %r: it can be distilled on, but "
                    "not evaluated (the evaluation's classifier needs at least 2 classes)",
                    task.name, classes.pop())
    save_json(examples, paths.train_json)
    dropped = {"dropped_rows": splits.dropped}
    write_manifest(paths.train_json, stage="texts", config=config, inputs=sources, extra=dropped)
    eval_split = {
        "task": task.name,
        "instruction": task.instruction,
        "train": {"text": splits.train_texts, "label": splits.train_labels},
        "test": {"text": splits.test_texts, "label": splits.test_labels},
    }
    save_json(eval_split, paths.eval_json)
    write_manifest(paths.eval_json, stage="texts", config=config,
                   inputs={"train.json": paths.train_json, **(sources or {})}, extra=dropped)
    return {"train": len(examples), "test": len(splits.test_texts)}


def read_train_texts(paths: Paths) -> list[str]:
    """The examples of train.json (a task set's: each member's, in member order, each example
    with its own task's instruction); UserError when one is missing, malformed or empty."""
    return [example for examples in _train_examples(paths).values() for example in examples]


def _train_examples(paths: Paths) -> dict[str, list[str]]:
    """Each task's examples, by its folder name (a task set's members, see Paths.train_jsons)."""
    by_task = {}
    for task, train_json in paths.train_jsons.items():
        if not train_json.is_file():
            raise UserError(f"missing {train_json}: run scripts/00_texts.py --task {task} first")
        examples = load_json(train_json)
        if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
            raise UserError(f"{train_json}: expected a JSON list of strings")
        if not examples:
            raise UserError(f"{train_json}: the task has no training texts")
        by_task[task] = examples
    return by_task


def texts_inputs(paths: Paths) -> dict[str, Path]:
    """The training texts as a stage's recorded inputs: ``texts`` for one task (as before task
    sets), ``texts/<member>`` for each member of a set, so that a member's change is seen."""
    if not paths.members:
        return {"texts": paths.train_json}
    return {f"texts/{task}": train_json for task, train_json in paths.train_jsons.items()}


def task_instructions(paths: Paths) -> dict[str, str]:
    """Each member task's instruction, by its folder name (:func:`instruction_of` of its
    examples): a task set's student has one prompt per member task."""
    return {task: instruction_of(examples) for task, examples in _train_examples(paths).items()}


def read_eval_split(paths: Paths) -> dict:
    """eval.json as a dict (see module docstring); UserError when missing or malformed."""
    if not paths.eval_json.is_file():
        raise UserError(
            f"missing {paths.eval_json}: run scripts/00_texts.py --task {paths.task} first"
        )
    data = load_json(paths.eval_json)
    for split in ("train", "test"):
        part = data.get(split) if isinstance(data, dict) else None
        if not isinstance(part, dict) or "text" not in part or "label" not in part:
            raise UserError(f"{paths.eval_json}: missing the '{split}' split")
    return data


def texts_only(examples: list[str]) -> list[str]:
    """The text part of formatted examples (instruction and separator removed)."""
    return [split_example(example)[1] for example in examples]


def instruction_of(examples: list[str]) -> str:
    """The one instruction of a task's examples (what an exported student's prompt is)."""
    instructions = {split_example(example)[0] for example in examples}
    if len(instructions) > 1:
        raise UserError(f"the examples carry {len(instructions)} different instructions; an "
                        "exported student has one prompt per task: give each task its own train.json (several "
                        "tasks as one task set train one student with a prompt per task)")
    return instructions.pop()
