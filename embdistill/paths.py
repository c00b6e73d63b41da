"""Every output path, derived in one place from (base directory, task, teacher, run).

Layout under the base directory (``--base-dir``, else ``$EMBDISTILL_HOME``, else the
current directory)::

    text_train/<task>/train.json, eval.json        stage 0: training texts, held-out split
                                                   (a task set, e.g. bbc-news+tweet-sentiment or
                                                   all, has none: its members' are read)
    work/<task>/<teacher>/counts.pkl               stage 1: token counts
    work/<task>/<teacher>/gather/rank<R>.pkl       stage 2: sampled token states, per rank
    work/<task>/<teacher>/combined.pkl             a0_generate_combinepkl.py
    sense_dict/<task>/<teacher>.kmeanspkl          stage 3: the sense dictionary
    work/<task>/<teacher>/targets.npz              stage 4: the sense targets of the training texts
    runs/<task>/<run>/                             stage 5: checkpoints/, export/, metrics
    runs/<task>/<run>/export/st-int8/              stage 8: the student with int8 weights (ONNX)
    results/<run>/                                 stage 6: mteb json, table.md/json, png (all tasks)
    baselines/model2vec/<teacher>/                 stage 7: model2vec's static embeddings of the teacher
    embeddings/<corpus>/corpus.json                multi-teacher stage 10: the corpus's texts
    embeddings/<corpus>/<teacher>/                 multi-teacher stage 10: teacher embedding shards
    runs/<corpus>/<run>/initial/, export/          multi-teacher stage 11: the student before and after
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# An export folder (a run's export/ and, multi-teacher, initial/) holds these
# (embdistill.students.export_student, scripts/08_quantize.py):
HF_FOLDER = "hf"  # the transformers model folder, with its tokenizer
ST_FOLDER = "st"  # the SentenceTransformer folder
ST_REPLACE_FOLDER = "st-replace"  # SKD: the SentenceTransformer in replace mode
ST_INT8_FOLDER = "st-int8"  # stage 8: int8 weights (ONNX)
ST_ONNX_FOLDER = "st-onnx"  # stage 8 --weight-type none: the fp32 ONNX graph
EXPORT_FOLDER = "export"
INITIAL_FOLDER = "initial"


def base_dir(arg: str | os.PathLike | None = None) -> Path:
    """The base directory: the flag, else $EMBDISTILL_HOME, else the current directory."""
    return Path(arg or os.environ.get("EMBDISTILL_HOME") or ".").resolve()


def slug(name: str) -> str:
    """A file-system-safe name: hub ids keep their owner (``a/b`` -> ``a__b``)."""
    name = str(name).rstrip("/")
    if os.sep in name and os.path.exists(name):  # a local folder or file: its own name
        name = Path(name).stem if Path(name).is_file() else Path(name).name
    name = name.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


@dataclass(frozen=True)
class Paths:
    """Paths of one (task, teacher) pipeline; ``run`` names a training run."""

    base: Path
    task: str  # task slug, from embdistill.tasks.Task.slug
    teacher: str = "minilm"  # teacher slug
    run: str = "skd"
    # a task set's members (embdistill.tasks.TaskSet.member_slugs): its texts are theirs, its
    # gathered states theirs combined; empty for one task
    members: tuple[str, ...] = ()

    def member(self, task: str) -> "Paths":
        """The paths of one member task (same base and teacher)."""
        return Paths(self.base, task, self.teacher, self.run)

    @property
    def train_jsons(self) -> dict[str, Path]:
        """Each training-text file this pipeline reads, by its task's folder name: a task set's
        are its members'."""
        return {task: self.member(task).train_json for task in self.members or (self.task,)}

    @property
    def text_dir(self) -> Path:
        return self.base / "text_train" / self.task

    @property
    def train_json(self) -> Path:
        return self.text_dir / "train.json"

    @property
    def eval_json(self) -> Path:
        return self.text_dir / "eval.json"

    @property
    def work_dir(self) -> Path:
        return self.base / "work" / self.task / self.teacher

    @property
    def counts(self) -> Path:
        return self.work_dir / "counts.pkl"

    @property
    def gather_dir(self) -> Path:
        return self.work_dir / "gather"

    def gather_rank(self, rank: int) -> Path:
        return self.gather_dir / f"rank{rank}.pkl"

    @property
    def combined(self) -> Path:
        return self.work_dir / "combined.pkl"

    @property
    def sense_dict(self) -> Path:
        return self.base / "sense_dict" / self.task / f"{self.teacher}.kmeanspkl"

    @property
    def targets(self) -> Path:
        """SKD's sense targets of this task's training texts (scripts/04_targets.py)."""
        return self.work_dir / "targets.npz"

    @property
    def run_dir(self) -> Path:
        return self.base / "runs" / self.task / self.run

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / EXPORT_FOLDER

    @property
    def export_st(self) -> Path:
        return self.export_dir / ST_FOLDER

    @property
    def initial_dir(self) -> Path:
        """Multi-teacher: the student before distillation, exported like the trained one."""
        return self.run_dir / INITIAL_FOLDER

    @staticmethod
    def initial_of_checkpoint(checkpoint: Path) -> Path:
        """Multi-teacher: the ``initial/`` of the run whose ``checkpoints/`` holds ``checkpoint``."""
        return Path(checkpoint).parent.parent / INITIAL_FOLDER

    @property
    def corpus_file(self) -> Path:
        """Multi-teacher: the corpus's texts (``task`` is the corpus name)."""
        return self.base / "embeddings" / self.task / "corpus.json"

    def embeddings_dir(self, teacher: str) -> Path:
        """Multi-teacher shards of one teacher over this task's corpus."""
        return self.base / "embeddings" / self.task / teacher


def check_run_name(name: str | None, under: str) -> str:
    """``name`` when it is one folder name (under ``under``, for the message), else a
    one-line error."""
    if not name or "/" in name or os.sep in name or name in (".", ".."):
        raise UserError(f"bad run name '{name}': a folder name under {under}")
    return name


def baseline_dir(base: Path, method: str, teacher: str) -> Path:
    """A baseline built from a teacher (not per task), e.g. model2vec's static embeddings."""
    return base / "baselines" / method / teacher


def results_dir(base: Path, run: str) -> Path:
    """Evaluation outputs of one run, across tasks (a table's columns are tasks)."""
    return base / "results" / run


def looks_like_path(target: str) -> bool:
    """A folder rather than a hub id (``owner/name``) or an alias."""
    return target.startswith(("/", ".", "~")) or target.count("/") > 1
