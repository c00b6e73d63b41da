"""Multi-teacher stage 1: every teacher's embeddings of the corpus, in fp16 shards.

    python scripts/10_teacher_embeddings.py --task bbc-news tweet-sentiment --teachers minilm lsa
    torchrun --nproc_per_node 2 scripts/10_teacher_embeddings.py --task bbc-news --shard-size 500
    python scripts/10_teacher_embeddings.py --corpus hub:<dataset id> --teachers BAAI/bge-small-en-v1.5

Writes embeddings/<corpus>/corpus.json and, per teacher, embeddings/<corpus>/<teacher>/
shard-<i>.npy (+ .ids.npy, manifests) and index.json; the LSA teacher's model goes to
embeddings/<corpus>/lsa/model/ (and sentence-transformer/, for evaluation). Finished shards
are kept: a rerun, with any number of processes, encodes only what is missing.
"""

import argparse

import torch

from embdistill.artifacts import fingerprint, is_done
from embdistill.cli import finite_float, log, positive_int, run_main, setup_logging, stage_parser
from embdistill.distributed import barrier, cleanup, default_device, init_distributed
from embdistill.multiteacher.corpus import (add_corpus_args, build_corpus, corpus_file, corpus_name,
                                            read_corpus, write_corpus)
from embdistill.multiteacher.lsa import LSA_TEACHER, LsaModel, lsa_dirs, prepare_lsa
from embdistill.multiteacher.shards import (finish_teacher, reset_teacher, shards_config,
                                            write_teacher_shards)
from embdistill.paths import Paths, base_dir, slug


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.splitlines()[0], task=False)
    add_corpus_args(parser)
    parser.add_argument("--teachers", nargs="+", default=["minilm", LSA_TEACHER],
                        help="'minilm', 'lsa' (TF-IDF + SVD fitted on the corpus), or any encoder's "
                        "hub id or folder")
    parser.add_argument("--shard-size", type=int, default=100_000, help="texts per shard")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per teacher forward pass")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="token limit per text (cut to the teacher's own limit)")
    parser.add_argument("--lsa-dim", type=int, default=256, help="LSA teacher: SVD components")
    parser.add_argument("--lsa-min-df", type=int, default=2, help="LSA teacher: least documents per term")
    parser.add_argument("--lsa-max-features", type=int, default=30_000, help="LSA teacher: vocabulary cap")
    parser.add_argument("--dist-timeout", type=finite_float, default=3600.0,
                        help="seconds the other ranks wait while rank 0 builds the corpus and fits LSA")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.log_level)

    env = init_distributed(timeout_s=args.dist_timeout)
    base = base_dir(args.base_dir)
    paths = Paths(base, corpus_name(args))
    teachers = list(dict.fromkeys(args.teachers))
    if env.is_main:
        prepare(args, base, paths, teachers)
    barrier()
    texts = read_corpus(paths)

    for name in teachers:
        folder = paths.embeddings_dir(slug(name))
        config = teacher_config(name, folder, args)
        if is_done(folder / "index.json", config=shards_config(config, texts, args.shard_size)):
            log.info("teacher %s: %s is up to date, skipping", name, folder)
            continue
        written = write_teacher_shards(load_encoder(name, folder), texts, folder, teacher_config=config,
                                       shard_size=args.shard_size, batch_size=args.batch_size,
                                       max_length=args.max_length, env=env)
        complete = finish_teacher(folder, texts, teacher_config=config, shard_size=args.shard_size)
        # The last rank to finish writes index.json; the others need not wait for it.
        print(f"teacher {name}: rank {env.rank} wrote {len(written)} shards to {folder}; "
              + ("all shards in, index.json written" if complete else "other ranks still writing"),
              flush=True)
    cleanup()
    return 0


def prepare(args, base, paths: Paths, teachers: list[str]) -> None:
    """Rank 0, before the others start: the corpus, the LSA teacher, resets for --overwrite."""
    texts, config, inputs = build_corpus(args, base)
    if args.overwrite or not is_done(corpus_file(paths), config=config, inputs=inputs):
        write_corpus(paths, texts, config, inputs)
    log.info("corpus %s: %d texts", paths.task, len(texts))
    for name in teachers:
        folder = paths.embeddings_dir(slug(name))
        if args.overwrite:
            reset_teacher(folder)
        if name == LSA_TEACHER:
            prepare_lsa(folder, texts, corpus_file(paths), dim=args.lsa_dim, min_df=args.lsa_min_df,
                        max_features=args.lsa_max_features, seed=args.seed, overwrite=args.overwrite)


def teacher_config(name: str, folder, args) -> dict:
    """What makes a teacher's vectors what they are: shards made otherwise are redone."""
    if name == LSA_TEACHER:
        return {"teacher": LSA_TEACHER, "model": fingerprint(lsa_dirs(folder)[0])}
    return {"teacher": slug(name), "source": name, "max_length": args.max_length}


def load_encoder(name: str, folder):
    if name == LSA_TEACHER:
        return LsaModel.load(lsa_dirs(folder)[0])
    from embdistill.teachers import load_teacher

    device = default_device()
    # fp16 on GPU, as the paper encodes; the CPU keeps fp32 (fp16 matmuls are slow there)
    return load_teacher(name, device=device, dtype=torch.float16 if device.type == "cuda" else None)


if __name__ == "__main__":
    run_main(main)
