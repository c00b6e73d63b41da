"""Combine gathered states of ranks and tasks into one dict per token, each capped (combined.pkl).

    python a0_generate_combinepkl.py --task bbc-news          # its gather/ -> work/bbc-news/minilm/combined.pkl
    python a0_generate_combinepkl.py --task bbc-news tweet-sentiment   # a task set: the members' gather/
                                                              # -> work/bbc-news+tweet-sentiment/minilm/combined.pkl
    python a0_generate_combinepkl.py --inputs bbc-news tweet-sentiment --output work/two-tasks/combined.pkl
    python a0_generate_combinepkl.py --inputs old/rank0.pkl old/rank1.pkl --output combined.pkl

Inputs: rank<R>.pkl files, gather folders or task names (their gather folder under --base-dir),
each checked: non-negative token ids to finite float rows. The rows go to one array,
combined.rows.npy, and combined.tokens.npy says where each token's rows are; the cluster stage
maps them, so that each of its processes reads only its own tokens' rows. combined.pkl, the same
states in the original's format, is written from them unless --combined-pickle skips it. Host
memory holds a block of one token's rows at a time (4 MiB), not a rank file's states.
"""

import argparse
from pathlib import Path

from embdistill.artifacts import skip_if_done
from embdistill.cli import positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import print0
from embdistill.errors import UserError
from embdistill.paths import Paths, base_dir, slug
from embdistill.senses.combine import PICKLE_AUTO_BYTES, PICKLE_MODES, combine, done_markers, resolve_inputs
from embdistill.tasks import resolve_task, resolve_task_set


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.splitlines()[0], task_set=True)
    parser.add_argument("--inputs", nargs="+", default=None,
                        help="rank pkls, gather folders or task names (default: --task's gather folder)")
    parser.add_argument("--output", default=None, help="combined pickle (default: --task's combined.pkl; "
                        "required with --inputs)")
    parser.add_argument("--cap", type=positive_int, default=4000, help="most samples kept per token")
    parser.add_argument("--teacher", default="minilm", help="teacher whose gathers task names refer to")
    parser.add_argument("--combined-pickle", choices=PICKLE_MODES, default="auto",
                        help="write combined.pkl (the original's format) beside the row file: auto = "
                        f"when its rows take at most {PICKLE_AUTO_BYTES >> 30} GiB (its readers load it "
                        "whole); the cluster stage needs only the row file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    base, teacher = base_dir(args.base_dir), slug(args.teacher)

    def task_paths(name: str) -> Paths:
        return Paths(base, resolve_task(name, args.text_column, args.label_column).slug, teacher)

    if args.inputs and not args.output:
        raise UserError("--output is required with --inputs")
    task_set = resolve_task_set(args.task, args.text_column, args.label_column)
    output = Path(args.output) if args.output else Paths(base, task_set.slug, teacher).combined
    # Without --inputs, the gather folder of each task of --task (a task set's: every member's,
    # gathered once per task): the task argument itself may be a data file, which is no rank file.
    defaults = [Paths(base, task.slug, teacher).gather_dir for task in task_set.members]
    for task, default in zip(task_set.members, defaults) if not args.inputs else ():
        if not default.is_dir():
            raise UserError(f"task {task.name}: nothing gathered in {default}; run run_gather_sense.sh {task.slug}")
    groups = resolve_inputs(args.inputs or [str(default) for default in defaults],
                            lambda name: task_paths(name).gather_dir)
    files = [path for group in groups for path in group]
    config = {"inputs": [str(p) for p in files], "cap": args.cap, "seed": args.seed}
    inputs = {f"input{i}": path for i, path in enumerate(files)}
    if any(skip_if_done(marker, config=config, inputs=inputs, overwrite=args.overwrite, what="combine")
           for marker in done_markers(output, args.combined_pickle)):
        return 0
    meta = combine(groups, args.cap, args.seed, output, config, inputs, combined_pickle=args.combined_pickle)
    print0(f"combine: {len(groups)} gather(s), {len(files)} files -> {meta['token_ids']} token ids, "
           f"{meta['rows']} rows ({meta['capped']} capped at {args.cap}), {meta['hidden_size']}-d "
           f"{meta['dtype']} -> {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
