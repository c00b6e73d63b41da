"""The sense dictionary: ``{token_id: (k, d) sense vectors}``, its summary and its plot.

On disk (``sense_dict/<task>/<teacher>.kmeanspkl``) it is a pickle of
``dict[int -> np.ndarray (k, d) float16]`` (``float32`` on request), or, with ``bfloat16``,
``dict[int -> torch.Tensor (k, d) bfloat16]`` as the original wrote it; the manifest beside it
holds teacher, dtype, k rule, backend, seed and the sense rule (``config``; the rule that picks
a token's sense, :mod:`.packed`: not in the pickle, so that the original's format is kept, and
none recorded means ``dot``), the input's fingerprint and hidden size and counts (``extra``).
Beside
them: ``<teacher>.summary.txt`` (counts, a histogram of senses per token, time) and
``<teacher>.senses.png`` (senses per token against samples per token).

:class:`SenseDictionary` is the file with its manifest, read once and passed on (its sense rule,
teacher, identity, checks); its :meth:`~SenseDictionary.load` reads ours and the original's files
and returns NumPy arrays (float16 or float32 as stored; bf16 tensors become float32, which holds
them exactly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..artifacts import atomic_open, fingerprint, load_pickle, read_manifest, save_pickle, write_manifest
from ..errors import UserError
from ..input_format import MaxLength, effective_max_length
from .packed import DEFAULT_SENSE_RULE, PackedSenses, check_sense_rule

log = logging.getLogger("embdistill.dictionary")

SENSE_DTYPES = ("float16", "float32", "bfloat16")
HISTOGRAM_BINS = ((1, 1), (2, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, 199), (200, 499),
                  (500, None))


def summary_path(dict_path: str | Path) -> Path:
    return Path(dict_path).with_suffix(".summary.txt")


def plot_path(dict_path: str | Path) -> Path:
    return Path(dict_path).with_suffix(".senses.png")


def _stored(senses: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(senses, dtype=np.float32)).to(torch.bfloat16)
    return np.ascontiguousarray(senses, dtype=dtype)


def save_sense_dict(senses: Mapping[int, np.ndarray], path: str | Path, *, dtype: str = "float16",
                    config: Mapping, inputs: Mapping[str, str | Path], extra: Mapping) -> None:
    """Write the dictionary (atomically) in ``dtype``, then its manifest."""
    if dtype not in SENSE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(SENSE_DTYPES)}, got '{dtype}'")
    stored = {int(t): _stored(v, dtype) for t, v in sorted(senses.items())}
    if dtype == "float16" and not all(np.isfinite(v).all() for v in stored.values()):
        raise UserError("sense vectors overflow float16; rerun with --dtype float32 or bfloat16")
    save_pickle(stored, path)
    write_manifest(path, stage="cluster", config=config, inputs=inputs, extra=extra)


def _as_array(value) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return value if isinstance(value, np.ndarray) else None


def load_sense_dict(path: str | Path, hidden_size: int | None = None,
                    teacher: str | None = None) -> dict[int, np.ndarray]:
    """:meth:`SenseDictionary.load` of the dictionary at ``path``."""
    return SenseDictionary.open(path).load(hidden_size=hidden_size, teacher=teacher)


@dataclass(frozen=True)
class SenseDictionary:
    """A sense dictionary file with its manifest, read once (:meth:`open`) and passed on: what
    depends on how it was made (its teacher, k rule, sense rule, the max length and input format
    its states were gathered with) is read from ``manifest``, never again from the path. The
    original's files have no manifest (``{}``): no teacher, the ``dot`` rule."""

    path: Path
    manifest: Mapping = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "SenseDictionary":
        return cls(Path(path), read_manifest(path) or {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra") or {}

    @property
    def sense_rule(self) -> str:
        """The sense rule the manifest records; ``dot`` when it records none (the original's
        files, ours from before the rule was an option). Whatever depends on the chosen senses
        (targets, training, replace-mode results) must name this rule in its identity: the
        pickle, and so its fingerprint, is the same for every rule."""
        recorded = self.config.get("sense_rule")
        if recorded is None:
            return DEFAULT_SENSE_RULE
        try:
            return check_sense_rule(recorded)
        except UserError as exc:
            raise UserError(f"{self.path}: its manifest has an {exc}") from None

    @property
    def identity(self) -> dict:
        """What identifies the dictionary for whatever depends on it (targets, a student's
        export, replace-mode results): its pickle's sha256 and what its manifest records of how
        it was made (the cluster config: teacher, k rule, sense rule, seed, ...; the max length
        and input format its states were gathered with). Re-clustering with another sense rule
        writes the same pickle with another manifest: the bytes alone would not tell them apart.
        A dictionary without a manifest (the original's) is its bytes and the ``dot`` rule."""
        return {**self.config, "sense_rule": self.sense_rule,
                **{key: self.extra[key] for key in ("max_length", "input_format") if key in self.extra},
                "sha256": fingerprint(self.path)}

    def check_teacher(self, teacher: str) -> None:
        """UserError when the manifest names another teacher than ``teacher`` (a teacher slug,
        as ``Teacher.slug``): a teacher of the same hidden size would pass every other check and
        give silently wrong targets. The original's files (no manifest) name no teacher and pass."""
        recorded = self.config.get("teacher")
        if recorded is not None and recorded != teacher:
            raise UserError(f"{self.path} was built with teacher '{recorded}', not '{teacher}': use a dictionary "
                            f"of '{teacher}', or pass --allow-teacher-mismatch if both name the same model")

    def check_learned(self, learned: dict | str, sense_rule: str | None, student: str) -> None:
        """UserError (one line) when this is not the dictionary ``student`` learned: ``learned``
        is the :attr:`identity` its export manifest records (exports from before it was recorded
        hold the pickle's sha256 and, apart, ``sense_rule``). Only what the record holds is
        compared."""
        if isinstance(learned, str):
            learned = {"sha256": learned, **({"sense_rule": sense_rule} if sense_rule else {})}
        current = self.identity
        differences = [f"{key} {_short(current.get(key))} (learned: {_short(value)})"
                       for key, value in learned.items() if current.get(key) != value]
        if differences:
            raise UserError(f"{self.path} is not the dictionary {student} learned: {'; '.join(differences)}; use "
                            "that dictionary, retrain the student, or pass --allow-dictionary-mismatch")

    def load(self, hidden_size: int | None = None, teacher: str | None = None) -> dict[int, np.ndarray]:
        """The vectors (ours or the original's file); UserError if it is not a dictionary, if
        its vectors are not ``hidden_size``-d, or if its manifest names another ``teacher``."""
        path = self.path
        if teacher is not None:
            self.check_teacher(teacher)
        raw = load_pickle(path)
        if not isinstance(raw, dict) or not raw:
            raise UserError(f"{path}: expected a non-empty dict token_id -> (k, d) sense vectors")
        senses: dict[int, np.ndarray] = {}
        for token, value in raw.items():
            array = _as_array(value)
            if not isinstance(token, (int, np.integer)) or array is None or array.ndim != 2 or not len(array):
                raise UserError(f"{path}: expected a dict token_id -> (k, d) sense vectors; entry {token!r} is not")
            if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
                raise UserError(f"{path}: the senses of token {token} are not finite floats")
            senses[int(token)] = array
        widths = {a.shape[1] for a in senses.values()}
        if len(widths) > 1:
            raise UserError(f"{path}: sense vectors of several widths {sorted(widths)}")
        width = widths.pop()
        recorded = self.extra.get("hidden_size")
        if recorded is not None and recorded != width:
            raise UserError(f"{path}: vectors are {width}-d, its manifest says {recorded}; the file was replaced")
        if hidden_size is not None and width != hidden_size:
            raise UserError(f"{path}: sense vectors are {width}-d but the model's hidden size is "
                            f"{hidden_size}; was the dictionary built with another teacher?")
        return senses

    def packed(self, vocab_size: int, *, hidden_size: int | None = None,
               teacher: str | None = None) -> PackedSenses:
        """:meth:`load` packed for lookup, with the dictionary's own sense rule."""
        return PackedSenses(self.load(hidden_size=hidden_size, teacher=teacher), vocab_size, rule=self.sense_rule)

    def check_gathered_with(self, max_length: MaxLength, input_format: str,
                            allow_max_length_mismatch: bool = False) -> None:
        """Refuse (one line) a dictionary whose states were gathered with another input format,
        or another max length unless ``allow_max_length_mismatch``: with a bidirectional teacher
        every token state depends on the whole input, so centroids of other contexts are not the
        senses of these. The lengths compared are those used (``max_length.used``, cut to the
        model's limit): on MiniLM (256) --max-length 512 and 300 are the same. A dictionary that
        does not record them (the original's) is used with a warning."""
        gathered_length, gathered_format = self.extra.get("max_length"), self.extra.get("input_format")
        used = max_length.used
        if gathered_length is None or gathered_format is None:
            log.warning("%s does not record the max length and input format its states were gathered "
                        "with; make sure they were %d and %s", self.path, used, input_format)
        if gathered_format is not None and gathered_format != input_format:
            raise UserError(f"{self.path} was gathered with input format {gathered_format}, the teacher now "
                            f"reads {input_format}; rebuild the dictionary (run_gather_sense.sh, run_sep_cluster.sh)")
        if gathered_length is None or allow_max_length_mismatch:
            return
        # Dictionaries gathered before the length used was recorded hold the --max-length asked
        # for (512 for MiniLM, which read 256): cut to the limit too, they compare as what their
        # gather used, since the limit is their teacher's (check_teacher) or that of a student
        # of it, trained at most at that length. A recorded length used is within the limit
        # already, and the cut leaves it as it is.
        gathered = effective_max_length(gathered_length, max_length.limit)
        if gathered != used:
            cut = (f" (--max-length {max_length.requested} cut to the model's {max_length.limit})"
                   if used < max_length.requested else "")
            raise UserError(f"{self.path} was gathered with --max-length {gathered}, not {used}{cut}; "
                            f"use --max-length {gathered}, or --allow-max-length-mismatch")


def _short(value):
    return value[:12] if isinstance(value, str) and len(value) == 64 else value  # a sha256


# ------------------------------------------------------------------------------ report


def senses_histogram(senses_per_token: list[int]) -> list[tuple[str, int]]:
    """(bin label, tokens) over :data:`HISTOGRAM_BINS`."""
    counts = np.asarray(senses_per_token)
    rows = []
    for low, high in HISTOGRAM_BINS:
        inside = (counts >= low) & (counts <= high) if high is not None else counts >= low
        label = str(low) if low == high else f"{low}-{high}" if high is not None else f"{low}+"
        rows.append((label, int(inside.sum())))
    return rows


def write_summary(path: str | Path, header: list[str], senses_per_token: list[int]) -> None:
    """The human-readable summary: ``header`` lines, then the histogram of senses per token."""
    histogram = senses_histogram(senses_per_token)
    widest = max(count for _, count in histogram) or 1
    lines = [*header, "senses per token (tokens):"]
    lines += [f"  {label:>8} {count:>8}  {'#' * round(40 * count / widest)}" for label, count in histogram]
    with atomic_open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot_senses(path: str | Path, samples: list[int], senses: list[int], title: str) -> None:
    """Senses per token against samples per token (log x), one dot per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(samples, senses, s=4, alpha=0.4, linewidths=0)
    ax.set_xscale("log")
    if max(senses) > 20 * min(senses):
        ax.set_yscale("log")
    ax.set_xlabel("samples per token (token frequency, capped by the gather)")
    ax.set_ylabel("senses per token")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
