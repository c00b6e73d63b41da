"""The multi-teacher corpus: the texts every teacher encodes and the student learns from.

Two sources (``--corpus``):

* ``tasks`` (default): the training texts of the ``--task`` arguments (local tasks, hub
  tasks or user files), read from stage 0's ``train.json`` with the instruction removed:
  a task-agnostic student learns from plain texts. The corpus is named after its tasks
  (``bbc-news+tweet-sentiment``).
* ``hub:<dataset id>``: a dataset read with ``datasets.load_dataset`` (the paper used
  about 3.6M texts flattened from MEDI/MTEB triplets). Every string cell of the chosen
  columns is a text; a cell holding a list of strings gives each of them.

Texts are stripped and each is kept once, in first-seen order. The corpus is written once,
as ``embeddings/<corpus>/corpus.json`` (with a manifest), so that every teacher and the
student read the very same texts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..artifacts import load_json, save_json, write_manifest
from ..cli import positive_int
from ..errors import UserError, first_line
from ..paths import Paths, slug
from ..tasks import resolve_task
from ..texts import read_train_texts, texts_only

log = logging.getLogger("embdistill.multiteacher.corpus")

HUB_PREFIX = "hub:"


def add_corpus_args(parser: argparse.ArgumentParser, *, building: bool = True) -> None:
    """The options that name a corpus (the teacher and training stages) and, with
    ``building``, those that choose its texts (the teacher stage, which writes it)."""
    parser.add_argument("--task", nargs="+", default=["bbc-news"],
                        help="tasks whose training texts form the corpus (index 1-16, a name such as "
                        "bbc-news or tweet-sentiment, or a .jsonl/.csv file; run scripts/00_texts.py "
                        "for each first)")
    parser.add_argument("--text-column", default="text", help="text column of a user file")
    parser.add_argument("--label-column", default="label", help="label column of a user file")
    parser.add_argument("--corpus", default="tasks",
                        help="'tasks' (the tasks' training texts) or hub:<dataset id> "
                        "(e.g. a MEDI-style triplet dataset; needs the hub)")
    if not building:
        return
    parser.add_argument("--corpus-columns", nargs="*", default=None,
                        help="hub corpus: the columns holding texts (default: every text column)")
    parser.add_argument("--corpus-split", default="train", help="hub corpus: the split to read")
    parser.add_argument("--max-texts", type=positive_int, default=None,
                        help="keep only the first N distinct texts of the corpus")


def corpus_name(args: argparse.Namespace) -> str:
    """The corpus's folder name under embeddings/ and runs/."""
    if args.corpus == "tasks":
        return "+".join(resolve_task(t, args.text_column, args.label_column).slug for t in args.task)
    if args.corpus.startswith(HUB_PREFIX) and args.corpus[len(HUB_PREFIX):]:
        return slug(args.corpus[len(HUB_PREFIX):])
    raise UserError(f"--corpus must be 'tasks' or hub:<dataset id>, got '{args.corpus}'")




def unique_texts(texts) -> list[str]:
    """Stripped, non-empty, each once, in first-seen order."""
    return list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))


def build_corpus(args: argparse.Namespace, base: Path) -> tuple[list[str], dict, dict]:
    """(texts, config, input files) of the corpus the arguments name."""
    config = {"corpus": args.corpus, "max_texts": args.max_texts}
    inputs = {}
    if args.corpus == "tasks":
        texts = []
        for arg in args.task:
            task = resolve_task(arg, args.text_column, args.label_column)
            paths = Paths(base, task.slug)
            texts += texts_only(read_train_texts(paths))
            inputs[f"{task.slug}/train.json"] = paths.train_json
        config["tasks"] = list(args.task)
    else:
        texts = hub_texts(args.corpus[len(HUB_PREFIX):], args.corpus_split, args.corpus_columns)
        config.update(split=args.corpus_split, columns=args.corpus_columns)
    texts = unique_texts(texts)[: args.max_texts]
    if not texts:
        raise UserError(f"corpus {args.corpus}: no texts")
    return texts, config, inputs


def hub_texts(dataset_id: str, split: str, columns: list[str] | None) -> list[str]:
    """The flattened text cells of a dataset (module docstring); UserError when unreachable."""
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # offline, unknown id, missing split, auth: all one line
        reason = first_line(exc, 200)
        raise UserError(f"could not load corpus dataset '{dataset_id}' (split {split}) with the "
                        f"datasets library; is the Hugging Face hub reachable? {reason}") from None
    available = list(dataset.column_names)
    if columns:
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise UserError(f"corpus {dataset_id}: no column(s) {', '.join(unknown)} "
                            f"(columns: {', '.join(available)})")
    else:
        columns = available
    texts = []
    for column in columns:
        for cell in dataset[column]:
            if isinstance(cell, str):
                texts.append(cell)
            elif isinstance(cell, (list, tuple)):
                texts += [item for item in cell if isinstance(item, str)]
    log.info("corpus %s: %d text cells from columns %s", dataset_id, len(texts), ", ".join(columns))
    return texts


def write_corpus(paths: Paths, texts: list[str], config: dict, inputs: dict) -> None:
    save_json(texts, paths.corpus_file)
    write_manifest(paths.corpus_file, stage="corpus", config=config, inputs=inputs)


def read_corpus(paths: Paths) -> list[str]:
    path = paths.corpus_file
    if not path.is_file():
        raise UserError(f"missing {path}: run scripts/10_teacher_embeddings.py for this corpus first")
    texts = load_json(path)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{path}: expected a non-empty JSON list of texts")
    return texts
