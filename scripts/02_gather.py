"""Stage 2: teacher states of sampled text tokens, one file per rank (work/<task>/<teacher>/gather/).

    python scripts/02_gather.py --task bbc-news
    torchrun --nproc_per_node 6 scripts/02_gather.py --task 14 --teacher llm2vec-llama3-8b --max-length 512

Ranks share nothing (each gathers its shard of texts), so no process group is set up; a
killed run resumes from its finished part files when started again with the same options.
"""

import argparse

from embdistill.artifacts import skip_if_done
from embdistill.cli import log, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import DEVICE_HELP, bind_device, dist_env, print0, resolve_device
from embdistill.input_format import effective_max_length
from embdistill.paths import Paths, base_dir, slug
from embdistill.senses.gather import OUT_DTYPES, GatherConfig, gather_shard, load_counts
from embdistill.tasks import resolve_task
from embdistill.teachers import load_teacher, load_tokenizer
from embdistill.texts import read_train_texts


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="minilm", help="teacher alias, folder or hub id")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="tokens per text, longer texts are cut (at most to the teacher's own limit, "
                        "which is what is recorded); the same as 01_count.py's")
    parser.add_argument("--per-token", type=positive_int, default=1000,
                        help="keep an occurrence when randint(0, count) < this: ~this many per token")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass")
    parser.add_argument("--dtype", default="float16", choices=sorted(OUT_DTYPES), help="stored states")
    parser.add_argument("--flush-every", type=positive_int, default=256,
                        help="texts per part file (bounds memory; a killed run resumes from parts)")
    parser.add_argument("--buffer-rows", type=positive_int, default=16384,
                        help="selected rows kept on the device before one copy to the CPU")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--teacher-dtype", default=None,
                        help="default: bfloat16 for decoders on GPU, else float32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    env = dist_env()
    task = resolve_task(args.task, args.text_column, args.label_column)
    paths = Paths(base_dir(args.base_dir), task.slug, slug(args.teacher))
    tokenizer = load_tokenizer(args.teacher)
    cfg = GatherConfig(args.teacher, effective_max_length(args.max_length, tokenizer.max_seq_length),
                       args.per_token, args.seed, args.dtype, tokenizer.input_format.name)
    rank_file = paths.gather_rank(env.rank)
    inputs = {"texts": paths.train_json, "counts": paths.counts}
    if skip_if_done(rank_file, config=cfg.rank_config(env), inputs=inputs,
                    overwrite=args.overwrite, what=f"gather rank {env.rank}"):
        return 0
    texts = read_train_texts(paths)
    counts = load_counts(paths.counts, cfg.max_length, tokenizer.max_seq_length)
    device = bind_device(resolve_device(args.device, env))  # this process's own GPU
    teacher = load_teacher(args.teacher, device=device, dtype=args.teacher_dtype)
    summary = gather_shard(teacher, texts, counts, rank_file, cfg, env, inputs=inputs,
                           batch_size=args.batch_size, flush_every=args.flush_every,
                           buffer_rows=args.buffer_rows, overwrite=args.overwrite)
    log.info("gather: %s", summary)
    print0(f"gather: {task.name} rank {env.rank}/{env.world_size}: {summary['texts']} texts "
           f"({summary['texts_resumed']} resumed) -> {summary['rows']} rows of {summary['token_ids']} "
           f"token ids, {summary['hidden_size']}-d {summary['dtype']}, {summary['seconds']} s -> {rank_file}")
    return 0


if __name__ == "__main__":
    run_main(main)
