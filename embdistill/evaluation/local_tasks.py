"""The tasks an evaluation runs, as mteb classification tasks.

* Hub tasks (indices 1-16): mteb's own task (``mteb.get_task``), run exactly as mteb runs it
  (its samples per label, experiments and seed), so that scores compare with the MTEB
  leaderboard. Its data comes from the Hugging Face hub; offline that is a one-line error.
* Local tasks (``bbc-news``, ``tweet-sentiment``, a user's file): an ``AbsTaskClassification``
  built from stage 0's ``eval.json`` (the ``train`` split fits mteb's logistic regression, the
  held-out ``test`` split scores it).

Samples per label for local tasks: mteb's default of 8 is noisy (a spread of
several points on 3-class sentiment), so :data:`DEFAULT_SAMPLES_PER_LABEL` is 32, with which
the spread across experiments is well under the gaps we compare (see the ``std`` columns of a
results table). Experiments: mteb's default, 10.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.task_metadata import TaskMetadata

from ..errors import UserError
from ..paths import Paths
from ..tasks import Task, load_mteb_task
from ..texts import read_eval_split

log = logging.getLogger("embdistill.evaluation")

DEFAULT_SAMPLES_PER_LABEL = 32


class LocalClassificationTask(AbsTaskClassification):
    """A classification task whose labelled splits are given, not downloaded. Labels are
    integers: mteb's metrics for binary tasks need numeric labels."""

    def __init__(self, splits: dict[str, tuple[list[str], list[int]]], seed: int):
        super().__init__(seed=seed)
        self.splits = splits

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = DatasetDict({
            name: Dataset.from_dict({"text": texts, "label": labels})
            for name, (texts, labels) in self.splits.items()
        })
        self.data_loaded = True


def local_task(task: Task, eval_split: dict, *, samples_per_label: int, n_experiments: int,
               seed: int) -> LocalClassificationTask:
    """An mteb task over eval.json's splits; UserError for unlabelled or single-class data."""
    train_texts, train_labels = _labelled(task, eval_split, "train")
    test_texts, test_labels = _labelled(task, eval_split, "test")
    classes = sorted(set(train_labels), key=str)
    if len(classes) < 2:
        raise UserError(f"task {task.name}: the train split has a single class ({classes[0]!r}); "
                        "classification needs at least 2")
    unseen = sorted({str(y) for y in test_labels} - {str(y) for y in classes})
    if unseen:
        log.warning("task %s: test labels %s never occur in train; those texts cannot be "
                    "classified correctly", task.name, unseen)
        classes += sorted({y for y in test_labels if str(y) in unseen}, key=str)
    index = {label: i for i, label in enumerate(classes)}  # in sorted order of the label text
    rare = {str(y): n for y, n in Counter(train_labels).items() if n < samples_per_label}
    if rare:
        log.info("task %s: classes with fewer than %d training texts use all they have: %s",
                 task.name, samples_per_label, rare)

    # The dataset revision in mteb's result file: a hash of the data, so results say which
    # eval.json they were computed on.
    revision = hashlib.sha256(json.dumps(eval_split, sort_keys=True).encode()).hexdigest()[:12]
    metadata = TaskMetadata(
        name=task.name,
        description=f"embdistill local classification task {task.name} ({task.source})",
        dataset={"path": f"embdistill/{task.slug}", "revision": revision},
        type="Classification",
        category="t2c",
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="accuracy",
        reference=None,
    )
    # mteb reads a task's metadata from its class: one subclass per task.
    task_class = type(f"Local_{task.slug}", (LocalClassificationTask,), {"metadata": metadata})
    mteb_task = task_class(
        {"train": (train_texts, [index[y] for y in train_labels]),
         "test": (test_texts, [index[y] for y in test_labels])},
        seed=seed,
    )
    mteb_task.samples_per_label = samples_per_label
    mteb_task.n_experiments = n_experiments
    mteb_task.load_data()
    return mteb_task


def _labelled(task: Task, eval_split: dict, split: str) -> tuple[list[str], list]:
    texts, labels = eval_split[split]["text"], eval_split[split]["label"]
    if labels is None or any(label is None for label in labels):
        raise UserError(f"task {task.name}: the {split} split has no labels; evaluation needs a "
                        "labelled task (for a file: --label-column when running scripts/00_texts.py)")
    if len(texts) != len(labels):
        raise UserError(f"task {task.name}: the {split} split has {len(texts)} texts but "
                        f"{len(labels)} labels")
    if not texts:
        raise UserError(f"task {task.name}: the {split} split is empty")
    return list(texts), list(labels)


def hub_task(task: Task, *, samples_per_label: int | None, n_experiments: int | None):
    """mteb's own task, its data loaded (UserError when the hub cannot be reached)."""
    mteb_task = load_mteb_task(task.mteb_name)
    if samples_per_label is not None:
        mteb_task.samples_per_label = samples_per_label
    if n_experiments is not None:
        mteb_task.n_experiments = n_experiments
    return mteb_task


@dataclass
class EvaluationTask:
    """A task ready to evaluate: the mteb task (data loaded) and the instruction our models
    format its texts with (eval.json's for local tasks, mteb's prompt for hub tasks)."""

    task: Task
    mteb_task: AbsTaskClassification
    instruction: str

    @property
    def name(self) -> str:
        """The mteb task name (the result file's name)."""
        return self.mteb_task.metadata.name

    def texts(self, limit: int) -> list[str]:
        """Up to ``limit`` texts of the first evaluation split (for throughput)."""
        split = self.mteb_task.metadata.eval_splits[0]
        dataset = self.mteb_task.dataset
        if split not in dataset:  # multilingual tasks nest splits under subsets
            dataset = next(iter(dataset.values()))
        return list(dataset[split][self.mteb_task.input_column_name][:limit])


def load_evaluation_task(task: Task, paths: Paths, *, samples_per_label: int | None,
                         n_experiments: int | None, seed: int) -> EvaluationTask:
    """The mteb task for ``task``: mteb's own for hub tasks, built from eval.json otherwise.

    ``samples_per_label`` / ``n_experiments`` None keep the defaults (hub: mteb's; local:
    :data:`DEFAULT_SAMPLES_PER_LABEL` and mteb's 10)."""
    if task.kind == "hub":
        mteb_task = hub_task(task, samples_per_label=samples_per_label, n_experiments=n_experiments)
        return EvaluationTask(task, mteb_task, task.instruction)
    eval_split = read_eval_split(paths)
    mteb_task = local_task(
        task,
        eval_split,
        samples_per_label=samples_per_label or DEFAULT_SAMPLES_PER_LABEL,
        n_experiments=n_experiments or AbsTaskClassification.n_experiments,
        seed=seed,
    )
    return EvaluationTask(task, mteb_task, eval_split.get("instruction") or task.instruction)
