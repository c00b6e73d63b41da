"""Multi-teacher stage 1: every teacher's embeddings of the corpus, in fp16 shards.

    python scripts/10_teacher_embeddings.py --task bbc-news tweet-sentiment --teachers minilm lsa
    torchrun --nproc_per_node 2 scripts/10_teacher_embeddings.py --task bbc-news --shard-size 500
    python scripts/10_teacher_embeddings.py --corpus hub:<dataset id> --teachers BAAI/bge-small-en-v1.5

Writes embeddings/<corpus>/corpus.json and, per teacher, embeddings/<corpus>/<teacher>/
shard-<i>.npy (+ .ids.npy, manifests) and index.json; the LSA teacher's model goes to
embeddings/<corpus>/lsa/model/ (and sentence-transformer/, for evaluation). Encoder teachers
embed the plain texts with SentenceTransformer(teacher).encode, the pipeline the evaluation's
st:<teacher> row loads. Finished shards are kept: a rerun, with any number of processes,
encodes only what is missing (shards made with another pipeline or length limit are redone).
"""

import argparse

from embdistill.cli import positive_float, positive_int, run_main, setup_logging, stage_parser
from embdistill.multiteacher.corpus import add_corpus_args
from embdistill.multiteacher.lsa import LSA_TEACHER
from embdistill.multiteacher.teacher_embeddings import build_teacher_embeddings


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(__doc__.splitlines()[0], task=False)
    add_corpus_args(parser)
    parser.add_argument("--teachers", nargs="+", default=["minilm", LSA_TEACHER],
                        help="'minilm', 'lsa' (TF-IDF + SVD fitted on the corpus), or any sentence-transformers "
                        "hub id or folder; each encodes through its own pipeline (SentenceTransformer.encode: its "
                        "pooling, Dense layers, normalisation)")
    parser.add_argument("--shard-size", type=positive_int, default=100_000, help="texts per shard")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="texts per teacher forward pass")
    parser.add_argument("--max-length", type=positive_int, default=512,
                        help="token limit per text, where the teacher's own max_seq_length is longer (the limit "
                        "in force is recorded in the shards' manifests)")
    parser.add_argument("--lsa-dim", type=positive_int, default=256, help="LSA teacher: SVD components")
    parser.add_argument("--lsa-min-df", type=positive_int, default=2, help="LSA teacher: least documents per term")
    parser.add_argument("--lsa-max-features", type=positive_int, default=30_000, help="LSA teacher: vocabulary cap")
    parser.add_argument("--dist-timeout", type=positive_float, default=3600.0,
                        help="seconds the other ranks wait while rank 0 builds the corpus and fits LSA")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    build_teacher_embeddings(args)
    return 0


if __name__ == "__main__":
    run_main(main)
