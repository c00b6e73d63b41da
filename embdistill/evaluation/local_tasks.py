"""The tasks an evaluation runs, as mteb tasks of any task type.

* Hub tasks (indices 1-16, or any other MTEB task name, e.g. ``STSBenchmark``,
  ``TwentyNewsgroupsClustering.v2``): mteb's own task (``mteb.get_task``), run exactly as mteb
  runs it (its samples, experiments and seed), so that scores compare with the MTEB
  leaderboard. Its data comes from the Hugging Face hub; offline that is a one-line error.
* Local tasks (``bbc-news``, ``tweet-sentiment``, a user's file), built from stage 0's
  ``eval.json``; labelled data gives two task types (:data:`LOCAL_TASK_TYPES`):

  - ``Classification`` (mteb task name: the task's name): an ``AbsTaskClassification``; the
    ``train`` split fits mteb's logistic regression, the held-out ``test`` split scores it;
  - ``Clustering`` (``<name>-clustering``): an ``AbsTaskClustering`` over the held-out ``test``
    split alone (nothing is fitted on train): k-means with k = the number of labels, on
    ``n_experiments`` bootstrap samples the size of the split, scored by the V-measure. Unlike
    mteb's default (4 % of a corpus that is usually far larger), every test text is embedded;
  - ``Retrieval`` (``bbc-news-retrieval``, bbc-news only: its articles have headlines):
    headline -> body over the held-out articles, nDCG@10 (:mod:`.offline_tasks`).
* ``lee-sts``: an evaluation-only task of type ``STS`` from the Lee corpus (:mod:`.offline_tasks`),
  which needs no stage 0.

Task types (``--task-types``, :func:`select_task_types`): mteb's names. None given: hub tasks
and ``lee-sts`` run as their own type, local tasks as ``Classification`` (the stage's
historical output).
Given: a hub task runs only if its type is listed (others are left out, with a log line), a
local task once per listed type it offers; a name mteb does not know, or a selection that
leaves nothing, is a one-line error.

Samples per label for local classification: mteb's default of 8 is noisy (a spread of
several points on 3-class sentiment), so :data:`DEFAULT_SAMPLES_PER_LABEL` is 32, with which
the spread across experiments is well under the gaps we compare (see the ``std`` columns of a
results table). Experiments (logistic-regression fits, or k-means runs): mteb's default, 10.

mteb's clustering draws its samples from the task's ``rng_state``, which advances with every
evaluation: the second model of a run would be scored on other samples than the first.
:meth:`EvaluationTask.reset_random_state` restores it before each (model, task) evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.task_metadata import TaskMetadata, TaskType

from ..errors import UserError
from ..paths import Paths
from ..tasks import Task, load_mteb_task, resolve_task
from ..texts import read_eval_split
from .offline_tasks import (LEE_STS, RETRIEVAL_TASKS, HeadlineRetrievalTask, headline_retrieval_task,
                            lee_files, lee_sts_task, lee_task)

log = logging.getLogger("embdistill.evaluation")

DEFAULT_SAMPLES_PER_LABEL = 32
TASK_TYPES: tuple[str, ...] = typing.get_args(TaskType)  # every type mteb knows
LOCAL_TASK_TYPES = ("Classification", "Clustering")  # what a labelled eval.json offers
DEFAULT_LOCAL_TASK_TYPES = ("Classification",)


class _GivenSplits:
    """An mteb task whose splits are given, not downloaded: per split (texts, labels), put in
    the task type's own input and label columns. Labels are integers: mteb's metrics for binary
    tasks need numeric labels."""

    def __init__(self, splits: dict[str, tuple[list[str], list[int]]], seed: int):
        super().__init__(seed=seed)
        self.splits = splits

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = DatasetDict({
            name: Dataset.from_dict({self.input_column_name: texts, self.label_column_name: labels})
            for name, (texts, labels) in self.splits.items()
        })
        self.data_loaded = True


class LocalClassificationTask(_GivenSplits, AbsTaskClassification):
    """Classification: a ``train`` and a ``test`` split."""


class LocalClusteringTask(_GivenSplits, AbsTaskClustering):
    """Clustering: one ``test`` split, every text embedded (see the module docstring)."""

    max_fraction_of_documents_to_embed = None


def check_task_types(task_types: Sequence[str]) -> None:
    """UserError for a name that is not an mteb task type."""
    unknown = [t for t in task_types if t not in TASK_TYPES]
    if unknown:
        raise UserError(f"unknown task type {', '.join(map(repr, unknown))}: choose mteb's "
                        f"(e.g. {', '.join(LOCAL_TASK_TYPES)}, STS, PairClassification, Retrieval)")


def resolve_evaluation_task(arg: str, text_column: str = "text", label_column: str = "label") -> Task:
    """``resolve_task``, and beyond its tasks ``lee-sts`` and any task mteb knows by name
    (evaluation only: the other stages need a classification task's texts and labels)."""
    import mteb

    try:
        return resolve_task(arg, text_column, label_column)
    except UserError as error:
        if arg.strip() == LEE_STS:
            return lee_task()
        try:
            name = mteb.get_task(arg.strip()).metadata.name
        except (KeyError, ValueError):
            raise error from None
        return Task(name=name, slug=name, kind="hub", source=f"mteb:{name}", mteb_name=name)


def task_types_of(task: Task) -> tuple[str, ...]:
    """The task types a task offers: a hub task its own (from mteb's metadata, no download)."""
    if task.kind == "hub":
        import mteb

        return (mteb.get_task(task.mteb_name).metadata.type,)
    if task.kind == "evaluation":
        return ("STS",)
    if task.kind == "local" and task.name in RETRIEVAL_TASKS:
        return LOCAL_TASK_TYPES + ("Retrieval",)
    return LOCAL_TASK_TYPES


def select_task_types(tasks: Sequence[Task], task_types: Sequence[str] | None) -> list[tuple[Task, str]]:
    """(task, type) pairs to evaluate, in the order of ``tasks`` then ``task_types`` (see the
    module docstring); UserError for an unknown type or when nothing is left."""
    if task_types is not None:
        check_task_types(task_types)
    selected = []
    for task in tasks:
        offered = task_types_of(task)
        if task_types is None:
            wanted = offered if task.kind in ("hub", "evaluation") else DEFAULT_LOCAL_TASK_TYPES
        else:
            wanted = [t for t in task_types if t in offered]
            if not wanted:
                log.info("task %s (%s) is not of the types %s: left out", task.name, "/".join(offered),
                         ", ".join(task_types))
        selected += [(task, task_type) for task_type in wanted]
    if not selected:
        raise UserError(f"none of the tasks ({', '.join(t.name for t in tasks)}) is of the task types "
                        f"{', '.join(task_types)}; local tasks offer {', '.join(LOCAL_TASK_TYPES)}, "
                        f"{' and '.join(RETRIEVAL_TASKS)} also Retrieval, {LEE_STS} is STS")
    return selected


def local_task(task: Task, eval_split: dict, task_type: str = "Classification", *,
               samples_per_label: int, n_experiments: int, seed: int) -> AbsTask:
    """An mteb task of ``task_type`` over eval.json's splits; UserError for unlabelled or
    single-class data, or a type the task does not offer."""
    if task_type == "Classification":
        return _classification_task(task, eval_split, samples_per_label=samples_per_label,
                                    n_experiments=n_experiments, seed=seed)
    if task_type == "Clustering":
        return _clustering_task(task, eval_split, n_experiments=n_experiments, seed=seed)
    if task_type == "Retrieval" and task_type in task_types_of(task):
        return headline_retrieval_task(task, eval_split, seed=seed)
    raise UserError(f"task {task.name}: offers the types {', '.join(task_types_of(task))}, not {task_type}")


def _classification_task(task: Task, eval_split: dict, *, samples_per_label: int, n_experiments: int,
                         seed: int) -> LocalClassificationTask:
    train_texts, train_labels = _labelled(task, eval_split, "train")
    test_texts, test_labels = _labelled(task, eval_split, "test")
    classes = _classes(task, train_labels, "train")
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
    mteb_task = task_class(LocalClassificationTask, task, eval_split, name=task.name,
                           type="Classification", category="t2c", main_score="accuracy")(
        {"train": (train_texts, [index[y] for y in train_labels]),
         "test": (test_texts, [index[y] for y in test_labels])},
        seed=seed,
    )
    mteb_task.samples_per_label = samples_per_label
    mteb_task.n_experiments = n_experiments
    mteb_task.load_data()
    return mteb_task


def _clustering_task(task: Task, eval_split: dict, *, n_experiments: int, seed: int) -> LocalClusteringTask:
    texts, labels = _labelled(task, eval_split, "test")
    index = {label: i for i, label in enumerate(_classes(task, labels, "test"))}
    mteb_task = task_class(LocalClusteringTask, task, eval_split, name=f"{task.name}-clustering",
                           type="Clustering", category="t2c", main_score="v_measure")(
        {"test": (texts, [index[y] for y in labels])}, seed=seed)
    mteb_task.n_clusters = n_experiments  # mteb's name for its number of k-means experiments
    mteb_task.max_documents_per_cluster = len(texts)  # each bootstrap sample: the split's size
    mteb_task.load_data()
    return mteb_task


def _classes(task: Task, labels: list, split: str) -> list:
    classes = sorted(set(labels), key=str)
    if len(classes) < 2:
        raise UserError(f"task {task.name}: the {split} split has a single class ({classes[0]!r}); "
                        "classification and clustering need at least 2")
    return classes


def task_class(base: type, task: Task, data: dict, *, name: str, **metadata) -> type:
    """A subclass of ``base`` with the task's metadata: mteb reads a task's metadata from its
    class. The dataset revision in mteb's result file is a hash of ``data`` (what the task is
    built from: eval.json for local tasks), so results say which data they were computed on."""
    revision = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return type(f"Local_{task.slug}_{metadata['type']}", (base,), {"metadata": TaskMetadata(
        name=name,
        description=f"embdistill local {metadata['type'].lower()} task {task.name} ({task.source})",
        dataset={"path": f"embdistill/{task.slug}", "revision": revision},
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        reference=None,
        **metadata,
    )})


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


def set_experiments(mteb_task: AbsTask, *, samples_per_label: int | None, n_experiments: int | None) -> None:
    """Apply --samples-per-label (classification) and --n-experiments (classification: its
    fits; clustering: its k-means runs) where the task type has them; None keeps the task's."""
    if isinstance(mteb_task, AbsTaskClassification):
        if samples_per_label is not None:
            mteb_task.samples_per_label = samples_per_label
        if n_experiments is not None:
            mteb_task.n_experiments = n_experiments
    elif isinstance(mteb_task, AbsTaskClustering) and n_experiments is not None:
        mteb_task.n_clusters = n_experiments


def protocol(mteb_task: AbsTask) -> dict:
    """What the table records of how a task is scored: its type, main score, splits and, for
    the types that repeat an experiment, how (headline retrieval: its queries, and the held-out
    articles left out as near duplicates)."""
    metadata = mteb_task.metadata
    record = {"type": metadata.type, "main_score": metadata.main_score,
              "eval_splits": list(metadata.eval_splits)}
    if isinstance(mteb_task, AbsTaskClassification):
        record |= {"samples_per_label": mteb_task.samples_per_label, "n_experiments": mteb_task.n_experiments}
    elif isinstance(mteb_task, AbsTaskClustering):
        record |= {"n_experiments": mteb_task.n_clusters}
    elif isinstance(mteb_task, HeadlineRetrievalTask):  # what the near duplicates cost
        record |= {"queries": len(mteb_task.data.headlines), "left_out": mteb_task.data.left_out}
    return record


def hub_task(task: Task, *, samples_per_label: int | None, n_experiments: int | None) -> AbsTask:
    """mteb's own task, its data loaded (UserError when the hub cannot be reached)."""
    mteb_task = load_mteb_task(task.mteb_name)
    set_experiments(mteb_task, samples_per_label=samples_per_label, n_experiments=n_experiments)
    return mteb_task


@dataclass
class EvaluationTask:
    """A task ready to evaluate: the mteb task (data loaded) and the instruction our models
    format its texts with (eval.json's for local tasks, mteb's prompt for hub tasks)."""

    task: Task
    mteb_task: AbsTask
    instruction: str

    @property
    def name(self) -> str:
        """The mteb task name (the result file's name)."""
        return self.mteb_task.metadata.name

    def reset_random_state(self) -> None:
        """The task's random generators as its seed made them (``AbsTask.__init__``), so that
        every model of a run sees the same samples (see the module docstring)."""
        seed = self.mteb_task.seed
        self.mteb_task.rng_state, self.mteb_task.np_rng = random.Random(seed), np.random.default_rng(seed)

    def texts(self, limit: int) -> list[str]:
        """Up to ``limit`` texts of the first evaluation split's first text column (for throughput)."""
        split = self.mteb_task.metadata.eval_splits[0]
        dataset = self.mteb_task.dataset
        if split not in dataset:  # multilingual tasks nest splits under subsets
            dataset = next(iter(dataset.values()))
        data = dataset[split]
        if isinstance(data, dict) and "corpus" in data:  # retrieval: its documents
            return list(data["corpus"]["text"][:limit])
        column = next(iter(self.mteb_task._get_content_columns()))  # e.g. text, sentences, sentence1
        return list(data[column][:limit])


def task_inputs(task: Task, base: Path) -> dict[str, Path]:
    """The local files an evaluation of ``task`` reads (for the table's manifest): a local
    task's eval.json, lee-sts's files; none for a hub task."""
    if task.kind == "hub":
        return {}
    if task.kind == "evaluation":
        return {f"{task.slug}.{role}": path for role, path in lee_files().items()}
    return {f"{task.slug}.eval.json": Paths(base, task.slug).eval_json}


def load_evaluation_task(task: Task, task_type: str, paths: Paths, *, samples_per_label: int | None,
                         n_experiments: int | None, seed: int) -> EvaluationTask:
    """The mteb task for ``task`` as ``task_type``: mteb's own for hub tasks (its own type),
    built from eval.json otherwise.

    ``samples_per_label`` / ``n_experiments`` None keep the defaults (hub: mteb's; local:
    :data:`DEFAULT_SAMPLES_PER_LABEL` and mteb's 10)."""
    if task.kind == "hub":
        mteb_task = hub_task(task, samples_per_label=samples_per_label, n_experiments=n_experiments)
        return EvaluationTask(task, mteb_task, task.instruction)
    if task.kind == "evaluation":  # lee-sts: the instruction of its task type, as a hub STS task's
        mteb_task = lee_sts_task(task, seed=seed)
        return EvaluationTask(task, mteb_task, type(mteb_task).abstask_prompt)
    eval_split = read_eval_split(paths)
    mteb_task = local_task(
        task,
        eval_split,
        task_type,
        samples_per_label=samples_per_label or DEFAULT_SAMPLES_PER_LABEL,
        n_experiments=n_experiments or AbsTaskClassification.n_experiments,
        seed=seed,
    )
    return EvaluationTask(task, mteb_task, eval_split.get("instruction") or task.instruction)
