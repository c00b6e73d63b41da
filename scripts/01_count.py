"""Stage 1: count the text tokens of train.json (work/<task>/<teacher>/counts.pkl).

    python scripts/01_count.py --task bbc-news
    python scripts/01_count.py --task 14 --teacher llm2vec-llama3-8b --max-length 512
"""

import argparse

from embdistill.artifacts import save_pickle, skip_if_done, write_manifest
from embdistill.cli import positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import print0
from embdistill.input_format import effective_max_length
from embdistill.paths import Paths, base_dir, slug
from embdistill.senses.gather import count_config, count_tokens
from embdistill.tasks import resolve_task
from embdistill.teachers import load_tokenizer
from embdistill.texts import read_train_texts


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__)
    parser.add_argument("--teacher", default="minilm", help="teacher alias, folder or hub id (its tokenizer counts)")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="tokens per text, longer texts are cut (at most to the teacher's own limit, "
                        "which is what is recorded); the same as 02_gather.py's")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    task = resolve_task(args.task, args.text_column, args.label_column)
    paths = Paths(base_dir(args.base_dir), task.slug, slug(args.teacher))
    tokenizer = load_tokenizer(args.teacher)
    max_length = effective_max_length(args.max_length, tokenizer.max_seq_length)
    config = count_config(args.teacher, max_length, tokenizer.input_format.name)
    inputs = {"texts": paths.train_json}
    if skip_if_done(paths.counts, config=config, inputs=inputs, overwrite=args.overwrite, what="count"):
        return 0
    texts = read_train_texts(paths)
    counts = count_tokens(tokenizer.tokenize, texts, max_length)
    save_pickle(counts, paths.counts)
    write_manifest(paths.counts, stage="count", config=config, inputs=inputs)
    print0(f"count: {task.name}: {len(texts)} texts, {sum(counts.values())} text tokens, "
           f"{len(counts)} token ids -> {paths.counts}")
    return 0


if __name__ == "__main__":
    run_main(main)
