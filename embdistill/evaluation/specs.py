"""Model specs: the models an evaluation compares, as named on the command line.

Model spec syntax: ``[LABEL=]KIND:TARGET``, one per model; LABEL names the table row and the
result folder (letters, digits, ``. _ + -``), with a default derived from the target.

=============================  ==================================================================
``teacher:MODEL``              a teacher in plain mode: MODEL is anything ``load_teacher`` loads
                               (``minilm``, ``llm2vec-llama3-8b``, a hub id, a folder). The first
                               teacher row is the reference of "relative to teacher".
``student:DIR``                an exported student in plain mode (``runs/<task>/<run>/export/hf``)
``untrained:MODEL@N``          the first N layers of MODEL, untrained: the student SKD starts from
``replace:MODEL@DICT``         MODEL (student or teacher) in replace mode with the sense dictionary
                               DICT (``sense_dict/<task>/<teacher>.kmeanspkl``); the teacher in
                               replace mode is the dictionary's ceiling; an exported student's
                               DICT must be the one it learned (:func:`check_replace_dictionaries`);
                               ``replace:MODEL@N@DICT``: the untrained first N layers of MODEL in
                               replace mode
``st:MODEL``                   a sentence-transformers model (folder or hub id), used as it is
                               but cut to the run's ``--max-length``; ``st:MODEL@own-length``:
                               at its own length (model2vec's: its tokenizer's cut, 512 as
                               model2vec saves it; the whole text without one)
=============================  ==================================================================

MODEL and DICT may contain ``{task}``, replaced by each task's folder name: one row whose model
differs per task, e.g. ``skd=student:runs/{task}/skd/export/hf`` (the student distilled on the
task it is evaluated on, as the paper's per-task SKD students are). A task without runs of its
own (``lee-sts``, a hub task scored but not trained on) takes another task's: ``--student-of
lee-sts=bbc-news`` fills ``{task}`` with ``bbc-news`` when a row is scored on ``lee-sts``
(:func:`parse_student_of`).

Our kinds (all but ``st``) embed ``format_example(task instruction, text)`` and mean-pool the
text tokens (:meth:`embdistill.teachers.Teacher.encode`); ``st`` models embed the plain text
through their own pipeline (pooling, normalisation), as published. Every row reads at most the
run's ``--max-length`` tokens, cut to the model's own limit (the table's "tokens" column), so
that rows compare on the same input; ``@own-length`` is the one exception, to be asked for.
Default labels: ``teacher:minilm`` -> ``minilm``; ``student:runs/bbc-news/skd/export/hf`` ->
``skd`` (the run); ``untrained:minilm@3`` -> ``minilm-first3``; ``replace:X@D`` -> X's label
plus ``-replace``; ``st:X`` -> X's name plus ``-st``; ``st:X@own-length`` -> X's name plus
``-st-own-length``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import UserError
from ..paths import EXPORT_FOLDER, HF_FOLDER, ST_FOLDER, looks_like_path, slug
from ..tasks import Task, resolve_task

KINDS = ("teacher", "student", "untrained", "replace", "st")
TASK_PLACEHOLDER = "{task}"
OWN_LENGTH = "@own-length"  # st:MODEL@own-length: the model's own max_seq_length, not the run's
_LABEL = re.compile(r"[A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class ModelSpec:
    """One model of an evaluation (see the module docstring for the syntax)."""

    label: str
    kind: str
    target: str  # the model: a load_teacher name or path, or a sentence-transformers id/path
    sense_dict: str | None = None  # replace mode: the dictionary file
    n_layers: int | None = None  # untrained: how many of the target's first layers
    own_length: bool = False  # st: read as many tokens as the model itself does (not --max-length)

    @property
    def text(self) -> str:
        """The spec as written on the command line (with its label)."""
        layers = f"@{self.n_layers}" if self.n_layers else ""
        suffix = {"replace": f"{layers}@{self.sense_dict}", "untrained": layers,
                  "st": OWN_LENGTH if self.own_length else ""}.get(self.kind, "")
        return f"{self.label}={self.kind}:{self.target}{suffix}"

    @property
    def per_task(self) -> bool:
        """The model differs per task (``{task}`` in its target or dictionary)."""
        return TASK_PLACEHOLDER in self.target or TASK_PLACEHOLDER in (self.sense_dict or "")

    def for_task(self, task_slug: str) -> "ModelSpec":
        """This spec with ``{task}`` replaced by ``task_slug`` (itself when it has none)."""
        if not self.per_task:
            return self
        sense_dict = self.sense_dict.replace(TASK_PLACEHOLDER, task_slug) if self.sense_dict else None
        return replace(self, target=self.target.replace(TASK_PLACEHOLDER, task_slug),
                       sense_dict=sense_dict)

    def for_tasks(self, task_slugs: Sequence[str]) -> set["ModelSpec"]:
        """This spec for each task (itself when no tasks are given)."""
        return {self.for_task(task_slug) for task_slug in task_slugs} or {self}

    def local_inputs(self, task_slugs: Sequence[str]) -> dict[str, str]:
        """The files behind this model that exist locally (fingerprinted by the manifest)."""
        files = {}
        for task_slug in task_slugs if self.per_task else [""]:
            spec, key = self.for_task(task_slug), f"{self.label}{'.' + task_slug if task_slug else ''}"
            files.update({f"{key}.model": spec.target, f"{key}.sense_dict": spec.sense_dict})
        return {key: path for key, path in files.items() if path and Path(path).exists()}


def parse_model_spec(text: str) -> ModelSpec:
    """``[LABEL=]KIND:TARGET`` -> :class:`ModelSpec`; UserError on bad syntax."""
    label, sep, body = text.partition("=")
    if not sep or ":" in label:  # no label given ('=' may only start a label before the kind)
        label, body = "", text
    kind, sep, target = body.partition(":")
    if not sep or kind not in KINDS or not target:
        raise UserError(f"bad model spec '{text}': expected [LABEL=]KIND:TARGET with KIND one of "
                        f"{', '.join(KINDS)} (e.g. teacher:minilm, replace:runs/t/skd/export/hf@d.kmeanspkl)")
    sense_dict = n_layers = None
    own_length = kind == "st" and target.endswith(OWN_LENGTH)
    if own_length:
        target = target.removesuffix(OWN_LENGTH)
        if not target:
            raise UserError(f"bad model spec '{text}': st:MODEL{OWN_LENGTH} needs a MODEL")
    if kind in ("replace", "untrained"):
        target, at, extra = target.rpartition("@")
        if not at or not target or not extra:
            what = "DICT" if kind == "replace" else "N"
            raise UserError(f"bad model spec '{text}': {kind} needs {kind}:MODEL@{what}")
        if kind == "replace":
            sense_dict = extra
            head, at, layers = target.rpartition("@")  # replace:MODEL@N@DICT: the untrained first N layers
            if at and layers.isdigit():
                target, n_layers = head, int(layers)
        else:
            n_layers = extra
        if n_layers is not None and (not str(n_layers).isdigit() or int(n_layers) < 1 or not target):
            raise UserError(f"bad model spec '{text}': the layer count after '@' must be a positive integer")
        n_layers = int(n_layers) if n_layers is not None else None
    label = label or default_label(kind, target, n_layers, own_length)
    if not _LABEL.fullmatch(label):
        raise UserError(f"bad model label '{label}': use letters, digits and . _ + -")
    return ModelSpec(label=label, kind=kind, target=target, sense_dict=sense_dict, n_layers=n_layers,
                     own_length=own_length)


def default_label(kind: str, target: str, n_layers: int | None = None, own_length: bool = False) -> str:
    parts = Path(target.rstrip("/")).parts
    if len(parts) > 2 and parts[-2] == EXPORT_FOLDER and parts[-1] in (HF_FOLDER, ST_FOLDER):
        name = parts[-3]  # runs/<task>/<run>/export/{hf,st}: the run's name
    else:
        name = slug(target)
    first = f"-first{n_layers}" if n_layers else ""
    return {"untrained": f"{name}{first}", "replace": f"{name}{first}-replace",
            "st": f"{name}-st{'-own-length' if own_length else ''}"}.get(kind, name)


def parse_model_specs(texts: Sequence[str], task_slugs: Sequence[str] = ()) -> list[ModelSpec]:
    """Parse specs and check the cheap things before any model loads: unique labels, local
    paths that exist, dictionaries that exist (for every task, where ``{task}`` is used)."""
    specs = [parse_model_spec(text) for text in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.label in seen:
            raise UserError(f"two models are labelled '{spec.label}': name them, e.g. "
                            f"other={spec.kind}:{spec.target}")
        seen.add(spec.label)
        if spec.per_task and not task_slugs:
            raise UserError(f"model {spec.label}: '{TASK_PLACEHOLDER}' needs the tasks to fill it")
        for resolved in spec.for_tasks(task_slugs):
            if looks_like_path(resolved.target) and not Path(resolved.target).expanduser().exists():
                hint = (" (a task without runs of its own takes another task's: --student-of TASK=SOURCE)"
                        if spec.per_task else "")
                raise UserError(f"model {spec.label}: no such folder {resolved.target}{hint}")
            if resolved.sense_dict is not None and not Path(resolved.sense_dict).is_file():
                raise UserError(f"model {spec.label}: no sense dictionary at {resolved.sense_dict}")
    return specs


def open_dictionaries(specs: Sequence[ModelSpec], task_slugs: Sequence[str] = ()) -> dict:
    """Each replace-mode dictionary of ``specs`` (for every task), opened once, by its path as
    the spec names it: the checks, the run's identity and the encoders read this one manifest
    (:class:`~embdistill.senses.dictionary.SenseDictionary`)."""
    from ..senses.dictionary import SenseDictionary

    return {resolved.sense_dict: SenseDictionary.open(resolved.sense_dict)
            for spec in specs if spec.kind == "replace" for resolved in spec.for_tasks(task_slugs)}


def check_replace_dictionaries(specs: Sequence[ModelSpec], dictionaries: Mapping, task_slugs: Sequence[str] = (), *,
                               allow_teacher_mismatch: bool = False,
                               allow_dictionary_mismatch: bool = False) -> None:
    """UserError when a replace-mode model's dictionary is not the model's own:

    * built with another teacher than the model's (unless ``allow_teacher_mismatch``): the
      teacher an exported student was distilled from (its export manifest), else the model
      itself (``replace:minilm@...``: the teacher in replace mode);
    * for an exported student trained with the sense loss, not the dictionary it learned
      (unless ``allow_dictionary_mismatch``): its export manifest records that dictionary's
      identity, sense rule included (:meth:`~embdistill.senses.dictionary.SenseDictionary.check_learned`),
      so a dictionary re-clustered since with another rule or k rule is refused.

    ``dictionaries``: :func:`open_dictionaries` of the same specs and tasks."""
    for spec in specs:
        if spec.kind != "replace":
            continue
        for resolved in spec.for_tasks(task_slugs):
            dictionary = dictionaries[resolved.sense_dict]
            manifest = export_manifest(resolved.target)
            teacher = (manifest.get("extra") or {}).get("teacher") if manifest else slug(resolved.target)
            if teacher is not None and not allow_teacher_mismatch:
                dictionary.check_teacher(teacher)
            learned = ((manifest or {}).get("config") or {}).get("run") or {}
            if "sense_dict" in learned and not spec.n_layers and not allow_dictionary_mismatch:
                dictionary.check_learned(learned["sense_dict"], learned.get("sense_rule"), f"student {resolved.target}")


def export_manifest(target: str) -> dict | None:
    """The export manifest of a student export target (``runs/<task>/<run>/export/hf``): what
    it was trained from (``config.run``) and its teacher's slug (``extra.teacher``, absent in
    exports that predate that record); None for any other target."""
    folder = Path(target).expanduser()
    return read_manifest(folder.parent) if folder.name in (HF_FOLDER, ST_FOLDER) else None


def parse_student_of(pairs: Sequence[str], tasks: Sequence[Task]) -> dict[str, str]:
    """``--student-of TASK=SOURCE`` pairs -> {TASK's slug: SOURCE's slug}: a per-task spec
    (``{task}``) scored on TASK, one of the evaluated ``tasks`` (by name or folder name), uses
    the model and dictionary of SOURCE, another of them or any task stages 0-5 run on
    (``lee-sts=bbc-news``: the bbc-news students score the Lee corpus). UserError for a
    malformed pair, a TASK that is not evaluated or named twice, an unknown SOURCE, or a SOURCE
    that itself takes another's."""
    evaluated = {key: task.slug for task in tasks for key in (task.name, task.slug)}
    student_of: dict[str, str] = {}
    for pair in pairs:
        task, sep, source = (part.strip() for part in pair.partition("="))
        if not sep or not task or not source:
            raise UserError(f"bad --student-of '{pair}': expected TASK=SOURCE, e.g. lee-sts=bbc-news")
        if task not in evaluated:
            raise UserError(f"--student-of {pair}: {task} is not one of the evaluated tasks "
                            f"({', '.join(t.name for t in tasks)})")
        if evaluated[task] in student_of:
            raise UserError(f"--student-of names the task {task} twice")
        try:
            source_slug = evaluated.get(source) or resolve_task(source).slug
        except UserError as error:
            raise UserError(f"--student-of {pair}: {error}") from None
        if source_slug == evaluated[task]:
            raise UserError(f"--student-of {pair}: a task uses its own models without it")
        student_of[evaluated[task]] = source_slug
    chained = sorted(set(student_of) & set(student_of.values()))
    if chained:
        raise UserError(f"--student-of: {chained[0]} takes another task's models, so it cannot lend its own")
    return student_of


def model_task_slugs(tasks: Sequence[Task], student_of: dict[str, str]) -> list[str]:
    """The task folders per-task specs are filled with over ``tasks`` (each task's own, or the
    one ``student_of`` names), without repeats."""
    return list(dict.fromkeys(student_of.get(task.slug, task.slug) for task in tasks))
