"""Stage 0 files: ``text_train/<task>/train.json`` and ``eval.json``.

``train.json`` is the original's format, a JSON list of ``"<instruction> !@#$%^&*()<text>"``,
so the original's downloaded files drop in. ``eval.json`` holds the labelled splits the
evaluation uses: ``train`` (the same texts as train.json, with labels, for mteb's logistic
regression) and ``test`` (held out: no test text is in train.json).

Every rank of every later stage reads train.json, so it is read lazily (:class:`JsonTextList`):
one streaming pass indexes where each text lies (16 bytes a text), and a text is read from the
file when it is asked for. A rank holds the texts it is working on, not the task's (a 1M-text
file of 500-character texts is about 1 GB as Python strings, in every rank).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

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


# One token of a JSON list of strings, after optional whitespace: punctuation or a whole string
# (UTF-8 continuation bytes are never '"' or '\\', so bytes are scanned as they are).
_LIST_TOKEN = re.compile(rb'\s*(?:([\[\],])|("[^"\\]*(?:\\.[^"\\]*)*"))', re.DOTALL)
_READ_BLOCK = 1 << 20
_ITER_TEXTS = 256  # texts read per pread batch while iterating


class JsonTextList(Sequence[str]):
    """A file holding a JSON list of strings (any layout: one per line, as save_json writes it,
    or all on one line, as the original's files are), read lazily. Building it checks the list's
    syntax in one streaming pass and keeps each string's byte span; indexing reads and decodes
    that string (a slice, the strings of the slice, as a list). The file must not change while it
    is read: a read that finds it changed is a UserError."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._starts, self._ends = array("q"), array("q")
        stat = self.path.stat()
        self._stamp = (stat.st_size, stat.st_mtime_ns)
        with open(self.path, "rb") as fh:
            self._index(fh)

    def _index(self, fh) -> None:
        buf, base, pos, eof = b"", 0, 0, False
        expect = b"["  # what may come next: b"s" a string, b"[" b"," b"]" punctuation, b"" the end
        while True:
            match = _LIST_TOKEN.match(buf, pos)
            if match is None:  # the buffer ends in whitespace or inside a string, or the file is wrong
                rest = buf[pos:].lstrip()
                if (rest and not rest.startswith(b'"')) or (eof and (rest or expect)):
                    raise self._malformed(base + len(buf) - len(rest))
                if eof:
                    return
                block = fh.read(max(_READ_BLOCK, len(buf) - pos))  # doubles for a long string
                buf, base, pos, eof = buf[pos:] + block, base + pos, 0, not block
                continue
            punct, string = match.groups()
            kind = b"s" if string is not None else punct
            if kind not in expect:
                raise self._malformed(base + match.start(1 if punct else 2))
            if string is not None:
                self._starts.append(base + match.start(2))
                self._ends.append(base + match.end(2))
            expect = {b"[": b"s]", b"s": b",]", b",": b"s", b"]": b""}[kind]
            pos = match.end()

    def _malformed(self, offset: int) -> UserError:
        return UserError(f"{self.path}: expected a JSON list of strings (malformed at byte {offset})")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._read(range(len(self))[key])
        index = operator.index(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path}: text {index} of {len(self)}")
        return self._read([index % len(self)])[0]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), _ITER_TEXTS):
            yield from self._read(range(start, min(start + _ITER_TEXTS, len(self))))

    def _read(self, indices: Sequence[int]) -> list[str]:
        with open(self.path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if (stat.st_size, stat.st_mtime_ns) != self._stamp:
                raise UserError(f"{self.path}: changed while it was being read; rerun this stage")
            fd, texts = fh.fileno(), []
            for i in indices:
                raw = os.pread(fd, self._ends[i] - self._starts[i], self._starts[i])
                try:
                    texts.append(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise UserError(f"{self.path}: string {i} is not valid JSON ({exc})") from None
            return texts


class ConcatenatedTexts(Sequence[str]):
    """Several text sequences read as one (a task set's members, in member order), each still lazy."""

    def __init__(self, parts: Sequence[Sequence[str]]):
        self._parts = list(parts)
        self._offsets = [0]
        for part in self._parts:
            self._offsets.append(self._offsets[-1] + len(part))

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(len(self))[key]]
        index = operator.index(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"text {index} of {len(self)}")
        index %= len(self)
        part = next(p for p in range(len(self._parts)) if index < self._offsets[p + 1])
        return self._parts[part][index - self._offsets[part]]

    def __iter__(self) -> Iterator[str]:
        for part in self._parts:
            yield from part


def read_train_texts(paths: Paths) -> Sequence[str]:
    """The examples of train.json, read lazily (:class:`JsonTextList`); a task set's: each
    member's, in member order, each example with its own task's instruction. UserError when one
    is missing, malformed or empty."""
    members = list(_train_examples(paths).values())
    return members[0] if len(members) == 1 else ConcatenatedTexts(members)


def _train_examples(paths: Paths) -> dict[str, JsonTextList]:
    """Each task's examples, by its folder name (a task set's members, see Paths.train_jsons)."""
    by_task = {}
    for task, train_json in paths.train_jsons.items():
        if not train_json.is_file():
            raise UserError(f"missing {train_json}: run scripts/00_texts.py --task {task} first")
        examples = JsonTextList(train_json)
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


def texts_only(examples: Iterable[str]) -> list[str]:
    """The text part of formatted examples (instruction and separator removed)."""
    return [split_example(example)[1] for example in examples]


def instruction_of(examples: Iterable[str]) -> str:
    """The one instruction of a task's examples (what an exported student's prompt is)."""
    instructions = {split_example(example)[0] for example in examples}
    if len(instructions) > 1:
        raise UserError(f"the examples carry {len(instructions)} different instructions; an "
                        "exported student has one prompt per task: give each task its own train.json (several "
                        "tasks as one task set train one student with a prompt per task)")
    return instructions.pop()
