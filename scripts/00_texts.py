"""Stage 0: write text_train/<task>/train.json (original format) and eval.json (held out).

    python scripts/00_texts.py --task bbc-news
    python scripts/00_texts.py --task 14 --max-train 20000
    python scripts/00_texts.py --task my_data.csv --text-column sentence --label-column y
"""

import argparse

from embdistill.artifacts import skip_if_done
from embdistill.cli import fraction, log, positive_int, run_main, setup_logging, stage_parser
from embdistill.paths import Paths, base_dir
from embdistill.tasks import CONFLICTING_LABELS, resolve_task
from embdistill.texts import write_texts


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--test-fraction", type=fraction, default=0.2,
                        help="share held out for evaluation when the task has no test split")
    parser.add_argument("--max-train", type=positive_int, default=None, help="cap on training texts")
    parser.add_argument("--max-test", type=positive_int, default=None, help="cap on held-out texts")
    parser.add_argument("--conflicting-labels", choices=CONFLICTING_LABELS, default=None,
                        help="a text given two labels: refuse the task (error; the default for a data "
                        "file), keep the text's first row (first; the default for tasks 1-16, bbc-news "
                        "and tweet-sentiment) or leave the text out (drop)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    task = resolve_task(args.task, args.text_column, args.label_column)
    paths = Paths(base_dir(args.base_dir), task.slug)
    config = {"task": task.name, "source": task.source, "instruction": task.instruction,
              "seed": args.seed, "test_fraction": args.test_fraction,
              "max_train": args.max_train, "max_test": args.max_test,
              "conflicting_labels": args.conflicting_labels or task.conflicting_labels}
    sources = {}
    if task.kind == "file":  # a user's file: its content and the columns read from it
        config |= {"text_column": args.text_column, "label_column": args.label_column}
        sources["data"] = task.source
    if skip_if_done(paths.eval_json, config=config, inputs={"train.json": paths.train_json, **sources},
                    overwrite=args.overwrite, what="texts"):
        return 0
    splits = task.load_splits(args.seed, args.test_fraction, args.max_train, args.max_test,
                              config["conflicting_labels"])
    counts = write_texts(task, paths, splits, config, sources)
    log.info("texts: %s -> %s (%d train, %d test)", task.name, paths.text_dir,
             counts["train"], counts["test"])
    return 0


if __name__ == "__main__":
    run_main(main)
